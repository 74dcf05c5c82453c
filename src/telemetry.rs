//! Logging (`tracing` with structured fields, filtered by `RUST_LOG`, default `info`) and the
//! Prometheus metrics recorder.
//!
//! Metrics are recorded through the `metrics` facade everywhere (relay, projection, HTTP). One
//! Prometheus recorder per process collects them: [`prometheus_handle`] installs it on first
//! use and hands out its [`PrometheusHandle`], which renders the text format. `bookstore serve`
//! serves that text at `/metrics` of its own router; [`install_metrics`] serves it on an
//! address of its own (for `bookstore relay --metrics-addr`). Both can run in one process: they
//! share the recorder.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// The `Content-Type` of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
pub enum MetricsError {
    #[error("could not install the Prometheus recorder: {0}")]
    Recorder(String),
    #[error("could not serve metrics on {addr}: {reason}")]
    Listener { addr: SocketAddr, reason: String },
}

/// The process's Prometheus recorder, installed as the global `metrics` recorder on the first
/// call; later calls return the same handle. Fails only if another recorder was installed
/// by other means.
pub fn prometheus_handle() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    // The lock only guards installing; a panic while holding it cannot leave a half state.
    let mut installed = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|error| MetricsError::Recorder(error.to_string()))?;
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Everything recorded so far, in the Prometheus text format.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    // Without the exporter's own upkeep task, draining histograms is the scraper's job.
    handle.run_upkeep();
    handle.render()
}

/// Serves every `metrics` counter and gauge for Prometheus at `http://addr/metrics`, from a
/// task on the current Tokio runtime, for as long as the process runs.
pub fn install_metrics(addr: SocketAddr) -> Result<(), MetricsError> {
    let listener_error = |reason: String| MetricsError::Listener { addr, reason };
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|error| listener_error(format!("no Tokio runtime: {error}")))?;
    let handle = prometheus_handle()?;
    // Bound here rather than in the task, so a taken port is reported to the caller.
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
        .map_err(|error| listener_error(error.to_string()))?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)
            .map_err(|error| listener_error(error.to_string()))?
    };
    let router = Router::new().route(
        "/metrics",
        get(move || {
            let text = render_metrics(&handle);
            async move { ([(CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], text) }
        }),
    );
    runtime.spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, %addr, "the metrics listener stopped");
        }
    });
    Ok(())
}
