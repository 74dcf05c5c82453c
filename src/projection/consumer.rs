//! The projector's Kafka consumer: a member of the projection's group that starts every
//! partition it is given at the offset the read model stored, and hands out batches.
//!
//! * **Start at the stored offset.** The context's `rebalance` callback reads the group's
//!   stored offsets from the [`ReportStore`] and assigns each new partition at its stored next
//!   offset, or at the beginning when none is stored (nothing of it was applied yet). Kafka's
//!   committed group offsets are never used to decide where to start, so a crash between the
//!   database commit and the Kafka commit, a restored database or a `--rebuild` all resume
//!   exactly where the rows are.
//! * **No batch spans a rebalance.** Callbacks run only inside `poll`, on the thread that
//!   polls. The projector collects the next batch while it applies the previous one, and holds
//!   the [revocation gate](Session::hold_revocations) while it applies: a revocation waits in
//!   its callback until the batch being applied is committed with its offsets. A revocation
//!   that arrives while a batch is being collected drops that batch's records of the revoked
//!   partitions (unapplied, with no offset stored: the next owner reads them from the stored
//!   offset). So when this member acknowledges a revocation, everything it applied of that
//!   partition is committed, and the next owner, which is only assigned the partition after
//!   that acknowledgement (cooperative-sticky), reads the stored offset after it.
//! * **Blocking calls stay off the async workers.** `poll` (and with it the callback, which
//!   waits for the database through the runtime handle) runs on the blocking pool; closing the
//!   consumer, which serves the last revocation, runs on a thread of its own and is waited for
//!   a bounded time (see [`Session::leave`]). This works on a current-thread runtime too: the
//!   thread in `Runtime::block_on` drives the I/O the callback waits for.
//!
//! * **Less to carry.** The polling thread reads each record as it arrives (while it is still
//!   librdkafka's) and drops the ones a newer fact of the same book in the batch supersedes,
//!   before their headers are parsed (see `settle`).
//!
//! The position handed out with a batch is librdkafka's consumer position, which also moves
//! past transaction markers and aborted records. Storing it (rather than last offset + 1) lets
//! the stored offset reach the end of a partition written by transactions, which
//! `--until-caught-up` relies on.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::fact::{FactReader, UntimedChange};
use super::projector::ProjectionError;
use super::{OffsetAdvance, PartitionOffset, ReportChange, ReportStore, Versioned};
use crate::config::KafkaConfig;
use crate::store::{StoreError, answer_within};

/// A change of this member's assignment, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentChange {
    /// The partition is this member's now, starting at `start` (the stored next offset; `None`:
    /// from the beginning).
    Assigned {
        partition: i32,
        start: Option<i64>,
    },
    Revoked {
        partition: i32,
    },
}

/// The consumer context: assigns at the stored offsets and records assignment changes.
pub struct ProjectionContext<S> {
    store: S,
    group: String,
    topic: String,
    runtime: tokio::runtime::Handle,
    state: Mutex<AssignmentState>,
    /// Held while a batch is applied; a revocation waits for it (see the module doc).
    revocations: Arc<AsyncMutex<()>>,
}

#[derive(Debug, Default)]
struct AssignmentState {
    owned: BTreeSet<i32>,
    changes: Vec<AssignmentChange>,
    /// Records between the position and the end of the owned partitions, from the last
    /// statistics librdkafka reported.
    lag: Option<i64>,
    /// Why an assignment could not be made safely; ends the session.
    failure: Option<AssignFailure>,
    /// Since when librdkafka's group handler has been outside a steady membership, as its
    /// statistics tell (see [`Session::stuck_outside_group`]).
    outside_group: Option<OutsideGroup>,
}

/// A stretch of time outside a steady group membership: joining, syncing, waiting for the
/// coordinator, or for the application to take a rebalance.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OutsideGroup {
    since: Instant,
    /// librdkafka's names for the group handler's state and its join state, last seen.
    state: String,
    join_state: String,
}

impl OutsideGroup {
    /// The stretch after statistics that say `state` and `join_state` at `now`: `None` once the
    /// membership is steady again, else the earlier stretch (or a new one) with these states.
    fn track(
        earlier: Option<OutsideGroup>,
        state: &str,
        join_state: &str,
        now: Instant,
    ) -> Option<OutsideGroup> {
        if join_state == "steady" {
            return None;
        }
        Some(OutsideGroup {
            since: earlier.map_or(now, |earlier| earlier.since),
            state: state.to_owned(),
            join_state: join_state.to_owned(),
        })
    }
}

/// How long an assignment waits for the stored offsets before the member leaves the group
/// (and joins again after a pause), as for any other failure to read them.
const STORED_OFFSETS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum AssignFailure {
    Store(StoreError),
    Kafka(KafkaError),
}

impl<S: ReportStore> ProjectionContext<S> {
    fn state(&self) -> MutexGuard<'_, AssignmentState> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn owns(&self, partition: i32) -> bool {
        self.state().owned.contains(&partition)
    }

    fn partitions_of(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|element| element.partition())
            .collect()
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let partitions = self.partitions_of(tpl);
        // Blocks the polling thread (never an async worker, see the module doc) until the
        // database answers: the assignment must not start anywhere else. Bounded: a database
        // that does not answer (a connection cut without a reset) would otherwise hold the
        // polling thread, and a stop waiting for it, until TCP gives up, minutes later.
        let stored = self.runtime.block_on(answer_within(
            STORED_OFFSETS_TIMEOUT,
            self.store.stored_offsets(&self.group, &self.topic),
        ));
        let starts: HashMap<i32, i64> = match stored {
            Ok(offsets) => offsets
                .into_iter()
                .map(|offset| (offset.partition, offset.next_offset))
                .collect(),
            Err(error) => {
                warn!(%error, "could not read the stored offsets; leaving the group");
                self.state().failure = Some(AssignFailure::Store(error));
                // Assigned anyway, as the protocol requires, but never owned: nothing of these
                // partitions is applied, and the session ends at the next batch.
                let _ = assign_partitions(consumer, tpl);
                return;
            }
        };
        for &partition in &partitions {
            let start = starts
                .get(&partition)
                .map_or(Offset::Beginning, |&next| Offset::Offset(next));
            if let Err(error) = tpl.set_partition_offset(&self.topic, partition, start) {
                self.state().failure = Some(AssignFailure::Kafka(error));
            }
        }
        if let Err(error) = assign_partitions(consumer, tpl) {
            self.state().failure = Some(AssignFailure::Kafka(error));
            return;
        }
        info!(?partitions, "assigned; starting at the stored offsets");
        let mut state = self.state();
        for partition in partitions {
            state.owned.insert(partition);
            state.changes.push(AssignmentChange::Assigned {
                partition,
                start: starts.get(&partition).copied(),
            });
        }
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let partitions = self.partitions_of(tpl);
        // Blocks the polling thread (never an async worker) until the batch being applied, if
        // any, is committed with its offsets: only then may the partitions go to their next
        // owner, which starts at the stored offsets.
        let _applied = self.revocations.blocking_lock();
        {
            let mut state = self.state();
            for &partition in &partitions {
                state.owned.remove(&partition);
                state.changes.push(AssignmentChange::Revoked { partition });
            }
        }
        let outcome = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(error) = outcome {
            warn!(%error, "unassigning revoked partitions failed");
        }
        info!(?partitions, "revoked");
    }

    fn take_changes(&self) -> Vec<AssignmentChange> {
        std::mem::take(&mut self.state().changes)
    }

    fn take_failure(&self) -> Option<AssignFailure> {
        self.state().failure.take()
    }
}

/// Adds `tpl` to the assignment: incrementally under the cooperative protocol (the default),
/// as the whole assignment under an eager one (configurable through the passthrough options).
fn assign_partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_assign(tpl),
        _ => consumer.assign(tpl),
    }
}

impl<S: ReportStore> ClientContext for ProjectionContext<S> {
    /// The lag of the owned partitions for [`Session::lag`] (the progress output), from
    /// librdkafka's periodic statistics: they cost no request, unlike asking the broker for
    /// watermarks. Not the lag gauge: a member that owns nothing has nothing to report, so the
    /// gauge is measured from the stored offsets instead (see [`super::lag`]).
    fn stats(&self, statistics: Statistics) {
        let mut state = self.state();
        if let Some(group) = &statistics.cgrp {
            state.outside_group = OutsideGroup::track(
                state.outside_group.take(),
                &group.state,
                &group.join_state,
                Instant::now(),
            );
        }
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut total = 0;
        for partition in topic.partitions.values() {
            if !state.owned.contains(&partition.partition) || partition.app_offset < 0 {
                continue;
            }
            // read_committed reads up to the last stable offset, not the high watermark.
            total += (partition.ls_offset - partition.app_offset).max(0);
        }
        state.lag = Some(total);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // The end of a partition is how `--until-caught-up` knows it is done; librdkafka also
        // reports it as a client error, which it is not.
        if matches!(error, KafkaError::PartitionEOF(_))
            || matches!(&error, KafkaError::Global(code) if *code == RDKafkaErrorCode::PartitionEOF)
        {
            return;
        }
        // librdkafka reconnects by itself; these are worth a warning, not an exit.
        warn!(%error, reason, "Kafka client error");
    }
}

impl<S: ReportStore> ConsumerContext for ProjectionContext<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                warn!(error = ?other, "rebalance failed; giving up the partitions");
                self.revoke(consumer, tpl);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // The group offsets only serve lag tooling; the database holds the real position.
        if let Err(error) = result {
            debug!(%error, "committing the group offsets failed");
        }
    }
}

type ProjectionConsumer<S> = BaseConsumer<ProjectionContext<S>>;

/// What one poll round brought.
#[derive(Debug, Default)]
pub struct Batch {
    /// Records of partitions this member owns, in the order received.
    pub records: Vec<PolledRecord>,
    /// The position after the batch of every owned partition that has one.
    pub positions: Vec<PartitionOffset>,
    /// Partitions whose end was reached (nothing more to read for now).
    pub ends_reached: Vec<i32>,
}

/// One record of a batch, read already when the poll thread could (see
/// [`FactReader::read_known`]).
#[derive(Debug)]
pub struct PolledRecord {
    pub partition: i32,
    pub offset: i64,
    pub read: PolledRead,
}

#[derive(Debug)]
pub enum PolledRead {
    /// What the record asks of the read model.
    Change(ReportChange),
    /// A readable record that another record of the batch supersedes (a newer version of the
    /// same book): nothing to apply. Counted as applied, like the ones the version guard of
    /// the read model ignores.
    Superseded { deletion: bool },
    /// The record, copied, for [`FactReader::read`] to tell (asking the schema registry) or
    /// reject (with everything the dead-letter queue keeps of it).
    Unread(OwnedMessage),
}

/// A batch being collected on the blocking pool; [`Session::receive`] takes it.
pub struct PendingBatch {
    polling: JoinHandle<Result<(Batch, Vec<AssignmentChange>), ProjectionError>>,
}

/// One membership in the group: from joining to leaving.
pub struct Session<S: ReportStore + Clone + 'static> {
    consumer: Option<Arc<ProjectionConsumer<S>>>,
    topic: String,
    /// Per partition this member owns (as of the last batch received): the next offset stored
    /// in the database, as far as this member knows; `None` when nothing is stored for it.
    stored: HashMap<i32, Option<i64>>,
    /// Longer than any healthy join takes (see [`Session::stuck_outside_group`]).
    stuck_after: Duration,
}

/// How often librdkafka reports statistics, and so how often [`Session::lag`] moves.
const STATISTICS_INTERVAL_MS: &str = "5000";

/// How long the group handler may stay outside a steady membership before the session counts
/// as stuck: the rebalance timeout (`max.poll.interval.ms`, which the classic protocol gives
/// the other members to rejoin) plus a session timeout, from `config` or librdkafka's defaults.
fn stuck_after(config: &rdkafka::ClientConfig) -> Duration {
    let millis = |key: &str, default: u64| {
        config
            .get(key)
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    Duration::from_millis(
        millis("max.poll.interval.ms", 300_000) + millis("session.timeout.ms", 45_000),
    )
}

impl<S: ReportStore + Clone + 'static> Session<S> {
    /// Joins `group` and subscribes to the fact topic. Must be called inside a Tokio runtime.
    pub fn join(kafka: &KafkaConfig, group: &str, store: S) -> Result<Self, ProjectionError> {
        let topic = kafka.topics().book_fact;
        let context = ProjectionContext {
            store,
            group: group.to_owned(),
            topic: topic.clone(),
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::new(AssignmentState::default()),
            revocations: Arc::new(AsyncMutex::new(())),
        };
        let mut config = kafka.consumer_config(group);
        let stuck_after = stuck_after(&config);
        config.set("enable.partition.eof", "true");
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
        }
        let consumer: ProjectionConsumer<S> =
            config
                .create_with_context(context)
                .map_err(|cause| ProjectionError::Consumer {
                    bootstrap_servers: kafka.bootstrap_servers.clone(),
                    cause,
                })?;
        consumer
            .subscribe(&[&topic])
            .map_err(ProjectionError::Kafka)?;
        Ok(Self {
            consumer: Some(Arc::new(consumer)),
            topic,
            stored: HashMap::new(),
            stuck_after,
        })
    }

    /// An error when librdkafka's group handler has been outside a steady membership for longer
    /// than a healthy join takes: the rebalance timeout (`max.poll.interval.ms`) that the other
    /// members may take to rejoin, plus a session timeout. The caller then leaves and joins
    /// again with a new consumer.
    ///
    /// Why: in the fault suite, librdkafka 2.12.1 once lost its assignment during a broker
    /// outage (its session timed out), revoked the partitions, and never sent another
    /// JoinGroup: the broker came back, dropped the member when its session expired, and the
    /// projector sat without partitions, polling, with nothing in its log, until the suite gave
    /// up two minutes later. A fresh consumer joins at once.
    pub fn stuck_outside_group(&self) -> Option<ProjectionError> {
        let state = self.consumer().context().state();
        let outside = state.outside_group.as_ref()?;
        let waited = outside.since.elapsed();
        (waited > self.stuck_after).then(|| ProjectionError::OutsideGroup {
            waited,
            state: outside.state.clone(),
            join_state: outside.join_state.clone(),
        })
    }

    fn consumer(&self) -> &Arc<ProjectionConsumer<S>> {
        self.consumer
            .as_ref()
            .expect("the consumer is only taken when the session ends")
    }

    /// The partitions this member owns.
    pub fn owned(&self) -> Vec<i32> {
        self.consumer()
            .context()
            .state()
            .owned
            .iter()
            .copied()
            .collect()
    }

    /// Records behind the end of the owned partitions, as librdkafka last reported.
    pub fn lag(&self) -> Option<i64> {
        self.consumer().context().state().lag
    }

    /// Starts collecting the next batch on the blocking pool (up to `limits` or `max_wait`),
    /// so that the previous one can be applied meanwhile. Hold the
    /// [revocation gate](Self::hold_revocations) while applying; [`receive`](Self::receive)
    /// the batch before starting another.
    pub fn poll_batch(
        &self,
        limits: BatchLimits,
        max_wait: Duration,
        reader: &FactReader,
    ) -> PendingBatch {
        let consumer = self.consumer().clone();
        let topic = self.topic.clone();
        // A clone shares the schemas learned so far; what only the registry can tell is left
        // to the projector's own reader, which learns it for the next batches.
        let reader = reader.clone();
        PendingBatch {
            polling: tokio::task::spawn_blocking(move || {
                collect_batch(&consumer, &topic, &reader, limits, max_wait)
            }),
        }
    }

    /// Makes revocations wait until the guard is dropped: hold it while applying a batch and
    /// recording its offsets.
    pub async fn hold_revocations(&self) -> OwnedMutexGuard<()> {
        self.consumer()
            .context()
            .revocations
            .clone()
            .lock_owned()
            .await
    }

    /// Waits for a batch started by [`poll_batch`](Self::poll_batch) and takes note of the
    /// assignment changes that came with it.
    pub async fn receive(&mut self, pending: PendingBatch) -> Result<Batch, ProjectionError> {
        let (batch, changes) = pending
            .polling
            .await
            .expect("polling the consumer panicked")?;
        for change in changes {
            match change {
                AssignmentChange::Assigned { partition, start } => {
                    self.stored.insert(partition, start);
                }
                AssignmentChange::Revoked { partition } => {
                    self.stored.remove(&partition);
                }
            }
        }
        match self.consumer().context().take_failure() {
            None => Ok(batch),
            Some(AssignFailure::Store(error)) => Err(ProjectionError::Store(error)),
            Some(AssignFailure::Kafka(error)) => Err(ProjectionError::Kafka(error)),
        }
    }

    /// The offsets to store with `batch`: per owned partition whose position moved, the
    /// position (never below what the batch's records need), and the one stored before.
    pub fn offsets_to_store(&self, batch: &Batch) -> Vec<OffsetAdvance> {
        let mut next: HashMap<i32, i64> = batch
            .positions
            .iter()
            .map(|position| (position.partition, position.next_offset))
            .collect();
        for record in &batch.records {
            let after = next.entry(record.partition).or_default();
            *after = (*after).max(record.offset + 1);
        }
        let mut offsets: Vec<OffsetAdvance> = next
            .into_iter()
            .filter_map(|(partition, next_offset)| {
                let stored = self.stored.get(&partition).copied().flatten();
                (stored != Some(next_offset)).then_some(OffsetAdvance {
                    partition,
                    stored,
                    next_offset,
                })
            })
            .collect();
        offsets.sort_unstable_by_key(|offset| offset.partition);
        offsets
    }

    /// Records that `offsets` are stored in the database, and commits them to the group for
    /// lag tooling (asynchronously: the database is what counts).
    pub fn stored(&mut self, offsets: &[OffsetAdvance]) {
        for offset in offsets {
            self.stored
                .insert(offset.partition, Some(offset.next_offset));
        }
        let positions = offsets
            .iter()
            .map(|offset| (offset.partition, offset.next_offset));
        if let Some(list) = self.offset_list(positions)
            && let Err(error) = self.consumer().commit(&list, CommitMode::Async)
        {
            debug!(%error, "could not commit the group offsets");
        }
    }

    /// The next offset stored per owned partition that has one, as far as this member knows.
    pub fn stored_offsets(&self) -> HashMap<i32, i64> {
        self.stored
            .iter()
            .filter_map(|(&partition, &stored)| Some((partition, stored?)))
            .collect()
    }

    /// Per owned partition (as of the last batch received), the position this member believes
    /// stored: `None` for nothing stored.
    pub fn believed_positions(&self) -> impl Iterator<Item = (i32, Option<i64>)> + '_ {
        self.stored
            .iter()
            .map(|(&partition, &stored)| (partition, stored))
    }

    /// `(partition, next offset)` pairs as a list to commit.
    fn offset_list(
        &self,
        offsets: impl IntoIterator<Item = (i32, i64)>,
    ) -> Option<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (partition, next_offset) in offsets {
            list.add_partition_offset(&self.topic, partition, Offset::Offset(next_offset))
                .ok()?;
        }
        (list.count() > 0).then_some(list)
    }

    /// Commits the stored offsets to the group synchronously and leaves the group (which
    /// revokes this member's partitions and lets the others take them over at once), waiting
    /// [`LEAVE_DEADLINE`] at most.
    ///
    /// Both normally take a few hundred milliseconds. With the broker unreachable, librdkafka
    /// waits out the group's session timeout (45 s by default), longer than an orchestrator's
    /// grace before it kills the process (Kubernetes: 30 s). Past the deadline the leave goes
    /// on in the background and this returns: the offsets that decide where reading resumes are
    /// in the database already, and the broker drops the member when its session times out.
    /// The leave runs on a thread of its own rather than the blocking pool because the runtime
    /// waits for its blocking tasks when it shuts down, so a stuck one would hold the process.
    pub async fn leave(mut self) {
        let list = self.offset_list(self.stored_offsets());
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let (left, on_left) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("projection-leave".into())
            .spawn(move || {
                if let Some(list) = list
                    && let Err(error) = consumer.commit(&list, CommitMode::Sync)
                {
                    debug!(%error, "could not commit the group offsets on leaving");
                }
                // Dropping the last handle closes the consumer: it leaves the group.
                drop(consumer);
                let _ = left.send(());
            });
        if let Err(error) = spawned {
            warn!(
                %error,
                "could not start a thread to leave the group; the broker drops this member when \
                 its session times out"
            );
            return;
        }
        match tokio::time::timeout(LEAVE_DEADLINE, on_left).await {
            Ok(Ok(())) => info!("left the group"),
            Ok(Err(_)) => warn!("closing the consumer panicked"),
            Err(_) => warn!(
                deadline = ?LEAVE_DEADLINE,
                "the group did not confirm the leave in time (is the broker down?); going on \
                 without it: the broker drops this member when its session times out"
            ),
        }
    }
}

/// How long [`Session::leave`] waits for the group to confirm.
pub const LEAVE_DEADLINE: Duration = Duration::from_secs(10);

impl<S: ReportStore + Clone + 'static> Drop for Session<S> {
    fn drop(&mut self) {
        // Closing serves the last rebalance callbacks and can wait long for an unreachable
        // broker: keep it off async workers, and off the blocking pool (see `leave`).
        if let Some(consumer) = self.consumer.take() {
            let closed = std::thread::Builder::new()
                .name("projection-close".into())
                .spawn(move || drop(consumer));
            if let Err(error) = closed {
                warn!(%error, "could not start a thread to close the consumer");
            }
        }
    }
}

/// How large a batch may grow.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most records.
    pub records: usize,
    /// Most bytes of keys and values; the record that reaches it is the batch's last.
    pub bytes: usize,
}

/// Polls until `limits` are reached, or until nothing more is buffered once there is a record,
/// or `max_wait` for the first record (blocking; on the blocking pool). Records of partitions
/// revoked meanwhile are dropped. Returns the batch and the assignment changes.
///
/// Returning as soon as librdkafka has nothing more buffered keeps a lone record from waiting
/// for a batch that will not fill (at low load, the batch is what has arrived), while a backlog
/// still makes full batches: librdkafka prefetches, so its queue does not run dry then.
fn collect_batch<S: ReportStore>(
    consumer: &ProjectionConsumer<S>,
    topic: &str,
    reader: &FactReader,
    limits: BatchLimits,
    max_wait: Duration,
) -> Result<(Batch, Vec<AssignmentChange>), ProjectionError> {
    let context = consumer.context();
    let deadline = Instant::now() + max_wait;
    let mut polled = Vec::new();
    let mut batch = Batch::default();
    let mut changes = Vec::new();
    let mut first_poll = true;
    let mut bytes = 0;
    while polled.len() < limits.records && bytes < limits.bytes {
        let wait = if polled.is_empty() {
            // Poll at least once, even with no time left (a `max_wait` of zero: take what is
            // buffered, wait for nothing): only `poll` serves the rebalance callbacks and
            // fetches records, so a round without one would never get partitions at all.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && !first_poll {
                break;
            }
            left
        } else {
            Duration::ZERO
        };
        first_poll = false;
        let message = consumer.poll(wait);
        for change in context.take_changes() {
            if let AssignmentChange::Revoked { partition } = change {
                polled.retain(|record: &Polled<'_>| record.message.partition() != partition);
                batch.ends_reached.retain(|&reached| reached != partition);
            }
            changes.push(change);
        }
        match message {
            None if !polled.is_empty() => break,
            None => {}
            Some(Ok(message)) if message.topic() == topic && context.owns(message.partition()) => {
                let known = reader.read_known(&message);
                bytes += message.payload_len() + message.key_len();
                polled.push(Polled { message, known });
            }
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                if context.owns(partition) {
                    batch.ends_reached.push(partition);
                }
                if !polled.is_empty() {
                    // The end is reached: apply what there is rather than wait for more.
                    break;
                }
            }
            Some(Err(error @ KafkaError::MessageConsumptionFatal(_))) => {
                return Err(ProjectionError::Kafka(error));
            }
            Some(Err(error)) => {
                warn!(%error, "consumer error; librdkafka retries");
                super::metrics::record_error("consume");
            }
        }
    }
    batch.records = settle(polled);
    batch.positions = positions(consumer, topic);
    Ok((batch, changes))
}

/// A record as polled, with what it asks of the read model when that is known already.
struct Polled<'c> {
    message: BorrowedMessage<'c>,
    known: Option<UntimedChange>,
}

/// The records of a batch as the projector takes them: the known changes that another known
/// change supersedes are marked so and dropped, the others timed (their headers are parsed
/// only now, for the changes that count), and the unread ones copied out. The changes of
/// records read later (through the registry) are all versioned facts, so they never make a
/// dropped change count again; the projector compacts the whole batch once more with them.
fn settle(polled: Vec<Polled<'_>>) -> Vec<PolledRecord> {
    let known: Vec<&UntimedChange> = polled.iter().filter_map(|p| p.known.as_ref()).collect();
    let mut superseded = super::superseded(&known).into_iter();
    polled
        .into_iter()
        .map(|Polled { message, known }| {
            let read = match known {
                Some(change) if superseded.next() == Some(true) => PolledRead::Superseded {
                    deletion: change.is_deletion(),
                },
                Some(change) => PolledRead::Change(change.timed(&message)),
                None => PolledRead::Unread(message.detach()),
            };
            PolledRecord {
                partition: message.partition(),
                offset: message.offset(),
                read,
            }
        })
        .collect()
}

/// The consumer position of every owned partition that has one.
fn positions<S: ReportStore>(
    consumer: &ProjectionConsumer<S>,
    topic: &str,
) -> Vec<PartitionOffset> {
    let Ok(list) = consumer.position() else {
        return vec![];
    };
    let context = consumer.context();
    list.elements_for_topic(topic)
        .iter()
        .filter(|element| context.owns(element.partition()))
        .filter_map(|element| match element.offset() {
            Offset::Offset(next_offset) => Some(PartitionOffset {
                partition: element.partition(),
                next_offset,
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stretch_outside_the_group_starts_at_the_first_unsteady_statistics_and_ends_when_steady() {
        let start = Instant::now();
        let later = start + Duration::from_secs(5);
        let joining = OutsideGroup::track(None, "up", "wait-join", start);
        assert_eq!(
            joining,
            Some(OutsideGroup {
                since: start,
                state: "up".into(),
                join_state: "wait-join".into(),
            })
        );
        // Still outside, in another state: the stretch keeps its start, with the new states.
        let waiting = OutsideGroup::track(joining, "wait-coord", "init", later);
        assert_eq!(
            waiting,
            Some(OutsideGroup {
                since: start,
                state: "wait-coord".into(),
                join_state: "init".into(),
            })
        );
        assert_eq!(OutsideGroup::track(waiting, "up", "steady", later), None);
        assert_eq!(OutsideGroup::track(None, "up", "steady", later), None);
    }

    #[test]
    fn a_session_is_stuck_after_the_rebalance_timeout_and_a_session_timeout() {
        let mut config = rdkafka::ClientConfig::new();
        assert_eq!(stuck_after(&config), Duration::from_secs(300 + 45));
        config
            .set("max.poll.interval.ms", "15000")
            .set("session.timeout.ms", "6000");
        assert_eq!(stuck_after(&config), Duration::from_secs(21));
    }
}
