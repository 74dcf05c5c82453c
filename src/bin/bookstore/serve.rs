//! `bookstore serve`: the dashboard and the JSON API until Ctrl-C/SIGTERM.

use anyhow::{Context, Result};
use bookstore::cli::ServeArgs;
use bookstore::config::{KafkaConfig, StoreConfig};
use bookstore::http::{self, HttpState};
use bookstore::shutdown::{Shutdown, ShutdownTrigger};
use tokio::net::TcpListener;
use tracing::info;

pub async fn run(
    store: &StoreConfig,
    kafka: &KafkaConfig,
    args: ServeArgs,
    (_trigger, shutdown): (ShutdownTrigger, Shutdown),
) -> Result<()> {
    let metrics = bookstore::telemetry::prometheus_handle()?;
    let Some(store) = crate::unless_stopped(&shutdown, crate::open_store(store)).await? else {
        return Ok(());
    };
    let relay_id = args
        .relay_id
        .unwrap_or_else(|| format!("{}.relay", kafka.topic_prefix));
    let mut state = HttpState::new(store, metrics).with_relay_id(relay_id);
    if args.ready_requires_kafka {
        state = state.with_kafka_readiness(kafka.clone());
    }
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("listening on {}", args.addr))?;
    let addr = listener.local_addr()?;
    info!("serving the dashboard on http://{addr}/");
    http::serve(listener, http::router(state), shutdown).await?;
    info!("HTTP server stopped");
    Ok(())
}
