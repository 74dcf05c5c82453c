//! Logging (`tracing` with structured fields, filtered by `RUST_LOG`, default `info`) and the
//! Prometheus metrics exporter.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stderr so stdout stays free for command output.
/// Calling it twice is harmless (the second call does nothing).
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[derive(Debug, thiserror::Error)]
#[error("could not serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    pub addr: std::net::SocketAddr,
    pub reason: String,
}

/// Serves every `metrics` counter and gauge for Prometheus at `http://addr/metrics`.
pub fn install_metrics(addr: std::net::SocketAddr) -> Result<(), MetricsError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|error| MetricsError {
            addr,
            reason: error.to_string(),
        })
}
