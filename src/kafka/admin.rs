//! Topic provisioning through the admin API: creates what is missing, verifies what exists.
//!
//! Provisioning is idempotent: running it against topics that already have the required
//! settings changes nothing. An existing topic whose partition count or cleanup policy differs
//! from what is required is reported as an error and left alone; silently using a topic with
//! the wrong policy (a non-compacted fact topic, say) would break the contract.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use std::time::{Duration, Instant};

use tracing::info;

use super::KafkaSetupError;
use crate::config::KafkaConfig;

/// What one topic must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// -1: the broker's default replication factor.
    pub replication_factor: i32,
    /// Topic-level settings that must hold (checked on existing topics too).
    pub configs: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: &str, partitions: i32, replication_factor: i32) -> Self {
        Self {
            name: name.to_owned(),
            partitions,
            replication_factor,
            configs: vec![],
        }
    }

    pub fn with_config(mut self, key: &str, value: &str) -> Self {
        self.configs.push((key.to_owned(), value.to_owned()));
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
    let new_topics: Vec<NewTopic<'_>> = specs.iter().map(new_topic).collect();
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| unreachable(config, source))?;

    let mut statuses = Vec::with_capacity(specs.len());
    for (spec, result) in specs.iter().zip(results) {
        let status = match result {
            Ok(_) => {
                info!(topic = %spec.name, partitions = spec.partitions, "created topic");
                TopicStatus::Created
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => TopicStatus::AlreadyPresent,
            Err((topic, code)) => {
                return Err(KafkaSetupError::Topic {
                    topic,
                    source: KafkaError::AdminOp(code),
                });
            }
        };
        verify_topic(config, &admin, &options, spec).await?;
        statuses.push((spec.name.clone(), status));
    }
    Ok(statuses)
}

fn new_topic(spec: &TopicSpec) -> NewTopic<'_> {
    let mut topic = NewTopic::new(
        &spec.name,
        spec.partitions,
        TopicReplication::Fixed(spec.replication_factor),
    );
    for (key, value) in &spec.configs {
        topic = topic.set(key, value);
    }
    topic
}

/// Compares an existing topic's partition count and configs with `spec`.
async fn verify_topic(
    config: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    options: &AdminOptions,
    spec: &TopicSpec,
) -> Result<(), KafkaSetupError> {
    let actual_partitions = partition_count(config, &spec.name).await?;
    if actual_partitions != spec.partitions {
        return Err(mismatch(
            spec,
            "partitions",
            spec.partitions.to_string(),
            actual_partitions.to_string(),
        ));
    }
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(&spec.name)], options)
        .await
        .map_err(|source| unreachable(config, source))?;
    let resource = described
        .into_iter()
        .next()
        .ok_or_else(|| KafkaSetupError::TopicMissing {
            topic: spec.name.clone(),
        })?
        .map_err(|code| KafkaSetupError::Topic {
            topic: spec.name.clone(),
            source: KafkaError::AdminOp(code),
        })?;
    for (key, expected) in &spec.configs {
        let actual = resource
            .get(key)
            .and_then(|entry| entry.value.clone())
            .unwrap_or_default();
        if &actual != expected {
            return Err(mismatch(spec, key, expected.clone(), actual));
        }
    }
    Ok(())
}

/// The topic's partition count. A topic just created may take a moment to show up in the
/// metadata of the broker that answers, so a missing topic is asked about again until the
/// request timeout.
async fn partition_count(config: &KafkaConfig, topic: &str) -> Result<i32, KafkaSetupError> {
    let deadline = Instant::now() + config.request_timeout();
    loop {
        let metadata = config.fetch_metadata(Some(topic)).await?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|candidate| candidate.name() == topic)
            .filter(|candidate| candidate.error().is_none() && !candidate.partitions().is_empty())
            .map(|found| found.partitions().len() as i32);
        if let Some(partitions) = partitions {
            return Ok(partitions);
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
