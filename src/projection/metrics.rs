//! The projection's metrics (Prometheus names, prefixed `bookstore_projection_`).
//!
//! Recorded through the `metrics` facade; whoever runs the projector installs an exporter
//! (see [`crate::telemetry::install_metrics`]). Without one they cost next to nothing.

use super::lag::ProjectionLag;

/// Fact records applied to the read model, by `change` (`upsert` or `delete`). A replayed or
/// older fact counts too: it was applied, the version guard made it change nothing.
pub const APPLIED_FACTS: &str = "bookstore_projection_applied_facts_total";
/// Batches committed to the read model (rows and offsets in one transaction).
pub const BATCHES: &str = "bookstore_projection_batches_total";
/// Records sent to the dead-letter queue.
pub const DLQ_RECORDS: &str = "bookstore_projection_dlq_records_total";
/// Errors that made the projector back off and rejoin the group, by `kind`.
pub const ERRORS: &str = "bookstore_projection_errors_total";
/// Records between the offset the read model stored for the group (where the projection
/// resumes) and the end of each partition of the fact topic, by `partition`. Set by
/// [`LagMeter::refresh`](super::LagMeter::refresh) every [`LAG_REFRESH`] in a process that
/// runs a projector and serves metrics; it reads no member's state, so a failing projector
/// that owns no partition cannot make it read 0.
pub const LAG: &str = "bookstore_projection_lag_records";

/// When [`LAG`] was last measured, in seconds since the Unix epoch. A measurement that fails
/// (database or broker down) leaves the lag gauge as it was, so a lag that looks fine may be
/// old: alert when `time() - bookstore_projection_lag_measured_timestamp_seconds` grows past a
/// few refresh periods.
pub const LAG_MEASURED_AT: &str = "bookstore_projection_lag_measured_timestamp_seconds";

/// How often a process running a projector and serving metrics measures the lag.
pub const LAG_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) fn record_batch(upserts: usize, deletes: usize) {
    metrics::counter!(APPLIED_FACTS, "change" => "upsert").increment(upserts as u64);
    metrics::counter!(APPLIED_FACTS, "change" => "delete").increment(deletes as u64);
    metrics::counter!(BATCHES).increment(1);
}

pub(crate) fn record_dead_letters(count: usize) {
    metrics::counter!(DLQ_RECORDS).increment(count as u64);
}

pub(crate) fn record_error(kind: &'static str) {
    metrics::counter!(ERRORS, "kind" => kind).increment(1);
}

pub(crate) fn record_lag(lag: &ProjectionLag) {
    for partition in &lag.partitions {
        metrics::gauge!(LAG, "partition" => partition.partition.to_string())
            .set(partition.records as f64);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!(LAG_MEASURED_AT).set(now.as_secs_f64());
}
