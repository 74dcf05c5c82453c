//! The relay's metrics (Prometheus names, prefixed `bookstore_relay_`).
//!
//! Recorded through the `metrics` facade; whoever runs the relay installs an exporter
//! (see [`crate::telemetry::install_metrics`]). Without one they cost next to nothing.

pub const PUBLISHED_EVENTS: &str = "bookstore_relay_published_events_total";
pub const BATCHES: &str = "bookstore_relay_batches_total";
pub const SEND_ERRORS: &str = "bookstore_relay_send_errors_total";
pub const BACKLOG: &str = "bookstore_relay_backlog_events";
pub const LAST_POSITION: &str = "bookstore_relay_last_published_position";

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

pub(crate) fn record_send_error() {
    metrics::counter!(SEND_ERRORS).increment(1);
}
