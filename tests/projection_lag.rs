//! The projection lag, measured from where the projection resumes: the offsets the read model
//! stored against each partition's end on the real broker. No projector needs to run for it,
//! and no member's state goes into it.
//!
//! The behaviours that read the stored offsets run once per read-model adapter
//! (`sqlite::<behaviour>`, `postgres::<behaviour>`); the ones about the Kafka side of the
//! measurement and the gauge run on SQLite only. See `tests/common` for where the broker and
//! PostgreSQL come from.

mod common;
#[path = "store_suite/fixtures.rs"]
mod fixtures;
#[path = "projection/world.rs"]
#[macro_use]
mod world;

use std::collections::BTreeMap;
use std::time::Duration;

use bookstore::config::RelaySettings;
use bookstore::projection::metrics::{LAG, LAG_MEASURED_AT};
use bookstore::projection::{LagError, LagMeter, OffsetAdvance, ProjectionLag, ReportStore};
use bookstore::relay::{DeliveryMode, RunMode, kafka_relay};
use bookstore::shutdown::Shutdown;
use metrics_exporter_prometheus::PrometheusBuilder;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use world::{Rng, World};

per_read_model!(
    without_a_projector_the_lag_is_every_record_of_each_partition,
    a_projector_that_caught_up_leaves_no_lag_past_the_transaction_markers,
    the_lag_counts_from_the_offsets_the_read_model_stored,
);

fn meter(world: &World, group: &str) -> LagMeter {
    LagMeter::new(&world.kafka, group).expect("lag meter")
}

async fn measure(world: &World, group: &str) -> ProjectionLag {
    meter(world, group)
        .measure(&world.store)
        .await
        .expect("measure the lag")
}

/// Publishes everything committed so far without transactions, so that every offset of the
/// fact topic holds a record (no transaction markers).
async fn relay_once_without_transactions(world: &World) {
    let settings = RelaySettings {
        delivery: DeliveryMode::AtLeastOnce,
        ..RelaySettings::default()
    };
    kafka_relay(world.store.clone(), &world.kafka, &settings)
        .await
        .expect("relay setup")
        .run(RunMode::Once, Shutdown::never())
        .await
        .expect("relay run");
}

/// The records of the fact topic per partition, as a `read_committed` reader gets them.
async fn records_per_partition(world: &World, expected: u64) -> BTreeMap<i32, u64> {
    let topic = world.kafka.topics().book_fact;
    let received = common::consume_committed(
        &world.kafka,
        &[&topic],
        usize::try_from(expected).unwrap(),
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    let mut counts = BTreeMap::new();
    for record in received {
        *counts.entry(record.partition).or_default() += 1;
    }
    counts
}

async fn without_a_projector_the_lag_is_every_record_of_each_partition(world: &World) {
    let history = world.write_random_history(12, 20, Rng::seed()).await;
    relay_once_without_transactions(world).await;
    let records = records_per_partition(world, history.fact_records()).await;

    let lag = measure(world, &common::unique("nobody-projects")).await;

    assert_eq!(lag.partitions.len(), 3, "{lag:?}");
    for partition in &lag.partitions {
        assert_eq!(partition.stored, None, "{lag:?}");
        assert_eq!(
            partition.records,
            records.get(&partition.partition).copied().unwrap_or(0),
            "partition {}: {lag:?}",
            partition.partition
        );
    }
    assert_eq!(lag.total(), history.fact_records());
}

async fn a_projector_that_caught_up_leaves_no_lag_past_the_transaction_markers(world: &World) {
    let history = world.write_random_history(12, 20, Rng::seed()).await;
    // The exactly-once relay: every transaction leaves a commit marker on each partition it
    // wrote, and the markers take offsets.
    world.relay_once().await;
    let group = common::unique("projected");

    let before = measure(world, &group).await;
    assert!(
        before.total() > history.fact_records(),
        "the commit markers count while behind: {before:?}"
    );
    for partition in &before.partitions {
        assert_eq!(
            partition.records,
            (partition.end - partition.beginning) as u64
        );
    }

    let report = world.project(&group).await;
    assert!(report.caught_up);
    let after = measure(world, &group).await;
    for partition in &after.partitions {
        assert_eq!(partition.records, 0, "{after:?}");
        if partition.end > partition.beginning {
            assert_eq!(partition.stored, Some(partition.end), "{after:?}");
        }
    }
}

async fn the_lag_counts_from_the_offsets_the_read_model_stored(world: &World) {
    world.write_random_history(12, 20, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("stored-by-hand");
    let topic = world.kafka.topics().book_fact;
    let before = measure(world, &group).await;
    let busiest = *before
        .partitions
        .iter()
        .max_by_key(|partition| partition.records)
        .unwrap();
    assert!(busiest.records > 1, "{before:?}");

    // As if a projector had applied one record of the partition and then stopped.
    let one_applied = OffsetAdvance::first(busiest.partition, busiest.beginning + 1);
    world
        .store
        .apply_batch(&group, &topic, &[], &[one_applied])
        .await
        .unwrap();
    let after_one = measure(world, &group).await;
    for partition in &after_one.partitions {
        let expected = if partition.partition == busiest.partition {
            busiest.records - 1
        } else {
            before.of(partition.partition).unwrap()
        };
        assert_eq!(partition.records, expected, "{after_one:?}");
    }

    // Forgetting the stored offsets (what `--rebuild` does) brings the whole topic back.
    world.store.reset().await.unwrap();
    assert_eq!(measure(world, &group).await, before);
}

/// The end is where a `read_committed` consumer can read up to: records of a transaction still
/// open are not lag yet; once it commits, they are, with its commit marker.
#[tokio::test]
async fn records_of_an_open_transaction_are_lag_only_once_committed() {
    let world = World::sqlite().await;
    world.write_random_history(3, 0, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("open-transaction");
    let meter = meter(&world, &group);
    let before = meter.measure(&world.store).await.unwrap();

    let producer: FutureProducer = world
        .kafka
        .relay_producer_config(Some(&common::unique("another-producer")))
        .create()
        .unwrap();
    let (initialiser, timeout) = (producer.clone(), world.kafka.request_timeout());
    tokio::task::spawn_blocking(move || initialiser.init_transactions(timeout))
        .await
        .unwrap()
        .unwrap();
    producer.begin_transaction().unwrap();
    let topic = world.kafka.topics().book_fact;
    const OPEN: u64 = 4;
    for index in 0..OPEN {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("not-a-book")
                    .payload(&format!("open {index}")),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let while_open = meter.measure(&world.store).await.unwrap();
    assert_eq!(while_open, before, "uncommitted records counted as lag");

    let committer = producer.clone();
    tokio::task::spawn_blocking(move || committer.commit_transaction(timeout))
        .await
        .unwrap()
        .unwrap();
    // The coordinator writes the commit marker after it answered; the end moves then.
    let committed = before.of(0).unwrap() + OPEN + 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = meter.measure(&world.store).await.unwrap();
        if now.of(0) == Some(committed) {
            assert_eq!(now.of(1), before.of(1));
            assert_eq!(now.of(2), before.of(2));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partition 0 never showed {committed} records of lag: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    world.finish().await;
}

/// `refresh` sets `bookstore_projection_lag_records{partition}` of every partition to what it
/// measured. The recorder is local to this test's thread (a current-thread runtime runs the
/// whole test there), so tests running alongside record elsewhere.
#[tokio::test]
async fn refreshing_sets_the_gauge_of_every_partition() {
    let world = World::sqlite().await;
    world.write_random_history(12, 20, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("gauged");
    let topic = world.kafka.topics().book_fact;
    // One partition partly applied, so the gauges differ from the partitions' sizes.
    world
        .store
        .apply_batch(&group, &topic, &[], &[OffsetAdvance::first(1, 1)])
        .await
        .unwrap();
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);

    let before = unix_seconds();
    let lag = meter(&world, &group).refresh(&world.store).await.unwrap();
    let after = unix_seconds();

    let text = handle.render();
    let measured_at = metric(&text, LAG_MEASURED_AT).expect("the measurement's time");
    assert!(
        (before..=after).contains(&measured_at),
        "measured at {measured_at}, between {before} and {after}"
    );
    let gauges = lag_gauges(&text);
    let expected: BTreeMap<i32, f64> = lag
        .partitions
        .iter()
        .map(|partition| (partition.partition, partition.records as f64))
        .collect();
    assert_eq!(gauges, expected);
    assert!(lag.total() > 0, "{lag:?}");
    world.finish().await;
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The value of the unlabelled metric `name`, from the Prometheus text format.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

/// The lag gauge's value per `partition` label, from the Prometheus text format.
fn lag_gauges(text: &str) -> BTreeMap<i32, f64> {
    let prefix = format!("{LAG}{{partition=\"");
    text.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|rest| {
            let (partition, value) = rest.split_once("\"} ").expect("a gauge line");
            (partition.parse().unwrap(), value.parse().unwrap())
        })
        .collect()
}

/// No topic is no measurement: an error to warn about, never a lag of 0.
#[tokio::test]
async fn a_missing_topic_is_an_error_not_zero_lag() {
    let world = World::sqlite().await;
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);

    let outcome = meter(&world, &common::unique("no-topic"))
        .refresh(&world.store)
        .await;

    assert!(
        matches!(outcome, Err(LagError::TopicMissing { .. })),
        "{outcome:?}"
    );
    // Neither a lag nor a time of measurement: the last good ones stay, and their age shows.
    let text = handle.render();
    assert!(lag_gauges(&text).is_empty(), "{text}");
    assert_eq!(metric(&text, LAG_MEASURED_AT), None, "{text}");
    world.finish().await;
}
