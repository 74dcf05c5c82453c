//! The foundation against the real broker: topic provisioning, an idempotent producer that
//! keeps per-key order, and a consumer group reading the records back.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bookstore::config::KafkaConfig;
use bookstore::kafka::{KafkaSetupError, TopicSpec, TopicStatus, provision_topics};
use futures::StreamExt;
use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset};

fn specs(config: &KafkaConfig) -> Vec<TopicSpec> {
    config
        .topics()
        .specs(config.partitions, config.replication_factor)
}

async fn topic_setting(config: &KafkaConfig, topic: &str, key: &str) -> String {
    let admin = config.admin_client().unwrap();
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let resource = described.into_iter().next().unwrap().unwrap();
    resource
        .get(key)
        .and_then(|entry| entry.value.clone())
        .unwrap()
}

async fn partition_count(config: &KafkaConfig, topic: &str) -> usize {
    let metadata = config.fetch_metadata(Some(topic)).await.unwrap();
    metadata.topics()[0].partitions().len()
}

#[tokio::test]
async fn provisioning_creates_delta_and_compacted_fact_topics_with_configured_partitions() {
    let mut config = common::kafka_config();
    config.partitions = 5;
    let topics = config.topics();

    let statuses = provision_topics(&config, &specs(&config)).await.unwrap();

    assert!(
        statuses
            .iter()
            .all(|(_, status)| *status == TopicStatus::Created)
    );
    assert_eq!(partition_count(&config, &topics.book).await, 5);
    assert_eq!(partition_count(&config, &topics.book_fact).await, 5);
    assert_eq!(
        topic_setting(&config, &topics.book_fact, "cleanup.policy").await,
        "compact"
    );
    assert_eq!(
        topic_setting(&config, &topics.book, "cleanup.policy").await,
        "delete"
    );
    assert_eq!(
        topic_setting(&config, &topics.book_fact_dlq, "retention.ms").await,
        "-1",
        "dead letters are kept until they are dealt with"
    );
}

#[tokio::test]
async fn default_partition_count_is_three_and_topic_names_follow_the_contract() {
    let config = common::kafka_config();
    let topics = config.topics();
    assert_eq!(topics.book, format!("{}.book", config.topic_prefix));
    assert_eq!(
        topics.book_fact,
        format!("{}.book-fact", config.topic_prefix)
    );
    assert_eq!(bookstore::kafka::Topics::default().book, "bookstore.book");
    assert_eq!(
        bookstore::kafka::Topics::default().book_fact,
        "bookstore.book-fact"
    );

    provision_topics(&config, &specs(&config)).await.unwrap();

    assert_eq!(partition_count(&config, &topics.book).await, 3);
    assert_eq!(partition_count(&config, &topics.book_fact).await, 3);
}

#[tokio::test]
async fn provisioning_twice_is_idempotent() {
    let config = common::kafka_config();

    provision_topics(&config, &specs(&config)).await.unwrap();
    let again = provision_topics(&config, &specs(&config)).await.unwrap();

    assert_eq!(again.len(), 4);
    assert!(
        again
            .iter()
            .all(|(_, status)| *status == TopicStatus::AlreadyPresent)
    );
}

/// `error` says that `setting` of `topic` is `actual` where `expected` was required.
fn assert_mismatch(
    error: &KafkaSetupError,
    topic: &str,
    setting: &str,
    expected: &str,
    actual: &str,
) {
    match error {
        KafkaSetupError::TopicMismatch {
            topic: mismatched,
            setting: which,
            expected: wanted,
            actual: found,
        } => {
            assert_eq!(
                (
                    mismatched.as_str(),
                    which.as_str(),
                    wanted.as_str(),
                    found.as_str()
                ),
                (topic, setting, expected, actual)
            );
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert!(error.to_string().contains(setting), "{error}");
}

#[tokio::test]
async fn existing_fact_topic_without_compaction_is_reported_not_used() {
    let config = common::kafka_config();
    let topics = config.topics();
    let wrong = TopicSpec::new(&topics.book_fact, 3, -1).with_config("cleanup.policy", "delete");
    provision_topics(&config, &[wrong]).await.unwrap();

    let error = provision_topics(&config, &specs(&config))
        .await
        .unwrap_err();

    assert_mismatch(
        &error,
        &topics.book_fact,
        "cleanup.policy",
        "compact",
        "delete",
    );
    // Nothing was changed on the existing topic.
    assert_eq!(
        topic_setting(&config, &topics.book_fact, "cleanup.policy").await,
        "delete"
    );
}

#[tokio::test]
async fn existing_topic_with_other_partition_count_is_reported() {
    let config = common::kafka_config();
    let topics = config.topics();
    provision_topics(&config, &[TopicSpec::new(&topics.book, 1, -1)])
        .await
        .unwrap();

    let error = provision_topics(&config, &specs(&config))
        .await
        .unwrap_err();

    assert!(
        matches!(&error, KafkaSetupError::TopicMismatch { setting, expected, actual, .. }
            if setting == "partitions" && expected == "3" && actual == "1"),
        "{error:?}"
    );
}

async fn replica_counts(config: &KafkaConfig, topic: &str) -> Vec<usize> {
    let metadata = config.fetch_metadata(Some(topic)).await.unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|partition| partition.replicas().len())
        .collect()
}

/// An operator who asks for two copies must not run, unknowingly, on a topic someone created
/// with one. (The test broker is a single node, so replication 1 is all it can create.)
#[tokio::test]
async fn existing_topic_with_fewer_replicas_than_required_is_reported_not_used() {
    let config = common::kafka_config();
    let topics = config.topics();
    provision_topics(&config, &topics.specs(3, 1))
        .await
        .unwrap();

    let error = provision_topics(&config, &topics.specs(3, 2))
        .await
        .unwrap_err();

    assert_mismatch(&error, &topics.book, "replication.factor", "2", "1");
    // Nothing was changed on the existing topic.
    assert_eq!(replica_counts(&config, &topics.book).await, [1, 1, 1]);
}

#[tokio::test]
async fn existing_topic_with_as_many_replicas_or_the_broker_default_is_used() {
    let config = common::kafka_config();
    let topics = config.topics();
    provision_topics(&config, &topics.specs(3, 1))
        .await
        .unwrap();

    let exact = provision_topics(&config, &topics.specs(3, 1))
        .await
        .unwrap();
    let broker_default = provision_topics(&config, &topics.specs(3, -1))
        .await
        .unwrap();

    for statuses in [exact, broker_default] {
        assert_eq!(statuses.len(), 4);
        assert!(
            statuses
                .iter()
                .all(|(_, status)| *status == TopicStatus::AlreadyPresent),
            "{statuses:?}"
        );
    }
}

#[tokio::test]
async fn idempotent_producer_keeps_send_order_per_key_and_a_consumer_group_reads_it_back() {
    let config = common::kafka_config();
    let topic = config.topics().book;
    provision_topics(&config, &specs(&config)).await.unwrap();
    let producer = config.producer().unwrap();
    let keys: Vec<String> = (0..6).map(|i| format!("book-{i}")).collect();
    let per_key = 50;

    // Interleave keys and send without waiting, so many records are in flight at once.
    let mut deliveries = Vec::new();
    for sequence in 0..per_key {
        for key in &keys {
            let payload = format!("{key}:{sequence}");
            let record = FutureRecord::to(&topic).key(key).payload(&payload);
            deliveries.push(
                producer
                    .send_result(record)
                    .map_err(|(error, _)| error)
                    .unwrap(),
            );
        }
    }
    for delivery in deliveries {
        delivery.await.unwrap().unwrap();
    }

    let group = common::unique("group");
    let consumer = config.consumer(&group).unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen: HashMap<String, Vec<u32>> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut stream = consumer.stream();
    let total = keys.len() * per_key as usize;
    let mut received = 0;
    while received < total {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("records did not arrive within 30 s")
            .unwrap()
            .unwrap();
        let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
        let payload = std::str::from_utf8(message.payload().unwrap()).unwrap();
        let (payload_key, sequence) = payload.split_once(':').unwrap();
        assert_eq!(payload_key, key);
        let partition = *partition_of
            .entry(key.clone())
            .or_insert(message.partition());
        assert_eq!(partition, message.partition(), "one key, one partition");
        seen.entry(key).or_default().push(sequence.parse().unwrap());
        consumer.store_offset_from_message(&message).unwrap();
        received += 1;
    }
    drop(stream);

    for key in &keys {
        let expected: Vec<u32> = (0..per_key).collect();
        assert_eq!(seen[key], expected, "records of {key} out of send order");
    }
    consumer.commit_consumer_state(CommitMode::Sync).unwrap();

    // The group's committed offsets cover everything: a new member of the group gets nothing.
    drop(consumer);
    let rejoined = config.consumer(&group).unwrap();
    rejoined.subscribe(&[&topic]).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(8), rejoined.recv()).await;
    assert!(
        next.is_err(),
        "the group re-read committed records: {next:?}"
    );
    let committed = rejoined
        .committed(Timeout::After(Duration::from_secs(10)))
        .unwrap();
    let committed_total: i64 = committed
        .elements()
        .iter()
        .map(|element| match element.offset() {
            Offset::Offset(offset) => offset,
            _ => 0,
        })
        .sum();
    assert_eq!(committed_total, total as i64);
}

#[tokio::test]
async fn unreachable_broker_is_a_clear_error_naming_the_fix() {
    let mut config = KafkaConfig::new("127.0.0.1:1");
    config.request_timeout_ms = 1_500;

    let error = config.check_reachable().await.unwrap_err();

    let message = error.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(message.contains("deploy/kafka/kafka.sh start"), "{message}");
}

#[tokio::test]
async fn test_broker_answers_metadata_requests() {
    let config = common::kafka_config();
    let brokers = config.check_reachable().await.unwrap();
    assert!(brokers >= 1);
}
