//! `bookstore bench`: throughput, latency and memory of the pipeline, each figure measured in
//! the same run as a raw-client baseline doing the same work, so a ratio says what this
//! crate's code costs on top of the clients it drives.
//!
//! ## What is measured, against what
//!
//! | measurement | figure | baseline (same run) |
//! | --- | --- | --- |
//! | relay drain ([`relay_drain`]) | events/s and MB/s of `Relay::run(Once)` over a backlog written before the clock starts | a raw `FutureProducer` sending the SAME records (`RecordMapper` over the same stored events, built before the clock starts) with the same settings: transactional, committing every `batch_size` events (exactly-once); idempotent `acks=all`, streaming (at-least-once) |
//! | exactly-once vs at-least-once | relay exactly-once events/s | relay at-least-once events/s |
//! | writers ([`writer_impact`]) | saves/s of N writers while a relay follows them | the same writers with no relay |
//! | projection ([`projection`]) | facts/s the projection applies to `BookReport` | a raw `read_committed` consumer reading the same topic |
//! | latency ([`latency`]) | commit → `read_committed` consumer (exactly once, at least once, and on SQLite with the relay in its own process), commit → report row, HDR p50/p99/p99.9 at a fixed offered load | targets only |
//! | store append ([`append`]) | events/s of `EventStore::save`, one writer and N | raw SQL doing the same inserts without the `outbox_head` reservation |
//! | backlog memory ([`backlog`]) | peak RSS (VmHWM) of a `bookstore relay --once` child draining a large backlog | target only |
//!
//! The run starts by warming the broker up (raw producers on throwaway topics, not measured):
//! a JVM broker serves its first thousands of transactions several times slower.
//! Every measurement runs on fresh stores ([`stores`]: a SQLite file in a temporary folder, a
//! PostgreSQL schema of its own) and fresh topics (a random prefix per run, deleted at the end).
//! Timed windows exclude setup: topics are provisioned, producers initialised and backlogs
//! written before the clock starts.
//!
//! Nothing here prints: [`run`] returns a [`BenchReport`], logs progress with `tracing`, and the
//! binary renders the report as a table or as one JSON object.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::AdminOptions;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::codec::CodecError;
use crate::config::KafkaConfig;
use crate::domain::DomainError;
use crate::kafka::{KafkaSetupError, Topics};
use crate::relay::{DeliveryMode, RelayError, RelaySetupError};
use crate::shutdown::Shutdown;
use crate::store::StoreError;

pub mod append;
pub mod backlog;
pub mod latency;
pub mod projection;
pub mod relay_drain;
pub mod report;
pub mod stores;
pub mod timed_outbox;
pub mod workload;
pub mod writer_impact;

pub use report::{Baseline, BenchReport, Figure, Target, Unit};
pub use stores::StoreKind;

/// What to measure and how much. Defaults finish in under five minutes on two cores.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The broker; the topic prefix is replaced by a fresh one per run.
    pub kafka: KafkaConfig,
    /// The stores to measure, in order; the first one gives the headline figures.
    pub stores: Vec<StoreKind>,
    /// PostgreSQL server; every run gets a fresh schema in it.
    pub postgres_url: String,
    /// Where SQLite files go (a fresh folder is made inside); default: the system temp folder.
    pub work_dir: Option<PathBuf>,
    /// Events in the backlog the relay and the raw producer drain.
    pub relay_events: u64,
    /// Relay batch size (one Kafka transaction in exactly-once mode).
    pub batch_size: usize,
    /// The exactly-once relay's pause after catching up (`--batch-linger-ms` of the relay).
    pub batch_linger_ms: u64,
    /// Repetitions of each drain (relay and baseline alike, back to back); the median of each is
    /// reported, and the median of the rounds' ratios as their ratio.
    pub rounds: usize,
    /// Events sent by the raw producers on throwaway topics before anything is measured, to
    /// warm the broker up; 0 skips it.
    pub broker_warm_up_events: u64,
    /// Concurrent writers for backlogs, the writer-impact runs and append ×N.
    pub writers: usize,
    /// Price updates after each book's addition (each change is a save of two events).
    pub updates_per_book: usize,
    /// How long writers run, with the relay and without it.
    pub writer_duration: Duration,
    /// Events appended per append variant.
    pub append_events: u64,
    /// Offered load of the latency runs, in events per second (two events per save).
    pub latency_events_per_second: u32,
    /// How long the offered load lasts.
    pub latency_duration: Duration,
    /// Events in the backlog whose drain's peak RSS is measured; 0 skips it.
    pub backlog_events: u64,
    /// The store the large backlog lives in.
    pub backlog_store: StoreKind,
    /// How the child relay draining it delivers: exactly-once (the default, which the memory
    /// target is about) or at-least-once, to profile that mode alone under `relay_wrapper`.
    pub backlog_delivery: DeliveryMode,
    /// The `bookstore` executable to run `relay --once` as a child (the binary passes itself).
    pub relay_program: Option<PathBuf>,
    /// A command the child relay runs under, e.g. `perf record -g -o relay.perf --`.
    pub relay_wrapper: Vec<String>,
    /// Which measurements to run.
    pub only: Vec<Measurement>,
}

/// The defaults of [`BenchConfig`] and of the `bookstore bench` flags: together they finish in
/// under five minutes on two cores.
pub mod defaults {
    pub const POSTGRES_URL: &str = "postgres://bookstore:bookstore@127.0.0.1:5432/bookstore_test";
    pub const RELAY_EVENTS: u64 = 20_000;
    pub const BATCH_SIZE: usize = 5_000;
    pub const BATCH_LINGER_MS: u64 = 0;
    pub const ROUNDS: usize = 9;
    pub const BROKER_WARM_UP_EVENTS: u64 = 20_000;
    pub const WRITERS: usize = 4;
    pub const UPDATES_PER_BOOK: usize = 4;
    pub const WRITER_SECONDS: f64 = 5.0;
    pub const APPEND_EVENTS: u64 = 4_000;
    pub const LATENCY_EVENTS_PER_SECOND: u32 = 1_000;
    pub const LATENCY_SECONDS: f64 = 10.0;
    pub const BACKLOG_EVENTS: u64 = 1_000_000;
}

impl BenchConfig {
    pub fn new(kafka: KafkaConfig) -> Self {
        Self {
            kafka,
            stores: vec![StoreKind::Sqlite, StoreKind::Postgres],
            postgres_url: defaults::POSTGRES_URL.into(),
            work_dir: None,
            relay_events: defaults::RELAY_EVENTS,
            batch_size: defaults::BATCH_SIZE,
            batch_linger_ms: defaults::BATCH_LINGER_MS,
            rounds: defaults::ROUNDS,
            broker_warm_up_events: defaults::BROKER_WARM_UP_EVENTS,
            writers: defaults::WRITERS,
            updates_per_book: defaults::UPDATES_PER_BOOK,
            writer_duration: Duration::from_secs_f64(defaults::WRITER_SECONDS),
            append_events: defaults::APPEND_EVENTS,
            latency_events_per_second: defaults::LATENCY_EVENTS_PER_SECOND,
            latency_duration: Duration::from_secs_f64(defaults::LATENCY_SECONDS),
            backlog_events: defaults::BACKLOG_EVENTS,
            backlog_store: StoreKind::Sqlite,
            backlog_delivery: DeliveryMode::ExactlyOnce,
            relay_program: None,
            relay_wrapper: vec![],
            only: vec![],
        }
    }

    fn runs(&self, measurement: Measurement) -> bool {
        self.only.is_empty() || self.only.contains(&measurement)
    }
}

/// The measurements, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Measurement {
    /// Relay drain vs raw producer, exactly-once and at-least-once.
    Relay,
    /// Writers with the relay following vs without.
    Writers,
    /// Projection vs raw consumer.
    Projection,
    /// Commit → ack and commit → report latency at a fixed load.
    Latency,
    /// Store append vs raw SQL.
    Append,
    /// Peak RSS of the relay draining a large backlog.
    Backlog,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    KafkaSetup(#[from] KafkaSetupError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("relay setup: {0}")]
    RelaySetup(#[from] RelaySetupError),
    #[error("relay: {0}")]
    Relay(#[from] RelayError),
    #[error("projection: {0}")]
    Projection(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("workload: {0}")]
    Domain(#[from] DomainError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("a benchmark task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The run did not reach the state it waits for (records missing, child failed, …).
    #[error("{0}")]
    Incomplete(String),
    #[error("invalid setting: {0}")]
    Setting(String),
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

/// Runs every selected measurement and returns the figures, or stops early when `shutdown`
/// is triggered ([`BenchError::Interrupted`]; the child relays are killed as their handles are
/// dropped, and the relays and projectors running as tasks are stopped and waited for). Either
/// way it leaves no stores, schemas or topics behind (best effort: a failed cleanup is logged).
pub async fn run(config: &BenchConfig, mut shutdown: Shutdown) -> Result<BenchReport, BenchError> {
    validate(config)?;
    let mut report = BenchReport::new(config);
    let mut kafka = KafkaRun::new(&config.kafka);
    let mut factory = stores::StoreFactory::new(config).await?;
    let outcome = tokio::select! {
        outcome = run_measurements(config, &mut report, &mut kafka, &mut factory) => outcome,
        () = shutdown.wait() => Err(BenchError::Interrupted),
    };
    kafka.wait_for_tasks().await;
    info!("cleaning up the run's stores and topics");
    factory.cleanup().await;
    kafka.delete_topics().await;
    outcome?;
    report.finish();
    Ok(report)
}

async fn run_measurements(
    config: &BenchConfig,
    report: &mut BenchReport,
    kafka: &mut KafkaRun,
    factory: &mut stores::StoreFactory,
) -> Result<(), BenchError> {
    let uses_kafka = [
        Measurement::Relay,
        Measurement::Projection,
        Measurement::Writers,
        Measurement::Latency,
    ]
    .into_iter()
    .any(|measurement| config.runs(measurement));
    if uses_kafka {
        report.machine.broker_partitions = count_broker_partitions(&config.kafka).await;
    }
    if uses_kafka && config.broker_warm_up_events > 0 {
        info!("warming up the broker (not measured)");
        relay_drain::warm_up_broker(config, kafka, config.broker_warm_up_events).await?;
    }
    for &store in &config.stores {
        if config.runs(Measurement::Append) {
            info!(%store, "measuring store append");
            append::measure(config, factory, store, report).await?;
        }
        if config.runs(Measurement::Relay) || config.runs(Measurement::Projection) {
            info!(%store, "measuring relay drain (and projection on its output)");
            relay_drain::measure(config, factory, kafka, store, report).await?;
        }
        if config.runs(Measurement::Writers) {
            info!(%store, "measuring writers with and without the relay");
            writer_impact::measure(config, factory, kafka, store, report).await?;
        }
        if config.runs(Measurement::Latency) {
            info!(%store, "measuring latency at a fixed offered load");
            latency::measure(config, factory, kafka, store, report).await?;
        }
    }
    if config.runs(Measurement::Backlog) && config.backlog_events > 0 {
        info!(
            events = config.backlog_events,
            "measuring the relay's memory on a large backlog"
        );
        backlog::measure(config, factory, kafka, report).await?;
    }
    Ok(())
}

fn validate(config: &BenchConfig) -> Result<(), BenchError> {
    let positive = [
        ("--relay-events", config.relay_events),
        ("--batch-size", config.batch_size as u64),
        ("--rounds", config.rounds as u64),
        ("--writers", config.writers as u64),
        ("--append-events", config.append_events),
        (
            "--latency-rate",
            u64::from(config.latency_events_per_second),
        ),
    ];
    for (flag, value) in positive {
        if value == 0 {
            return Err(BenchError::Setting(format!("{flag} must be at least 1")));
        }
    }
    if !config.latency_events_per_second.is_multiple_of(2) {
        return Err(BenchError::Setting(
            "--latency-rate must be even: every save writes two events".into(),
        ));
    }
    if config.stores.is_empty() {
        return Err(BenchError::Setting("--stores names no store".into()));
    }
    Ok(())
}

/// The label of a delivery mode in figures and keys.
pub(crate) fn mode_key(mode: DeliveryMode) -> &'static str {
    match mode {
        DeliveryMode::ExactlyOnce => "exactly_once",
        DeliveryMode::AtLeastOnce => "at_least_once",
    }
}

pub(crate) fn mode_label(mode: DeliveryMode) -> &'static str {
    match mode {
        DeliveryMode::ExactlyOnce => "exactly-once",
        DeliveryMode::AtLeastOnce => "at-least-once",
    }
}

/// Fresh topic prefixes for one bench run, the relays and projectors that use them as tasks of
/// this process, and the topics to delete at its end.
pub struct KafkaRun {
    base: KafkaConfig,
    run_id: String,
    next: usize,
    prefixes: Vec<String>,
    /// Cloned into every task [`spawn`](Self::spawn) starts and dropped when it ends: once
    /// this one is dropped too, `ended` sees the channel closed when the last task has ended.
    /// (tokio-util's `TaskTracker` does this; it is not a dependency of the library.)
    alive: Option<mpsc::Sender<()>>,
    ended: mpsc::Receiver<()>,
}

/// How long [`KafkaRun::wait_for_tasks`] waits: a projector leaves its group within
/// [`crate::projection::consumer::LEAVE_DEADLINE`], a relay aborts its transaction within its
/// request timeout.
const TASKS_STOP_DEADLINE: Duration = Duration::from_secs(40);

impl KafkaRun {
    pub fn new(base: &KafkaConfig) -> Self {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let (alive, ended) = mpsc::channel(1);
        Self {
            base: base.clone(),
            run_id,
            next: 0,
            prefixes: vec![],
            alive: Some(alive),
            ended,
        }
    }

    /// Runs `task` (a relay or projector on this run's topics) on the runtime, to be waited
    /// for by [`wait_for_tasks`](Self::wait_for_tasks).
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let alive = self.alive.clone();
        tokio::spawn(async move {
            let output = task.await;
            drop(alive);
            output
        })
    }

    /// Waits for every task [`spawn`](Self::spawn) started to end. After an interruption the
    /// measurement that owned them is dropped with their triggers, which stops them, but a
    /// task can take seconds to stop (a projector leaves its group, a relay ends its
    /// transaction); until then it still uses the stores and topics about to be deleted, and
    /// on a broker that creates topics on use, it could bring one back.
    pub async fn wait_for_tasks(&mut self) {
        drop(self.alive.take());
        if tokio::time::timeout(TASKS_STOP_DEADLINE, self.ended.recv())
            .await
            .is_err()
        {
            warn!(
                deadline = ?TASKS_STOP_DEADLINE,
                "a relay or projector of the run did not stop in time; cleaning up anyway"
            );
        }
    }

    /// A configuration with topics no run has used: `bench-<run>-<n>`.
    pub fn fresh(&mut self) -> KafkaConfig {
        self.next += 1;
        let prefix = format!("bench-{}-{}", self.run_id, self.next);
        self.prefixes.push(prefix.clone());
        let mut config = self.base.clone();
        config.topic_prefix = prefix;
        config
    }

    /// Deletes every topic of this run (they can hold a million records). Best effort.
    pub async fn delete_topics(&self) {
        let names: Vec<String> = self
            .prefixes
            .iter()
            .flat_map(|prefix| {
                let topics = Topics::with_prefix(prefix);
                [
                    topics.book,
                    topics.book_fact,
                    topics.book_fact_dlq,
                    topics.relay_checkpoint,
                ]
            })
            .collect();
        if names.is_empty() {
            return;
        }
        let admin = match self.base.admin_client() {
            Ok(admin) => admin,
            Err(error) => {
                warn!(%error, "could not delete the bench topics");
                return;
            }
        };
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let options = AdminOptions::new().request_timeout(Some(self.base.request_timeout()));
        // Topics a measurement never created answer "unknown topic"; that is fine.
        if let Err(error) = admin.delete_topics(&names, &options).await {
            warn!(%error, "could not delete the bench topics");
        }
    }
}

/// Above this many partitions on the broker, the run warns: each costs the broker work on
/// every replication and fetch round, and a local broker holding thousands (topics left behind
/// by killed benchmark runs and by test runs) ran every baseline at about half speed.
const CROWDED_BROKER_PARTITIONS: usize = 1_000;

/// How many partitions the broker holds, all topics together; `None` if it cannot tell.
async fn count_broker_partitions(kafka: &KafkaConfig) -> Option<usize> {
    match kafka.fetch_metadata(None).await {
        Ok(metadata) => {
            let partitions = metadata
                .topics()
                .iter()
                .map(|topic| topic.partitions().len())
                .sum();
            if partitions > CROWDED_BROKER_PARTITIONS {
                warn!(
                    partitions,
                    "the broker holds many partitions, which slows every figure down; delete \
                     the topics earlier runs left behind (`./dev clean-topics` on the local \
                     broker)"
                );
            }
            Some(partitions)
        }
        Err(error) => {
            warn!(%error, "could not count the broker's partitions");
            None
        }
    }
}

/// The median of `values` (the mean of the two middle ones for an even count); 0 when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn odd_latency_rates_are_refused() {
        let mut config = BenchConfig::new(KafkaConfig::new("127.0.0.1:9092"));
        config.latency_events_per_second = 999;
        assert!(matches!(validate(&config), Err(BenchError::Setting(_))));
    }
}
