//! The relay's metrics (Prometheus names, prefixed `bookstore_relay_`).
//!
//! Recorded through the `metrics` facade; whoever runs the relay installs an exporter
//! (see [`crate::telemetry::install_metrics`]). Without one they cost next to nothing.

use crate::store::{Outbox, StoreError};

/// How often a relay process serving metrics reads its progress back from the store.
pub const PROGRESS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

pub const PUBLISHED_EVENTS: &str = "bookstore_relay_published_events_total";
pub const BATCHES: &str = "bookstore_relay_batches_total";
pub const SEND_ERRORS: &str = "bookstore_relay_send_errors_total";
/// Failures of the store (reading the outbox, its head or the relay's position) the relay
/// waited out; counted apart from [`SEND_ERRORS`], so that a database outage does not look
/// like Kafka refusing records.
pub const STORE_ERRORS: &str = "bookstore_relay_store_errors_total";
pub const BACKLOG: &str = "bookstore_relay_backlog_events";
pub const LAST_POSITION: &str = "bookstore_relay_last_published_position";
/// Exactly once: how long the oldest committed transaction not yet readable by `read_committed`
/// readers has been so (0: everything committed is readable); see [`super::visibility`].
pub const UNREADABLE_COMMIT: &str = "bookstore_relay_unreadable_commit_seconds";

pub(crate) fn record_batch(events: u64, facts: u64, last_position: u64) {
    metrics::counter!(PUBLISHED_EVENTS, "kind" => "fact").increment(facts);
    metrics::counter!(PUBLISHED_EVENTS, "kind" => "delta").increment(events - facts);
    metrics::counter!(BATCHES).increment(1);
    record_position(last_position);
}

pub(crate) fn record_position(position: u64) {
    metrics::gauge!(LAST_POSITION).set(position as f64);
}

pub(crate) fn record_backlog(events: u64) {
    metrics::gauge!(BACKLOG).set(events as f64);
}

pub(crate) fn record_unreadable_commit(for_: std::time::Duration) {
    metrics::gauge!(UNREADABLE_COMMIT).set(for_.as_secs_f64());
}

pub(crate) fn record_send_error() {
    metrics::counter!(SEND_ERRORS).increment(1);
}

pub(crate) fn record_store_error() {
    metrics::counter!(STORE_ERRORS).increment(1);
}

/// Sets the backlog and last-position gauges from the store: what is committed but not yet
/// published by `relay_id`, and how far it got.
///
/// The relay sets them itself after each batch, which is not enough: while it cannot publish
/// (broker down, standing by, retrying) no batch ends, and the gauges would show the last
/// good state, usually an empty backlog, exactly when it is growing.
pub async fn refresh_progress<O: Outbox>(outbox: &O, relay_id: &str) -> Result<(), StoreError> {
    let head = outbox.head_position().await?;
    let published = outbox.published_position(relay_id).await?;
    record_backlog(head.saturating_sub(published));
    record_position(published);
    Ok(())
}
