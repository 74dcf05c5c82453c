//! Projection throughput against a raw consumer reading the same topic, and the projection
//! running beside the latency measurement.
//!
//! The fact topic of the first exactly-once relay drain (see [`super::relay_drain`]) is read,
//! per round, by:
//!
//! * **the projection**: `Projector::run(UntilCaughtUp)` in a fresh group into a fresh read
//!   model, whose store is wrapped ([`TimedReports`]) to time the window from the end of the
//!   first `apply_batch` to the end of the last one; the records of the first batch are left
//!   out of the count, so group join and the first fetch stay outside the figure;
//! * **a raw consumer**: `read_committed`, the same client settings, a fresh group subscribed
//!   to the topic, receiving every record; timed from its first record to its last, the first
//!   record left out of the count.
//!
//! The median of the rounds is reported for both, and as the ratio the median of the rounds'
//! ratios (see [`Figure::against_rounds`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing::info;

use super::latency::Timelines;
use super::relay_drain::PublishedFacts;
use super::stores::{BenchStore, StoreFactory};
use super::{
    BenchConfig, BenchError, BenchReport, Figure, KafkaRun, StoreKind, Target, Unit, median,
};
use crate::config::KafkaConfig;
use crate::domain::BookId;
use crate::projection::{
    BookReport, OffsetAdvance, PartitionOffset, ProjectionConfig, ProjectionError, ProjectionMode,
    ProjectionReport, ReportChange, ReportKey, ReportOrder, ReportStore, ReportTotals,
    kafka_projector,
};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::store::{AnyStore, StoreError};

/// How long a drain of the fact topic may take before the run is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn measure(
    config: &BenchConfig,
    factory: &mut StoreFactory,
    kind: StoreKind,
    published: &PublishedFacts,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    // (projection, raw consumer) records/s, per round.
    let mut rounds = vec![];
    let mut apply_share = vec![];
    let mut batches = 0;
    for round in 1..=config.rounds {
        let read_model = factory.fresh(kind).await?;
        let group = format!("{}.bench-projection-{round}", published.kafka.topic_prefix);
        let (drain, clock) = project_until_caught_up(&published.kafka, &read_model, &group).await?;
        if drain.applied_facts != published.facts {
            return Err(BenchError::Incomplete(format!(
                "the projection applied {} of {} facts",
                drain.applied_facts, published.facts
            )));
        }
        let (window, first_batch, apply) = clock.window();
        let counted = published.facts.saturating_sub(first_batch);
        let projection = super::workload::per_second(counted, window);
        apply_share.push(apply.as_secs_f64() / window.as_secs_f64().max(f64::EPSILON));
        batches = drain.batches;
        let group = format!("{}.bench-raw-reader-{round}", published.kafka.topic_prefix);
        let raw = raw_consume(&published.kafka, &group, published.facts).await?;
        info!(%kind, round, projection, raw, "fact topic read (records/s)");
        rounds.push((projection, raw));
    }
    let projection: Vec<f64> = rounds.iter().map(|(projection, _)| *projection).collect();
    report.push(
        Figure::new(
            format!("{kind}_projection"),
            "projection into BookReport",
            median(&projection),
            Unit::RecordsPerSecond,
        )
        .store(kind)
        .detail(format!(
            "{} facts, {batches} batches; {:.0}% of the time in apply_batch",
            published.facts,
            median(&apply_share) * 100.0
        ))
        .against_rounds("raw read_committed consumer", &rounds, None)
        .target(Target::RatioAtLeast(0.5))
        .extra("apply_batch_share", median(&apply_share))
        .extra("batches", batches as f64),
    );
    Ok(())
}

async fn project_until_caught_up(
    kafka: &KafkaConfig,
    read_model: &BenchStore,
    group: &str,
) -> Result<(ProjectionReport, Arc<ReportClock>), BenchError> {
    let reports = TimedReports::new(read_model.store.clone());
    let clock = reports.clock();
    let projector = kafka_projector(reports, kafka, ProjectionConfig::new(group))
        .await
        .map_err(projection_error)?;
    let report = tokio::time::timeout(
        READ_TIMEOUT,
        projector.run(ProjectionMode::UntilCaughtUp, Shutdown::never()),
    )
    .await
    .map_err(|_| {
        BenchError::Incomplete(format!(
            "the projection did not catch up in {READ_TIMEOUT:?}"
        ))
    })?
    .map_err(projection_error)?;
    Ok((report, clock))
}

fn projection_error(error: ProjectionError) -> BenchError {
    BenchError::Projection(error.to_string())
}

/// Receives `records` records of the fact topic in a fresh group; returns records/s from the
/// first record to the last (the first one not counted).
async fn raw_consume(kafka: &KafkaConfig, group: &str, records: u64) -> Result<f64, BenchError> {
    let consumer: BaseConsumer = kafka.consumer_config(group).create()?;
    consumer.subscribe(&[&kafka.topics().book_fact])?;
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut first = None;
        let mut received = 0;
        let mut bytes = 0;
        while received < records {
            if Instant::now() > deadline {
                return Err(BenchError::Incomplete(format!(
                    "the raw consumer received {received} of {records} records"
                )));
            }
            match consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(message)) => {
                    first.get_or_insert_with(Instant::now);
                    bytes += message.payload_len();
                    received += 1;
                }
                Some(Err(error)) => return Err(error.into()),
            }
        }
        let last = Instant::now();
        // Touching the payload length keeps the loop honest about having the record.
        std::hint::black_box(bytes);
        let window = last.duration_since(first.unwrap_or(last));
        Ok(super::workload::per_second(records - 1, window))
    })
    .await?
}

/// A projection in `Follow` mode into a fresh read model, for the latency measurement.
pub struct RunningProjection {
    clock: Arc<ReportClock>,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<ProjectionReport, ProjectionError>>,
    _read_model: BenchStore,
}

impl RunningProjection {
    pub async fn start(
        kafka: &KafkaConfig,
        factory: &mut StoreFactory,
        kind: StoreKind,
        run: &KafkaRun,
    ) -> Result<Self, BenchError> {
        let read_model = factory.fresh(kind).await?;
        let reports = TimedReports::new(read_model.store.clone());
        let clock = reports.clock();
        let group = format!("{}.book-report", kafka.topic_prefix);
        let projector = kafka_projector(reports, kafka, ProjectionConfig::new(group))
            .await
            .map_err(projection_error)?;
        let (trigger, shutdown) = ShutdownTrigger::new();
        let task = run.spawn(projector.run(ProjectionMode::Follow, shutdown));
        Ok(Self {
            clock,
            trigger,
            task,
            _read_model: read_model,
        })
    }

    /// From now on, every book whose row commits is reported to `timelines`.
    pub fn attach(&self, timelines: Arc<Timelines>) {
        *self
            .clock
            .timelines
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(timelines);
    }

    pub fn detach(&self) {
        *self
            .clock
            .timelines
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub async fn stop(self) -> Result<(), BenchError> {
        self.trigger.trigger();
        self.task.await?.map_err(projection_error)?;
        Ok(())
    }
}

/// What [`TimedReports`] saw of the projection's batches.
#[derive(Debug, Default)]
pub struct ReportClock {
    /// Nanoseconds since `origin` (plus one) at the end of the first and the last batch.
    origin: OnceInstant,
    first_end: AtomicU64,
    last_end: AtomicU64,
    /// Records up to the end of the first batch: the sum of its next offsets (a fresh group
    /// on a fresh topic starts every partition at 0; transaction markers make it a few more).
    first_batch_records: AtomicU64,
    /// Time inside `apply_batch` after the first batch.
    apply_nanos: AtomicU64,
    timelines: Mutex<Option<Arc<Timelines>>>,
}

/// An `Instant` fixed at creation (a `Default` for [`ReportClock`]).
#[derive(Debug)]
struct OnceInstant(Instant);

impl Default for OnceInstant {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl ReportClock {
    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.origin.0).as_nanos()).unwrap_or(u64::MAX - 1) + 1
    }

    fn batch_applied(&self, started: Instant, changes: &[ReportChange], offsets: &[OffsetAdvance]) {
        let ended = Instant::now();
        let stamp = self.stamp(ended);
        if self
            .first_end
            .compare_exchange(0, stamp, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let records = offsets
                .iter()
                .map(|offset| offset.next_offset.max(0) as u64)
                .sum();
            self.first_batch_records.store(records, Ordering::Relaxed);
        } else {
            let nanos = u64::try_from(ended.duration_since(started).as_nanos()).unwrap_or(0);
            self.apply_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        self.last_end.store(stamp, Ordering::Relaxed);
        let timelines = self
            .timelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(timelines) = timelines {
            let books: Vec<BookId> = changes.iter().map(ReportChange::book_id).collect();
            timelines.reported(&books, started, ended);
        }
    }

    /// The window from the end of the first batch to the end of the last, the records up to
    /// the end of the first batch (not in the window), and the time spent in `apply_batch` in
    /// the window.
    pub fn window(&self) -> (Duration, u64, Duration) {
        let first = self.first_end.load(Ordering::Relaxed);
        let last = self.last_end.load(Ordering::Relaxed);
        (
            Duration::from_nanos(last.saturating_sub(first)),
            self.first_batch_records.load(Ordering::Relaxed),
            Duration::from_nanos(self.apply_nanos.load(Ordering::Relaxed)),
        )
    }
}

/// A [`ReportStore`] that notes when each batch committed; every call goes through unchanged.
#[derive(Debug, Clone)]
pub struct TimedReports<S> {
    inner: S,
    clock: Arc<ReportClock>,
}

impl<S> TimedReports<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            clock: Arc::new(ReportClock::default()),
        }
    }

    pub fn clock(&self) -> Arc<ReportClock> {
        self.clock.clone()
    }
}

impl ReportStore for TimedReports<AnyStore> {
    async fn apply_batch(
        &self,
        group: &str,
        topic: &str,
        changes: &[ReportChange],
        offsets: &[OffsetAdvance],
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        self.inner
            .apply_batch(group, topic, changes, offsets)
            .await?;
        if !changes.is_empty() {
            self.clock.batch_applied(started, changes, offsets);
        }
        Ok(())
    }

    async fn stored_groups(&self) -> Result<Vec<String>, StoreError> {
        self.inner.stored_groups().await
    }

    async fn stored_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<PartitionOffset>, StoreError> {
        self.inner.stored_offsets(group, topic).await
    }

    async fn list_reports(&self) -> Result<Vec<BookReport>, StoreError> {
        self.inner.list_reports().await
    }

    async fn list_reports_page(
        &self,
        after: Option<&ReportKey>,
        limit: u32,
    ) -> Result<Vec<BookReport>, StoreError> {
        self.inner.list_reports_page(after, limit).await
    }

    async fn list_reports_sorted(
        &self,
        order: ReportOrder,
        limit: u32,
    ) -> Result<Vec<BookReport>, StoreError> {
        self.inner.list_reports_sorted(order, limit).await
    }

    async fn report_totals(&self) -> Result<ReportTotals, StoreError> {
        self.inner.report_totals().await
    }

    async fn report(&self, book_id: BookId) -> Result<Option<BookReport>, StoreError> {
        self.inner.report(book_id).await
    }

    async fn reset(&self) -> Result<Vec<String>, StoreError> {
        self.inner.reset().await
    }
}
