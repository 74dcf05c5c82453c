//! What a running relay costs the writers: N closed-loop writers for a fixed time on a fresh
//! store with no relay, then on another fresh store while a relay (exactly-once, `Follow`, in
//! this process, as a deployment with the relay beside the service would run it) publishes
//! what they commit. The ratio of their commit rates is the relay's price for the write path;
//! the relay's lag at the end tells whether it kept up.

use tracing::info;

use super::stores::StoreFactory;
use super::timed_outbox::TimedOutbox;
use super::workload::{Workload, save_for};
use super::{BenchConfig, BenchError, BenchReport, Figure, KafkaRun, StoreKind, Unit};
use crate::config::RelaySettings;
use crate::relay::{DeliveryMode, RunMode, kafka_relay};
use crate::shutdown::ShutdownTrigger;
use crate::store::EventStore;

pub async fn measure(
    config: &BenchConfig,
    factory: &mut StoreFactory,
    kafka: &mut KafkaRun,
    kind: StoreKind,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let workload = Workload::new(config.updates_per_book);
    let alone = factory.fresh(kind).await?;
    let stopped = save_for(
        &alone.store,
        workload,
        config.writers,
        config.writer_duration,
    )
    .await?;
    drop(alone);

    let followed = factory.fresh(kind).await?;
    let outbox = TimedOutbox::new(followed.store.clone());
    let clock = outbox.clock();
    let settings = RelaySettings {
        delivery: DeliveryMode::ExactlyOnce,
        batch_size: config.batch_size,
        batch_linger_ms: config.batch_linger_ms,
        ..RelaySettings::default()
    };
    let relay = kafka_relay(outbox, &kafka.fresh(), &settings).await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let relay = kafka.spawn(relay.run(RunMode::Follow, shutdown));
    // Writers start once the relay is publishing, not while its producer initialises.
    clock.wait_for_first_read().await;
    let draining = save_for(
        &followed.store,
        workload,
        config.writers,
        config.writer_duration,
    )
    .await?;
    let head = followed.store.head_position().await?;
    trigger.trigger();
    let relayed = relay.await??;
    let lag = head.saturating_sub(relayed.last_position);
    info!(
        %kind,
        alone = stopped.saves_per_second(),
        with_relay = draining.saves_per_second(),
        lag,
        "writers measured (saves/s)"
    );

    let mut figure = Figure::new(
        format!("{kind}_writers_with_relay"),
        format!("{} writers' commits, relay following", config.writers),
        draining.saves_per_second(),
        Unit::SavesPerSecond,
    )
    .store(kind)
    .detail(format!(
        "{:.0} events/s; relay lag at end {lag} events, {} batches",
        draining.events_per_second(),
        relayed.batches
    ))
    .against(
        "same writers, relay stopped",
        stopped.saves_per_second(),
        Some(format!("{:.0} events/s", stopped.events_per_second())),
    )
    .extra("relay_lag_events", lag as f64)
    .extra("relay_batches", relayed.batches as f64)
    .extra(
        "events_per_batch",
        relayed.published_events as f64 / relayed.batches.max(1) as f64,
    );
    for (name, value) in super::timed_outbox::call_extras(&clock) {
        figure = figure.extra(&name, value);
    }
    report.push(figure);
    Ok(())
}
