//! The relay's resume point as Kafka knows it, for exactly-once delivery.
//!
//! Every relay transaction also writes one record to the checkpoint topic (compacted, one
//! partition, key = the relay's transactional id, value = the last outbox position of the
//! batch as decimal text). The checkpoint thus commits or aborts together with the events, and
//! the last committed checkpoint record states exactly how far the published events go: no
//! event at or below it needs sending again, every event above it does. The database copy of
//! the position is written only after a commit, so it can lag behind but never run ahead.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::QuietEof;

/// The value of a checkpoint record for `position`.
pub fn checkpoint_value(position: u64) -> String {
    position.to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("reading the relay checkpoint from {topic}: {source}")]
    Kafka { topic: String, source: KafkaError },
    #[error("reading the relay checkpoint from {topic} did not finish within {timeout:?}")]
    Timeout { topic: String, timeout: Duration },
    /// A transaction stayed open on the checkpoint partition for the whole wait. One that
    /// outlives every producer's transaction timeout is hanging, and only an operator ends it
    /// (aborts it, or commits it if this relay had committed it).
    #[error(
        "a transaction has held {topic} open at offset {last_stable} (its end is \
         {high_watermark}) for {waited:?}; if that lasts beyond the producers' transaction \
         timeout it is a hanging transaction, which an operator must end (abort it, or commit \
         it if this relay had committed it): see the README, \"Hanging transactions\""
    )]
    OpenTransaction {
        topic: String,
        last_stable: i64,
        high_watermark: i64,
        waited: Duration,
    },
    #[error("checkpoint record at offset {offset} of {topic} is not a position: {value:?}")]
    Corrupt {
        topic: String,
        offset: i64,
        value: String,
    },
}

/// The position of the last committed checkpoint record of `relay_id`, `None` if there is none.
///
/// Call it only after `init_transactions` of the relay's producer: that completes or aborts
/// any transaction a previous instance left open. Transactions of other producers can still be
/// open: relays of other stores sharing the topics write to the same partition, and one that
/// died mid-transaction leaves it open until the broker aborts it (its `transaction.timeout.ms`).
/// A `read_committed` reader sees nothing past the first offset of an open transaction, this
/// relay's later checkpoints included, so the reader first waits until every transaction open
/// when it started has ended (see `wait_for_open_transactions`). Then it reads backwards from
/// the end in growing windows, since compaction and aborted transactions leave no fixed
/// distance between the end and the last committed record.
pub async fn read_checkpoint(
    config: &KafkaConfig,
    topic: &str,
    relay_id: &str,
) -> Result<Option<u64>, CheckpointError> {
    let mut consumer_config =
        committed_reader_config(config, &format!("{relay_id}.checkpoint-reader"));
    consumer_config.set("enable.partition.eof", "true");
    let kafka_error = |source| CheckpointError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let consumer: BaseConsumer<QuietEof> = consumer_config
        .create_with_context(QuietEof)
        .map_err(kafka_error)?;
    let everything: BaseConsumer = consumer_config
        .set("isolation.level", "read_uncommitted")
        .create()
        .map_err(kafka_error)?;
    let timeout = config.request_timeout();
    let topic = topic.to_owned();
    let relay_id = relay_id.to_owned();
    // The consumers' calls block; keep them off the async worker threads.
    tokio::task::spawn_blocking(move || {
        wait_for_open_transactions(&consumer, &everything, &topic, timeout)?;
        read_last(&consumer, &topic, &relay_id, timeout)
    })
    .await
    .expect("the checkpoint reader panicked")
}

/// A consumer configuration that reads only committed records, whatever the passthrough
/// options say: they apply last, and with `isolation.level=read_uncommitted` among them (which
/// a user may set for the projection) the checkpoint of a transaction that was aborted would be
/// read as the last one, and the relay would resume after events it never published.
pub(crate) fn committed_reader_config(config: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut consumer_config = config.consumer_config(group_id);
    consumer_config.set("isolation.level", "read_committed");
    consumer_config
}

/// Waits until the checkpoint partition's last stable offset (where `read_committed` reading
/// ends) has reached its high watermark as of now: then every transaction open now has ended,
/// and whatever this relay committed is readable. Asking each end uses the isolation level of
/// the client that asks.
fn wait_for_open_transactions(
    committed: &BaseConsumer<QuietEof>,
    everything: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<(), CheckpointError> {
    let kafka_error = |source| CheckpointError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let started = Instant::now();
    let (_, high_watermark) = everything
        .fetch_watermarks(topic, 0, timeout)
        .map_err(kafka_error)?;
    let mut announced = false;
    loop {
        // Each request gets the whole timeout: one given only what is left of the wait would
        // end it with a bare "timed out" from librdkafka instead of what kept it waiting.
        let (_, last_stable) = committed
            .fetch_watermarks(topic, 0, timeout)
            .map_err(kafka_error)?;
        if last_stable >= high_watermark {
            return Ok(());
        }
        if !announced {
            tracing::info!(
                topic,
                last_stable,
                high_watermark,
                "waiting for a transaction another producer holds open on the checkpoint \
                 topic (it ends by its producer's transaction timeout; one that never ends \
                 is a hanging transaction, see the README)"
            );
            announced = true;
        }
        if started.elapsed() >= timeout {
            return Err(CheckpointError::OpenTransaction {
                topic: topic.to_owned(),
                last_stable,
                high_watermark,
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read_last(
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    relay_id: &str,
    timeout: Duration,
) -> Result<Option<u64>, CheckpointError> {
    let kafka_error = |source| CheckpointError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(kafka_error)?;
    let mut window = 16;
    loop {
        let start = high.saturating_sub(window).max(low);
        if let Some(position) = last_in_range(consumer, topic, relay_id, start, timeout)? {
            return Ok(Some(position));
        }
        if start <= low {
            return Ok(None);
        }
        window = window.saturating_mul(4);
    }
}

/// The last checkpoint of `relay_id` at or after `start`, reading up to the end.
fn last_in_range(
    consumer: &BaseConsumer<QuietEof>,
    topic: &str,
    relay_id: &str,
    start: i64,
    timeout: Duration,
) -> Result<Option<u64>, CheckpointError> {
    let kafka_error = |source| CheckpointError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(start))
        .map_err(kafka_error)?;
    consumer.assign(&assignment).map_err(kafka_error)?;
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if Instant::now() > deadline {
            return Err(CheckpointError::Timeout {
                topic: topic.to_owned(),
                timeout,
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(last),
            Some(Err(error)) => return Err(kafka_error(error)),
            Some(Ok(message)) => {
                if message.key() != Some(relay_id.as_bytes()) {
                    continue;
                }
                let value = message.payload().unwrap_or_default();
                let text = String::from_utf8_lossy(value);
                let position = text.parse().map_err(|_| CheckpointError::Corrupt {
                    topic: topic.to_owned(),
                    offset: message.offset(),
                    value: text.clone().into_owned(),
                })?;
                last = Some(position);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientOptions;

    #[test]
    fn the_checkpoint_is_read_committed_whatever_the_passthrough_options_say() {
        let mut kafka = KafkaConfig::new("localhost:9092");
        kafka.client_options = vec![ClientOptions(vec![(
            "isolation.level".into(),
            "read_uncommitted".into(),
        )])];
        assert_eq!(
            kafka.consumer_config("g").get("isolation.level"),
            Some("read_uncommitted"),
            "the options apply last"
        );
        assert_eq!(
            committed_reader_config(&kafka, "g").get("isolation.level"),
            Some("read_committed")
        );
    }
}
