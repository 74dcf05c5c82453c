//! Latency at a fixed offered load, never at saturation: new books are saved on an open-loop
//! schedule (`rate / 2` saves per second, two events each) while a relay follows the store
//! (`Follow`, woken by the commit signal) and the projection follows the fact topic. It runs
//! twice: exactly-once (the headline, with the projection) and at-least-once (relay only), so
//! the cost of the transactions shows.
//!
//! * **commit → ack**: for every event, from the instant its `save` returned (the commit) to
//!   the instant a `read_committed` consumer, assigned every partition of both topics on its
//!   own thread, received its record (matched by the `bookstore_position` header). A record a
//!   `read_committed` reader sees is committed in Kafka, so this is the latency a downstream
//!   consumer observes.
//! * **commit → report**: for every book, from the commit of its addition to the commit of the
//!   projection batch that wrote its `BookReport` row (the projection's store is wrapped, see
//!   [`super::projection::TimedReports`]).
//!
//! Both are also split into stages, to show where the time goes: the relay's outbox is
//! traced ([`TimedOutbox::traced`]: when each batch was read, when it was recorded published,
//! i.e. right after its Kafka commit returned), so every event's commit → ack splits into
//! pickup, publish and Kafka visibility; every report row's into fact visible, projection
//! batching and `apply_batch`. They are the `stage_*` extras of the figures.
//!
//! On SQLite a third run has the relay in a process of its own (`bookstore relay`, exactly
//! once, no projection): the deployment with `serve` and `relay` apart, where the relay learns
//! of commits through the file watch (`SqliteCommitWatch`), not the in-process signal. It has
//! no stage split (its outbox is not traced).
//!
//! A short warm-up (saves one at a time until their records arrive) makes sure the relay's
//! producer and both consumers are live before the schedule starts; it is not measured.
//! Percentiles come from HDR histograms in microseconds.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::projection::RunningProjection;
use super::stores::StoreFactory;
use super::timed_outbox::{RelayTrace, TimedOutbox};
use super::workload::{EVENTS_PER_SAVE, Workload, save_at_rate};
use super::{BenchConfig, BenchError, BenchReport, Figure, KafkaRun, StoreKind, Target, Unit};
use crate::codec::headers as h;
use crate::config::{KafkaConfig, RelaySettings};
use crate::domain::BookId;
use crate::relay::{DeliveryMode, RunMode, kafka_relay};
use crate::shutdown::ShutdownTrigger;
use crate::store::{AnyStore, EventStore};

/// Saves made one at a time before the schedule starts.
const WARM_UP_SAVES: usize = 10;
/// How long records may take to arrive once the schedule is over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Both delivery modes: exactly-once (with the projection following, when it is measured)
/// gives the headline figures; at-least-once shows what the transactions cost in latency. On
/// SQLite, exactly-once once more with the relay in its own process.
pub async fn measure(
    config: &BenchConfig,
    factory: &mut StoreFactory,
    kafka: &mut KafkaRun,
    kind: StoreKind,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    for mode in [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce] {
        measure_mode(
            config,
            factory,
            kafka,
            kind,
            mode,
            Placement::InProcess,
            report,
        )
        .await?;
    }
    if kind == StoreKind::Sqlite {
        match &config.relay_program {
            Some(program) => {
                let placement = Placement::OwnProcess(program);
                let mode = DeliveryMode::ExactlyOnce;
                measure_mode(config, factory, kafka, kind, mode, placement, report).await?;
            }
            None => warn!("no bookstore executable: the relay is not measured in its own process"),
        }
    }
    Ok(())
}

/// Where the relay runs during a latency run.
#[derive(Debug, Clone, Copy)]
enum Placement<'a> {
    /// In the benchmark's process: its saves wake it directly, and its outbox is traced.
    InProcess,
    /// `bookstore relay` (this executable) as a child process, which learns of the benchmark's
    /// commits as of another process's.
    OwnProcess(&'a Path),
}

/// The relay of a latency run, while it runs.
enum RunningRelay {
    InProcess {
        task: tokio::task::JoinHandle<Result<crate::relay::RelayReport, crate::relay::RelayError>>,
        trigger: ShutdownTrigger,
        clock: Arc<super::timed_outbox::OutboxClock>,
    },
    OwnProcess(tokio::process::Child),
}

impl RunningRelay {
    async fn start(
        placement: Placement<'_>,
        bench: &super::stores::BenchStore,
        kafka: &KafkaConfig,
        settings: &RelaySettings,
        run: &KafkaRun,
    ) -> Result<Self, BenchError> {
        match placement {
            Placement::InProcess => {
                let outbox = TimedOutbox::traced(bench.store.clone());
                let clock = outbox.clock();
                let relay = kafka_relay(outbox, kafka, settings).await?;
                let (trigger, shutdown) = ShutdownTrigger::new();
                let task = run.spawn(relay.run(RunMode::Follow, shutdown));
                Ok(Self::InProcess {
                    task,
                    trigger,
                    clock,
                })
            }
            Placement::OwnProcess(program) => {
                // The reader assigns their partitions before the child would create them.
                let topics = kafka.topics();
                let specs = topics.specs(kafka.partitions, kafka.replication_factor);
                crate::kafka::provision_topics(kafka, &specs).await?;
                let mut command = tokio::process::Command::new(program);
                command
                    .args(["relay", "--delivery", super::mode_label(settings.delivery)])
                    .args(["--batch-size", &settings.batch_size.to_string()])
                    .args(["--batch-linger-ms", &settings.batch_linger_ms.to_string()])
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .kill_on_drop(true);
                super::backlog::configure_child(&mut command, &bench.url, kafka);
                let child = command
                    .spawn()
                    .map_err(BenchError::io(format!("starting {}", program.display())))?;
                Ok(Self::OwnProcess(child))
            }
        }
    }

    /// Stops the relay; for one in process, its batch count and outbox timings as extras and
    /// the trace that splits commit → ack into stages.
    async fn stop(self) -> Result<Option<(Vec<(String, f64)>, RelayTrace)>, BenchError> {
        match self {
            Self::InProcess {
                task,
                trigger,
                clock,
            } => {
                trigger.trigger();
                let relayed = task.await??;
                let mut extras = vec![
                    ("relay_batches".to_owned(), relayed.batches as f64),
                    (
                        "relay_events_per_batch".to_owned(),
                        relayed.published_events as f64 / relayed.batches.max(1) as f64,
                    ),
                ];
                extras.extend(super::timed_outbox::call_extras(&clock));
                Ok(Some((extras, clock.trace())))
            }
            // The measurement is over (every record arrived, or the run failed): nothing the
            // benchmark needs is lost by killing it, and its store is thrown away.
            Self::OwnProcess(mut child) => {
                child
                    .kill()
                    .await
                    .map_err(BenchError::io("stopping the child relay".to_owned()))?;
                Ok(None)
            }
        }
    }
}

async fn measure_mode(
    config: &BenchConfig,
    factory: &mut StoreFactory,
    run: &mut KafkaRun,
    kind: StoreKind,
    mode: DeliveryMode,
    placement: Placement<'_>,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let bench = factory.fresh(kind).await?;
    let kafka = run.fresh();
    let settings = RelaySettings {
        delivery: mode,
        batch_size: config.batch_size,
        batch_linger_ms: config.batch_linger_ms,
        ..RelaySettings::default()
    };
    let relay = RunningRelay::start(placement, &bench, &kafka, &settings, run).await?;

    let saves_per_second = config.latency_events_per_second / 2;
    let saves = (f64::from(saves_per_second) * config.latency_duration.as_secs_f64()) as usize;
    let capacity = (WARM_UP_SAVES + saves) as u64 * EVENTS_PER_SAVE;
    let timeline = Arc::new(Timelines::new(capacity));
    let listener = AckListener::start(&kafka, timeline.clone())?;
    let in_process = matches!(placement, Placement::InProcess);
    let projection = if in_process
        && mode == DeliveryMode::ExactlyOnce
        && config.runs(super::Measurement::Projection)
    {
        Some(RunningProjection::start(&kafka, factory, kind, run).await?)
    } else {
        None
    };

    let outcome = run_schedule(
        &bench.store,
        config,
        saves,
        timeline.clone(),
        projection.as_ref(),
    )
    .await;
    listener.stop();
    let listener_result = listener.join().await;
    let relay_result = relay.stop().await;
    if let Some(projection) = projection {
        projection.stop().await?;
    }
    let offered = outcome?;
    listener_result?;
    let (relay_extras, relay_stages) = match relay_result? {
        Some((extras, trace)) => (extras, timeline.relay_stages(&trace)?),
        None => (Vec::new(), Vec::new()),
    };
    let acks = timeline.histogram(WARM_UP_SAVES as u64 * EVENTS_PER_SAVE)?;
    let report_stages = timeline.report_stages()?;
    let rate_detail = format!(
        "offered {} events/s ({saves_per_second} saves/s), achieved {:.0}",
        config.latency_events_per_second,
        offered * EVENTS_PER_SAVE as f64
    );
    let (key, measurement) = match (placement, mode) {
        (Placement::OwnProcess(_), _) => (
            format!("{kind}_relay_process_commit_to_ack_p99"),
            "commit → Kafka ack, relay in its own process, p99",
        ),
        (Placement::InProcess, DeliveryMode::ExactlyOnce) => (
            format!("{kind}_commit_to_ack_p99"),
            "commit → Kafka ack (read_committed), p99",
        ),
        (Placement::InProcess, DeliveryMode::AtLeastOnce) => (
            format!("{kind}_at_least_once_commit_to_ack_p99"),
            "commit → Kafka ack, at-least-once relay, p99",
        ),
    };
    let mut figure = latency_figure(key, measurement, kind, &acks, &rate_detail, offered);
    for (name, value) in relay_extras.into_iter().chain(relay_stages) {
        figure = figure.extra(&name, value);
    }
    report.push(figure);
    if let Some(reports) = timeline.report_histogram()? {
        let mut figure = latency_figure(
            format!("{kind}_commit_to_report_p99"),
            "commit → report row, p99",
            kind,
            &reports,
            &rate_detail,
            offered,
        );
        for (name, value) in report_stages {
            figure = figure.extra(&name, value);
        }
        report.push(figure);
    }
    Ok(())
}

fn latency_figure(
    key: String,
    measurement: &str,
    kind: StoreKind,
    histogram: &Histogram<u64>,
    rate_detail: &str,
    offered_saves: f64,
) -> Figure {
    let ms = |micros: u64| micros as f64 / 1e3;
    let p50 = ms(histogram.value_at_quantile(0.5));
    let p99 = ms(histogram.value_at_quantile(0.99));
    let p999 = ms(histogram.value_at_quantile(0.999));
    let max = ms(histogram.max());
    Figure::new(key, measurement, p99, Unit::Milliseconds)
        .store(kind)
        .detail(format!(
            "p50 {p50:.1} · p99.9 {p999:.1} · max {max:.1} ms; {} samples; {rate_detail}",
            histogram.len()
        ))
        .target(Target::ValueAtMost(25.0))
        .extra("p50_ms", p50)
        .extra("p99_ms", p99)
        .extra("p999_ms", p999)
        .extra("max_ms", max)
        .extra("samples", histogram.len() as f64)
        .extra("achieved_saves_per_second", offered_saves)
}

/// Warms up, runs the schedule and waits for every record; returns the achieved saves/s.
async fn run_schedule(
    store: &AnyStore,
    config: &BenchConfig,
    saves: usize,
    timeline: Arc<Timelines>,
    projection: Option<&RunningProjection>,
) -> Result<f64, BenchError> {
    let workload = Workload::new(0);
    if let Some(projection) = projection {
        projection.attach(timeline.clone());
    }
    for n in 0..WARM_UP_SAVES {
        let events = store.save(workload.addition(n)?).await?;
        timeline.committed(&events, Instant::now());
    }
    let warm_up_events = WARM_UP_SAVES as u64 * EVENTS_PER_SAVE;
    timeline
        .wait_for_acks(1..=warm_up_events, DRAIN_TIMEOUT)
        .await?;
    if projection.is_some() {
        timeline.wait_for_reports(DRAIN_TIMEOUT).await?;
    }
    info!("latency warm-up done; relay and consumers are live");
    timeline.start_measuring();

    let changes = (0..saves)
        .map(|n| workload.addition(WARM_UP_SAVES + n))
        .collect::<Result<Vec<_>, _>>()?;
    let saves_per_second = f64::from(config.latency_events_per_second / 2);
    let period = Duration::from_secs_f64(1.0 / saves_per_second);
    let recorder = timeline.clone();
    let scheduled = save_at_rate(store, changes, period, move |events, at| {
        recorder.committed(events, at);
    })
    .await?;
    let head = store.head_position().await?;
    timeline
        .wait_for_acks(warm_up_events + 1..=head, DRAIN_TIMEOUT)
        .await?;
    if let Some(projection) = projection {
        timeline.wait_for_reports(DRAIN_TIMEOUT).await?;
        projection.detach();
    }
    let schedule = period.as_secs_f64() * saves as f64;
    Ok(scheduled.saves as f64 / schedule.max(scheduled.elapsed.as_secs_f64()))
}

/// When each event committed and was received, by position; when each book's report row
/// committed. Instants are kept as nanoseconds since `origin`, plus one (0: not yet).
pub struct Timelines {
    origin: Instant,
    commits: Vec<AtomicU64>,
    acks: Vec<AtomicU64>,
    /// When the schedule started: books committed before are the warm-up's.
    measured_from: AtomicU64,
    /// Per book: its addition committed (and the position of its fact), the projection began
    /// applying the batch with its fact, that batch committed.
    book_commits: std::sync::Mutex<std::collections::HashMap<BookId, (u64, u64)>>,
    book_applying: std::sync::Mutex<std::collections::HashMap<BookId, u64>>,
    book_reports: std::sync::Mutex<std::collections::HashMap<BookId, u64>>,
}

impl std::fmt::Debug for Timelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timelines")
            .field("positions", &self.commits.len())
            .finish_non_exhaustive()
    }
}

impl Timelines {
    fn new(capacity: u64) -> Self {
        let slots = || (0..=capacity).map(|_| AtomicU64::new(0)).collect();
        Self {
            origin: Instant::now(),
            commits: slots(),
            acks: slots(),
            measured_from: AtomicU64::new(0),
            book_commits: Default::default(),
            book_applying: Default::default(),
            book_reports: Default::default(),
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX - 1)
            + 1
    }

    fn start_measuring(&self) {
        self.measured_from
            .store(self.stamp(Instant::now()), Ordering::Relaxed);
    }

    fn slot(slots: &[AtomicU64], position: u64) -> Option<&AtomicU64> {
        slots.get(usize::try_from(position).ok()?)
    }

    fn committed(&self, events: &[crate::domain::StoredEvent], at: Instant) {
        let stamp = self.stamp(at);
        for event in events {
            if let Some(slot) = Self::slot(&self.commits, event.position) {
                slot.store(stamp, Ordering::Relaxed);
            }
        }
        if let (Some(first), Some(last)) = (events.first(), events.last()) {
            let mut books = self.book_commits.lock().unwrap_or_else(|p| p.into_inner());
            books.insert(first.metadata.aggregate_id, (stamp, last.position));
        }
    }

    fn acknowledged(&self, position: u64, at: Instant) {
        if let Some(slot) = Self::slot(&self.acks, position) {
            // The first arrival counts; a redelivery would not be news to a reader.
            let _ = slot.compare_exchange(0, self.stamp(at), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Records that the projection began applying the rows of `books` at `started` and
    /// committed them at `ended` (the first time counts).
    pub fn reported(&self, books: &[BookId], started: Instant, ended: Instant) {
        let (started, ended) = (self.stamp(started), self.stamp(ended));
        let mut applying = self.book_applying.lock().unwrap_or_else(|p| p.into_inner());
        let mut reports = self.book_reports.lock().unwrap_or_else(|p| p.into_inner());
        for book in books {
            applying.entry(*book).or_insert(started);
            reports.entry(*book).or_insert(ended);
        }
    }

    async fn wait_for_acks(
        &self,
        positions: std::ops::RangeInclusive<u64>,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = positions
                .clone()
                .filter(|&position| {
                    Self::slot(&self.acks, position)
                        .is_none_or(|slot| slot.load(Ordering::Relaxed) == 0)
                })
                .count();
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Incomplete(format!(
                    "{missing} records of positions {positions:?} did not reach the \
                     read_committed consumer within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_reports(&self, timeout: Duration) -> Result<(), BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let missing = {
                let commits = self.book_commits.lock().unwrap_or_else(|p| p.into_inner());
                let reports = self.book_reports.lock().unwrap_or_else(|p| p.into_inner());
                commits
                    .keys()
                    .filter(|book| !reports.contains_key(book))
                    .count()
            };
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BenchError::Incomplete(format!(
                    "{missing} books did not reach the report within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Commit → ack of every position above `skip`, in microseconds.
    fn histogram(&self, skip: u64) -> Result<Histogram<u64>, BenchError> {
        let mut histogram = new_histogram()?;
        let mut early = 0;
        for (position, (commit, ack)) in self.commits.iter().zip(&self.acks).enumerate() {
            let (commit, ack) = (commit.load(Ordering::Relaxed), ack.load(Ordering::Relaxed));
            if position as u64 <= skip || commit == 0 || ack == 0 {
                continue;
            }
            // A record can arrive before its writer task noted the commit (it was descheduled
            // in between): count it as zero rather than dropping it.
            early += u64::from(ack < commit);
            histogram.saturating_record(ack.saturating_sub(commit) / 1_000);
        }
        if early > 0 {
            warn!(early, "records arrived before their commit was noted");
        }
        Ok(histogram)
    }

    /// Commit → report row of every book measured (warm-up books excluded), if any was.
    fn report_histogram(&self) -> Result<Option<Histogram<u64>>, BenchError> {
        let reports = self.book_reports.lock().unwrap_or_else(|p| p.into_inner());
        if reports.is_empty() {
            return Ok(None);
        }
        let commits = self.book_commits.lock().unwrap_or_else(|p| p.into_inner());
        let measured_from = self.measured_from.load(Ordering::Relaxed);
        let mut histogram = new_histogram()?;
        for (book, &(commit, _)) in commits.iter() {
            if commit < measured_from {
                continue;
            }
            if let Some(&reported) = reports.get(book) {
                histogram.saturating_record(reported.saturating_sub(commit) / 1_000);
            }
        }
        Ok(Some(histogram))
    }

    /// Every measured event's way through the relay, in stages: commit → picked up by the
    /// relay's read, → recorded published (right after its Kafka commit returned), → received
    /// by the `read_committed` reader. p50 and p99 of each, in milliseconds; plus the relay's
    /// cycle time.
    fn relay_stages(&self, trace: &RelayTrace) -> Result<Vec<(String, f64)>, BenchError> {
        let (mut pickup, mut publish, mut visible) =
            (new_histogram()?, new_histogram()?, new_histogram()?);
        let skip = WARM_UP_SAVES as u64 * EVENTS_PER_SAVE;
        for (position, (commit, ack)) in self.commits.iter().zip(&self.acks).enumerate() {
            let position = position as u64;
            let (commit, ack) = (commit.load(Ordering::Relaxed), ack.load(Ordering::Relaxed));
            if position <= skip || commit == 0 || ack == 0 {
                continue;
            }
            let (Some(picked), Some(published)) =
                (trace.picked_up(position), trace.published(position))
            else {
                continue;
            };
            let (picked, published) = (self.stamp(picked), self.stamp(published));
            pickup.saturating_record(picked.saturating_sub(commit) / 1_000);
            publish.saturating_record(published.saturating_sub(picked) / 1_000);
            visible.saturating_record(ack.saturating_sub(published) / 1_000);
        }
        // One relay cycle (read, publish, checkpoint, head) is the gap between two reads that
        // returned events; an event committed during a cycle waits for the rest of it.
        let mut cycle = new_histogram()?;
        for pair in trace.reads.windows(2) {
            let gap = pair[1].1.saturating_duration_since(pair[0].1);
            cycle.saturating_record(u64::try_from(gap.as_micros()).unwrap_or(u64::MAX));
        }
        let mut extras = stage_extras([
            ("relay_pickup", &pickup),
            ("relay_publish", &publish),
            ("kafka_visible", &visible),
            ("relay_cycle", &cycle),
        ]);
        extras.push(("relay_cycle_max_ms".into(), cycle.max() as f64 / 1e3));
        Ok(extras)
    }

    /// Every measured book's way from its fact being readable to its report row: the
    /// `read_committed` reader received the fact → the projection began applying the batch
    /// holding it → that batch committed.
    fn report_stages(&self) -> Result<Vec<(String, f64)>, BenchError> {
        let commits = self.book_commits.lock().unwrap_or_else(|p| p.into_inner());
        let applying = self.book_applying.lock().unwrap_or_else(|p| p.into_inner());
        let reports = self.book_reports.lock().unwrap_or_else(|p| p.into_inner());
        let measured_from = self.measured_from.load(Ordering::Relaxed);
        let (mut fact_visible, mut batching, mut apply) =
            (new_histogram()?, new_histogram()?, new_histogram()?);
        for (book, &(commit, fact_position)) in commits.iter() {
            let ack = Self::slot(&self.acks, fact_position)
                .map_or(0, |slot| slot.load(Ordering::Relaxed));
            let (Some(&started), Some(&ended)) = (applying.get(book), reports.get(book)) else {
                continue;
            };
            if commit < measured_from || ack == 0 {
                continue;
            }
            fact_visible.saturating_record(ack.saturating_sub(commit) / 1_000);
            batching.saturating_record(started.saturating_sub(ack) / 1_000);
            apply.saturating_record(ended.saturating_sub(started) / 1_000);
        }
        Ok(stage_extras([
            ("fact_visible", &fact_visible),
            ("projection_batching", &batching),
            ("projection_apply", &apply),
        ]))
    }
}

/// `stage_<name>_{p50,p99}_ms` of each stage's histogram (in µs).
fn stage_extras<const N: usize>(stages: [(&str, &Histogram<u64>); N]) -> Vec<(String, f64)> {
    let mut extras = vec![];
    for (name, histogram) in stages {
        if histogram.is_empty() {
            continue;
        }
        for (label, quantile) in [("p50", 0.5), ("p99", 0.99)] {
            let ms = histogram.value_at_quantile(quantile) as f64 / 1e3;
            extras.push((format!("stage_{name}_{label}_ms"), ms));
        }
    }
    extras
}

fn new_histogram() -> Result<Histogram<u64>, BenchError> {
    // 1 µs to 10 minutes at three significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .map_err(|error| BenchError::Incomplete(format!("histogram: {error}")))
}

/// A `read_committed` consumer on a thread of its own, assigned every partition of the delta
/// and fact topics from the beginning (no group join to wait for).
struct AckListener {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<u64, BenchError>>,
}

impl AckListener {
    fn start(kafka: &KafkaConfig, timeline: Arc<Timelines>) -> Result<Self, BenchError> {
        let group = format!("{}.latency-reader", kafka.topic_prefix);
        let consumer: BaseConsumer = kafka.consumer_config(&group).create()?;
        let topics = kafka.topics();
        let mut assignment = TopicPartitionList::new();
        for topic in [&topics.book, &topics.book_fact] {
            for partition in 0..kafka.partitions {
                assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut received = 0;
            while !stopped.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Ok(message)) => {
                        let at = Instant::now();
                        if let Some(position) = position_of(&message) {
                            timeline.acknowledged(position, at);
                            received += 1;
                        }
                    }
                    Some(Err(error)) => warn!(%error, "latency reader error"),
                }
            }
            Ok(received)
        });
        Ok(Self { stop, thread })
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    async fn join(self) -> Result<u64, BenchError> {
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| BenchError::Incomplete("the latency reader panicked".into()))?
    }
}

fn position_of(message: &impl Message) -> Option<u64> {
    let headers = message.headers()?;
    (0..headers.count())
        .filter_map(|index| headers.try_get(index))
        .find(|header| header.key == h::POSITION)
        .and_then(|header| std::str::from_utf8(header.value?).ok()?.parse().ok())
}
