//! Wiring a relay from configuration: topics provisioned, schemas registered when a registry
//! is configured, the Kafka publisher in the chosen delivery mode.

use std::time::Duration;

use super::record::RecordMapper;
use super::{DeliveryMode, KafkaPublisher, Relay, RelayConfig};
use crate::codec::wire::WireFormat;
use crate::codec::{AvroCodec, RegistryError};
use crate::config::{KafkaConfig, RelaySettings};
use crate::kafka::{KafkaSetupError, provision_topics};
use crate::store::Outbox;

#[derive(Debug, thiserror::Error)]
pub enum RelaySetupError {
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("outbox: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// A relay from `outbox` to the Kafka cluster of `kafka`, ready to run.
pub async fn kafka_relay<O: Outbox + Clone + 'static>(
    outbox: O,
    kafka: &KafkaConfig,
    settings: &RelaySettings,
) -> Result<Relay<O, KafkaPublisher>, RelaySetupError> {
    let topics = kafka.topics();
    provision_topics(
        kafka,
        &topics.specs(kafka.partitions, kafka.replication_factor),
    )
    .await?;
    let wire = wire_format(kafka).await?;
    let relay_id = settings
        .relay_id
        .clone()
        .unwrap_or_else(|| format!("{}.relay", kafka.topic_prefix));
    let mut config = RelayConfig::new(relay_id.clone());
    config.batch_size = settings.batch_size.max(1);
    config.poll_interval = Duration::from_millis(settings.poll_interval_ms.max(1));
    config.retention = Duration::from_secs(settings.retention_hours.saturating_mul(3600));
    config.lease_ttl = Duration::from_millis(settings.lease_ttl_ms.max(1));
    if settings.delivery == DeliveryMode::ExactlyOnce {
        config.batch_linger = Duration::from_millis(settings.batch_linger_ms);
    }
    let checkpoint_topic = topics.relay_checkpoint.clone();
    // Kafka-side identity: the relay of THIS store. Another store relaying to the same topics
    // under the same relay id must neither fence this one nor read its checkpoint.
    let transactional_id = format!("{relay_id}.{}", outbox.store_id().await?);
    let mut mapper = RecordMapper::new(topics, wire);
    if let Some(registry) = kafka.schema_registry_client()? {
        mapper = mapper.with_registry(registry);
    }
    let publisher = KafkaPublisher::new(
        kafka.clone(),
        mapper,
        settings.delivery,
        transactional_id,
        checkpoint_topic,
    );
    Ok(Relay::new(outbox, publisher, config))
}

/// Confluent framing with registered ids when a registry is configured, else single-object.
pub async fn wire_format(kafka: &KafkaConfig) -> Result<WireFormat, RelaySetupError> {
    let Some(registry) = kafka.schema_registry_client()? else {
        return Ok(WireFormat::SingleObject);
    };
    let topics = kafka.topics();
    // The registry client is blocking; registration happens once, at start.
    let schemas = tokio::task::spawn_blocking(move || {
        registry.register_all(&AvroCodec::new(), &topics.book, &topics.book_fact)
    })
    .await
    .expect("schema registration panicked")?;
    Ok(WireFormat::Confluent { schemas })
}
