//! `bookstore relay`: the outbox relay until Ctrl-C/SIGTERM, or `--once`.

use anyhow::{Context, Result, bail};
use bookstore::cli::RelayArgs;
use bookstore::config::{KafkaConfig, StoreConfig};
use bookstore::relay::{RunMode, kafka_relay};
use bookstore::shutdown::ShutdownTrigger;
use bookstore::store::AnyStore;

pub async fn run(store: &StoreConfig, kafka: &KafkaConfig, args: RelayArgs) -> Result<()> {
    if let Some(addr) = args.metrics_addr {
        bookstore::telemetry::install_metrics(addr)?;
    }
    let outbox = AnyStore::connect(&store.database_url)
        .await
        .with_context(|| format!("opening the store {}", store.database_url))?;
    let (trigger, mut shutdown) = ShutdownTrigger::new();
    trigger.on_signals();
    let mode = if args.once {
        RunMode::Once
    } else {
        RunMode::Follow
    };
    // A following relay is a service: it waits for a broker that is not up yet. `--once` is a
    // job and says at once that Kafka does not answer.
    if mode == RunMode::Follow && !kafka.wait_until_reachable(&mut shutdown).await? {
        return Ok(());
    }
    let relay = kafka_relay(outbox, kafka, &args.settings).await?;
    let report = relay.run(mode, shutdown).await?;
    if args.once && !report.finished {
        bail!(
            "stopped before publishing everything (published {} events, last position {}); \
             run it again to go on from there",
            report.published_events,
            report.last_position
        );
    }
    if args.once {
        println!(
            "published {} events in {} batches; last position {}",
            report.published_events, report.batches, report.last_position
        );
    }
    Ok(())
}
