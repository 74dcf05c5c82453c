//! `bookstore demo`: the seed scenario end to end, every stage checked; exit 0 only if all pass.

use std::time::Duration;

use anyhow::{Result, bail};
use bookstore::cli::DemoArgs;
use bookstore::config::{KafkaConfig, StoreConfig};
use bookstore::demo::run_scenario;
use bookstore::projection::default_group;
use bookstore::shutdown::{Shutdown, ShutdownTrigger};

/// How long a stage has, once interrupted, to stop the relay or projector it runs.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub async fn run(
    store: &StoreConfig,
    kafka: &KafkaConfig,
    args: DemoArgs,
    (_trigger, interrupt): (ShutdownTrigger, Shutdown),
) -> Result<()> {
    let Some(store) = crate::unless_stopped(&interrupt, crate::open_store(store)).await? else {
        bail!("interrupted");
    };
    let group = args
        .group
        .unwrap_or_else(|| default_group(&kafka.topic_prefix));
    let scenario = run_scenario(store, kafka, &args.relay, &group, &interrupt, |stage| {
        eprintln!("… {stage}")
    });
    // The stages that run a relay or a projector stop them on the interrupt; the others
    // (provisioning, reading the topics back) would go on for up to their timeouts.
    let mut stopping = interrupt.clone();
    let report = tokio::select! {
        report = scenario => report?,
        () = async {
            stopping.wait().await;
            tokio::time::sleep(STOP_GRACE).await;
        } => bail!("interrupted"),
    };
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
