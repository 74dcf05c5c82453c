//! How one committed event becomes Kafka records: topic by kind, key = book id, value = the
//! framed Avro datum, CloudEvents headers. A removed book's fact is followed by a tombstone,
//! whose headers are the fact's but for an id of its own and no `content-type`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write;

use chrono::format::{Fixed, Item, Numeric, Pad};
use rdkafka::message::{Header, OwnedHeaders};
use uuid::fmt::Hyphenated;

use crate::codec::CodecError;
use crate::codec::avro::fact_is_removal;
use crate::codec::contract;
use crate::codec::headers as h;
use crate::codec::registry::{RegistryClient, RegistryError, subject_for};
use crate::codec::wire::{WireFormat, write_confluent};
use crate::domain::{EventKind, StoredEvent};
use crate::kafka::Topics;

/// A record ready to hand to the producer.
#[derive(Debug)]
pub struct OutboundRecord<'a> {
    pub topic: &'a str,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

/// Maps events to records; holds what every mapping needs.
#[derive(Debug, Clone)]
pub struct RecordMapper {
    topics: Topics,
    wire: WireFormat,
    /// With Confluent framing: where the ids of other versions' schemas are found.
    registry: Option<RegistryClient>,
    /// Registry ids of schemas other than this version's that wrote events, by fingerprint.
    other_versions: HashMap<u64, u32>,
}

impl RecordMapper {
    pub fn new(topics: Topics, wire: WireFormat) -> Self {
        Self {
            topics,
            wire,
            registry: None,
            other_versions: HashMap::new(),
        }
    }

    /// With Confluent framing, an event written with another version's schema goes out under
    /// the id `registry` has for that schema (see [`RecordMapper::learn_writer_schema`]),
    /// instead of stopping the relay.
    pub fn with_registry(mut self, registry: RegistryClient) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The subject and fingerprint of `event`'s writer schema when it is another version's,
    /// not known yet, and could be looked up in the registry; `None` otherwise.
    pub fn unknown_writer_schema(&self, event: &StoredEvent) -> Option<(String, u64)> {
        if self.registry.is_none() || !matches!(self.wire, WireFormat::Confluent { .. }) {
            return None;
        }
        let event_type = &event.metadata.event_type;
        // As `records` reads it: an event saved before fingerprints were recorded was written
        // with the schema its type had then.
        let written = contract::writer_fingerprint(event_type, event.schema_fingerprint)?;
        let contract = contract::contract(event_type)?;
        if written == contract.fingerprint() || self.other_versions.contains_key(&written) {
            return None;
        }
        let subject = subject_for(event_type, &self.topics.book, &self.topics.book_fact);
        Some((subject, written))
    }

    /// Asks the registry for the id of the schema with `fingerprint` among `subject`'s
    /// versions, and frames the events written with it under that id from now on. Returns
    /// whether the registry had it; when it had not, such an event stays unpublishable.
    pub async fn learn_writer_schema(
        &mut self,
        subject: String,
        fingerprint: u64,
    ) -> Result<bool, RegistryError> {
        let Some(registry) = self.registry.clone() else {
            return Ok(false);
        };
        // The registry client blocks; this happens once per schema version.
        let found = tokio::task::spawn_blocking(move || {
            registry.find_by_fingerprint(&subject, fingerprint)
        })
        .await
        .expect("the registry lookup panicked")?;
        if let Some(id) = found {
            tracing::info!(
                fingerprint = %format_args!("{fingerprint:016x}"),
                id,
                "events written with another version's schema go out under its registry id"
            );
            self.other_versions.insert(fingerprint, id);
        }
        Ok(found.is_some())
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The records of `event`, in the order they must be sent: its own record, then, for the
    /// fact of a removed book, a tombstone for the compacted fact topic.
    pub fn records(&self, event: &StoredEvent) -> Result<Vec<OutboundRecord<'_>>, CodecError> {
        let metadata = &event.metadata;
        let mut key_buffer = [0; Hyphenated::LENGTH];
        let key: &str = metadata
            .aggregate_id
            .as_uuid()
            .hyphenated()
            .encode_lower(&mut key_buffer);
        let mut value = Vec::with_capacity(event.payload.len() + 16);
        match check_writer_schema(event) {
            Ok(()) => self
                .wire
                .frame_into(&metadata.event_type, &event.payload, &mut value)?,
            Err(refusal @ CodecError::WrittenWithAnotherSchema { written, .. }) => {
                // Only ever learned with Confluent framing (see `unknown_writer_schema`).
                let id = self.other_versions.get(&written).ok_or(refusal)?;
                write_confluent(*id, &event.payload, &mut value);
            }
            Err(other) => return Err(other),
        }
        let (topic, removal) = match metadata.kind() {
            EventKind::Delta => (self.topics.book.as_str(), false),
            EventKind::Fact => (
                self.topics.book_fact.as_str(),
                fact_is_removal(&event.payload)?,
            ),
        };
        let mut records = Vec::with_capacity(if removal { 2 } else { 1 });
        records.push(OutboundRecord {
            topic,
            key: key.to_owned(),
            value: Some(value),
            headers: headers(event, Carries::Event),
        });
        if removal {
            records.push(OutboundRecord {
                topic,
                key: key.to_owned(),
                value: None,
                headers: headers(event, Carries::Tombstone),
            });
        }
        Ok(records)
    }
}

/// Refuses a datum written with another schema than the one its frame will name (the wire
/// framings label a datum with this version's schema of its type). Unknown event types are
/// left to the framing, which refuses them too.
fn check_writer_schema(event: &StoredEvent) -> Result<(), CodecError> {
    let event_type = &event.metadata.event_type;
    match contract::contract(event_type) {
        Some(contract) => contract::check_written_with(
            event_type,
            event.schema_fingerprint,
            contract.fingerprint(),
        ),
        None => Ok(()),
    }
}

/// What a record holds: the event, or the tombstone that follows a removed book's fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carries {
    Event,
    Tombstone,
}

/// The `ce_id` of the tombstone that follows the fact `fact_id`: the same bits as version 8.
///
/// A tombstone is a record of its own: with the fact's id, a consumer deduplicating by `ce_id`
/// (as `docs/contracts.md` advises) would drop it as a redelivery of the fact. Event ids are
/// version 7, so this id is no event's, and it is derived, so it is the same on every
/// redelivery.
pub fn tombstone_id(fact_id: uuid::Uuid) -> uuid::Uuid {
    uuid::Builder::from_custom_bytes(fact_id.into_bytes()).into_uuid()
}

/// CloudEvents binary-mode headers plus position, version, stream and causality.
///
/// Built for every record the relay sends, so the values are written into stack buffers and
/// one scratch string rather than a `String` each (librdkafka copies every header anyway).
fn headers(event: &StoredEvent, carries: Carries) -> OwnedHeaders {
    let metadata = &event.metadata;
    let mut uuids = [[0; Hyphenated::LENGTH]; 4];
    let [id, subject, correlation, causation] = &mut uuids;
    let record_id = match carries {
        Carries::Event => metadata.event_id,
        Carries::Tombstone => tombstone_id(metadata.event_id),
    };
    let event_id: &str = record_id.hyphenated().encode_lower(id);
    let subject: &str = metadata
        .aggregate_id
        .as_uuid()
        .hyphenated()
        .encode_lower(subject);
    let correlation: &str = metadata
        .correlation_id
        .hyphenated()
        .encode_lower(correlation);
    let causation: &str = metadata.causation_id.hyphenated().encode_lower(causation);
    let ce_type = match contract::contract(&metadata.event_type) {
        Some(contract) => Cow::Borrowed(contract.full_name()),
        None => Cow::Owned(h::ce_type(&metadata.event_type)),
    };
    // Time, position and version, one after the other; writing to a String cannot fail.
    let mut scratch = String::with_capacity(64);
    let _ = write!(
        scratch,
        "{}",
        metadata
            .occurred_at
            .format_with_items(CE_TIME_FORMAT.iter())
    );
    let time_end = scratch.len();
    let _ = write!(scratch, "{}", event.position);
    let position_end = scratch.len();
    let _ = write!(scratch, "{}", metadata.aggregate_version);
    let time = &scratch[..time_end];
    let position = &scratch[time_end..position_end];
    let version = &scratch[position_end..];
    let mut headers = OwnedHeaders::new_with_capacity(13)
        .insert(header(h::CE_SPECVERSION, h::SPEC_VERSION))
        .insert(header(h::CE_ID, event_id))
        .insert(header(h::CE_TYPE, &ce_type))
        .insert(header(h::CE_SOURCE, h::SOURCE))
        .insert(header(h::CE_TIME, time))
        .insert(header(h::CE_SUBJECT, subject));
    if carries == Carries::Event {
        // A tombstone has no content, so no content type.
        headers = headers.insert(header(h::CONTENT_TYPE, h::CONTENT_TYPE_AVRO));
    }
    headers = headers
        .insert(header(h::POSITION, position))
        .insert(header(h::AGGREGATE_VERSION, version))
        .insert(header(h::STREAM, &metadata.stream))
        .insert(header(h::CORRELATION_ID, correlation))
        .insert(header(h::CAUSATION_ID, causation));
    if let Some(traceparent) = &metadata.traceparent {
        headers = headers.insert(header(h::TRACEPARENT, traceparent));
    }
    headers
}

/// `2025-01-31T12:34:56.123456Z` (RFC 3339, UTC, microseconds), as items chrono need not parse
/// again for every record (a format string is parsed on every use: 10 % of the relay's CPU).
const CE_TIME_FORMAT: [Item<'static>; 13] = [
    Item::Numeric(Numeric::Year, Pad::Zero),
    Item::Literal("-"),
    Item::Numeric(Numeric::Month, Pad::Zero),
    Item::Literal("-"),
    Item::Numeric(Numeric::Day, Pad::Zero),
    Item::Literal("T"),
    Item::Numeric(Numeric::Hour, Pad::Zero),
    Item::Literal(":"),
    Item::Numeric(Numeric::Minute, Pad::Zero),
    Item::Literal(":"),
    Item::Numeric(Numeric::Second, Pad::Zero),
    Item::Fixed(Fixed::Nanosecond6),
    Item::Literal("Z"),
];

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{SecondsFormat, TimeZone, Utc};

    use super::*;

    #[test]
    fn a_tombstone_id_is_no_event_id_and_the_same_every_time() {
        let fact_id = uuid::Uuid::now_v7();
        let tombstone = tombstone_id(fact_id);
        assert_ne!(tombstone, fact_id);
        assert_eq!(tombstone.get_version_num(), 8);
        assert_eq!(tombstone_id(fact_id), tombstone);
        // Only the version differs: distinct facts keep distinct tombstone ids.
        assert_eq!(tombstone.as_bytes()[..6], fact_id.as_bytes()[..6]);
        assert_eq!(tombstone.as_bytes()[7..], fact_id.as_bytes()[7..]);
    }

    /// A saved `BookAdded` whose datum was written with the schema of `fingerprint`.
    fn saved_book_added(fingerprint: Option<u64>) -> StoredEvent {
        use crate::codec::{AvroCodec, EventCodec};
        use crate::domain::{BookAdded, BookEvent, BookId, EventMetadata, EventPayload, Price};
        let book_id = BookId::generate();
        let payload = EventPayload::Delta(BookEvent::Added(BookAdded {
            book_id,
            title: "Dune".to_owned(),
            author: "Frank Herbert".to_owned(),
            isbn: None,
            price: Price::from_cents(999).unwrap(),
            description: None,
        }));
        StoredEvent {
            position: 7,
            metadata: EventMetadata {
                event_id: uuid::Uuid::now_v7(),
                event_type: BookAdded::TYPE.to_owned(),
                stream: crate::domain::delta_stream(book_id),
                aggregate_id: book_id,
                aggregate_version: 1,
                occurred_at: Utc::now(),
                correlation_id: uuid::Uuid::now_v7(),
                causation_id: uuid::Uuid::now_v7(),
                traceparent: None,
            },
            payload: AvroCodec::new().encode(&payload).unwrap(),
            schema_fingerprint: fingerprint,
        }
    }

    fn mapper() -> RecordMapper {
        RecordMapper::new(Topics::with_prefix("test"), WireFormat::SingleObject)
    }

    #[test]
    fn a_datum_goes_out_under_the_schema_that_wrote_it() {
        let current = contract::contract("BookAdded").unwrap().fingerprint();
        // Recorded, and saved before fingerprints were recorded (this version's schemas).
        let mapper = mapper();
        for event in [saved_book_added(Some(current)), saved_book_added(None)] {
            let records = mapper.records(&event).unwrap();
            let value = records[0].value.as_deref().unwrap();
            assert_eq!(value[2..10], current.to_le_bytes());
            assert_eq!(value[10..], event.payload);
        }
    }

    #[test]
    fn a_datum_written_with_another_schema_is_refused() {
        let current = contract::contract("BookAdded").unwrap().fingerprint();
        let older = 0x0123_4567_89ab_cdef;
        match mapper().records(&saved_book_added(Some(older))) {
            Err(CodecError::WrittenWithAnotherSchema {
                event_type,
                written,
                current: sent_under,
            }) => {
                assert_eq!(event_type, "BookAdded");
                assert_eq!(written, older);
                assert_eq!(sent_under, current);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn with_a_registry_a_datum_of_another_version_goes_out_under_that_versions_id() {
        use crate::codec::registry::RegisteredSchemas;
        let mut schemas = RegisteredSchemas::default();
        schemas.insert("BookAdded", 11);
        let topics = Topics::with_prefix("test");
        let confluent = WireFormat::Confluent { schemas };
        let older = 0x0123_4567_89ab_cdef;
        let event = saved_book_added(Some(older));

        // Without a registry there is nowhere to look it up: refused, as in single-object mode.
        let alone = RecordMapper::new(topics.clone(), confluent.clone());
        assert_eq!(alone.unknown_writer_schema(&event), None);
        assert!(alone.records(&event).is_err());

        // The port is never asked here: the id is learned as a lookup would learn it.
        let registry = RegistryClient::new("http://127.0.0.1:9/apis/ccompat/v7").unwrap();
        let mut mapper = RecordMapper::new(topics, confluent).with_registry(registry);
        assert_eq!(
            mapper.unknown_writer_schema(&event),
            Some(("test.book-bookstore.events.BookAdded".to_owned(), older))
        );
        assert_eq!(mapper.unknown_writer_schema(&saved_book_added(None)), None);
        assert!(mapper.records(&event).is_err(), "not learned yet");
        mapper.other_versions.insert(older, 42);
        assert_eq!(mapper.unknown_writer_schema(&event), None);
        let value = mapper.records(&event).unwrap()[0].value.clone().unwrap();
        assert_eq!(value[..5], [0, 0, 0, 0, 42]);
        assert_eq!(value[5..], event.payload);
        // This version's own datums keep this version's id.
        let current = saved_book_added(None);
        let value = mapper.records(&current).unwrap()[0].value.clone().unwrap();
        assert_eq!(value[..5], [0, 0, 0, 0, 11]);
    }

    #[test]
    fn ce_time_is_rfc3339_utc_with_microseconds() {
        for time in [
            Utc.with_ymd_and_hms(2025, 1, 31, 12, 34, 56).unwrap(),
            Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap(),
            Utc.with_ymd_and_hms(999, 2, 3, 4, 5, 6).unwrap(),
        ] {
            assert_eq!(
                time.format_with_items(CE_TIME_FORMAT.iter()).to_string(),
                time.to_rfc3339_opts(SecondsFormat::Micros, true)
            );
        }
    }
}
