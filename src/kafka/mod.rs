//! Kafka client setup and topic layout, shared by the relay, the projection and the tools.
//!
//! Client settings are built here once so every producer and consumer gets the same safe
//! defaults (idempotence, `acks=all`, `read_committed`), with the user's passthrough options
//! (`BOOKSTORE_KAFKA_OPTIONS`) applied last.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::metadata::{Metadata, MetadataTopic};
use rdkafka::producer::{FutureProducer, Producer};
use thiserror::Error;
use tracing::warn;

use crate::config::KafkaConfig;
use crate::shutdown::Shutdown;

mod admin;

pub use admin::{TopicSpec, TopicStatus, provision_topics};

/// The names of the topics, derived from one prefix (`bookstore` in production).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Delta events: `<prefix>.book`.
    pub book: String,
    /// Fact events, compacted: `<prefix>.book-fact`.
    pub book_fact: String,
    /// Fact records the projection could not apply: `<prefix>.book-fact.dlq`.
    pub book_fact_dlq: String,
    /// The relay's exactly-once checkpoints (internal): `<prefix>.relay-checkpoint`.
    pub relay_checkpoint: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            book: format!("{prefix}.book"),
            book_fact: format!("{prefix}.book-fact"),
            book_fact_dlq: format!("{prefix}.book-fact.dlq"),
            relay_checkpoint: format!("{prefix}.relay-checkpoint"),
        }
    }

    /// What each topic must look like: deltas are kept by time, facts are compacted (the
    /// latest fact of a book is its state, a tombstone deletes it), the DLQ is kept until it is
    /// dealt with: once its record's offset is stored past, a dead letter is the only trace of a
    /// fact that was never applied, and one deleted by time would be gone without a word (a
    /// replay starting below the log's start moves on to what is left).
    pub fn specs(&self, partitions: i32, replication_factor: i32) -> Vec<TopicSpec> {
        vec![
            TopicSpec::new(&self.book, partitions, replication_factor)
                .with_config("cleanup.policy", "delete"),
            TopicSpec::new(&self.book_fact, partitions, replication_factor)
                .with_config("cleanup.policy", "compact"),
            TopicSpec::new(&self.book_fact_dlq, 1, replication_factor)
                .with_config("cleanup.policy", "delete")
                .with_advised_config("retention.ms", "-1"),
            // One partition, so "the last checkpoint" is well defined; compacted, since only
            // the latest checkpoint per relay matters.
            TopicSpec::new(&self.relay_checkpoint, 1, replication_factor)
                .with_config("cleanup.policy", "compact"),
        ]
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self::with_prefix("bookstore")
    }
}

#[derive(Debug, Error)]
pub enum KafkaSetupError {
    #[error(
        "could not create a Kafka client for {bootstrap_servers}: {}",
        without_option_value(source)
    )]
    Client {
        bootstrap_servers: String,
        source: KafkaError,
    },
    #[error(
        "Kafka at {bootstrap_servers} did not answer within {timeout:?}: {source} \
         (start a local broker with `deploy/kafka/kafka.sh start`, or set KAFKA_BOOTSTRAP_SERVERS)"
    )]
    Unreachable {
        bootstrap_servers: String,
        timeout: Duration,
        source: KafkaError,
    },
    #[error("topic {topic}: {source}")]
    Topic { topic: String, source: KafkaError },
    #[error(
        "topic {topic} exists with {setting} = {actual}, but {expected} is required; \
         fix the topic or the configuration (nothing was changed)"
    )]
    TopicMismatch {
        topic: String,
        setting: String,
        expected: String,
        actual: String,
    },
    #[error("topic {topic} is missing after creation was requested")]
    TopicMissing { topic: String },
}

/// `error`'s text, but for a refused client option without the option's value (see
/// [`crate::config::option_refusal`]).
fn without_option_value(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, description, key, value) => {
            crate::config::option_refusal(description, key, value)
        }
        other => other.to_string(),
    }
}

impl KafkaConfig {
    pub fn topics(&self) -> Topics {
        Topics::with_prefix(&self.topic_prefix)
    }

    /// Settings common to every client, passthrough options applied.
    pub fn client_config(&self) -> ClientConfig {
        self.with_client_options(self.base_config())
    }

    fn base_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", "bookstore");
        config
    }

    /// The user's passthrough options go last so they can override any default set here.
    fn with_client_options(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in self.client_options.iter().flat_map(|options| &options.0) {
            config.set(key, value);
        }
        config
    }

    /// An idempotent producer: `acks=all`, retries that never reorder or duplicate within a
    /// partition. Records with the same key keep their send order.
    pub fn idempotent_producer_config(&self) -> ClientConfig {
        self.with_client_options(self.idempotent_settings(Duration::from_millis(5)))
    }

    /// The relay's producer: idempotent as above, transactional when given an id, and sending
    /// at once (`linger.ms=0`): the relay hands over whole batches and then waits for their
    /// acknowledgements, so lingering would only add its delay to every batch. Passthrough
    /// options still override all of it.
    ///
    /// A record not acknowledged within twice the request timeout fails its batch, and the
    /// relay replaces the producer and sends again from the last confirmed position. Exactly-once
    /// gets that bound from its transaction timeout (librdkafka lowers `message.timeout.ms` to
    /// it); at-least-once sets it here. Why not librdkafka's 300 s: a producer can stall after a
    /// broker restart without failing anything (known librdkafka behaviour, e.g. issues #1913,
    /// #4976), and the fault suite saw an at-least-once relay publish nothing for over 90 s
    /// after an outage the broker had come back from.
    pub fn relay_producer_config(&self, transactional_id: Option<&str>) -> ClientConfig {
        let mut config = self.idempotent_settings(Duration::ZERO);
        let acknowledgement_timeout = (self.request_timeout().as_millis() * 2).to_string();
        match transactional_id {
            Some(id) => config
                .set("transactional.id", id)
                .set("transaction.timeout.ms", acknowledgement_timeout),
            None => config.set("message.timeout.ms", acknowledgement_timeout),
        };
        self.with_client_options(config)
    }

    /// The `transaction.timeout.ms` of [`relay_producer_config`](Self::relay_producer_config):
    /// twice the request timeout, unless the client options set another. The broker aborts a
    /// transaction left open this long.
    pub fn relay_transaction_timeout(&self) -> Duration {
        let ours = 2 * self.request_timeout();
        self.relay_producer_config(Some("relay"))
            .get("transaction.timeout.ms")
            .and_then(|millis| millis.trim().parse().ok())
            .map_or(ours, Duration::from_millis)
    }

    /// The dead-letter queue's producer (the projector's, and `dlq replay`'s): idempotent as
    /// above, sending at once (its callers wait for each acknowledgement), and failing a record
    /// not acknowledged within twice the request timeout, like the relay's. Why not librdkafka's
    /// 300 s: the projector waits for its dead letters before it stores the batch, holding a
    /// revocation meanwhile, so during a broker outage it would sit that long on every attempt
    /// instead of backing off and joining again like on any other broker error. Passthrough
    /// options still override it.
    pub fn dead_letter_producer_config(&self) -> ClientConfig {
        let mut config = self.idempotent_settings(Duration::ZERO);
        config.set(
            "message.timeout.ms",
            (self.request_timeout().as_millis() * 2).to_string(),
        );
        self.with_client_options(config)
    }

    fn idempotent_settings(&self, linger: Duration) -> ClientConfig {
        let mut config = self.base_config();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", linger.as_millis().to_string())
            .set("compression.type", "lz4")
            // Java clients hash keys with murmur2; doing the same puts a book on the same
            // partition whichever language produced it.
            .set("partitioner", "murmur2_random");
        config
    }

    /// A consumer in `group_id` that reads committed data only and commits offsets only when
    /// told to (the caller stores an offset once the record is durably handled).
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut config = self.base_config();
        config
            .set("group.id", group_id)
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky");
        self.with_client_options(config)
    }

    pub fn admin_client(&self) -> Result<AdminClient<DefaultClientContext>, KafkaSetupError> {
        self.client_config()
            .create()
            .map_err(|source| self.client_error(source))
    }

    pub fn producer(&self) -> Result<FutureProducer, KafkaSetupError> {
        self.idempotent_producer_config()
            .create()
            .map_err(|source| self.client_error(source))
    }

    pub fn consumer(&self, group_id: &str) -> Result<StreamConsumer, KafkaSetupError> {
        self.consumer_config(group_id)
            .create()
            .map_err(|source| self.client_error(source))
    }

    fn client_error(&self, source: KafkaError) -> KafkaSetupError {
        KafkaSetupError::Client {
            bootstrap_servers: self.bootstrap_servers.clone(),
            source,
        }
    }

    /// Asks the cluster for its metadata: proves the brokers answer. Returns the broker count.
    pub async fn check_reachable(&self) -> Result<usize, KafkaSetupError> {
        Ok(self.fetch_metadata(None).await?.brokers().len())
    }

    /// Waits until the cluster answers, for services that should outlive a broker that is not
    /// up yet (started in any order by an orchestrator): retries every `pause`, up to 10 s,
    /// saying each time what it waits for. False if shutdown came first, also in the middle of
    /// an attempt (which can take the whole request timeout against a broker that does not
    /// answer; it is left to end on the blocking pool). Errors other than "did not answer" (a
    /// bad client setting) are returned at once.
    pub async fn wait_until_reachable(
        &self,
        shutdown: &mut Shutdown,
    ) -> Result<bool, KafkaSetupError> {
        let mut pause = Duration::from_millis(500);
        loop {
            if shutdown.is_triggered() {
                return Ok(false);
            }
            let attempt = tokio::select! {
                _ = shutdown.wait() => return Ok(false),
                attempt = self.check_reachable() => attempt,
            };
            match attempt {
                Ok(_) => return Ok(true),
                Err(error @ KafkaSetupError::Unreachable { .. }) => {
                    warn!(%error, retry_in = ?pause, "waiting for Kafka");
                }
                Err(error) => return Err(error),
            }
            tokio::select! {
                _ = shutdown.wait() => return Ok(false),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }

    /// Cluster metadata, for all topics or one. Runs the blocking librdkafka call on the
    /// blocking pool so an async caller's worker thread stays free.
    pub async fn fetch_metadata(&self, topic: Option<&str>) -> Result<Metadata, KafkaSetupError> {
        let client: BaseConsumer = self
            .client_config()
            .create()
            .map_err(|source| self.client_error(source))?;
        let timeout = self.request_timeout();
        let bootstrap_servers = self.bootstrap_servers.clone();
        let topic = topic.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            client
                .fetch_metadata(topic.as_deref(), timeout)
                .map_err(|source| KafkaSetupError::Unreachable {
                    bootstrap_servers,
                    timeout,
                    source,
                })
        })
        .await
        .expect("the metadata request panicked")
    }
}

/// The context of a consumer that reads to the end of its partitions
/// (`enable.partition.eof`): reaching the end is how it knows it has seen the last record, and
/// librdkafka also reports it as a client error (as the consumer closes, say), which would
/// otherwise be logged as one.
pub(crate) struct QuietEof;

impl rdkafka::ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        tracing::error!(%error, reason, "Kafka client error");
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// `topic` in `metadata`, when the cluster knows it and it has partitions (a topic just
/// created can show up without them for a moment, or with an error).
pub(crate) fn existing_topic<'a>(metadata: &'a Metadata, topic: &str) -> Option<&'a MetadataTopic> {
    metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic)
        .filter(|found| found.error().is_none() && !found.partitions().is_empty())
}

/// The ids of `topic`'s partitions, when it exists (see [`existing_topic`]).
pub(crate) fn partition_ids_in(metadata: &Metadata, topic: &str) -> Option<Vec<i32>> {
    existing_topic(metadata, topic).map(|found| {
        found
            .partitions()
            .iter()
            .map(|partition| partition.id())
            .collect()
    })
}

/// Commits `producer`'s open transaction once every record sent in it is acknowledged.
///
/// Why not just `Producer::commit_transaction`: rust-rdkafka's commit first flushes, and its
/// flush, when anything is still counted as outstanding, polls for a full 100 ms before it
/// looks again. A delivery future resolves a moment before librdkafka stops counting its
/// record, so a commit right after the last acknowledgement paid those 100 ms about once in a
/// hundred commits: the p99 of commit → Kafka ack. Waiting the few microseconds until nothing
/// is outstanding (bounded, in case something else keeps the count up) lets the flush return
/// at once. The commit itself blocks on the coordinator, so it runs on the blocking pool.
pub async fn commit_transaction(
    producer: &FutureProducer,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let settled_by = std::time::Instant::now() + Duration::from_millis(20);
    while producer.in_flight_count() > 0 && std::time::Instant::now() < settled_by {
        tokio::task::yield_now().await;
    }
    let committer = producer.clone();
    tokio::task::spawn_blocking(move || committer.commit_transaction(timeout))
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_record_unacknowledged_for_twice_the_request_timeout_fails_in_both_modes() {
        let mut kafka = KafkaConfig::new("127.0.0.1:9092");
        kafka.request_timeout_ms = 10_000;
        let at_least_once = kafka.relay_producer_config(None);
        assert_eq!(at_least_once.get("message.timeout.ms"), Some("20000"));
        assert_eq!(at_least_once.get("transactional.id"), None);
        // librdkafka lowers the message timeout of a transactional producer to this.
        let exactly_once = kafka.relay_producer_config(Some("relay"));
        assert_eq!(exactly_once.get("transaction.timeout.ms"), Some("20000"));
        assert_eq!(exactly_once.get("message.timeout.ms"), None);
        // Passthrough options still have the last word.
        kafka.client_options = vec![crate::config::ClientOptions(vec![(
            "message.timeout.ms".to_owned(),
            "90000".to_owned(),
        )])];
        let overridden = kafka.relay_producer_config(None);
        assert_eq!(overridden.get("message.timeout.ms"), Some("90000"));
    }

    #[test]
    fn the_relay_transaction_timeout_is_the_one_its_producers_are_given() {
        let mut kafka = KafkaConfig::new("127.0.0.1:9092");
        kafka.request_timeout_ms = 10_000;
        assert_eq!(kafka.relay_transaction_timeout(), Duration::from_secs(20));
        kafka.client_options = vec![crate::config::ClientOptions(vec![(
            "transaction.timeout.ms".to_owned(),
            "900000".to_owned(),
        )])];
        assert_eq!(kafka.relay_transaction_timeout(), Duration::from_secs(900));
    }
}
