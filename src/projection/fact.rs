//! What one record of the fact topic asks of the read model, or why it cannot be applied.
//!
//! A record is keyed by book id. Its value is a `BookFactEvent` in either framing (the first
//! byte tells which; see [`crate::codec::wire`]), or nothing: a tombstone, which deletes the
//! book. A fact of a removed book deletes it too. Anything else is a [`Rejection`], which the
//! projector sends to the dead-letter queue.
//!
//! A Confluent frame with a schema id the reader does not know yet is looked up in the schema
//! registry, when one is configured, and the writer schema is remembered for the next record.
//! An unreachable registry is an error to retry, not a rejection: the record is fine, the
//! reader just cannot tell yet.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::Headers;

use super::{ReportChange, Versioned};
use crate::codec::headers as h;
use crate::codec::{AvroCodec, CodecError, FramedDecoder, RegistryClient, RegistryError};
use crate::domain::{BookFactEvent, BookId, EventPayload};

/// Why a record cannot be applied; the text becomes its `bookstore_dlq_reason` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the record has no key; fact records are keyed by book id")]
    MissingKey,
    #[error("the key {0:?} is not a book id")]
    KeyNotABookId(String),
    #[error("undecodable value: {0}")]
    Undecodable(String),
    #[error("a {0} event is not a fact")]
    NotAFact(&'static str),
    #[error("the key {key} is not the fact's book id {book_id}")]
    KeyMismatch { key: BookId, book_id: BookId },
    #[error("the version {0:?} is not a version from 1 to {MAX_VERSION}")]
    InvalidVersion(String),
    #[error("the {0} contains a NUL character, which the read model cannot store")]
    NulInText(&'static str),
}

/// The highest version the read model stores (its columns are 64-bit signed integers).
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// What the projector does with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FactOutcome {
    Apply(ReportChange),
    DeadLetter(Rejection),
}

/// Reads fact records; remembers writer schemas fetched from the registry.
#[derive(Debug, Clone)]
pub struct FactReader {
    decoder: FramedDecoder,
    registry: Option<RegistryClient>,
    /// Schema ids the registry could not give a usable schema for, and why; remembered for
    /// the life of the reader, so after registering a missing schema restart the projector
    /// (then `bookstore dlq replay`).
    unusable_ids: HashMap<u32, String>,
}

impl FactReader {
    /// A reader of single-object frames, and of Confluent frames whose schema ids `registry`
    /// knows (none without one).
    pub fn new(registry: Option<RegistryClient>) -> Self {
        Self {
            decoder: FramedDecoder::new(AvroCodec::new()),
            registry,
            unusable_ids: HashMap::new(),
        }
    }

    /// What `message` asks of the read model, when that can be told without the schema
    /// registry and the record can be applied; `None` otherwise, and then [`read`](Self::read)
    /// tells (asking the registry, or rejecting the record with its reason). Needs no `&mut`,
    /// so that the records of a batch can be read on the thread that polls them, while they are
    /// still librdkafka's: copying a record out (with all its headers) costs more than reading it.
    ///
    /// The change comes without its time: reading any header makes librdkafka parse all of
    /// them, so [`UntimedChange::timed`] reads it only for the changes a batch keeps.
    pub fn read_known(&self, message: &impl Message) -> Option<UntimedChange> {
        let book_id = book_id_of(message.key()).ok()?;
        let Some(value) = message.payload() else {
            return tombstone(book_id, message).ok();
        };
        let payload = self.decoder.decode(value).ok()?;
        interpret(book_id, payload).ok()
    }

    /// What `message` asks of the read model. Fails only when the schema registry cannot be
    /// asked right now.
    pub async fn read(&mut self, message: &impl Message) -> Result<FactOutcome, RegistryError> {
        let book_id = match book_id_of(message.key()) {
            Ok(book_id) => book_id,
            Err(rejection) => return Ok(FactOutcome::DeadLetter(rejection)),
        };
        let Some(value) = message.payload() else {
            return Ok(match tombstone(book_id, message) {
                Ok(change) => FactOutcome::Apply(change.timed(message)),
                Err(rejection) => FactOutcome::DeadLetter(rejection),
            });
        };
        let payload = match self.decode(value).await? {
            Ok(payload) => payload,
            Err(rejection) => return Ok(FactOutcome::DeadLetter(rejection)),
        };
        Ok(match interpret(book_id, payload) {
            Ok(change) => FactOutcome::Apply(change.timed(message)),
            Err(rejection) => FactOutcome::DeadLetter(rejection),
        })
    }

    /// The event in `value`: the outer error means "ask the registry again later", the inner
    /// one "this record is bad".
    async fn decode(
        &mut self,
        value: &[u8],
    ) -> Result<Result<EventPayload, Rejection>, RegistryError> {
        match self.decoder.decode(value) {
            Err(CodecError::UnknownSchemaId(id)) => {
                if let Some(rejection) = self.learn_schema(id).await? {
                    return Ok(Err(rejection));
                }
                Ok(self.decoder.decode(value).map_err(undecodable))
            }
            other => Ok(other.map_err(undecodable)),
        }
    }

    /// Fetches schema `id` from the registry and teaches it to the decoder; a rejection when
    /// there is no registry or it has no usable schema under that id.
    async fn learn_schema(&mut self, id: u32) -> Result<Option<Rejection>, RegistryError> {
        if let Some(reason) = self.unusable_ids.get(&id) {
            return Ok(Some(Rejection::Undecodable(reason.clone())));
        }
        let Some(registry) = self.registry.clone() else {
            let reason = format!(
                "{} (no schema registry is configured to look it up)",
                CodecError::UnknownSchemaId(id)
            );
            return Ok(Some(Rejection::Undecodable(reason)));
        };
        // The registry client blocks.
        let fetched = tokio::task::spawn_blocking(move || registry.fetch_schema(id))
            .await
            .expect("the schema registry lookup panicked");
        let learned = match fetched {
            Ok(schema) => self
                .decoder
                .add_writer_schema(id, &schema)
                .map(|_| ())
                .map_err(|error| format!("schema id {id}: {error}")),
            Err(error) if error.is_retryable() => return Err(error),
            Err(error) => Err(format!("schema id {id}: {error}")),
        };
        match learned {
            Ok(()) => Ok(None),
            Err(reason) => {
                self.unusable_ids.insert(id, reason.clone());
                Ok(Some(Rejection::Undecodable(reason)))
            }
        }
    }
}

/// What a readable record asks of the read model, before its time is read (see
/// [`FactReader::read_known`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UntimedChange {
    /// A fact of an existing book.
    Upsert(BookFactEvent),
    /// A tombstone, or a fact of a removed book.
    Delete {
        book_id: BookId,
        version: Option<u64>,
    },
}

impl UntimedChange {
    /// The change, with the time of `message`, the record it was read from.
    pub fn timed(self, message: &impl Message) -> ReportChange {
        match self {
            UntimedChange::Upsert(fact) => ReportChange::Upsert {
                fact,
                changed_at: changed_at(message),
            },
            UntimedChange::Delete { book_id, version } => ReportChange::Delete { book_id, version },
        }
    }
}

impl Versioned for UntimedChange {
    fn book_id(&self) -> BookId {
        match self {
            UntimedChange::Upsert(fact) => fact.book_id,
            UntimedChange::Delete { book_id, .. } => *book_id,
        }
    }

    fn version(&self) -> Option<u64> {
        match self {
            UntimedChange::Upsert(fact) => Some(fact.version),
            UntimedChange::Delete { version, .. } => *version,
        }
    }

    fn is_deletion(&self) -> bool {
        matches!(self, UntimedChange::Delete { .. })
    }
}

/// The deletion a tombstone of `book_id` asks for, at the version its header states if any.
/// A header that states no usable version is a rejection: read as "no version", it would
/// delete the book whatever its version.
fn tombstone(book_id: BookId, message: &impl Message) -> Result<UntimedChange, Rejection> {
    let version = match header(message, h::AGGREGATE_VERSION) {
        None => None,
        Some(text) => Some(
            text.parse()
                .ok()
                .filter(is_storable_version)
                .ok_or_else(|| Rejection::InvalidVersion(text.to_owned()))?,
        ),
    };
    Ok(UntimedChange::Delete { book_id, version })
}

/// Whether the read model can hold `version`. The contract's versions start at 1; a record
/// outside the range would fail the database's checks on every attempt and stall its
/// partitions, so it is rejected instead.
fn is_storable_version(version: &u64) -> bool {
    (1..=MAX_VERSION).contains(version)
}

/// The change a decoded value of the record of `key` asks for.
fn interpret(key: BookId, payload: EventPayload) -> Result<UntimedChange, Rejection> {
    let fact = match payload {
        EventPayload::Fact(fact) => fact,
        EventPayload::Delta(event) => return Err(Rejection::NotAFact(event.event_type())),
    };
    if fact.book_id != key {
        return Err(Rejection::KeyMismatch {
            key,
            book_id: fact.book_id,
        });
    }
    if !is_storable_version(&fact.version) {
        return Err(Rejection::InvalidVersion(fact.version.to_string()));
    }
    if fact.removed {
        return Ok(UntimedChange::Delete {
            book_id: fact.book_id,
            version: Some(fact.version),
        });
    }
    // PostgreSQL text cannot hold NUL; SQLite could, but both stores reject the same records.
    let stored_text = [
        ("title", Some(&fact.title)),
        ("author", Some(&fact.author)),
        ("isbn", fact.isbn.as_ref()),
    ];
    for (field, text) in stored_text {
        if text.is_some_and(|text| text.contains('\0')) {
            return Err(Rejection::NulInText(field));
        }
    }
    Ok(UntimedChange::Upsert(fact))
}

fn book_id_of(key: Option<&[u8]>) -> Result<BookId, Rejection> {
    let key = key.ok_or(Rejection::MissingKey)?;
    std::str::from_utf8(key)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Rejection::KeyNotABookId(String::from_utf8_lossy(key).into_owned()))
}

fn undecodable(error: CodecError) -> Rejection {
    Rejection::Undecodable(error.to_string())
}

/// When the change happened: the CloudEvents time the relay writes, else the record's
/// timestamp, else now.
fn changed_at(message: &impl Message) -> DateTime<Utc> {
    header(message, h::CE_TIME)
        .and_then(|time| DateTime::parse_from_rfc3339(time).ok())
        .map(|time| time.with_timezone(&Utc))
        .or_else(|| {
            message
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis)
        })
        .unwrap_or_else(Utc::now)
}

/// The value of header `name` as text, if present and UTF-8.
pub(crate) fn header<'m>(message: &'m impl Message, name: &str) -> Option<&'m str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
}

#[cfg(test)]
mod tests {
    use rdkafka::Timestamp;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};

    use super::*;
    use crate::codec::{EventCodec, frame_single_object};
    use crate::domain::{BookFactEvent, BookRemoved, Price};

    fn fact(book_id: BookId, version: u64, removed: bool) -> BookFactEvent {
        BookFactEvent {
            book_id,
            title: "Dune".into(),
            author: "Frank Herbert".into(),
            isbn: None,
            price: Price::from_cents(1599).unwrap(),
            description: None,
            version,
            removed,
        }
    }

    fn framed(payload: &EventPayload) -> Vec<u8> {
        let codec = AvroCodec::new();
        let datum = codec.encode(payload).unwrap();
        frame_single_object(codec.fingerprint(payload.event_type()).unwrap(), &datum)
    }

    fn record(key: Option<&str>, value: Option<Vec<u8>>, headers: &[(&str, &str)]) -> OwnedMessage {
        let mut owned = OwnedHeaders::new();
        for &(name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        OwnedMessage::new(
            value,
            key.map(|key| key.as_bytes().to_vec()),
            "t.book-fact".into(),
            Timestamp::CreateTime(1_700_000_000_000),
            0,
            7,
            Some(owned),
        )
    }

    async fn read(message: &OwnedMessage) -> FactOutcome {
        FactReader::new(None).read(message).await.unwrap()
    }

    #[tokio::test]
    async fn a_fact_becomes_an_upsert_at_its_event_time() {
        let book_id = BookId::generate();
        let value = framed(&EventPayload::Fact(fact(book_id, 3, false)));
        let key = book_id.to_string();
        let message = record(
            Some(&key),
            Some(value),
            &[(h::CE_TIME, "2025-01-31T12:34:56.123456Z")],
        );
        let FactOutcome::Apply(ReportChange::Upsert {
            fact: read,
            changed_at,
        }) = read(&message).await
        else {
            panic!("not an upsert");
        };
        assert_eq!(read, fact(book_id, 3, false));
        let known = FactReader::new(None).read_known(&message);
        assert_eq!(known, Some(UntimedChange::Upsert(read.clone())));
        assert_eq!(
            known.map(|change| change.timed(&message)),
            Some(ReportChange::Upsert {
                fact: read.clone(),
                changed_at
            })
        );
        assert_eq!(changed_at.to_rfc3339(), "2025-01-31T12:34:56.123456+00:00");
    }

    #[tokio::test]
    async fn a_removed_fact_and_a_tombstone_delete_at_their_version() {
        let book_id = BookId::generate();
        let key = book_id.to_string();
        let removed = record(
            Some(&key),
            Some(framed(&EventPayload::Fact(fact(book_id, 4, true)))),
            &[],
        );
        let tombstone = record(Some(&key), None, &[(h::AGGREGATE_VERSION, "4")]);
        let bare_tombstone = record(Some(&key), None, &[]);
        let delete = |version| FactOutcome::Apply(ReportChange::Delete { book_id, version });
        assert_eq!(read(&removed).await, delete(Some(4)));
        for message in [&removed, &tombstone, &bare_tombstone] {
            let FactOutcome::Apply(change) = read(message).await else {
                panic!("not applied: {message:?}");
            };
            let known = FactReader::new(None).read_known(message);
            assert_eq!(known.map(|known| known.timed(message)), Some(change));
        }
        assert_eq!(read(&tombstone).await, delete(Some(4)));
        assert_eq!(read(&bare_tombstone).await, delete(None));
    }

    #[tokio::test]
    async fn records_that_cannot_be_applied_are_rejected_with_a_reason() {
        let book_id = BookId::generate();
        let key = book_id.to_string();
        let good = framed(&EventPayload::Fact(fact(book_id, 1, false)));
        let delta = framed(&EventPayload::Delta(crate::domain::BookEvent::Removed(
            BookRemoved {
                book_id,
                title: "Dune".into(),
                author: "Frank Herbert".into(),
            },
        )));
        let other = BookId::generate().to_string();
        let cases = [
            record(None, Some(good.clone()), &[]),
            record(Some("not-a-uuid"), Some(good.clone()), &[]),
            record(Some(&key), Some(b"garbage".to_vec()), &[]),
            record(Some(&key), Some(good[..good.len() - 3].to_vec()), &[]),
            record(Some(&key), Some(frame_single_object(42, &good[10..])), &[]),
            record(Some(&key), Some(vec![0, 0, 0, 0, 9, 1]), &[]),
            record(Some(&key), Some(delta), &[]),
            record(Some(&other), Some(good), &[]),
        ];
        let mut reasons = Vec::new();
        for message in &cases {
            assert_eq!(
                FactReader::new(None).read_known(message),
                None,
                "{message:?}"
            );
            match read(message).await {
                FactOutcome::DeadLetter(rejection) => reasons.push(rejection.to_string()),
                outcome => panic!("{outcome:?} for {message:?}"),
            }
        }
        assert!(reasons[0].contains("no key"), "{reasons:?}");
        assert!(reasons[1].contains("not a book id"), "{reasons:?}");
        assert!(reasons[2].contains("unknown magic"), "{reasons:?}");
        assert!(reasons[3].contains("could not decode"), "{reasons:?}");
        assert!(reasons[4].contains("fingerprint"), "{reasons:?}");
        assert!(reasons[5].contains("no schema registry"), "{reasons:?}");
        assert!(
            reasons[6].contains("BookRemoved event is not a fact"),
            "{reasons:?}"
        );
        assert!(
            reasons[7].contains("is not the fact's book id"),
            "{reasons:?}"
        );
    }

    /// Records that decode but that the database would refuse on every attempt, stalling the
    /// projection: they go to the dead-letter queue instead.
    #[tokio::test]
    async fn records_the_read_model_cannot_hold_are_rejected() {
        let book_id = BookId::generate();
        let key = book_id.to_string();
        let fact_record =
            |fact: BookFactEvent| record(Some(&key), Some(framed(&EventPayload::Fact(fact))), &[]);
        let with_nul = |field: &str| {
            let mut fact = fact(book_id, 2, false);
            match field {
                "title" => fact.title = "Du\0ne".into(),
                "author" => fact.author = "Frank\0Herbert".into(),
                _ => fact.isbn = Some("97804\0".into()),
            }
            fact
        };
        let tombstone =
            |version: &str| record(Some(&key), None, &[(h::AGGREGATE_VERSION, version)]);
        let cases = [
            (
                fact_record(fact(book_id, 0, false)),
                Rejection::InvalidVersion("0".into()),
            ),
            (
                fact_record(fact(book_id, 0, true)),
                Rejection::InvalidVersion("0".into()),
            ),
            (
                fact_record(with_nul("title")),
                Rejection::NulInText("title"),
            ),
            (
                fact_record(with_nul("author")),
                Rejection::NulInText("author"),
            ),
            (fact_record(with_nul("isbn")), Rejection::NulInText("isbn")),
            (tombstone("0"), Rejection::InvalidVersion("0".into())),
            (tombstone("-1"), Rejection::InvalidVersion("-1".into())),
            (tombstone("four"), Rejection::InvalidVersion("four".into())),
            (
                tombstone("9223372036854775808"),
                Rejection::InvalidVersion("9223372036854775808".into()),
            ),
        ];
        for (message, rejection) in &cases {
            assert_eq!(
                FactReader::new(None).read_known(message),
                None,
                "{message:?}"
            );
            assert_eq!(
                read(message).await,
                FactOutcome::DeadLetter(rejection.clone())
            );
        }
        assert_eq!(
            cases[5].1.to_string(),
            "the version \"0\" is not a version from 1 to 9223372036854775807"
        );

        // The bounds themselves are fine, and a NUL in the description, which the read model
        // does not keep, is no reason to reject the fact.
        let highest = tombstone("9223372036854775807");
        assert_eq!(
            read(&highest).await,
            FactOutcome::Apply(ReportChange::Delete {
                book_id,
                version: Some(MAX_VERSION)
            })
        );
        let mut described = fact(book_id, 1, false);
        described.description = Some("a\0b".into());
        assert!(matches!(
            read(&fact_record(described)).await,
            FactOutcome::Apply(ReportChange::Upsert { .. })
        ));
    }
}
