//! The `EventPublisher` port and its Kafka adapter.
//!
//! `KafkaPublisher` sends a batch of outbox events in one of two modes:
//!
//! * **Exactly-once** (default): a transactional producer (`transactional.id` per relay) sends
//!   the batch and a checkpoint record in ONE Kafka transaction. `read_committed` consumers see
//!   the whole batch or nothing. A restarted or second instance with the same transactional id
//!   fences the old one (`init_transactions`), which also aborts whatever it left open, and then
//!   reads the checkpoint to learn exactly where to resume.
//! * **At-least-once**: an idempotent producer (`acks=all`) sends the batch and waits for every
//!   acknowledgement. After a crash between the acknowledgements and the database checkpoint,
//!   the batch is sent again: duplicates, never loss.
//!
//! In both modes records of one book go to one partition in position order: the idempotent
//! producer never reorders within a partition, and a failed batch is resent from its start.

use std::future::Future;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tracing::{debug, info};

use super::checkpoint::{self, CheckpointError};
use super::record::{OutboundRecord, RecordMapper};
use crate::codec::CodecError;
use crate::config::KafkaConfig;
use crate::domain::StoredEvent;
use crate::kafka::KafkaSetupError;

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
    /// Another relay instance took over the transactional id: this one must stop publishing.
    #[error("another relay instance took over (fenced): {0}")]
    Fenced(KafkaError),
    /// An event cannot be encoded as its contract says: publishing cannot go past it.
    #[error("event at position {position} cannot be published: {source}")]
    Poison { position: u64, source: CodecError },
    #[error(transparent)]
    Setup(#[from] KafkaSetupError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
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

/// Sends outbox events somewhere durable, in order.
pub trait EventPublisher: Send {
    /// Gets ready to publish: connects, fences older instances where the mode has fencing, and
    /// returns the position up to which everything is known to be published already, if the
    /// publisher itself keeps track (exactly-once does; at-least-once relies on the store).
    fn start(&mut self) -> impl Future<Output = Result<Option<u64>, PublishError>> + Send;

    /// Publishes `events` (ascending positions) and returns once all are durably stored.
    /// On error nothing can be assumed about the batch: call `start` again and resume from
    /// the position it returns.
    fn publish_batch(
        &mut self,
        events: &[StoredEvent],
    ) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// Publishes to Kafka; see the module documentation for the two modes.
pub struct KafkaPublisher {
    config: KafkaConfig,
    mapper: RecordMapper,
    mode: DeliveryMode,
    /// The transactional id (relay id and store id), also the checkpoint record key.
    relay_id: String,
    checkpoint_topic: String,
    producer: Option<FutureProducer>,
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
            producer: None,
        }
    }

    fn transaction_timeout(&self) -> Duration {
        self.config.request_timeout()
    }

    fn create_producer(&self) -> Result<FutureProducer, KafkaSetupError> {
        let mut producer_config = self.config.idempotent_producer_config();
        if self.mode == DeliveryMode::ExactlyOnce {
            producer_config.set("transactional.id", &self.relay_id).set(
                "transaction.timeout.ms",
                (self.transaction_timeout().as_millis() * 2).to_string(),
            );
        }
        producer_config
            .create()
            .map_err(|source| KafkaSetupError::Client {
                bootstrap_servers: self.config.bootstrap_servers.clone(),
                source,
            })
    }

    fn producer(&self) -> &FutureProducer {
        self.producer
            .as_ref()
            .expect("publish_batch is only called after start succeeded")
    }

    /// Hands every record of `events` to the producer, in order; returns their delivery futures.
    async fn enqueue(&self, events: &[StoredEvent]) -> Result<Vec<DeliveryFuture>, PublishError> {
        let producer = self.producer();
        let mut deliveries = Vec::with_capacity(events.len() + 1);
        for event in events {
            let records = self
                .mapper
                .records(event)
                .map_err(|source| PublishError::Poison {
                    position: event.position,
                    source,
                })?;
            for record in records {
                deliveries.push(send(producer, record).await?);
            }
        }
        Ok(deliveries)
    }

    async fn publish_transaction(&self, events: &[StoredEvent]) -> Result<(), PublishError> {
        let producer = self.producer();
        producer
            .begin_transaction()
            .map_err(PublishError::from_kafka)?;
        let outcome = async {
            let mut deliveries = self.enqueue(events).await?;
            let last = events
                .last()
                .map(|event| event.position)
                .unwrap_or_default();
            let value = checkpoint::checkpoint_value(last);
            let checkpoint = FutureRecord::to(&self.checkpoint_topic)
                .key(self.relay_id.as_str())
                .payload(value.as_str());
            deliveries.push(send_record(producer, checkpoint).await?);
            await_deliveries(deliveries).await?;
            let committer = producer.clone();
            let timeout = self.transaction_timeout();
            // commit_transaction blocks until the coordinator answers.
            tokio::task::spawn_blocking(move || committer.commit_transaction(timeout))
                .await
                .expect("commit_transaction panicked")
                .map_err(PublishError::from_kafka)
        }
        .await;
        let outcome = outcome.map_err(|error| self.fenced_if_fatal(error));
        if outcome.is_err() {
            // Best effort: the next `start` fences and aborts whatever is left open anyway.
            let aborter = producer.clone();
            let timeout = Duration::from_secs(5);
            let _ = tokio::task::spawn_blocking(move || aborter.abort_transaction(timeout)).await;
        }
        outcome
    }

    /// A fenced producer first fails its queued records ("purged"), and only its later calls
    /// say why; its fatal-error state tells at once.
    fn fenced_if_fatal(&self, error: PublishError) -> PublishError {
        let PublishError::Retryable(kafka_error) = error else {
            return error;
        };
        match self.producer().client().fatal_error() {
            Some((code, reason)) => {
                debug!(?code, %reason, "producer is in a fatal state");
                PublishError::Fenced(KafkaError::MessageProduction(code))
            }
            None => PublishError::Retryable(kafka_error),
        }
    }

    async fn publish_acknowledged(&self, events: &[StoredEvent]) -> Result<(), PublishError> {
        let deliveries = self.enqueue(events).await?;
        await_deliveries(deliveries).await
    }
}

impl EventPublisher for KafkaPublisher {
    async fn start(&mut self) -> Result<Option<u64>, PublishError> {
        // A fresh producer each time: after an error the old one's state is unknown.
        self.producer = None;
        let producer = self.create_producer()?;
        if self.mode == DeliveryMode::AtLeastOnce {
            self.producer = Some(producer);
            return Ok(None);
        }
        let initialiser = producer.clone();
        let timeout = self.transaction_timeout();
        tokio::task::spawn_blocking(move || initialiser.init_transactions(timeout))
            .await
            .expect("init_transactions panicked")
            .map_err(PublishError::from_kafka)?;
        self.producer = Some(producer);
        let position =
            checkpoint::read_checkpoint(&self.config, &self.checkpoint_topic, &self.relay_id)
                .await?;
        info!(relay_id = %self.relay_id, ?position, "transactional producer ready");
        Ok(position)
    }

    async fn publish_batch(&mut self, events: &[StoredEvent]) -> Result<(), PublishError> {
        if events.is_empty() {
            return Ok(());
        }
        match self.mode {
            DeliveryMode::ExactlyOnce => self.publish_transaction(events).await,
            DeliveryMode::AtLeastOnce => self.publish_acknowledged(events).await,
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

async fn await_deliveries(deliveries: Vec<DeliveryFuture>) -> Result<(), PublishError> {
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => return Err(PublishError::from_kafka(error)),
            Err(_canceled) => {
                return Err(PublishError::Retryable(KafkaError::Canceled));
            }
        }
    }
    Ok(())
}
