//! `bookstore project`: the reporting projection until Ctrl-C/SIGTERM, or `--until-caught-up`.

use std::time::Duration;

use anyhow::{Result, bail};
use bookstore::cli::ProjectArgs;
use bookstore::config::{KafkaConfig, StoreConfig};
use bookstore::projection::metrics::LAG_REFRESH;
use bookstore::projection::{
    LagMeter, ProjectionMode, ProjectionStatus, default_group, kafka_projector,
};
use bookstore::shutdown::{Shutdown, ShutdownTrigger};
use bookstore::store::AnyStore;
use tokio::sync::watch;
use tracing::warn;

pub async fn run(
    store: &StoreConfig,
    kafka: &KafkaConfig,
    args: ProjectArgs,
    (_trigger, mut shutdown): (ShutdownTrigger, Shutdown),
) -> Result<()> {
    if let Some(addr) = args.metrics_addr {
        bookstore::telemetry::install_metrics(addr)?;
    }
    let is_job = args.until_caught_up || args.rebuild;
    let opened = crate::unless_stopped(&shutdown, crate::open_store(store)).await?;
    let Some(read_model) = opened else {
        return crate::stopped_while_setting_up(is_job, "nothing was applied");
    };
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| default_group(&kafka.topic_prefix));
    let config = args.projection_config(group);
    // Following, the projection is a service: it waits for a broker that is not up yet.
    // `--until-caught-up` and `--rebuild` are jobs and say at once that Kafka does not answer.
    if !is_job && !kafka.wait_until_reachable(&mut shutdown).await? {
        return Ok(());
    }
    let projector = kafka_projector(read_model.clone(), kafka, config);
    let Some(projector) = crate::unless_stopped(&shutdown, projector).await? else {
        return crate::stopped_while_setting_up(is_job, "nothing was applied");
    };
    if args.metrics_addr.is_some() {
        spawn_lag_gauge_refresh(read_model, kafka, projector.group())?;
    }
    if args.rebuild {
        // Checking the groups takes a request per group; the read model is then emptied in one
        // transaction, which a stop either comes before (nothing changed) or after.
        if crate::unless_stopped(&shutdown, projector.rebuild())
            .await?
            .is_none()
        {
            bail!(
                "interrupted while rebuilding: the read model is either as it was or emptied; \
                 run the rebuild again"
            );
        }
        eprintln!(
            "rebuilding: read model emptied; reading {} from the beginning",
            kafka.topics().book_fact
        );
    }
    let mode = if args.until_caught_up {
        ProjectionMode::UntilCaughtUp
    } else {
        ProjectionMode::Follow
    };
    let progress = args
        .until_caught_up
        .then(|| tokio::spawn(print_progress(projector.status())));
    let outcome = projector.run(mode, shutdown).await;
    if let Some(progress) = progress {
        progress.abort();
    }
    let report = outcome?;
    if args.until_caught_up && !report.caught_up {
        bail!(
            "stopped before catching up (applied {} facts in {} batches, {} sent to the \
             dead-letter queue); run it again to go on from there",
            report.applied_facts,
            report.batches,
            report.dead_letters
        );
    }
    if args.until_caught_up {
        println!(
            "caught up: applied {} facts in {} batches; {} sent to the dead-letter queue",
            report.applied_facts, report.batches, report.dead_letters
        );
    }
    Ok(())
}

/// A line on stderr every second while something moves.
async fn print_progress(status: watch::Receiver<ProjectionStatus>) {
    let mut shown = ProjectionStatus::default();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = status.borrow().clone();
        if now == shown {
            continue;
        }
        let (done, partitions) = now.caught_up.unwrap_or_default();
        let lag = now
            .lag
            .map_or("unknown yet".to_owned(), |lag| lag.to_string());
        eprintln!(
            "projecting: {} facts applied in {} batches, {} dead letters; {done}/{partitions} \
             partitions caught up; lag {lag}",
            now.applied_facts, now.batches, now.dead_letters
        );
        shown = now;
    }
}

/// Keeps `bookstore_projection_lag_records` true for as long as the process runs: measured from
/// the offsets the read model stored, every [`LAG_REFRESH`], whether the projector is healthy
/// or not (see [`LagMeter`]). Call it once the topics are provisioned (`kafka_projector` does
/// that), or the first measurement warns that the fact topic is missing.
pub fn spawn_lag_gauge_refresh(
    read_model: AnyStore,
    kafka: &KafkaConfig,
    group: &str,
) -> Result<()> {
    let mut kafka = kafka.clone();
    // A measurement that the timeout below gave up on must be over before the next one starts,
    // or a broker that does not answer would pile up blocking threads.
    kafka.request_timeout_ms = kafka
        .request_timeout_ms
        .min(u64::try_from(LAG_REFRESH.as_millis()).unwrap_or(u64::MAX));
    let meter = LagMeter::new(&kafka, group)?;
    let group = group.to_owned();
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(LAG_REFRESH, meter.refresh(&read_model)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => warn!(%error, %group, "could not measure the projection lag"),
                Err(_) => {
                    warn!(%group, timeout = ?LAG_REFRESH, "measuring the projection lag timed out")
                }
            }
            tokio::time::sleep(LAG_REFRESH).await;
        }
    });
    Ok(())
}
