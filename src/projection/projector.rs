//! The projector: joins the group, applies batches of fact records to the read model, and goes
//! on through outages; or, with [`ProjectionMode::UntilCaughtUp`], stops once it has applied
//! everything that was on the topic when it started.
//!
//! One batch is one round: poll up to `batch_size` records, or what is buffered once there is a
//! record, or `batch_wait` for the first one (reading each record as it is polled); send the records
//! it cannot read to the dead-letter queue and wait for the acknowledgement; apply the rest
//! and store the next offsets in ONE [`ReportStore::apply_batch`]; then commit the offsets to
//! the Kafka group. The next batch is polled while one is applied, with revocations held back
//! until it is committed (see [`super::consumer`]). Any failure (database, broker, registry
//! down) abandons the batch, leaves the group, backs off and joins again: the stored offsets
//! say where to resume, and what was applied already is applied again harmlessly (see the
//! [module doc](super)).
//!
//! So does a stored position that moved under the member ([`StoreError::PositionMoved`]): a
//! reset of the read model (a `--rebuild` that raced with this member) or a member that took
//! its partitions over. Every batch checks the positions it advances; an idle member checks
//! every position it owns once per [`IDLE_POSITION_CHECK`], so that a reset is noticed even
//! where nothing new arrives, and the rows it deleted are read again from the beginning.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{info, warn};

use super::consumer::{Batch, BatchLimits, PendingBatch, PolledRead, Session};
use super::dlq::{DeadLetterSender, DlqError, partition_ids};
use super::fact::{FactOutcome, FactReader, Rejection};
use super::{OffsetAdvance, ReportChange, ReportStore, check_positions, compact_changes, metrics};
use crate::codec::RegistryError;
use crate::config::KafkaConfig;
use crate::kafka::{KafkaSetupError, provision_topics};
use crate::shutdown::Shutdown;
use crate::store::{StoreError, answer_within};

/// How long a stop waits for the batch being applied before abandoning it.
pub const APPLY_GRACE: Duration = Duration::from_secs(10);

/// How often a member with nothing to apply checks that the positions it owns are still the
/// ones stored (see the module doc).
pub const IDLE_POSITION_CHECK: Duration = Duration::from_secs(1);

/// How the projector runs. [`ProjectionConfig::new`] gives defaults for a laptop and
/// production alike.
#[derive(Debug, Clone)]
pub struct ProjectionConfig {
    /// The consumer group; its offsets are stored with the read model under this name.
    /// Default in the command line: `<topic prefix>.book-report`.
    pub group_id: String,
    /// Most records per batch (one database transaction). Default 5000: a backlog is applied
    /// in few large transactions, while at low load a batch is whatever has arrived (see
    /// `batch_wait`), so the size costs no latency.
    pub batch_size: usize,
    /// Most bytes of keys and values per batch (the batch ends with the record that reaches
    /// it). Default [`DEFAULT_BATCH_BYTES`]: facts take a few hundred bytes, so it never cuts a
    /// batch of them short, but 5,000 records near Kafka's size limit (garbage on the topic,
    /// each copied out to be dead-lettered) would otherwise be held as gigabytes at once, and
    /// the crash that follows would read the same batch again.
    pub batch_bytes: usize,
    /// Longest wait for the first record of a batch. Default 100 ms. Once a batch has a record,
    /// it is applied as soon as the consumer has nothing more buffered, without waiting. Zero
    /// takes what is buffered and waits for nothing (so an idle projector polls without pause).
    pub batch_wait: Duration,
    /// How long a schema id the registry does not know is asked for again before its records
    /// are dead-lettered (see [`FactReader::with_missing_schema_patience`]). Default
    /// [`super::MISSING_SCHEMA_PATIENCE`], 60 s.
    pub missing_schema_patience: Duration,
    /// First pause after an error; doubles up to `max_backoff`. Defaults 200 ms and 10 s.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest wait for the read model to apply a batch or to answer a question, after which
    /// the batch is abandoned as after any database error. Default
    /// [`QUERY_TIMEOUT`](crate::store::QUERY_TIMEOUT): a batch takes milliseconds, and the
    /// bound is for a connection that died without a word (see [`answer_within`]), which
    /// would otherwise hold the projector, and every rebalance of its group (a revocation
    /// waits for the batch being applied), for about 15 minutes.
    pub store_timeout: Duration,
}

impl ProjectionConfig {
    pub fn new(group_id: impl Into<String>) -> Self {
        Self {
            group_id: group_id.into(),
            batch_size: 5000,
            batch_bytes: DEFAULT_BATCH_BYTES,
            batch_wait: Duration::from_millis(100),
            missing_schema_patience: super::MISSING_SCHEMA_PATIENCE,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            store_timeout: crate::store::QUERY_TIMEOUT,
        }
    }
}

/// Default [`ProjectionConfig::batch_bytes`]: 32 MiB.
pub const DEFAULT_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// The group the projection uses by default: `<topic prefix>.book-report`.
pub fn default_group(topic_prefix: &str) -> String {
    format!("{topic_prefix}.book-report")
}

/// Until when [`Projector::run`] goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionMode {
    /// Until shutdown.
    Follow,
    /// Until every partition is applied up to its end as measured at start (its high
    /// watermark, or its last stable offset while a transaction is open), counting what other
    /// members of the group stored; or until shutdown.
    UntilCaughtUp,
}

/// Why the projector stopped. Each variant's text already names its cause, so none is marked
/// as a `source` (an error chain printed with `{:#}` would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("read model: {0}")]
    Store(StoreError),
    #[error("{0}")]
    Setup(KafkaSetupError),
    #[error("could not create a Kafka consumer for {bootstrap_servers}: {cause}")]
    Consumer {
        bootstrap_servers: String,
        cause: KafkaError,
    },
    #[error("Kafka: {0}")]
    Kafka(KafkaError),
    #[error("{0}")]
    DeadLetter(DlqError),
    #[error("schema registry: {0}")]
    Registry(RegistryError),
    #[error(
        "consumer group {group} has {members} active member(s); stop every projector of the \
         group before rebuilding"
    )]
    GroupActive { group: String, members: usize },
    /// librdkafka left this member outside a steady group membership for longer than a join
    /// can take (see `Session::stuck_outside_group`); a new consumer joins again.
    #[error(
        "this member has been outside a steady group membership for {waited:?} (librdkafka's \
         group state {state}, join state {join_state}), longer than a healthy join takes"
    )]
    OutsideGroup {
        waited: Duration,
        state: String,
        join_state: String,
    },
}

impl From<StoreError> for ProjectionError {
    fn from(error: StoreError) -> Self {
        ProjectionError::Store(error)
    }
}

impl From<KafkaSetupError> for ProjectionError {
    fn from(error: KafkaSetupError) -> Self {
        ProjectionError::Setup(error)
    }
}

impl From<DlqError> for ProjectionError {
    fn from(error: DlqError) -> Self {
        ProjectionError::DeadLetter(error)
    }
}

impl From<RegistryError> for ProjectionError {
    fn from(error: RegistryError) -> Self {
        ProjectionError::Registry(error)
    }
}

impl ProjectionError {
    /// Whether waiting can fix it (something is down), as opposed to configuration or data
    /// that will stay wrong.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProjectionError::Store(
                StoreError::Database(_)
                | StoreError::Timeout(_)
                | StoreError::Unreachable { .. }
                | StoreError::PositionMoved { .. },
            ) => true,
            ProjectionError::Setup(KafkaSetupError::Unreachable { .. }) => true,
            ProjectionError::Kafka(_) | ProjectionError::OutsideGroup { .. } => true,
            ProjectionError::DeadLetter(DlqError::Kafka { .. } | DlqError::Timeout { .. }) => true,
            ProjectionError::Registry(error) => error.is_retryable(),
            _ => false,
        }
    }

    /// A short label for the error metric.
    fn kind(&self) -> &'static str {
        match self {
            ProjectionError::Store(_) => "store",
            ProjectionError::DeadLetter(_) => "dlq",
            ProjectionError::Registry(_) => "registry",
            ProjectionError::OutsideGroup { .. } => "group",
            _ => "kafka",
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectionReport {
    /// Fact records applied (including replayed and older ones the version guard ignored).
    pub applied_facts: u64,
    /// Batches committed.
    pub batches: u64,
    /// Records sent to the dead-letter queue.
    pub dead_letters: u64,
    /// Every partition this instance owned at some point.
    pub partitions: BTreeSet<i32>,
    /// With [`ProjectionMode::UntilCaughtUp`]: whether it stopped because it caught up, rather
    /// than for shutdown.
    pub caught_up: bool,
}

/// How a running projector is doing, for progress output and dashboards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectionStatus {
    /// The partitions this instance owns now.
    pub owned: Vec<i32>,
    pub applied_facts: u64,
    pub batches: u64,
    pub dead_letters: u64,
    /// Records behind the end of the owned partitions, as librdkafka last reported (every
    /// 5 s); `None` before the first report. This instance's view, for progress output; the
    /// group's lag, whoever owns what, is [`super::LagMeter`]'s.
    pub lag: Option<i64>,
    /// With [`ProjectionMode::UntilCaughtUp`]: partitions caught up, of all.
    pub caught_up: Option<(usize, usize)>,
}

/// Keeps the read model of `S` up to date from the fact topic.
pub struct Projector<S> {
    store: S,
    kafka: KafkaConfig,
    config: ProjectionConfig,
    topic: String,
    reader: FactReader,
    dead_letters: DeadLetterSender,
    status: watch::Sender<ProjectionStatus>,
    /// When an idle batch last checked the stored positions.
    positions_checked: Instant,
}

/// A projector from the Kafka cluster of `kafka` into `store`, ready to run: the topics are
/// provisioned, and a schema registry client made when one is configured.
pub async fn kafka_projector<S: ReportStore + Clone + 'static>(
    store: S,
    kafka: &KafkaConfig,
    config: ProjectionConfig,
) -> Result<Projector<S>, ProjectionError> {
    let topics = kafka.topics();
    provision_topics(
        kafka,
        &topics.specs(kafka.partitions, kafka.replication_factor),
    )
    .await?;
    let registry = kafka.schema_registry_client()?;
    let reader =
        FactReader::new(registry).with_missing_schema_patience(config.missing_schema_patience);
    Ok(Projector {
        store,
        kafka: kafka.clone(),
        config: ProjectionConfig {
            batch_size: config.batch_size.max(1),
            batch_bytes: config.batch_bytes.max(1),
            ..config
        },
        topic: topics.book_fact,
        reader,
        dead_letters: DeadLetterSender::new(kafka)?,
        status: watch::Sender::new(ProjectionStatus::default()),
        positions_checked: Instant::now(),
    })
}

/// A batch read: what to apply, what to dead-letter, and the offsets to store with it.
struct ReadBatch {
    offsets: Vec<OffsetAdvance>,
    /// Records polled.
    polled: usize,
    changes: Vec<ReportChange>,
    superseded: Superseded,
    rejected: Vec<(OwnedMessage, Rejection)>,
}

/// The records of a batch dropped on the polling thread for a newer change of their book.
#[derive(Default)]
struct Superseded {
    records: usize,
    deletes: usize,
}

impl Superseded {
    fn count(&mut self, deletion: bool) {
        self.records += 1;
        self.deletes += usize::from(deletion);
    }
}

/// What a run carries from one membership to the next.
#[derive(Default)]
struct Progress {
    report: ProjectionReport,
    /// Partitions whose end this run reached with everything before it applied.
    ends_reached: HashSet<i32>,
}

/// Why a membership ended.
enum Stop {
    Shutdown,
    CaughtUp,
}

/// How many members `group` has right now.
async fn active_members(
    kafka: &KafkaConfig,
    client: Arc<BaseConsumer>,
    group: &str,
) -> Result<usize, ProjectionError> {
    let group = group.to_owned();
    let timeout = kafka.request_timeout();
    run_blocking(move || {
        let groups = client.fetch_group_list(Some(&group), timeout)?;
        Ok(groups.groups().iter().map(|g| g.members().len()).sum())
    })
    .await
    .map_err(ProjectionError::Kafka)
}

/// The end of each partition when the run started.
type Ends = HashMap<i32, End>;

#[derive(Debug, Clone, Copy)]
struct End {
    low: i64,
    high: i64,
    /// The offset stored for the partition when that was past its end: the topic was deleted
    /// and created again (or its log cut short) under a read model that was kept. A consumer
    /// starts such a partition over, so this offset says nothing about what was applied.
    stale: Option<i64>,
}

impl<S: ReportStore + Clone + 'static> Projector<S> {
    pub fn group(&self) -> &str {
        &self.config.group_id
    }

    /// Follows the projector's progress.
    pub fn status(&self) -> watch::Receiver<ProjectionStatus> {
        self.status.subscribe()
    }

    /// Empties the read model and forgets the stored offsets of every group (see
    /// [`ReportStore::reset`]), and this group's offsets in Kafka, so the next run reads the
    /// compacted topic from the beginning. Refuses while a member of this group, or of any
    /// group with offsets stored in the read model, is active: the dashboard it feeds would be
    /// emptied under it. The check cannot lock members out; one that joins in between, or one
    /// still applying after it left its group, finds its positions gone at its next batch (or
    /// idle check) and reads its partitions again from the beginning, so the rows it had
    /// passed come back.
    pub async fn rebuild(&self) -> Result<(), ProjectionError> {
        let group = &self.config.group_id;
        let client = Arc::new(self.group_client()?);
        let mut groups = self.store.stored_groups().await?;
        if !groups.contains(group) {
            groups.insert(0, group.clone());
        }
        for checked in &groups {
            let members = active_members(&self.kafka, client.clone(), checked).await?;
            if members > 0 {
                return Err(ProjectionError::GroupActive {
                    group: checked.clone(),
                    members,
                });
            }
        }
        let forgotten = self.store.reset().await?;
        info!(groups = ?forgotten, "forgot the stored offsets");
        // The database alone decides where reading starts; the group offsets only feed lag
        // tooling until the first batch commits new ones, so failing here is no reason to stop.
        if let Err(error) = self.rewind_group_offsets(client).await {
            warn!(%error, "could not reset the group offsets in Kafka");
        }
        info!(%group, "read model and stored offsets reset");
        Ok(())
    }

    /// A client of the group that does not join it.
    fn group_client(&self) -> Result<BaseConsumer, ProjectionError> {
        self.kafka
            .consumer_config(&self.config.group_id)
            .create()
            .map_err(|cause| ProjectionError::Consumer {
                bootstrap_servers: self.kafka.bootstrap_servers.clone(),
                cause,
            })
    }

    /// Commits the low watermark of every partition as the group's offset.
    async fn rewind_group_offsets(&self, client: Arc<BaseConsumer>) -> Result<(), ProjectionError> {
        let partitions = partition_ids(&self.kafka, &self.topic).await?;
        let topic = self.topic.clone();
        let timeout = self.kafka.request_timeout();
        run_blocking(move || {
            let mut beginning = TopicPartitionList::new();
            for partition in partitions {
                let (low, _) = client.fetch_watermarks(&topic, partition, timeout)?;
                beginning.add_partition_offset(&topic, partition, Offset::Offset(low))?;
            }
            client.commit(&beginning, CommitMode::Sync)
        })
        .await
        .map_err(ProjectionError::Kafka)
    }

    /// Runs until shutdown (or, with [`ProjectionMode::UntilCaughtUp`], until caught up).
    /// Returns an error only for what waiting cannot fix.
    pub async fn run(
        mut self,
        mode: ProjectionMode,
        mut shutdown: Shutdown,
    ) -> Result<ProjectionReport, ProjectionError> {
        let ends = match mode {
            ProjectionMode::UntilCaughtUp => Some(self.measure_ends().await?),
            ProjectionMode::Follow => None,
        };
        let mut progress = Progress::default();
        let mut backoff = self.config.min_backoff;
        while !shutdown.is_triggered() {
            // No retry here, unlike the errors below: joining only creates the consumer and
            // subscribes, both without a word to the broker (librdkafka connects and joins
            // inside `poll`, where an unreachable broker is waited for), so it fails only for
            // a setting or topic name that the next attempt would find just as wrong.
            let mut session =
                Session::join(&self.kafka, &self.config.group_id, self.store.clone())?;
            let outcome = self
                .project(
                    &mut session,
                    ends.as_ref(),
                    &mut progress,
                    &mut shutdown,
                    &mut backoff,
                )
                .await;
            session.leave().await;
            self.status.send_modify(|status| status.owned.clear());
            match outcome {
                Ok(Stop::Shutdown) => break,
                Ok(Stop::CaughtUp) => {
                    progress.report.caught_up = true;
                    break;
                }
                Err(error) if error.is_retryable() => {
                    metrics::record_error(error.kind());
                    warn!(%error, ?backoff, "projection interrupted; joining again after a pause");
                    if !pause(&mut shutdown, &mut backoff, self.config.max_backoff).await {
                        break;
                    }
                }
                Err(error) => return Err(error),
            }
        }
        let report = progress.report;
        info!(
            applied = report.applied_facts,
            batches = report.batches,
            dead_letters = report.dead_letters,
            "projection stopped"
        );
        Ok(report)
    }

    /// One membership: batches until shutdown, caught up, or an error. Each batch is applied
    /// while the next one is polled: decoding on the polling thread and writing the read model
    /// take turns otherwise, and each took about half the time of a backlog.
    async fn project(
        &mut self,
        session: &mut Session<S>,
        ends: Option<&Ends>,
        progress: &mut Progress,
        shutdown: &mut Shutdown,
        backoff: &mut Duration,
    ) -> Result<Stop, ProjectionError> {
        let mut pending = self.poll_batch(session);
        loop {
            let mut batch = session.receive(pending).await?;
            if let Some(stuck) = session.stuck_outside_group() {
                // The batch is dropped unapplied, nothing of it stored: the next session reads
                // it again from the stored offsets.
                return Err(stuck);
            }
            if shutdown.is_triggered() {
                // The batch is dropped unapplied, nothing of it stored: the next run reads it.
                return Ok(Stop::Shutdown);
            }
            // Read before the next batch is polled: a schema id learned from the registry here
            // lets the polling thread decode the next batch's records of it already.
            let read = self.read(session, &mut batch).await?;
            let revocations = session.hold_revocations().await;
            pending = self.poll_batch(session);
            // A stop lets the batch being applied finish for [`APPLY_GRACE`], then abandons
            // it: its dead letters may wait for an acknowledgement for twice the request
            // timeout (a broker outage), its transaction for the database. That is safe: the batch's rows and its offsets go in one
            // transaction, which either committed (both stored) or is rolled back when it is
            // dropped (neither), and the offsets stored are where the next run starts. So an
            // abandoned batch is read and applied again, which the version guard makes
            // harmless; a dead letter sent already may be sent twice, as after a crash; and a
            // record is never skipped, since its offset is stored only after its dead letter
            // is acknowledged.
            let applied = tokio::select! {
                // A batch that is done counts, even when the stop came meanwhile.
                biased;
                applied = self.apply(session, read, &mut progress.report) => Some(applied),
                _ = async {
                    shutdown.wait().await;
                    tokio::time::sleep(APPLY_GRACE).await;
                } => None,
            };
            drop(revocations);
            let stop = match applied {
                Some(Ok(())) => self.account(session, &batch, ends, progress, backoff).await,
                Some(Err(error)) => Err(error),
                None => {
                    warn!(
                        grace = ?APPLY_GRACE,
                        "the batch being applied did not finish in time; abandoning it (the next run applies it again)"
                    );
                    Ok(Some(Stop::Shutdown))
                }
            };
            match stop {
                Ok(None) => {}
                stop => {
                    // Whatever the next batch holds is read again by the next membership.
                    let _ = session.receive(pending).await;
                    return stop.map(|stop| stop.unwrap_or(Stop::Shutdown));
                }
            }
        }
    }

    fn poll_batch(&self, session: &Session<S>) -> PendingBatch {
        session.poll_batch(
            BatchLimits {
                records: self.config.batch_size,
                bytes: self.config.batch_bytes,
            },
            self.config.batch_wait,
            &self.reader,
        )
    }

    /// After a batch is applied: progress, status, and whether the run is caught up.
    async fn account(
        &self,
        session: &Session<S>,
        batch: &Batch,
        ends: Option<&Ends>,
        progress: &mut Progress,
        backoff: &mut Duration,
    ) -> Result<Option<Stop>, ProjectionError> {
        *backoff = self.config.min_backoff;
        progress.ends_reached.extend(&batch.ends_reached);
        let owned = session.owned();
        progress.report.partitions.extend(&owned);
        self.publish_status(&progress.report, owned, session.lag());
        if let Some(ends) = ends
            && self
                .caught_up(session, ends, &progress.ends_reached)
                .await?
        {
            info!(applied = progress.report.applied_facts, "caught up");
            return Ok(Some(Stop::CaughtUp));
        }
        Ok(None)
    }

    /// Reads what the polling thread could not (asking the schema registry), in batch order,
    /// taking the batch's records. Needs no revocation gate: nothing is polled meanwhile.
    async fn read(
        &mut self,
        session: &Session<S>,
        batch: &mut Batch,
    ) -> Result<ReadBatch, ProjectionError> {
        let offsets = session.offsets_to_store(batch);
        let records = std::mem::take(&mut batch.records);
        let polled = records.len();
        let mut changes = Vec::with_capacity(polled);
        let mut superseded = Superseded::default();
        let mut rejected = Vec::new();
        // Schema ids the registry does not know yet hold the batch back, but only after every
        // record is read: each unknown id's patience starts now, together, rather than one id
        // after another's has run out (records framed with a thousand made-up ids would
        // otherwise hold the projection back a thousand times).
        let mut not_yet_known = None;
        // In batch order: the changes of a book with a versionless deletion depend on it.
        for record in records {
            let message = match record.read {
                PolledRead::Change(change) => {
                    changes.push(change);
                    continue;
                }
                PolledRead::Superseded { deletion } => {
                    superseded.count(deletion);
                    continue;
                }
                PolledRead::Unread(message) => message,
            };
            let outcome = match self.reader.read(&message).await {
                Ok(outcome) => outcome,
                Err(error @ RegistryError::NotYetKnown { .. }) => {
                    not_yet_known.get_or_insert(error);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            match outcome {
                FactOutcome::Apply(change) => changes.push(change),
                FactOutcome::DeadLetter(rejection) => {
                    warn!(
                        partition = record.partition,
                        offset = record.offset,
                        %rejection,
                        "fact record cannot be applied; sending it to the dead-letter queue"
                    );
                    rejected.push((message, rejection));
                }
            }
        }
        if let Some(error) = not_yet_known {
            return Err(error.into());
        }
        Ok(ReadBatch {
            offsets,
            polled,
            changes,
            superseded,
            rejected,
        })
    }

    /// Dead-letters what cannot be read, then applies the rest with the batch's offsets in one
    /// transaction, then tells the group.
    async fn apply(
        &mut self,
        session: &mut Session<S>,
        read: ReadBatch,
        report: &mut ProjectionReport,
    ) -> Result<(), ProjectionError> {
        let ReadBatch {
            offsets,
            polled,
            changes,
            superseded,
            rejected,
        } = read;
        let rejected: Vec<_> = rejected
            .iter()
            .map(|(message, rejection)| (message, rejection.clone()))
            .collect();
        if !rejected.is_empty() {
            // Acknowledged before any offset past these records is stored.
            self.dead_letters.send_all(&rejected).await?;
            metrics::record_dead_letters(rejected.len());
            report.dead_letters += rejected.len() as u64;
        }
        if changes.is_empty() && offsets.is_empty() {
            return self.check_positions_when_idle(session).await;
        }
        let deletes = superseded.deletes
            + changes
                .iter()
                .filter(|change| matches!(change, ReportChange::Delete { .. }))
                .count();
        let applied = superseded.records + changes.len();
        let changes = compact_changes(changes);
        let batch = self
            .store
            .apply_batch(&self.config.group_id, &self.topic, &changes, &offsets);
        answer_within(self.config.store_timeout, batch).await?;
        session.stored(&offsets);
        if polled > 0 {
            metrics::record_batch(applied - deletes, deletes);
            report.applied_facts += applied as u64;
            report.batches += 1;
        }
        Ok(())
    }

    /// At most once per [`IDLE_POSITION_CHECK`]: an error when a position this member owns is
    /// no longer the one stored. Called under the revocation gate, like a batch: no partition
    /// changes owner meanwhile.
    async fn check_positions_when_idle(
        &mut self,
        session: &Session<S>,
    ) -> Result<(), ProjectionError> {
        if self.positions_checked.elapsed() < IDLE_POSITION_CHECK {
            return Ok(());
        }
        self.positions_checked = Instant::now();
        let group = &self.config.group_id;
        let stored = self.store.stored_offsets(group, &self.topic);
        let stored = answer_within(self.config.store_timeout, stored).await?;
        check_positions(group, &self.topic, session.believed_positions(), &stored)?;
        Ok(())
    }

    fn publish_status(&self, report: &ProjectionReport, owned: Vec<i32>, lag: Option<i64>) {
        self.status.send_modify(|status| {
            status.owned = owned;
            status.applied_facts = report.applied_facts;
            status.batches = report.batches;
            status.dead_letters = report.dead_letters;
            if lag.is_some() {
                status.lag = lag;
            }
        });
    }

    /// Whether every partition is applied up to its end at start, by this member (its stored
    /// offsets, or an end it reached) or by another one (the offsets it stored).
    async fn caught_up(
        &self,
        session: &Session<S>,
        ends: &Ends,
        reached: &HashSet<i32>,
    ) -> Result<bool, ProjectionError> {
        let mut progress = session.stored_offsets();
        let is_done = |partition: &i32, progress: &HashMap<i32, i64>| {
            let end = ends[partition];
            end.high <= end.low
                || reached.contains(partition)
                || progress
                    .get(partition)
                    .is_some_and(|next| *next >= end.high && Some(*next) != end.stale)
        };
        let done = |progress: &HashMap<i32, i64>| {
            ends.keys()
                .filter(|partition| is_done(partition, progress))
                .count()
        };
        let mut caught_up = done(&progress);
        // Only a partition this member does not own can have been applied further by another
        // member; one it owns it gets to itself, having started at the offset stored for it.
        // So the database is asked only then, not after every batch of a catch-up.
        let owned = session.owned();
        let behind_elsewhere = ends
            .keys()
            .any(|partition| !owned.contains(partition) && !is_done(partition, &progress));
        if behind_elsewhere {
            let stored = self
                .store
                .stored_offsets(&self.config.group_id, &self.topic);
            for offset in answer_within(self.config.store_timeout, stored).await? {
                let next = progress.entry(offset.partition).or_default();
                *next = (*next).max(offset.next_offset);
            }
            caught_up = done(&progress);
        }
        self.status
            .send_modify(|status| status.caught_up = Some((caught_up, ends.len())));
        Ok(caught_up == ends.len())
    }

    /// The watermarks of every partition of the fact topic, now, and the offsets stored past
    /// them.
    async fn measure_ends(&self) -> Result<Ends, ProjectionError> {
        // Read before the watermarks: an offset stored by then was at most the end then, so
        // one past the end measured after it is stale, not applied by a member meanwhile.
        let stored = self
            .store
            .stored_offsets(&self.config.group_id, &self.topic);
        let stored: HashMap<i32, i64> = answer_within(self.config.store_timeout, stored)
            .await?
            .into_iter()
            .map(|offset| (offset.partition, offset.next_offset))
            .collect();
        let partitions = partition_ids(&self.kafka, &self.topic).await?;
        let client: BaseConsumer =
            self.kafka
                .client_config()
                .create()
                .map_err(|cause| ProjectionError::Consumer {
                    bootstrap_servers: self.kafka.bootstrap_servers.clone(),
                    cause,
                })?;
        let topic = self.topic.clone();
        let timeout = self.kafka.request_timeout();
        let watermarks = run_blocking(move || {
            partitions
                .into_iter()
                .map(|partition| {
                    let watermarks = client.fetch_watermarks(&topic, partition, timeout)?;
                    Ok((partition, watermarks))
                })
                .collect::<Result<HashMap<i32, (i64, i64)>, KafkaError>>()
        })
        .await
        .map_err(ProjectionError::Kafka)?;
        info!(?watermarks, "catching up to the end of every partition");
        let ends = watermarks
            .into_iter()
            .map(|(partition, (low, high))| {
                let stale = stored.get(&partition).copied().filter(|next| *next > high);
                if let Some(next_offset) = stale {
                    warn!(
                        partition,
                        next_offset,
                        end = high,
                        "the offset stored for this partition is past its end (the topic was \
                         created again?); it is read from its beginning"
                    );
                }
                (partition, End { low, high, stale })
            })
            .collect();
        Ok(ends)
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn run_blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(call)
        .await
        .expect("a blocking Kafka call panicked")
}

/// Sleeps for `backoff` (doubling it for next time); false if shutdown came first.
async fn pause(shutdown: &mut Shutdown, backoff: &mut Duration, max: Duration) -> bool {
    let sleep = *backoff;
    *backoff = (*backoff * 2).min(max);
    tokio::select! {
        _ = shutdown.wait() => false,
        _ = tokio::time::sleep(sleep) => true,
    }
}
