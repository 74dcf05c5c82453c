//! The projection's metrics (Prometheus names, prefixed `bookstore_projection_`).
//!
//! Recorded through the `metrics` facade; whoever runs the projector installs an exporter
//! (see [`crate::telemetry::install_metrics`]). Without one they cost next to nothing.

/// Fact records applied to the read model, by `change` (`upsert` or `delete`). A replayed or
/// older fact counts too: it was applied, the version guard made it change nothing.
pub const APPLIED_FACTS: &str = "bookstore_projection_applied_facts_total";
/// Batches committed to the read model (rows and offsets in one transaction).
pub const BATCHES: &str = "bookstore_projection_batches_total";
/// Records sent to the dead-letter queue.
pub const DLQ_RECORDS: &str = "bookstore_projection_dlq_records_total";
/// Errors that made the projector back off and rejoin the group, by `kind`.
pub const ERRORS: &str = "bookstore_projection_errors_total";
/// Records between the consumer position and the end (last stable offset) of each assigned
/// partition, by `partition`; refreshed from librdkafka's statistics every 5 s.
pub const LAG: &str = "bookstore_projection_lag_records";

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

pub(crate) fn record_lag(partition: i32, records: i64) {
    metrics::gauge!(LAG, "partition" => partition.to_string()).set(records.max(0) as f64);
}
