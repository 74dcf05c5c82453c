//! What every handler shares: the command service over the store, the metrics handle, and the
//! settings of the readiness probe and the relay gauges.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::codec::AvroCodec;
use crate::config::KafkaConfig;
use crate::projection::ReportStore;
use crate::service::BookService;
use crate::store::Outbox;

/// Everything the HTTP layer needs of a store: commands and the outbox position
/// ([`Outbox`], which includes [`crate::store::EventStore`]) and the read model
/// ([`ReportStore`]). [`crate::store::AnyStore`], `SqliteStore` and `PostgresStore` are all one.
pub trait HttpStore: Outbox + ReportStore + 'static {}

impl<S: Outbox + ReportStore + 'static> HttpStore for S {}

/// How long a readiness check may wait for the database or the cluster before it counts as
/// down: shorter than any probe timeout an orchestrator would use.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The relay id whose backlog `/metrics` reports when none is set: the relay's own default
/// for the default topic prefix.
pub const DEFAULT_RELAY_ID: &str = "bookstore.relay";

/// The shared state of the router. Cheap to clone.
pub struct HttpState<S> {
    pub(super) service: Arc<BookService<S, AvroCodec>>,
    pub(super) metrics: PrometheusHandle,
    pub(super) relay_id: Arc<str>,
    pub(super) kafka: Option<Arc<KafkaConfig>>,
    pub(super) probe_timeout: Duration,
    pub(super) request_timeout: Duration,
}

impl<S> Clone for HttpState<S> {
    fn clone(&self) -> Self {
        Self {
            service: Arc::clone(&self.service),
            metrics: self.metrics.clone(),
            relay_id: Arc::clone(&self.relay_id),
            kafka: self.kafka.clone(),
            probe_timeout: self.probe_timeout,
            request_timeout: self.request_timeout,
        }
    }
}

impl<S: HttpStore> HttpState<S> {
    /// State over `store`, rendering `/metrics` from `metrics` (see
    /// [`crate::telemetry::prometheus_handle`], which also makes the facade record into it).
    pub fn new(store: S, metrics: PrometheusHandle) -> Self {
        Self {
            service: Arc::new(BookService::new(store, AvroCodec::new())),
            metrics,
            relay_id: Arc::from(DEFAULT_RELAY_ID),
            kafka: None,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            request_timeout: super::REQUEST_TIMEOUT,
        }
    }

    /// The relay whose backlog and published position `/metrics` reports (default
    /// `bookstore.relay`).
    pub fn with_relay_id(mut self, relay_id: impl Into<String>) -> Self {
        self.relay_id = Arc::from(relay_id.into());
        self
    }

    /// Makes `/readyz` also ask the cluster of `kafka` for its metadata.
    pub fn with_kafka_readiness(mut self, kafka: KafkaConfig) -> Self {
        self.kafka = Some(Arc::new(kafka));
        self
    }

    /// How long each readiness check may take (default [`DEFAULT_PROBE_TIMEOUT`]).
    pub fn with_probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// How long a request may take from the end of its head, body included (default
    /// [`super::REQUEST_TIMEOUT`]); longer ones are answered 503.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn store(&self) -> &S {
        self.service.store()
    }

    pub(super) fn service(&self) -> &BookService<S, AvroCodec> {
        &self.service
    }
}
