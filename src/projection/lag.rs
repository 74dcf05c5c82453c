//! How far the read model is behind the fact topic: per partition, the records between the
//! offset the read model stored for the group and the partition's end in Kafka.
//!
//! The stored offsets are where the projection resumes (see the [module doc](super)), so they
//! are what lags, whichever member owns a partition and whether any member runs at all. That is
//! the point: a projector that keeps failing leaves the group between attempts and owns
//! nothing, and a figure taken from the members' own consumers (librdkafka's statistics) would
//! read 0 exactly while the read model falls behind. [`LagMeter`] asks the ends through a client
//! of its own that never joins the group, and reads the offsets from the [`ReportStore`].
//!
//! ## The end of a partition
//!
//! The end is where the projector's consumer can read up to: under `read_committed` (the
//! consumer's isolation level, unless the passthrough options change it) the last stable
//! offset, which stops before the first record of a transaction still open, and equals the high
//! watermark when none is. Records of an open transaction are not lag: nobody can read them
//! yet. The meter asks under the consumer's isolation level, since a watermark request answers
//! under the asking client's.
//!
//! Transaction markers (control records) take offsets too, so while a projector is behind a
//! topic written by the exactly-once relay, its lag counts one record more per transaction and
//! partition still to read. Caught up it reads 0 all the same: the offset the projector stores
//! is its consumer position, which moves past the markers (see [`super::consumer`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tracing::debug;

use super::{ReportStore, metrics};
use crate::config::KafkaConfig;
use crate::kafka::partition_ids_in;
use crate::store::StoreError;

/// Why the lag could not be measured. Each variant's text already names its cause, so none is
/// marked as a `source` (an error chain printed with `{:#}` would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("could not create a Kafka client for {bootstrap_servers}: {cause}")]
    Client {
        bootstrap_servers: String,
        cause: KafkaError,
    },
    #[error("asking Kafka for the ends of {topic}: {cause}")]
    Kafka { topic: String, cause: KafkaError },
    #[error("topic {topic} does not exist")]
    TopicMissing { topic: String },
    #[error("read model: {0}")]
    Store(StoreError),
}

impl From<StoreError> for LagError {
    fn from(error: StoreError) -> Self {
        LagError::Store(error)
    }
}

/// How far one partition of the fact topic is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// The next offset the read model stored for the group; `None` when nothing of the
    /// partition was applied yet.
    pub stored: Option<i64>,
    /// The partition's low watermark: where reading starts when nothing is stored.
    pub beginning: i64,
    /// The partition's end (see the [module doc](self)).
    pub end: i64,
    /// Records between where the projection resumes and the end.
    pub records: u64,
}

impl PartitionLag {
    fn between(partition: i32, stored: Option<i64>, beginning: i64, end: i64) -> Self {
        // Records below the low watermark are gone (retention, deleted records): a consumer
        // starting there is moved to the low watermark, so they are nothing left to read.
        let resume = stored.unwrap_or(beginning).max(beginning);
        // A stored offset past the end (a topic deleted and created again) leaves nothing to
        // read either; the projector's consumer would start over at the low watermark.
        let records = u64::try_from(end - resume).unwrap_or(0);
        Self {
            partition,
            stored,
            beginning,
            end,
            records,
        }
    }
}

/// How far the group's read model is behind the fact topic, per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectionLag {
    /// Every partition of the topic, in partition order.
    pub partitions: Vec<PartitionLag>,
}

impl ProjectionLag {
    /// Records behind, over all partitions.
    pub fn total(&self) -> u64 {
        self.partitions.iter().map(|lag| lag.records).sum()
    }

    /// Records behind on `partition`; `None` for a partition the topic does not have.
    pub fn of(&self, partition: i32) -> Option<u64> {
        self.partitions
            .iter()
            .find(|lag| lag.partition == partition)
            .map(|lag| lag.records)
    }
}

/// Measures the lag of one group on the fact topic. Holds one Kafka client for every
/// measurement, so a process that measures every few seconds keeps its connections.
pub struct LagMeter {
    client: Arc<BaseConsumer>,
    group: String,
    topic: String,
    /// The most all the Kafka requests of one measurement may take together.
    timeout: Duration,
}

impl LagMeter {
    /// A meter of `group` on the fact topic of `kafka`. The Kafka requests of one measurement
    /// take at most the request timeout of `kafka`, together.
    pub fn new(kafka: &KafkaConfig, group: &str) -> Result<Self, LagError> {
        let consumer = kafka.consumer_config(group);
        let isolation = consumer.get("isolation.level").unwrap_or("read_committed");
        // No `group.id`: this client never joins the group nor touches its offsets.
        let mut config = kafka.client_config();
        config.set("isolation.level", isolation);
        let client = config.create().map_err(|cause| LagError::Client {
            bootstrap_servers: kafka.bootstrap_servers.clone(),
            cause,
        })?;
        Ok(Self {
            client: Arc::new(client),
            group: group.to_owned(),
            topic: kafka.topics().book_fact,
            timeout: kafka.request_timeout(),
        })
    }

    /// The lag now, per partition of the topic.
    pub async fn measure<S: ReportStore>(&self, store: &S) -> Result<ProjectionLag, LagError> {
        // The ends first: a batch the projector applies while they are asked then counts as
        // applied, so a projector that keeps up reads 0 rather than what arrived meanwhile.
        let ends = self.partition_ends().await?;
        let stored: HashMap<i32, i64> = store
            .stored_offsets(&self.group, &self.topic)
            .await?
            .into_iter()
            .map(|offset| (offset.partition, offset.next_offset))
            .collect();
        let partitions = ends
            .into_iter()
            .map(|(partition, (beginning, end))| {
                PartitionLag::between(partition, stored.get(&partition).copied(), beginning, end)
            })
            .collect();
        Ok(ProjectionLag { partitions })
    }

    /// Measures the lag and sets `bookstore_projection_lag_records` of every partition from it.
    /// A failed measurement leaves the gauge as it was.
    pub async fn refresh<S: ReportStore>(&self, store: &S) -> Result<ProjectionLag, LagError> {
        let lag = self.measure(store).await?;
        metrics::record_lag(&lag);
        debug!(group = %self.group, total = lag.total(), "projection lag measured");
        Ok(lag)
    }

    /// The (low watermark, end) of every partition of the topic.
    async fn partition_ends(&self) -> Result<BTreeMap<i32, (i64, i64)>, LagError> {
        let client = Arc::clone(&self.client);
        let topic = self.topic.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || read_partition_ends(&client, &topic, timeout))
            .await
            .expect("asking Kafka for the partition ends panicked")
    }
}

/// Asks for the topic's partitions and then each one's watermarks (blocking; on the blocking
/// pool). One budget for all the requests, so a broker that does not answer holds the thread
/// for `timeout`, not for `timeout` per partition.
fn read_partition_ends(
    client: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<i32, (i64, i64)>, LagError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let kafka_error = |cause| LagError::Kafka {
        topic: topic.to_owned(),
        cause,
    };
    let metadata = client
        .fetch_metadata(Some(topic), left())
        .map_err(kafka_error)?;
    let partitions = partition_ids_in(&metadata, topic).ok_or_else(|| LagError::TopicMissing {
        topic: topic.to_owned(),
    })?;
    partitions
        .into_iter()
        .map(|partition| {
            let watermarks = client
                .fetch_watermarks(topic, partition, left())
                .map_err(kafka_error)?;
            Ok((partition, watermarks))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_with_nothing_stored_is_behind_by_all_it_holds() {
        let lag = PartitionLag::between(0, None, 4, 10);
        assert_eq!(lag.records, 6);
    }

    #[test]
    fn a_stored_offset_counts_from_where_reading_resumes() {
        assert_eq!(PartitionLag::between(0, Some(7), 0, 10).records, 3);
        assert_eq!(PartitionLag::between(0, Some(10), 0, 10).records, 0);
    }

    #[test]
    fn records_gone_below_the_beginning_or_offsets_past_the_end_are_not_lag() {
        assert_eq!(PartitionLag::between(0, Some(2), 5, 10).records, 5);
        assert_eq!(PartitionLag::between(0, Some(12), 0, 10).records, 0);
    }
}
