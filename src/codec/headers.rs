//! The Kafka record headers of every event: CloudEvents 1.0 in the Kafka protocol binding's
//! binary mode (`ce_` attributes, `content-type`), plus this service's ordering and causality
//! metadata. The relay writes them and the projection reads them; both take the names from
//! here so they cannot disagree. `docs/contracts.md` documents them for other teams.

use super::contract::NAMESPACE;

/// CloudEvents spec version; value [`SPEC_VERSION`].
pub const CE_SPECVERSION: &str = "ce_specversion";
/// CloudEvents `id`: the event id (`EventMetadata::event_id`, a UUID as hyphenated text).
pub const CE_ID: &str = "ce_id";
/// CloudEvents `type`: the record's full name, see [`ce_type`].
pub const CE_TYPE: &str = "ce_type";
/// CloudEvents `source`; value [`SOURCE`].
pub const CE_SOURCE: &str = "ce_source";
/// CloudEvents `time`: when the change happened, RFC 3339 in UTC with microseconds
/// (`2025-01-31T12:34:56.123456Z`).
pub const CE_TIME: &str = "ce_time";
/// CloudEvents `subject`: the book id, so a router can filter without decoding the value.
pub const CE_SUBJECT: &str = "ce_subject";
/// CloudEvents `datacontenttype`, mapped to Kafka's `content-type` header in binary mode;
/// value [`CONTENT_TYPE_AVRO`].
pub const CONTENT_TYPE: &str = "content-type";

/// The event's global position in the outbox (commit order), as decimal text.
pub const POSITION: &str = "bookstore_position";
/// The aggregate version the event brought the book to, as decimal text.
pub const AGGREGATE_VERSION: &str = "bookstore_aggregate_version";
/// The event's stream (`bookstore::book-<id>` or `bookstore::book-fact-<id>`).
pub const STREAM: &str = "bookstore_stream";
/// Shared by every event one user request caused (a UUID).
pub const CORRELATION_ID: &str = "bookstore_correlation_id";
/// The command or event that directly caused this one (a UUID).
pub const CAUSATION_ID: &str = "bookstore_causation_id";
/// W3C trace context of the request that caused the event; only present when there was one.
pub const TRACEPARENT: &str = "traceparent";

/// Value of [`CE_SPECVERSION`].
pub const SPEC_VERSION: &str = "1.0";
/// Value of [`CE_SOURCE`].
pub const SOURCE: &str = "/bookstore";
/// Value of [`CONTENT_TYPE`]: the value is Avro binary in one of the framings of
/// [`super::wire`]; its first byte tells which.
pub const CONTENT_TYPE_AVRO: &str = "application/avro";

/// The CloudEvents `type` of an event type: the Avro record's full name,
/// `bookstore.events.BookAdded`.
pub fn ce_type(event_type: &str) -> String {
    format!("{NAMESPACE}.{event_type}")
}

/// The event type a CloudEvents `type` names, if it is one of ours (`BookAdded` for
/// `bookstore.events.BookAdded`).
pub fn event_type_of_ce_type(ce_type: &str) -> Option<&str> {
    ce_type
        .strip_prefix(NAMESPACE)?
        .strip_prefix('.')
        .filter(|event_type| super::contract::EVENT_TYPES.contains(event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ce_type_is_the_record_full_name_and_reads_back() {
        assert_eq!(ce_type("BookAdded"), "bookstore.events.BookAdded");
        assert_eq!(
            event_type_of_ce_type("bookstore.events.BookAdded"),
            Some("BookAdded")
        );
        assert_eq!(event_type_of_ce_type("bookstore.events.Nope"), None);
        assert_eq!(event_type_of_ce_type("other.BookAdded"), None);
    }
}
