//! The `EventPublisher` port and its Kafka adapter.
//!
//! `KafkaPublisher` sends a batch of outbox events in one of two modes:
//!
//! * **Exactly-once** (default): a transactional producer sends the batch and a checkpoint
//!   record in ONE Kafka transaction. `read_committed` consumers see the whole batch or nothing.
//!   A restarted or second instance with the same transactional ids fences the old one
//!   (`init_transactions`), which also aborts whatever it left open, and then reads the
//!   checkpoint to learn exactly where to resume. Batches take turns between two transactional
//!   producers, see [`TRANSACTIONAL_PRODUCERS`], and a batch's commit runs while the next batch
//!   is sent, see [`CommitInFlight`].
//! * **At-least-once**: an idempotent producer (`acks=all`) sends the batches; a batch is
//!   confirmed once every record of it is acknowledged, while the next one is already being
//!   read and sent (see [`AT_LEAST_ONCE_BATCHES_AHEAD`]). After a crash or an error, what was
//!   not confirmed is sent again: duplicates, never loss.
//!
//! In both modes records of one book go to one partition in position order: the idempotent
//! producer never reorders within a partition, and a failed batch is resent from its start.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use tracing::{debug, info};

use super::checkpoint::{self, CheckpointError};
use super::record::{OutboundRecord, RecordMapper};
use super::visibility::VisibilityWatch;
use crate::codec::{CodecError, RegistryError};
use crate::config::KafkaConfig;
use crate::domain::StoredEvent;
use crate::kafka::{self, KafkaSetupError};

/// How the relay delivers to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeliveryMode {
    /// Kafka transactions: no duplicates for `read_committed` consumers.
    ExactlyOnce,
    /// Idempotent producer, `acks=all`: duplicates possible after a crash, never loss.
    AtLeastOnce,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Worth trying again after a pause (broker down, request timed out, transaction aborted).
    #[error("Kafka is unavailable or refused the batch: {0}")]
    Retryable(KafkaError),
    /// Another relay instance took over the transactional id, or the producer failed fatally
    /// otherwise: this producer can do nothing more, and the relay stands by a while.
    #[error("fenced by another relay instance, or failed fatally: {0}")]
    Fenced(KafkaError),
    /// An event cannot be encoded as its contract says, or its record is larger than the
    /// producer may send: publishing cannot go past it.
    #[error("event at position {position} cannot be published: {source}")]
    Poison { position: u64, source: PoisonCause },
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Looking up the schema another version wrote an event with failed; tried again.
    #[error("schema registry: {0}")]
    Registry(RegistryError),
}

/// Why an event cannot be published, whatever is tried again.
#[derive(Debug, thiserror::Error)]
pub enum PoisonCause {
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Larger than `message.max.bytes` (librdkafka refuses it before sending). The domain's
    /// limits keep events far below Kafka's default of 1 MB, so this takes a lowered limit.
    #[error(
        "its record is larger than the producer's message.max.bytes allows ({0}); raise the \
         limit (--kafka-option message.max.bytes=…, within the topic's max.message.bytes)"
    )]
    TooLarge(KafkaError),
}

impl PublishError {
    fn from_kafka(error: KafkaError) -> Self {
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced)
        ) || matches!(&error, KafkaError::Transaction(inner) if inner.is_fatal());
        if fenced {
            PublishError::Fenced(error)
        } else {
            PublishError::Retryable(error)
        }
    }
}

/// Sends outbox events somewhere durable, in order, in batches: `begin_batch`, any number of
/// `send`s, `commit_batch`; `settle` when nothing more is to be sent for now. A batch is all or
/// nothing for its readers in exactly-once mode (one Kafka transaction); sending several pages
/// into one batch lets the next page be read while the previous one is on the wire.
pub trait EventPublisher: Send {
    /// Gets ready to publish: connects, fences older instances where the mode has fencing, and
    /// returns the position up to which everything is known to be published already, if the
    /// publisher itself keeps track (exactly-once does; at-least-once relies on the store).
    fn start(&mut self) -> impl Future<Output = Result<Option<u64>, PublishError>> + Send;

    /// Opens a batch (a Kafka transaction in exactly-once mode).
    fn begin_batch(&mut self) -> Result<(), PublishError>;

    /// Hands `events` (ascending positions, after those sent before in this batch) to the
    /// batch without waiting for them to be stored. On [`PublishError::Poison`] the events
    /// before the refused one stay in the batch, and `commit_batch` publishes them; after any
    /// other error, as for `commit_batch`.
    fn send(
        &mut self,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Closes the batch and returns the last position now known to be durably stored, if
    /// any batch was confirmed. Both modes may leave this batch outstanding and confirm an
    /// earlier one instead: exactly-once returns once the batch's records are stored and its
    /// commit has begun, confirming the previous batch, whose commit had to succeed first;
    /// at-least-once leaves this batch's acknowledgements outstanding. On any error, nothing
    /// can be assumed about unconfirmed batches: call `start` again and resume from what it
    /// returns.
    fn commit_batch(&mut self) -> impl Future<Output = Result<Option<u64>, PublishError>> + Send;

    /// Returns once every batch committed so far is durably stored, with the last position
    /// that confirms (`None` if none was outstanding). Errors as for `commit_batch`.
    fn settle(&mut self) -> impl Future<Output = Result<Option<u64>, PublishError>> + Send;

    /// Stops publishing at once: disconnects and discards whatever is queued and not yet
    /// sent, so that nothing more of this instance's reaches its destination. Unconfirmed
    /// batches are as after an error; `start` connects again.
    fn stop(&mut self) -> impl Future<Output = ()> + Send;

    /// One batch of `events`, durably stored when this returns: begin, send, commit, settle.
    fn publish_batch(
        &mut self,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<(), PublishError>> + Send
    where
        Self: Sized,
    {
        async move {
            self.begin_batch()?;
            self.send(events).await?;
            self.commit_batch().await?;
            self.settle().await.map(drop)
        }
    }
}

/// How many transactional producers an exactly-once relay takes turns with, one batch each.
///
/// Why more than one: when a transaction commits, the coordinator answers `EndTxn` before it
/// has written the commit markers, and until it has, it refuses the same transactional id's
/// next transaction with `CONCURRENT_TRANSACTIONS`; librdkafka then retries after a fixed
/// 20 ms. A relay that is following the writers begins its next transaction right after the
/// commit, and at 1,000 events/s about 5 % of its transactions paid those 20 ms (the p99 of
/// commit → ack). The other producer's previous transaction ended a whole batch earlier, so
/// its markers are written. Turns keep the order: a batch's records are sent only after every
/// record of the previous batch was stored (at lower offsets), and it commits only after the
/// previous one committed (see `CommitInFlight` in this module). Both producers write the same
/// checkpoint key; the last committed checkpoint wins.
pub const TRANSACTIONAL_PRODUCERS: usize = 2;

/// How many batches an at-least-once relay sends past the last one fully acknowledged.
///
/// Why: waiting for every acknowledgement of a batch before reading the next one left the
/// producer idle for that round trip, and the relay's thread idle while the broker wrote: the
/// first batches after a start waited 30-60 ms for their acknowledgements, out of 60-90 ms.
/// With one batch ahead, the next batch is read and sent while the previous one's
/// acknowledgements arrive. Order is unaffected (one idempotent producer, records handed over
/// in position order); what a failure costs is resending up to one more batch.
pub const AT_LEAST_ONCE_BATCHES_AHEAD: usize = 1;

/// An exactly-once batch whose records and checkpoint are stored and whose commit is under way,
/// while the next batch is read and sent by the other producer.
///
/// Why: `EndTxn` is a round trip to the transaction coordinator, which first writes the
/// transaction's state to its log (2-5 ms here, tens of milliseconds when the broker is slow),
/// and the relay used to wait for it before reading the next batch: in a backlog every batch
/// paid it, and at low load an event that came during a commit waited for it too.
///
/// Why it keeps every promise of the relay:
/// * Order: the next batch's records are sent only after all of this batch's were
///   acknowledged (`commit_transaction` awaits them before the commit starts), so they lie
///   behind them in every partition.
/// * No gap for `read_committed` readers: the next batch commits only after this commit
///   succeeded. If it fails, the next batch is aborted (and `start` aborts whatever is left
///   open), so a later batch never becomes readable without an earlier one.
/// * Resume point: a restart takes the last committed checkpoint; a batch whose commit was
///   under way when the next one failed counts as published if it committed, and is sent again
///   if it did not.
struct CommitInFlight {
    /// The batch's last position (none for an empty transaction).
    last: Option<u64>,
    checkpoint_offset: Option<i64>,
    producer: FutureProducer,
    commit: tokio::task::JoinHandle<Result<(), KafkaError>>,
}

/// An at-least-once batch handed to the producer, not yet fully acknowledged.
struct SentBatch {
    last: u64,
    deliveries: Vec<DeliveryFuture>,
}

/// Publishes to Kafka; see the module documentation for the two modes.
pub struct KafkaPublisher {
    config: KafkaConfig,
    mapper: RecordMapper,
    mode: DeliveryMode,
    /// The first transactional id (relay id and store id), also the checkpoint record key.
    relay_id: String,
    checkpoint_topic: String,
    /// Empty until `start`; one producer at least once, [`TRANSACTIONAL_PRODUCERS`] exactly once.
    producers: Vec<FutureProducer>,
    /// The producer whose turn it is.
    turn: usize,
    /// The open batch: deliveries still to await and the last position sent.
    deliveries: Vec<DeliveryFuture>,
    batch_last: Option<u64>,
    /// An emptied deliveries list, kept for its capacity. Why: a batch of 5,000 events grew
    /// a fresh list by reallocation every time, and the large reallocations made glibc
    /// consolidate its free lists (about 4 % of the relay's thread in a profile).
    spare_deliveries: Vec<DeliveryFuture>,
    /// At-least-once batches committed but not yet fully acknowledged, oldest first.
    unconfirmed: VecDeque<SentBatch>,
    /// Exactly once: the previous batch, committing while this one is sent.
    committing: Option<CommitInFlight>,
    /// Exactly once: whether what this relay commits becomes readable (see [`VisibilityWatch`]).
    visibility: Option<VisibilityWatch>,
}

impl KafkaPublisher {
    pub fn new(
        config: KafkaConfig,
        mapper: RecordMapper,
        mode: DeliveryMode,
        relay_id: String,
        checkpoint_topic: String,
    ) -> Self {
        Self {
            config,
            mapper,
            mode,
            relay_id,
            checkpoint_topic,
            producers: Vec::new(),
            turn: 0,
            deliveries: Vec::new(),
            batch_last: None,
            spare_deliveries: Vec::new(),
            unconfirmed: VecDeque::new(),
            committing: None,
            visibility: None,
        }
    }

    /// How long a call to the cluster (a commit, an init, metadata) may take.
    fn call_timeout(&self) -> Duration {
        self.config.request_timeout()
    }

    /// The transactional ids of the producers: the relay id, then `<relay id>.<n>`.
    fn transactional_ids(&self) -> Vec<String> {
        (0..TRANSACTIONAL_PRODUCERS)
            .map(|n| match n {
                0 => self.relay_id.clone(),
                n => format!("{}.{n}", self.relay_id),
            })
            .collect()
    }

    fn create_producer(
        &self,
        transactional_id: Option<&str>,
    ) -> Result<FutureProducer, KafkaSetupError> {
        self.config
            .relay_producer_config(transactional_id)
            .create()
            .map_err(|source| KafkaSetupError::Client {
                bootstrap_servers: self.config.bootstrap_servers.clone(),
                source,
            })
    }

    /// The producer whose turn it is.
    fn producer(&self) -> &FutureProducer {
        self.producers
            .get(self.turn)
            .expect("batches are only opened after start succeeded")
    }

    /// Hands every record of `events` to the producer, in order, keeping their delivery futures.
    async fn enqueue(&mut self, events: &[StoredEvent]) -> Result<(), PublishError> {
        let producer = self
            .producers
            .get(self.turn)
            .expect("batches are only opened after start succeeded");
        self.deliveries.reserve(events.len());
        for event in events {
            if let Some((subject, fingerprint)) = self.mapper.unknown_writer_schema(event) {
                self.mapper
                    .learn_writer_schema(subject, fingerprint)
                    .await
                    .map_err(PublishError::Registry)?;
            }
            let records = self
                .mapper
                .records(event)
                .map_err(|source| PublishError::Poison {
                    position: event.position,
                    source: source.into(),
                })?;
            for (index, record) in records.into_iter().enumerate() {
                match send(producer, record).await {
                    Ok(delivery) => self.deliveries.push(delivery),
                    // Refused before any record of the event is in the batch: the batch ends
                    // before the event, as for an event that does not encode. (An event's
                    // later record is a fact's tombstone, never the larger one.)
                    Err(PublishError::Retryable(error)) if index == 0 && is_too_large(&error) => {
                        return Err(PublishError::Poison {
                            position: event.position,
                            source: PoisonCause::TooLarge(error),
                        });
                    }
                    Err(error) => return Err(error),
                }
            }
            self.batch_last = Some(event.position);
        }
        Ok(())
    }

    /// Sends the checkpoint, awaits every record of the transaction, awaits the previous
    /// batch's commit and starts this one's (see [`CommitInFlight`]). Returns the previous
    /// batch's last position.
    async fn commit_transaction(&mut self) -> Result<Option<u64>, PublishError> {
        let last = self.batch_last.take();
        let mut checkpoint_delivery = None;
        if let Some(last) = last {
            let value = checkpoint::checkpoint_value(last);
            let checkpoint = FutureRecord::to(&self.checkpoint_topic)
                .key(self.relay_id.as_str())
                .payload(value.as_str());
            checkpoint_delivery = Some(send_record(self.producer(), checkpoint).await?);
        }
        await_deliveries(&mut self.deliveries).await?;
        let checkpoint_offset = match checkpoint_delivery {
            Some(delivery) => Some(delivered_offset(delivery).await?),
            None => None,
        };
        let confirmed = self.confirm_commit_in_flight().await?;
        let producer = self.producer().clone();
        let (committer, timeout) = (producer.clone(), self.call_timeout());
        let commit =
            tokio::spawn(async move { kafka::commit_transaction(&committer, timeout).await });
        self.committing = Some(CommitInFlight {
            last,
            checkpoint_offset,
            producer,
            commit,
        });
        self.turn = (self.turn + 1) % self.producers.len();
        Ok(confirmed)
    }

    /// Awaits the commit under way, if any, and returns its batch's last position.
    async fn confirm_commit_in_flight(&mut self) -> Result<Option<u64>, PublishError> {
        let Some(in_flight) = self.committing.take() else {
            return Ok(None);
        };
        let outcome = in_flight.commit.await.unwrap_or(Err(KafkaError::Canceled));
        if let Err(error) = outcome {
            return Err(fenced_if_fatal(
                &in_flight.producer,
                PublishError::from_kafka(error),
            ));
        }
        if let (Some(watch), Some(offset)) = (&self.visibility, in_flight.checkpoint_offset) {
            watch.committed(offset);
        }
        Ok(in_flight.last)
    }

    /// Readies an idempotent producer: returns once the cluster answered it with the metadata
    /// of the topics it publishes to, which also starts its producer-id request.
    ///
    /// Why: librdkafka requests the producer id as the producer is created, before any broker
    /// connection is up, and then retries on a fixed 500 ms timer, so the first batch after a
    /// start waited up to half a second. A metadata response runs that request again at once
    /// (measured: first acknowledgement 2 ms after a 55-65 ms metadata round trip, against
    /// 505 ms without), and the first records find their partition leaders known. It also
    /// proves the broker answers before the relay says it resumed.
    async fn ready_idempotent(&self, producer: &FutureProducer) -> Result<(), PublishError> {
        let client = producer.clone();
        let topics = self.mapper.topics();
        let topics = [topics.book.clone(), topics.book_fact.clone()];
        let timeout = self.call_timeout();
        tokio::task::spawn_blocking(move || {
            topics.iter().try_for_each(|topic| {
                client
                    .client()
                    .fetch_metadata(Some(topic), timeout)
                    .map(drop)
            })
        })
        .await
        .unwrap_or(Err(KafkaError::Canceled))
        .map_err(PublishError::from_kafka)
    }

    /// Closes an at-least-once batch and awaits the acknowledgements of the batches more than
    /// [`AT_LEAST_ONCE_BATCHES_AHEAD`] behind it.
    async fn commit_acknowledged(&mut self) -> Result<Option<u64>, PublishError> {
        let deliveries = std::mem::replace(
            &mut self.deliveries,
            std::mem::take(&mut self.spare_deliveries),
        );
        if let Some(last) = self.batch_last.take() {
            self.unconfirmed.push_back(SentBatch { last, deliveries });
        }
        self.confirm_while(|unconfirmed| unconfirmed > AT_LEAST_ONCE_BATCHES_AHEAD)
            .await
    }

    /// Awaits the oldest unconfirmed batches' acknowledgements while `more(unconfirmed count)`,
    /// returning the last position confirmed. On an error the rest are abandoned: `start`
    /// resumes before them.
    async fn confirm_while(
        &mut self,
        more: impl Fn(usize) -> bool,
    ) -> Result<Option<u64>, PublishError> {
        let mut confirmed = None;
        while more(self.unconfirmed.len()) {
            let Some(mut batch) = self.unconfirmed.pop_front() else {
                break;
            };
            if let Err(error) = await_deliveries(&mut batch.deliveries).await {
                self.unconfirmed.clear();
                return Err(error);
            }
            confirmed = Some(batch.last);
            self.spare_deliveries = batch.deliveries;
        }
        Ok(confirmed)
    }

    /// Drops the producers and whatever they still queue, and forgets the open and unconfirmed
    /// batches; false if there were none. Purging first: dropping a producer joins its polling
    /// thread (up to 100 ms) before it purges, and records could still go out meanwhile. Both
    /// block (the drop flushes for up to 500 ms), so they run off the async runtime.
    ///
    /// A commit under way is left to finish on its own: its records are all stored, and the
    /// next `start` fences its producer and learns from the checkpoint whether it committed.
    async fn discard_producers(&mut self) -> bool {
        self.turn = 0;
        self.deliveries.clear();
        self.batch_last = None;
        self.unconfirmed.clear();
        self.committing = None;
        self.visibility = None;
        let producers = std::mem::take(&mut self.producers);
        if producers.is_empty() {
            return false;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for producer in &producers {
                producer.purge(PurgeConfig::default().queue().inflight());
            }
            drop(producers);
        })
        .await;
        true
    }

    /// Best effort after a failed batch: the next `start` fences and aborts whatever is left
    /// open anyway.
    async fn abort_transaction(&self) {
        let aborter = self.producer().clone();
        let timeout = Duration::from_secs(5);
        let _ = tokio::task::spawn_blocking(move || aborter.abort_transaction(timeout)).await;
    }

    /// See [`fenced_if_fatal`]; for the producer whose turn it is.
    fn fenced_if_fatal(&self, error: PublishError) -> PublishError {
        fenced_if_fatal(self.producer(), error)
    }
}

/// Drops `producers` on the blocking pool, as [`KafkaPublisher::discard_producers`] does: a
/// producer's drop flushes (up to 500 ms) and joins librdkafka's threads, which must not hold
/// up an async worker. Nobody waits for it.
fn drop_off_the_runtime(producers: Vec<FutureProducer>) {
    drop(tokio::task::spawn_blocking(move || drop(producers)));
}

/// A fenced producer first fails its queued records ("purged"), and only its later calls say
/// why; its fatal-error state tells at once.
fn fenced_if_fatal(producer: &FutureProducer, error: PublishError) -> PublishError {
    let PublishError::Retryable(kafka_error) = error else {
        return error;
    };
    match producer.client().fatal_error() {
        Some((code, reason)) => {
            debug!(?code, %reason, "producer is in a fatal state");
            PublishError::Fenced(KafkaError::MessageProduction(code))
        }
        None => PublishError::Retryable(kafka_error),
    }
}

impl EventPublisher for KafkaPublisher {
    async fn start(&mut self) -> Result<Option<u64>, PublishError> {
        // Fresh producers each time: after an error the old ones' state is unknown.
        self.discard_producers().await;
        if self.mode == DeliveryMode::AtLeastOnce {
            let producer = self.create_producer(None)?;
            if let Err(error) = self.ready_idempotent(&producer).await {
                drop_off_the_runtime(vec![producer]);
                return Err(error);
            }
            self.producers.push(producer);
            return Ok(None);
        }
        let producers = self
            .transactional_ids()
            .iter()
            .map(|id| self.create_producer(Some(id)))
            .collect::<Result<Vec<_>, _>>()?;
        // Each init fences that id's older instance and completes or aborts what it left
        // open; all must be done before the checkpoint is final. They block, so they run on
        // the blocking pool, side by side.
        let timeout = self.call_timeout();
        let inits: Vec<_> = producers
            .iter()
            .map(|producer| {
                let initialiser = producer.clone();
                tokio::task::spawn_blocking(move || initialiser.init_transactions(timeout))
            })
            .collect();
        let mut failed = None;
        for init in inits {
            if let Err(error) = init.await.expect("init_transactions panicked") {
                failed.get_or_insert(PublishError::from_kafka(error));
            }
        }
        if let Some(error) = failed {
            drop_off_the_runtime(producers);
            return Err(error);
        }
        self.producers = producers;
        let position =
            checkpoint::read_checkpoint(&self.config, &self.checkpoint_topic, &self.relay_id)
                .await?;
        // Twice the transaction timeout: another producer's transaction may hold readers up to
        // its own timeout (usually the same), and one that outlives that will not end.
        self.visibility = Some(
            VisibilityWatch::start(
                &self.config,
                &self.checkpoint_topic,
                2 * self.config.relay_transaction_timeout(),
            )
            .map_err(PublishError::from_kafka)?,
        );
        info!(relay_id = %self.relay_id, ?position, "transactional producers ready");
        Ok(position)
    }

    fn begin_batch(&mut self) -> Result<(), PublishError> {
        self.deliveries.clear();
        self.batch_last = None;
        if self.mode == DeliveryMode::ExactlyOnce {
            self.producer()
                .begin_transaction()
                .map_err(|error| self.fenced_if_fatal(PublishError::from_kafka(error)))?;
        }
        Ok(())
    }

    async fn send(&mut self, events: &[StoredEvent]) -> Result<(), PublishError> {
        let outcome = self
            .enqueue(events)
            .await
            .map_err(|error| self.fenced_if_fatal(error));
        let failed = match &outcome {
            Ok(()) | Err(PublishError::Poison { .. }) => false,
            Err(_) => true,
        };
        if failed && self.mode == DeliveryMode::ExactlyOnce {
            self.abort_transaction().await;
        }
        outcome
    }

    async fn commit_batch(&mut self) -> Result<Option<u64>, PublishError> {
        let outcome = match self.mode {
            DeliveryMode::ExactlyOnce => self.commit_transaction().await,
            DeliveryMode::AtLeastOnce => self.commit_acknowledged().await,
        };
        let outcome = outcome.map_err(|error| self.fenced_if_fatal(error));
        if outcome.is_err() && self.mode == DeliveryMode::ExactlyOnce {
            self.abort_transaction().await;
        }
        outcome
    }

    async fn settle(&mut self) -> Result<Option<u64>, PublishError> {
        match self.mode {
            // Its error is already told apart (fenced or not) on the committing producer.
            DeliveryMode::ExactlyOnce => self.confirm_commit_in_flight().await,
            DeliveryMode::AtLeastOnce => {
                let outcome = self.confirm_while(|unconfirmed| unconfirmed > 0).await;
                outcome.map_err(|error| self.fenced_if_fatal(error))
            }
        }
    }

    async fn stop(&mut self) {
        if self.discard_producers().await {
            info!(relay_id = %self.relay_id, "stopped publishing; queued records discarded");
        }
    }
}

async fn send(
    producer: &FutureProducer,
    record: OutboundRecord<'_>,
) -> Result<DeliveryFuture, PublishError> {
    let mut future_record = FutureRecord::to(record.topic)
        .key(record.key.as_str())
        .headers(record.headers);
    if let Some(value) = &record.value {
        future_record = future_record.payload(value.as_slice());
    }
    send_record(producer, future_record).await
}

/// Whether librdkafka refused a record for its size, which sending it again cannot change.
fn is_too_large(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

/// Enqueues one record, waiting while the producer's local queue is full.
async fn send_record<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, PublishError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                debug!("producer queue full; waiting for deliveries");
                tokio::time::sleep(Duration::from_millis(10)).await;
                record = returned;
            }
            Err((error, _)) => return Err(PublishError::from_kafka(error)),
        }
    }
}

/// Awaits one record's acknowledgement and returns its offset.
async fn delivered_offset(delivery: DeliveryFuture) -> Result<i64, PublishError> {
    match delivery.await {
        Ok(Ok(delivered)) => Ok(delivered.offset),
        Ok(Err((error, _))) => Err(PublishError::from_kafka(error)),
        Err(_canceled) => Err(PublishError::Retryable(KafkaError::Canceled)),
    }
}

/// Awaits every delivery of `deliveries`, leaving the list empty (its capacity kept for the
/// next batch). On an error the rest are dropped unawaited.
async fn await_deliveries(deliveries: &mut Vec<DeliveryFuture>) -> Result<(), PublishError> {
    for delivery in deliveries.drain(..) {
        delivered_offset(delivery).await?;
    }
    Ok(())
}
