//! `bookstore relay`: the outbox relay until Ctrl-C/SIGTERM, or `--once`.

use anyhow::{Result, bail};
use bookstore::cli::RelayArgs;
use bookstore::config::{KafkaConfig, StoreConfig};
use bookstore::relay::{RunMode, kafka_relay, metrics};
use bookstore::shutdown::{Shutdown, ShutdownTrigger};
use bookstore::store::AnyStore;

pub async fn run(
    store: &StoreConfig,
    kafka: &KafkaConfig,
    args: RelayArgs,
    (_trigger, mut shutdown): (ShutdownTrigger, Shutdown),
) -> Result<()> {
    if let Some(addr) = args.metrics_addr {
        bookstore::telemetry::install_metrics(addr)?;
    }
    let Some(outbox) = crate::unless_stopped(&shutdown, crate::open_store(store)).await? else {
        return crate::stopped_while_setting_up(args.once, "nothing was published");
    };
    if args.metrics_addr.is_some() {
        let relay_id = args
            .settings
            .relay_id
            .clone()
            .unwrap_or_else(|| format!("{}.relay", kafka.topic_prefix));
        tokio::spawn(refresh_progress_gauges(outbox.clone(), relay_id));
    }
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
    let relay = kafka_relay(outbox, kafka, &args.settings);
    let Some(relay) = crate::unless_stopped(&shutdown, relay).await? else {
        return crate::stopped_while_setting_up(args.once, "nothing was published");
    };
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

/// Keeps the backlog gauge true while the relay cannot publish (see
/// [`metrics::refresh_progress`]), for as long as the process runs.
pub async fn refresh_progress_gauges(outbox: AnyStore, relay_id: String) {
    loop {
        let refreshed = tokio::time::timeout(
            metrics::PROGRESS_REFRESH,
            metrics::refresh_progress(&outbox, &relay_id),
        )
        .await;
        match refreshed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not read the relay's progress"),
            Err(_) => tracing::warn!("the store did not say the relay's progress in time"),
        }
        tokio::time::sleep(metrics::PROGRESS_REFRESH).await;
    }
}
