//! Topic provisioning through the admin API: creates what is missing, verifies what exists.
//! Topics that exist are never asked to be created, so a principal without the CREATE
//! permission can provision topics made for it beforehand.
//!
//! Provisioning is idempotent: running it against topics that already have the required
//! settings changes nothing. An existing topic whose partition count or cleanup policy differs
//! from what is required, or that keeps fewer replicas of a partition than the configured
//! replication factor, is reported as an error and left alone: silently using a topic with the
//! wrong policy (a non-compacted fact topic, say) would break the contract, and one with fewer
//! copies would give less durability than the operator asked for. With the replication factor
//! left to the broker (-1), any replica count is accepted.
//!
//! When two or more replicas are asked for, a topic whose `min.insync.replicas` is 1 is accepted
//! with a warning: `acks=all` then succeeds with a single copy in sync, so the extra replicas
//! protect less than they seem to. That setting is usually made broker-wide, by whoever runs
//! the cluster, so it is theirs to decide, not a reason to refuse to start.

use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::KafkaSetupError;
use crate::config::KafkaConfig;

/// What one topic must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// -1: the broker's default replication factor. An existing topic must have at least this
    /// many replicas of every partition (any count with -1).
    pub replication_factor: i32,
    /// Topic-level settings that must hold (checked on existing topics too).
    pub configs: Vec<(String, String)>,
    /// Topic-level settings a new topic gets and an existing one is warned about when it
    /// differs: the operator's to change, not a reason to refuse to start.
    pub advised_configs: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: &str, partitions: i32, replication_factor: i32) -> Self {
        Self {
            name: name.to_owned(),
            partitions,
            replication_factor,
            configs: vec![],
            advised_configs: vec![],
        }
    }

    pub fn with_config(mut self, key: &str, value: &str) -> Self {
        self.configs.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn with_advised_config(mut self, key: &str, value: &str) -> Self {
        self.advised_configs
            .push((key.to_owned(), value.to_owned()));
        self
    }
}

/// What provisioning did for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicStatus {
    Created,
    AlreadyPresent,
}

/// Creates the topics in `specs` that are missing and checks that the existing ones match.
pub async fn provision_topics(
    config: &KafkaConfig,
    specs: &[TopicSpec],
) -> Result<Vec<(String, TopicStatus)>, KafkaSetupError> {
    let admin = config.admin_client()?;
    let options = AdminOptions::new().request_timeout(Some(config.request_timeout()));
    // Only the topics the metadata does not show are asked for: a broker checks the CREATE
    // permission before it looks for the topic, so asking to create one that exists fails
    // for a principal that may only use its topics (a managed cluster, ACLs), although there
    // is nothing to create.
    let metadata = config.fetch_metadata(None).await?;
    let missing: Vec<&TopicSpec> = specs
        .iter()
        .filter(|spec| super::existing_topic(&metadata, &spec.name).is_none())
        .collect();
    let created = create_topics(config, &admin, &options, &missing).await?;

    let mut statuses = Vec::with_capacity(specs.len());
    for spec in specs {
        verify_topic(config, &admin, &options, spec).await?;
        let status = if created.contains(&spec.name.as_str()) {
            TopicStatus::Created
        } else {
            TopicStatus::AlreadyPresent
        };
        statuses.push((spec.name.clone(), status));
    }
    Ok(statuses)
}

/// Creates `specs` and returns the names of those this call created; one that exists by now
/// (another instance created it meanwhile) is not an error.
async fn create_topics<'s>(
    config: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
    specs: &[&'s TopicSpec],
) -> Result<Vec<&'s str>, KafkaSetupError> {
    if specs.is_empty() {
        return Ok(vec![]);
    }
    let new_topics: Vec<NewTopic<'_>> = specs.iter().map(|spec| new_topic(spec)).collect();
    let results = admin
        .create_topics(&new_topics, options)
        .await
        .map_err(|source| unreachable(config, source))?;
    let mut created = Vec::with_capacity(specs.len());
    for (spec, result) in specs.iter().zip(results) {
        match result {
            Ok(_) => {
                info!(topic = %spec.name, partitions = spec.partitions, "created topic");
                created.push(spec.name.as_str());
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaSetupError::Topic {
                    topic,
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(created)
}

fn new_topic(spec: &TopicSpec) -> NewTopic<'_> {
    let mut topic = NewTopic::new(
        &spec.name,
        spec.partitions,
        TopicReplication::Fixed(spec.replication_factor),
    );
    for (key, value) in spec.configs.iter().chain(&spec.advised_configs) {
        topic = topic.set(key, value);
    }
    topic
}

/// Compares an existing (or just created) topic with `spec`.
async fn verify_topic(
    config: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
    spec: &TopicSpec,
) -> Result<(), KafkaSetupError> {
    let layout = topic_layout(config, &spec.name).await?;
    check_layout(spec, layout)?;
    let settings = topic_settings(config, admin, options, &spec.name).await?;
    check_configs(spec, &settings)?;
    warn_about_advised_configs(spec, &settings);
    warn_if_min_insync_defeats_replication(spec, layout, &settings);
    Ok(())
}

/// The partition count must be the one asked for; replicas must be at least as many.
fn check_layout(spec: &TopicSpec, layout: TopicLayout) -> Result<(), KafkaSetupError> {
    if layout.partitions != spec.partitions {
        return Err(mismatch(
            spec,
            "partitions",
            spec.partitions.to_string(),
            layout.partitions.to_string(),
        ));
    }
    // Only too few replicas is refused: more copies than asked for (a cluster-wide policy,
    // say) is at least as durable. -1 asks for the broker's default, whatever it is.
    if spec.replication_factor >= 1 && layout.fewest_replicas < spec.replication_factor {
        return Err(mismatch(
            spec,
            "replication.factor",
            spec.replication_factor.to_string(),
            layout.fewest_replicas.to_string(),
        ));
    }
    Ok(())
}

/// The topic's configs as the broker describes them: every setting with its effective value,
/// whether set on the topic, on the broker or left at Kafka's default.
async fn topic_settings(
    config: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
    topic: &str,
) -> Result<ConfigResource, KafkaSetupError> {
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], options)
        .await
        .map_err(|source| unreachable(config, source))?;
    described
        .into_iter()
        .next()
        .ok_or_else(|| KafkaSetupError::TopicMissing {
            topic: topic.to_owned(),
        })?
        .map_err(|code| KafkaSetupError::Topic {
            topic: topic.to_owned(),
            source: KafkaError::AdminOp(code),
        })
}

fn check_configs(spec: &TopicSpec, settings: &ConfigResource) -> Result<(), KafkaSetupError> {
    for (key, expected) in &spec.configs {
        let actual = setting(settings, key).unwrap_or_default();
        if &actual != expected {
            return Err(mismatch(spec, key, expected.clone(), actual));
        }
    }
    Ok(())
}

fn warn_about_advised_configs(spec: &TopicSpec, settings: &ConfigResource) {
    for (key, advised) in &spec.advised_configs {
        let actual = setting(settings, key).unwrap_or_default();
        if &actual != advised {
            warn!(
                topic = %spec.name,
                setting = %key,
                advised = %advised,
                actual = %actual,
                "the topic has another setting than the one this program gives it; see the README's topic table"
            );
        }
    }
}

/// Not an error: `min.insync.replicas` is usually set broker-wide by whoever runs the cluster.
/// The replicas the topic really keeps count: with the factor left to the broker (-1), a
/// cluster that keeps three copies would otherwise never be warned about.
fn warn_if_min_insync_defeats_replication(
    spec: &TopicSpec,
    layout: TopicLayout,
    settings: &ConfigResource,
) {
    let Some(min_insync) =
        setting(settings, "min.insync.replicas").and_then(|value| value.parse().ok())
    else {
        return;
    };
    let replicas = replicas_kept(spec, layout);
    if min_insync_defeats_replication(replicas, min_insync) {
        warn!(
            topic = %spec.name,
            replicas,
            min_insync_replicas = min_insync,
            "acks=all is satisfied by a single in-sync copy on this topic; set \
             min.insync.replicas to 2 or more for the durability the replication factor suggests"
        );
    }
}

/// The copies of the topic's partitions there are, or at least will be: the factor asked for,
/// or, when it is left to the broker (-1) or the topic keeps more, what the topic has.
fn replicas_kept(spec: &TopicSpec, layout: TopicLayout) -> i32 {
    spec.replication_factor.max(layout.fewest_replicas)
}

fn setting(settings: &ConfigResource, key: &str) -> Option<String> {
    settings.get(key).and_then(|entry| entry.value.clone())
}

/// True when a topic asked to keep `replication_factor` copies (2 or more) would still
/// acknowledge `acks=all` writes held by one broker only, as `min.insync.replicas` of 1 allows:
/// losing that broker loses them, whatever the replication factor.
fn min_insync_defeats_replication(replication_factor: i32, min_insync_replicas: i32) -> bool {
    replication_factor >= 2 && min_insync_replicas < 2
}

/// What the cluster metadata says of a topic's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TopicLayout {
    partitions: i32,
    /// The replica count of the partition with the fewest: the durability of the topic is
    /// that of its weakest partition.
    fewest_replicas: i32,
}

/// The topic's partitions and replicas, from one metadata request. A topic just created may
/// take a moment to show up in the metadata of the broker that answers, so a missing topic is
/// asked about again until the request timeout.
async fn topic_layout(config: &KafkaConfig, topic: &str) -> Result<TopicLayout, KafkaSetupError> {
    let deadline = Instant::now() + config.request_timeout();
    loop {
        let metadata = config.fetch_metadata(Some(topic)).await?;
        let layout = super::existing_topic(&metadata, topic).map(|found| TopicLayout {
            partitions: found.partitions().len() as i32,
            fewest_replicas: found
                .partitions()
                .iter()
                .map(|partition| partition.replicas().len() as i32)
                .min()
                .unwrap_or(0),
        });
        if let Some(layout) = layout {
            return Ok(layout);
        }
        if Instant::now() >= deadline {
            return Err(KafkaSetupError::TopicMissing {
                topic: topic.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mismatch(spec: &TopicSpec, setting: &str, expected: String, actual: String) -> KafkaSetupError {
    KafkaSetupError::TopicMismatch {
        topic: spec.name.clone(),
        setting: setting.to_owned(),
        expected,
        actual,
    }
}

fn unreachable(config: &KafkaConfig, source: KafkaError) -> KafkaSetupError {
    KafkaSetupError::Unreachable {
        bootstrap_servers: config.bootstrap_servers.clone(),
        timeout: config.request_timeout(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(partitions: i32, fewest_replicas: i32) -> TopicLayout {
        TopicLayout {
            partitions,
            fewest_replicas,
        }
    }

    #[test]
    fn fewer_replicas_than_asked_for_is_a_mismatch() {
        let spec = TopicSpec::new("t.book", 3, 3);

        let error = check_layout(&spec, layout(3, 2)).unwrap_err();

        assert!(
            matches!(&error, KafkaSetupError::TopicMismatch { setting, expected, actual, .. }
                if setting == "replication.factor" && expected == "3" && actual == "2"),
            "{error:?}"
        );
    }

    #[test]
    fn as_many_or_more_replicas_than_asked_for_are_accepted() {
        let spec = TopicSpec::new("t.book", 3, 2);

        check_layout(&spec, layout(3, 2)).unwrap();
        check_layout(&spec, layout(3, 3)).unwrap();
    }

    #[test]
    fn broker_default_replication_accepts_any_replica_count() {
        check_layout(&TopicSpec::new("t.book", 3, -1), layout(3, 1)).unwrap();
    }

    #[test]
    fn one_in_sync_copy_defeats_a_replication_factor_of_two_or_more() {
        assert!(min_insync_defeats_replication(2, 1));
        assert!(min_insync_defeats_replication(3, 1));
    }

    #[test]
    fn with_the_factor_left_to_the_broker_the_replicas_a_topic_keeps_count() {
        let three_copies = layout(3, 3);
        let left_to_broker = TopicSpec::new("t.book", 3, -1);
        assert_eq!(replicas_kept(&left_to_broker, three_copies), 3);
        assert!(min_insync_defeats_replication(
            replicas_kept(&left_to_broker, three_copies),
            1
        ));
        assert_eq!(replicas_kept(&left_to_broker, layout(3, 1)), 1);
        assert_eq!(
            replicas_kept(&TopicSpec::new("t.book", 3, 2), layout(3, 3)),
            3
        );
    }

    #[test]
    fn min_insync_of_two_or_more_keeps_the_replication_it_asks_for() {
        assert!(!min_insync_defeats_replication(2, 2));
        assert!(!min_insync_defeats_replication(3, 2));
    }

    /// A single copy was asked for (or the broker's default, which this program does not
    /// know): nothing more is promised, so there is nothing to warn about.
    #[test]
    fn single_copy_or_broker_default_is_not_warned_about() {
        assert!(!min_insync_defeats_replication(1, 1));
        assert!(!min_insync_defeats_replication(-1, 1));
    }
}
