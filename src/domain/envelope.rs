//! The envelope every event travels in: identity, stream, ordering and causality metadata.
//!
//! Values are plain data here; the service fills in ids and timestamps, and the store assigns
//! `position`, the event's place in the one global commit order the relay follows.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{BookEvent, BookFactEvent, BookId};

/// Prefix of every stream name of this service.
pub const STREAM_PREFIX: &str = "bookstore::";

/// Stream of a book's delta events: `bookstore::book-<id>`.
pub fn delta_stream(book_id: BookId) -> String {
    format!("{STREAM_PREFIX}book-{book_id}")
}

/// Stream of a book's fact events: `bookstore::book-fact-<id>`.
pub fn fact_stream(book_id: BookId) -> String {
    format!("{STREAM_PREFIX}book-fact-{book_id}")
}

/// The stream `name` stands for, spelled as the store spells it: `bookstore::book-<id>` or
/// `bookstore::book-fact-<id>`, with the id in any spelling a UUID may take (upper case, say);
/// `None` when it names no stream of this service.
pub fn canonical_stream(name: &str) -> Option<String> {
    let rest = name.trim().strip_prefix(STREAM_PREFIX)?;
    if let Some(id) = rest.strip_prefix("book-fact-") {
        return id.parse().ok().map(fact_stream);
    }
    rest.strip_prefix("book-")?.parse().ok().map(delta_stream)
}

/// Whether an event says what changed (delta) or what is (fact). Decides its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Delta,
    Fact,
}

impl EventKind {
    /// The kind of an event type name (`BookFactEvent` is the only fact).
    pub fn of_type(event_type: &str) -> EventKind {
        if event_type == BookFactEvent::TYPE {
            EventKind::Fact
        } else {
            EventKind::Delta
        }
    }
}

/// Either kind of event, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EventPayload {
    Delta(BookEvent),
    Fact(BookFactEvent),
}

impl EventPayload {
    pub fn event_type(&self) -> &'static str {
        match self {
            EventPayload::Delta(event) => event.event_type(),
            EventPayload::Fact(_) => BookFactEvent::TYPE,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            EventPayload::Delta(_) => EventKind::Delta,
            EventPayload::Fact(_) => EventKind::Fact,
        }
    }

    pub fn book_id(&self) -> BookId {
        match self {
            EventPayload::Delta(event) => event.book_id(),
            EventPayload::Fact(fact) => fact.book_id,
        }
    }
}

/// Everything about an event except its body and its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Unique id of the event (UUIDv7); the CloudEvents `id`.
    pub event_id: Uuid,
    /// `BookAdded`, `BookPriceUpdated`, …, `BookFactEvent`.
    pub event_type: String,
    /// `bookstore::book-<id>` or `bookstore::book-fact-<id>`.
    pub stream: String,
    pub aggregate_id: BookId,
    /// The aggregate version this event brought the book to.
    pub aggregate_version: u64,
    pub occurred_at: DateTime<Utc>,
    /// Shared by every event that one user request caused, across services.
    pub correlation_id: Uuid,
    /// The command or event that directly caused this one.
    pub causation_id: Uuid,
    /// W3C trace context of the request that caused the event, when there was one.
    pub traceparent: Option<String>,
}

impl EventMetadata {
    pub fn kind(&self) -> EventKind {
        EventKind::of_type(&self.event_type)
    }
}

/// An event ready to be appended: metadata and the encoded body (an Avro datum, no framing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub metadata: EventMetadata,
    pub payload: Vec<u8>,
    /// Which schema wrote `payload`: the CRC-64-AVRO fingerprint of its canonical form. The
    /// outbox keeps it, so that a datum is never sent labelled with another version's schema.
    pub schema_fingerprint: u64,
}

/// An event as committed: `position` is its place in the global commit order (starting at 1,
/// without gaps: every position up to the store's head belongs to a committed event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub position: u64,
    pub metadata: EventMetadata,
    pub payload: Vec<u8>,
    /// The fingerprint of the schema that wrote `payload` (see [`NewEvent`]); `None` for an
    /// event saved by a version that did not record it yet.
    pub schema_fingerprint: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_name_is_spelled_as_the_store_spells_it_or_refused() {
        let id = BookId::generate();
        let upper = id.to_string().to_uppercase();
        assert_eq!(canonical_stream(&delta_stream(id)), Some(delta_stream(id)));
        assert_eq!(canonical_stream(&fact_stream(id)), Some(fact_stream(id)));
        assert_eq!(
            canonical_stream(&format!("bookstore::book-fact-{upper}")),
            Some(fact_stream(id))
        );
        for wrong in [
            id.to_string(),
            format!("book-{id}"),
            format!("bookstore::books-{id}"),
            "bookstore::book-".to_owned(),
            "bookstore::book-fact-12".to_owned(),
        ] {
            assert_eq!(canonical_stream(&wrong), None, "{wrong}");
        }
    }
}
