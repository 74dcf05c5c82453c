//! The operational endpoints: liveness, readiness, Prometheus metrics, and the request counter.
//!
//! * `/healthz` answers 200 as long as the process serves requests at all.
//! * `/readyz` answers 200 only when the database answers (and the Kafka cluster, when the
//!   state was given a [`crate::config::KafkaConfig`]), each within the probe timeout;
//!   otherwise 503 with the reason per check.
//! * `/metrics` renders everything recorded through the `metrics` facade (the relay's, the
//!   projection's, the request counter), after reading the relay's progress from the store, so
//!   `bookstore_relay_backlog_events` and `bookstore_relay_last_published_position` are right
//!   at every scrape even when no relay runs in this process.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use axum::Json;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::warn;

use super::HTTP_REQUESTS;
use super::state::{HttpState, HttpStore};
use crate::relay::metrics as relay_metrics;
use crate::telemetry::{PROMETHEUS_CONTENT_TYPE, render_metrics};

#[derive(Debug, Serialize)]
pub(super) struct Health {
    status: &'static str,
}

pub(super) async fn healthz() -> Json<Health> {
    Json(Health { status: "alive" })
}

/// The outcome of `/readyz`: `ready` or `unavailable`, and `ok` or the reason per check.
#[derive(Debug, Serialize)]
pub(super) struct Readiness {
    status: &'static str,
    checks: BTreeMap<&'static str, String>,
}

pub(super) async fn readyz<S: HttpStore>(
    State(state): State<HttpState<S>>,
) -> (StatusCode, Json<Readiness>) {
    let timeout = state.probe_timeout;
    let mut results = vec![(
        "database",
        probe(timeout, async {
            state.store().head_position().await.map(drop)
        })
        .await,
    )];
    if let Some(kafka) = &state.kafka {
        let mut kafka = kafka.as_ref().clone();
        // The metadata request runs on the blocking pool; bounding it too lets it end soon
        // after the probe gave up on it.
        kafka.request_timeout_ms = kafka
            .request_timeout_ms
            .min(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        results.push(("kafka", probe(timeout, kafka.check_reachable()).await));
    }
    let ready = results.iter().all(|(_, result)| result.is_ok());
    let checks = results
        .into_iter()
        .map(|(name, result)| (name, result.err().unwrap_or_else(|| "ok".to_owned())))
        .collect();
    if ready {
        let body = Readiness {
            status: "ready",
            checks,
        };
        (StatusCode::OK, Json(body))
    } else {
        warn!(?checks, "not ready");
        let body = Readiness {
            status: "unavailable",
            checks,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    }
}

/// Runs one readiness check; its error, or running out of time, is the reason it failed.
async fn probe<T, E: std::fmt::Display>(
    timeout: Duration,
    check: impl Future<Output = Result<T, E>>,
) -> Result<(), String> {
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

pub(super) async fn metrics<S: HttpStore>(State(state): State<HttpState<S>>) -> Response {
    record_relay_progress(&state).await;
    let text = render_metrics(&state.metrics);
    ([(CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)], text).into_response()
}

/// Sets the relay gauges from the store: what is committed but not yet published, and how far
/// the relay got. A store that does not answer leaves them as they were.
async fn record_relay_progress<S: HttpStore>(state: &HttpState<S>) {
    let progress = relay_metrics::refresh_progress(state.store(), &state.relay_id);
    match tokio::time::timeout(state.probe_timeout, progress).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "could not read the relay's progress for /metrics"),
        Err(_) => warn!("the store did not say the relay's progress in time for /metrics"),
    }
}

/// Counts every request by method, matched route and status.
pub(super) async fn count_requests(request: Request, next: Next) -> Response {
    // Only well-known methods become label values, so odd requests cannot grow the series.
    let method = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    metrics::counter!(
        HTTP_REQUESTS,
        "method" => method,
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}
