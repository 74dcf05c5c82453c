//! `bookstore demo`: the seed scenario end to end, every stage checked; exit 0 only if all pass.

use anyhow::{Result, bail};
use bookstore::cli::DemoArgs;
use bookstore::config::{KafkaConfig, StoreConfig};
use bookstore::demo::run_scenario;
use bookstore::projection::default_group;
use bookstore::shutdown::ShutdownTrigger;

pub async fn run(store: &StoreConfig, kafka: &KafkaConfig, args: DemoArgs) -> Result<()> {
    let store = crate::open_store(store).await?;
    let group = args
        .group
        .unwrap_or_else(|| default_group(&kafka.topic_prefix));
    let (trigger, interrupt) = ShutdownTrigger::new();
    trigger.on_signals();
    let report = run_scenario(store, kafka, &args.relay, &group, &interrupt, |stage| {
        eprintln!("… {stage}")
    })
    .await?;
    println!("book {}", report.book_id);
    for check in &report.checks {
        let mark = if check.passed { "PASS" } else { "FAIL" };
        println!("{mark}  {}  ({})", check.claim, check.found);
    }
    let failed = report.checks.iter().filter(|check| !check.passed).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", report.checks.len());
    }
    println!("all {} checks passed", report.checks.len());
    Ok(())
}
