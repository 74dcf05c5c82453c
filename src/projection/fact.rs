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
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Utc};
use rdkafka::Message;
use rdkafka::message::Headers;

use super::{ReportChange, Versioned};
use crate::codec::headers as h;
use crate::codec::{
    AvroCodec, CodecError, FramedDecoder, RegistryClient, RegistryError, cut_to, excerpt,
};
use crate::domain::{BookFactEvent, BookId, EventPayload, ValidationError, validate_details};

/// Why a record cannot be applied; the text becomes its `bookstore_dlq_reason` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the record has no key; fact records are keyed by book id")]
    MissingKey,
    #[error("the key {0:?} is not a book id")]
    KeyNotABookId(String),
    #[error(
        "the key {key:?} is not the contract's spelling of book id {book_id} \
         (lower-case, hyphenated)"
    )]
    KeyNotCanonical { key: String, book_id: BookId },
    #[error("undecodable value: {0}")]
    Undecodable(String),
    #[error("a {0} event is not a fact")]
    NotAFact(&'static str),
    #[error("the key {key} is not the fact's book id {book_id}")]
    KeyMismatch { key: BookId, book_id: BookId },
    #[error("the version {0:?} is not a version from 1 to {MAX_VERSION}")]
    InvalidVersion(String),
    #[error("the {header} header is {0}, not a version", header = h::AGGREGATE_VERSION)]
    UnreadableVersionHeader(&'static str),
    #[error("the {0} contains a NUL character, which the read model cannot store")]
    NulInText(&'static str),
    /// `field` breaks a rule of the domain; `excerpt` is the start of its text.
    #[error("the {field} {excerpt:?} {rule}")]
    InvalidText {
        field: &'static str,
        rule: String,
        excerpt: String,
    },
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
    /// Schema ids the registry did not know when first asked, and since when: asked again
    /// until [`Self::missing_schema_patience`] has passed, then unusable. The projector reads
    /// every record of a batch before it holds the batch back, so the clocks of all unknown
    /// ids of a batch start together (see `Projector::read`).
    missing_since: HashMap<u32, Instant>,
    missing_schema_patience: Duration,
}

/// How long a schema id the registry does not know is asked for again before the records
/// framed with it are dead-lettered (see [`FactReader::with_missing_schema_patience`]).
pub const MISSING_SCHEMA_PATIENCE: Duration = Duration::from_secs(60);

impl FactReader {
    /// A reader of single-object frames, and of Confluent frames whose schema ids `registry`
    /// knows (none without one).
    pub fn new(registry: Option<RegistryClient>) -> Self {
        Self {
            decoder: FramedDecoder::new(AvroCodec::new()),
            registry,
            unusable_ids: HashMap::new(),
            missing_since: HashMap::new(),
            missing_schema_patience: MISSING_SCHEMA_PATIENCE,
        }
    }

    /// How long schema ids the registry answers 404 for are asked for again, the batch held
    /// back meanwhile, before their records are dead-lettered (default
    /// [`MISSING_SCHEMA_PATIENCE`]). A producer registers a schema and sends the first record
    /// framed with it at once; a registry replica that has not caught up yet would otherwise
    /// have that record, and every later one of that schema, dead-lettered for good. Each id
    /// has its own patience, from its first 404.
    pub fn with_missing_schema_patience(mut self, patience: Duration) -> Self {
        self.missing_schema_patience = patience;
        self
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
    ///
    /// Only answers about the schema reject the record: not found (after the patience), not
    /// Avro, not a schema the decoder can read. Any other failure (refused credentials, a
    /// proxy's page, a registry down) says nothing about the record, so it is the error that
    /// holds the batch back: rejecting would dead-letter every record of the id, and, with the
    /// id remembered as unusable, go on doing so after the registry is mended.
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
            Ok(schema) => {
                self.missing_since.remove(&id);
                self.decoder
                    .add_writer_schema(id, &schema)
                    .map(|_| ())
                    .map_err(|error| format!("schema id {id}: {error}"))
            }
            Err(error) if error.is_not_found() => {
                let since = *self.missing_since.entry(id).or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited < self.missing_schema_patience {
                    return Err(RegistryError::NotYetKnown { id, waited });
                }
                self.missing_since.remove(&id);
                Err(format!(
                    "schema id {id}: not in the registry after {waited:.0?} of asking ({error})"
                ))
            }
            Err(error @ RegistryError::NotAvro { .. }) => Err(format!("schema id {id}: {error}")),
            Err(error) => return Err(error),
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
/// A header that states no usable version (null or not UTF-8 included) is a rejection: read
/// as "no version", it would delete the book whatever its version.
fn tombstone(book_id: BookId, message: &impl Message) -> Result<UntimedChange, Rejection> {
    let version = match header_value(message, h::AGGREGATE_VERSION) {
        None => None,
        Some(value) => Some(stated_version(value)?),
    };
    Ok(UntimedChange::Delete { book_id, version })
}

/// The version a tombstone's version header (`None`: null) states.
fn stated_version(value: Option<&[u8]>) -> Result<u64, Rejection> {
    let value = value.ok_or(Rejection::UnreadableVersionHeader("null"))?;
    let text =
        std::str::from_utf8(value).map_err(|_| Rejection::UnreadableVersionHeader("not UTF-8"))?;
    text.parse()
        .ok()
        .filter(is_storable_version)
        .ok_or_else(|| Rejection::InvalidVersion(excerpt(text)))
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
    Ok(UntimedChange::Upsert(with_valid_details(fact)?))
}

/// `fact` with its title, author and ISBN as the domain keeps them (trimmed; a blank ISBN is
/// none), or why the domain would have refused them. The relay publishes only facts the
/// domain made, but another producer's could hold anything, and what the domain refuses can
/// break the read model: PostgreSQL cannot index a title of a few kilobytes (the insert
/// would fail on every retry and stall the partition), and `bookstore report` would print
/// control characters (escape sequences) to the terminal. Trimming too, so that padding
/// cannot carry an oversized text past the limits. The description is not checked: the read
/// model does not keep it.
fn with_valid_details(mut fact: BookFactEvent) -> Result<BookFactEvent, Rejection> {
    let details = validate_details(&fact.title, &fact.author, fact.isbn.as_deref(), None)
        .map_err(|error| invalid_text(&fact, error))?;
    fact.title = details.title;
    fact.author = details.author;
    fact.isbn = details.isbn;
    Ok(fact)
}

fn invalid_text(fact: &BookFactEvent, error: ValidationError) -> Rejection {
    let text = match error.field {
        "title" => fact.title.as_str(),
        "author" => fact.author.as_str(),
        _ => fact.isbn.as_deref().unwrap_or_default(),
    };
    Rejection::InvalidText {
        field: error.field,
        rule: error.rule,
        excerpt: excerpt(text),
    }
}

/// The book id `key` spells. Only the contract's spelling, the lower-case hyphenated UUID, is
/// one: Kafka compacts by key bytes, so a fact under another spelling of the same id would
/// never be compacted against the book's other records, and a tombstone under it would never
/// make the topic forget them.
fn book_id_of(key: Option<&[u8]>) -> Result<BookId, Rejection> {
    let key = key.ok_or(Rejection::MissingKey)?;
    let lossy = || excerpt(&String::from_utf8_lossy(key));
    let book_id: BookId = std::str::from_utf8(key)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Rejection::KeyNotABookId(lossy()))?;
    let mut canonical = uuid::Uuid::encode_buffer();
    let canonical = book_id.as_uuid().hyphenated().encode_lower(&mut canonical);
    if canonical.as_bytes() != key {
        return Err(Rejection::KeyNotCanonical {
            key: lossy(),
            book_id,
        });
    }
    Ok(book_id)
}

/// Most characters of the reason for a value that does not decode.
const UNDECODABLE_CHARS: usize = 300;

/// The codec's error, bounded: what it quotes of the record is an excerpt already, but an
/// error worded by apache-avro (a value under another writer schema) may quote more.
fn undecodable(error: CodecError) -> Rejection {
    Rejection::Undecodable(cut_to(&error.to_string(), UNDECODABLE_CHARS))
}

/// When the change happened: the CloudEvents time the relay writes, else the record's
/// timestamp, else now. A time the read model cannot hold counts as none. Falling back rather
/// than rejecting the record loses nothing: the fact is fine, only its time is wrong, and
/// dead-lettering it would lose the book's change for a time that is no use anyway.
fn changed_at(message: &impl Message) -> DateTime<Utc> {
    let event_time = || {
        header(message, h::CE_TIME)
            .and_then(|time| DateTime::parse_from_rfc3339(time).ok())
            .map(|time| time.with_timezone(&Utc))
    };
    // Kafka has no timestamps before 1970: a negative one is a producer's garbage.
    let record_time = || {
        message
            .timestamp()
            .to_millis()
            .filter(|millis| *millis >= 0)
            .and_then(DateTime::from_timestamp_millis)
    };
    event_time()
        .filter(is_storable_time)
        .or_else(|| record_time().filter(is_storable_time))
        .unwrap_or_else(Utc::now)
}

/// Whether both stores can hold `time`: SQLite keeps it as RFC 3339 text, which has only the
/// years 0 to 9999 (a row outside them could not be read back); PostgreSQL's range (4713 BC
/// to 294276 AD) holds those, but not all of chrono's, and an insert it refuses would be
/// retried forever.
fn is_storable_time(time: &DateTime<Utc>) -> bool {
    (0..=9999).contains(&time.year())
}

/// The value of header `name` as text, if present and UTF-8.
pub(crate) fn header<'m>(message: &'m impl Message, name: &str) -> Option<&'m str> {
    header_value(message, name)
        .flatten()
        .and_then(|value| std::str::from_utf8(value).ok())
}

/// The value of header `name`: `None` when the record has no such header, `Some(None)` when
/// it has one whose value is null.
fn header_value<'m>(message: &'m impl Message, name: &str) -> Option<Option<&'m [u8]>> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|header| header.key == name)
        .map(|header| header.value)
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

    const RECORD_TIME: Timestamp = Timestamp::CreateTime(1_700_000_000_000);

    fn record(key: Option<&str>, value: Option<Vec<u8>>, headers: &[(&str, &str)]) -> OwnedMessage {
        let headers: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|&(name, value)| (name, Some(value.as_bytes())))
            .collect();
        raw_record(key, value, &headers, RECORD_TIME)
    }

    fn raw_record(
        key: Option<&str>,
        value: Option<Vec<u8>>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp: Timestamp,
    ) -> OwnedMessage {
        let mut owned = OwnedHeaders::new();
        for &(name, value) in headers {
            owned = owned.insert(Header { key: name, value });
        }
        OwnedMessage::new(
            value,
            key.map(|key| key.as_bytes().to_vec()),
            "t.book-fact".into(),
            timestamp,
            0,
            7,
            Some(owned),
        )
    }

    /// The rejection `message` gets, checking that the polling thread does not read it either.
    async fn rejection(message: &OwnedMessage) -> Rejection {
        assert_eq!(
            FactReader::new(None).read_known(message),
            None,
            "{message:?}"
        );
        match read(message).await {
            FactOutcome::DeadLetter(rejection) => rejection,
            outcome => panic!("{outcome:?} for {message:?}"),
        }
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

    /// A foreign producer's fact whose text the domain would refuse: PostgreSQL cannot index
    /// a title of kilobytes (retried forever), and control characters would reach the
    /// terminal of `bookstore report`. The reason names the field and the rule, and quotes
    /// only the start of the text.
    #[tokio::test]
    async fn facts_with_text_the_domain_refuses_are_rejected_with_a_short_reason() {
        let book_id = BookId::generate();
        let key = book_id.to_string();
        let with = |change: &dyn Fn(&mut BookFactEvent)| {
            let mut fact = fact(book_id, 2, false);
            change(&mut fact);
            record(Some(&key), Some(framed(&EventPayload::Fact(fact))), &[])
        };
        let long_title = "x".repeat(5000);
        let cases = [
            (
                with(&|fact| fact.title = long_title.clone()),
                "title",
                "must be at most 200 characters",
            ),
            (
                with(&|fact| fact.author = "y".repeat(151)),
                "author",
                "must be at most 150 characters",
            ),
            (
                with(&|fact| fact.isbn = Some("9".repeat(14))),
                "isbn",
                "must be at most 13 characters",
            ),
            (
                with(&|fact| fact.title = "Dune\u{1b}[2J\u{1b}[31m".into()),
                "title",
                "must not contain control characters",
            ),
            (
                with(&|fact| fact.author = "Frank\u{8}Herbert".into()),
                "author",
                "must not contain control characters",
            ),
            (
                with(&|fact| fact.title = " \u{200B} ".into()),
                "title",
                "must not be empty",
            ),
        ];
        for (message, field, rule) in &cases {
            let rejection = rejection(message).await;
            let Rejection::InvalidText {
                field: rejected,
                rule: broken,
                ..
            } = &rejection
            else {
                panic!("{rejection:?} for {message:?}");
            };
            assert_eq!((*rejected, broken.as_str()), (*field, *rule));
            let reason = rejection.to_string();
            assert!(reason.len() < 200, "{reason}");
            assert!(!reason.contains('\u{1b}'), "{reason}");
        }
        assert_eq!(
            rejection(&cases[0].0).await.to_string(),
            format!(
                "the title \"{}…\" must be at most 200 characters",
                "x".repeat(crate::codec::EXCERPT_CHARS)
            )
        );
        assert_eq!(
            rejection(&cases[3].0).await.to_string(),
            "the title \"Dune\\u{1b}[2J\\u{1b}[31m\" must not contain control characters"
        );
    }

    /// What the domain accepts is applied as the domain keeps it: trimmed, so padding cannot
    /// carry an oversized text into the read model, and a blank ISBN is none.
    #[tokio::test]
    async fn facts_within_the_domains_limits_are_applied_as_the_domain_keeps_them() {
        let book_id = BookId::generate();
        let key = book_id.to_string();
        let mut padded = fact(book_id, 2, false);
        padded.title = format!("  Dune{}", " ".repeat(5000));
        padded.isbn = Some("  ".into());
        let mut longest = fact(book_id, 2, false);
        longest.title = "é".repeat(200);
        longest.author = "a".repeat(150);
        longest.isbn = Some("9".repeat(13));
        longest.description = Some("line\nand\ttab".into());
        for (sent, applied) in [
            (padded, fact(book_id, 2, false)),
            (longest.clone(), longest),
        ] {
            let message = record(Some(&key), Some(framed(&EventPayload::Fact(sent))), &[]);
            assert_eq!(
                FactReader::new(None).read_known(&message),
                Some(UntimedChange::Upsert(applied.clone()))
            );
            let FactOutcome::Apply(ReportChange::Upsert { fact, .. }) = read(&message).await else {
                panic!("not an upsert: {message:?}");
            };
            assert_eq!(fact, applied);
        }
    }

    /// Kafka compacts by key bytes: a record under another spelling of a book's id would
    /// never be compacted against the book's records, so only the contract's is a book id
    /// (and the polling thread never drops a record under the canonical key for it).
    #[tokio::test]
    async fn only_the_contracts_spelling_of_a_book_id_is_a_key() {
        let book_id = BookId::generate();
        let canonical = book_id.to_string();
        let simple = book_id.as_uuid().simple().to_string();
        let value = framed(&EventPayload::Fact(fact(book_id, 1, false)));
        for key in [
            canonical.to_uppercase(),
            format!("{{{canonical}}}"),
            format!("urn:uuid:{canonical}"),
            simple,
            format!(" {canonical}"),
            format!("{canonical}\n"),
        ] {
            let message = record(Some(&key), Some(value.clone()), &[]);
            let tombstone = record(Some(&key), None, &[]);
            for message in [&message, &tombstone] {
                assert_eq!(
                    rejection(message).await,
                    Rejection::KeyNotCanonical {
                        key: key.clone(),
                        book_id
                    }
                );
            }
        }
        assert_eq!(
            Rejection::KeyNotCanonical {
                key: canonical.to_uppercase(),
                book_id
            }
            .to_string(),
            format!(
                "the key {:?} is not the contract's spelling of book id {canonical} \
                 (lower-case, hyphenated)",
                canonical.to_uppercase()
            )
        );
        let message = record(Some(&canonical), Some(value), &[]);
        assert!(matches!(read(&message).await, FactOutcome::Apply(_)));

        let huge = "k".repeat(100_000);
        let reason = rejection(&record(Some(&huge), None, &[])).await.to_string();
        assert!(
            reason.contains("not a book id") && reason.len() < 100,
            "{reason}"
        );
    }

    /// A version header that is there but cannot be read states no version: read as "no
    /// header", the tombstone would delete the book whatever its version.
    #[tokio::test]
    async fn a_tombstone_with_an_unreadable_version_header_is_rejected() {
        let key = BookId::generate().to_string();
        let tombstone = |value: Option<&[u8]>| {
            raw_record(
                Some(&key),
                None,
                &[(h::AGGREGATE_VERSION, value)],
                RECORD_TIME,
            )
        };
        assert_eq!(
            rejection(&tombstone(None)).await,
            Rejection::UnreadableVersionHeader("null")
        );
        assert_eq!(
            rejection(&tombstone(Some(b"4\xff"))).await,
            Rejection::UnreadableVersionHeader("not UTF-8")
        );
        assert_eq!(
            Rejection::UnreadableVersionHeader("null").to_string(),
            "the bookstore_aggregate_version header is null, not a version"
        );
        let long = "9".repeat(10_000);
        let reason = rejection(&tombstone(Some(long.as_bytes())))
            .await
            .to_string();
        assert!(reason.len() < 150, "{reason}");
    }

    /// Neither store can hold every time a record may carry (an insert PostgreSQL refuses is
    /// retried forever): a time outside years 0 to 9999, or a negative record timestamp,
    /// counts as none, and the fact is applied at the next time there is.
    #[tokio::test]
    async fn a_fact_out_of_the_storable_time_range_is_applied_at_the_next_usable_time() {
        let book_id = BookId::generate();
        let key = book_id.to_string();
        let value = framed(&EventPayload::Fact(fact(book_id, 1, false)));
        let changed_at = |ce_time: Option<&str>, timestamp: Timestamp| {
            let headers: Vec<(&str, Option<&[u8]>)> = ce_time
                .map(|time| (h::CE_TIME, Some(time.as_bytes())))
                .into_iter()
                .collect();
            let message = raw_record(Some(&key), Some(value.clone()), &headers, timestamp);
            let Some(change) = FactReader::new(None).read_known(&message) else {
                panic!("not read: {message:?}");
            };
            match change.timed(&message) {
                ReportChange::Upsert { changed_at, .. } => changed_at,
                change => panic!("not an upsert: {change:?}"),
            }
        };
        let record_time = DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let is_now = |time: DateTime<Utc>| (Utc::now() - time).num_seconds().abs() < 60;

        assert_eq!(changed_at(None, RECORD_TIME), record_time);
        assert_eq!(
            changed_at(Some("0000-01-01T00:30:00+01:00"), RECORD_TIME),
            record_time
        );
        assert_eq!(
            changed_at(Some("9999-12-31T23:30:00-01:00"), RECORD_TIME),
            record_time
        );
        assert!(is_now(changed_at(None, Timestamp::CreateTime(-5_000))));
        assert!(is_now(changed_at(None, Timestamp::CreateTime(i64::MIN))));
        assert!(is_now(changed_at(None, Timestamp::LogAppendTime(i64::MAX))));
        // About 100,000 AD: PostgreSQL holds it, RFC 3339 text (SQLite) does not.
        let far = Timestamp::CreateTime(3_100_000_000_000_000);
        assert!(is_now(changed_at(None, far)));

        // The edges of the range are kept, and read back from RFC 3339 text as they were.
        for time in ["0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"] {
            let kept = changed_at(Some(time), RECORD_TIME);
            assert_eq!(kept, DateTime::parse_from_rfc3339(time).unwrap());
            let text = kept.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
            assert_eq!(DateTime::parse_from_rfc3339(&text).unwrap(), kept);
        }
    }

    /// A registry at the returned client's URL that answers each request with the next of
    /// `answers` (status, JSON body), one connection each, and then no more.
    fn registry_answering(answers: Vec<(u16, String)>) -> RegistryClient {
        use std::io::{BufRead, BufReader, Write};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while line != "\r\n" {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                }
                write!(
                    reader.get_mut(),
                    "HTTP/1.1 {status} Answer\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
        });
        RegistryClient::new(&url).unwrap()
    }

    /// A fact of a new book, framed with the registry's schema id `id`.
    fn fact_framed_with_id(id: u32) -> OwnedMessage {
        let book_id = BookId::generate();
        let datum = AvroCodec::new()
            .encode(&EventPayload::Fact(fact(book_id, 1, false)))
            .unwrap();
        let key = book_id.to_string();
        record(
            Some(&key),
            Some(crate::codec::frame_confluent(id, &datum)),
            &[(h::CE_TIME, "2025-01-31T12:34:56Z")],
        )
    }

    #[tokio::test]
    async fn a_registry_that_refuses_or_talks_nonsense_holds_the_record_back_without_rejecting_it()
    {
        let message = fact_framed_with_id(7);
        let schema = crate::codec::contract::contract("BookFactEvent")
            .unwrap()
            .schema_json();
        let registry = registry_answering(vec![
            (
                401,
                r#"{"error_code":40101,"message":"Unauthorized"}"#.into(),
            ),
            (200, r#"{"maintenance": true}"#.into()),
            (200, serde_json::json!({ "schema": schema }).to_string()),
        ]);
        let mut reader = FactReader::new(Some(registry));

        let refused = reader.read(&message).await.unwrap_err();
        assert!(
            matches!(refused, RegistryError::Status { status: 401, .. }),
            "{refused}"
        );
        let nonsense = reader.read(&message).await.unwrap_err();
        assert!(
            matches!(nonsense, RegistryError::BadResponse { .. }),
            "{nonsense}"
        );
        // Mended, the registry is asked again and the record applied: neither answer was
        // remembered against the schema id.
        let outcome = reader.read(&message).await.unwrap();
        assert!(
            matches!(outcome, FactOutcome::Apply(ReportChange::Upsert { .. })),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_schema_id_of_another_format_rejects_its_records_for_good() {
        let registry = registry_answering(vec![(
            200,
            r#"{"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}"#.into(),
        )]);
        let mut reader = FactReader::new(Some(registry));
        for attempt in ["first", "second, without asking again"] {
            let outcome = reader.read(&fact_framed_with_id(9)).await.unwrap();
            let FactOutcome::DeadLetter(Rejection::Undecodable(reason)) = outcome else {
                panic!("{attempt}: {outcome:?}");
            };
            assert!(reason.contains("PROTOBUF, not AVRO"), "{attempt}: {reason}");
        }
    }

    /// An Avro `string` or `bytes`: its length as a zig-zag varint, then the bytes.
    fn avro_bytes(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut zigzag = (bytes.len() as u64) << 1;
        while zigzag >= 0x80 {
            out.push((zigzag as u8) | 0x80);
            zigzag >>= 7;
        }
        out.push(zigzag as u8);
        out.extend_from_slice(bytes);
        out
    }

    /// A fact record of version 1, written field by field with `book_id` and `price` as given.
    fn fact_written_with(book_id: &str, price: &[u8]) -> OwnedMessage {
        let mut datum = avro_bytes(book_id.as_bytes());
        datum.extend(avro_bytes(b"Dune"));
        datum.extend(avro_bytes(b"Frank Herbert"));
        datum.push(0); // isbn: null
        datum.extend(avro_bytes(price));
        datum.push(0); // description: null
        datum.extend([2, 0]); // version 1, not removed
        let fingerprint = AvroCodec::new().fingerprint("BookFactEvent").unwrap();
        let key = BookId::generate().to_string();
        record(
            Some(&key),
            Some(frame_single_object(fingerprint, &datum)),
            &[],
        )
    }

    #[tokio::test]
    async fn a_reason_quotes_only_the_start_of_a_huge_value() {
        let valid = fact_written_with(&BookId::generate().to_string(), &[0x06, 0x3f]);
        assert!(
            matches!(
                read(&valid).await,
                FactOutcome::DeadLetter(Rejection::KeyMismatch { .. })
            ),
            "written by hand as the codec writes it (under another key)"
        );
        let huge = "7".repeat(100_000);
        let not_an_id = fact_written_with(&huge, &[0x06, 0x3f]);
        let too_large = fact_written_with(&BookId::generate().to_string(), huge.as_bytes());
        for (field, message) in [("book_id", not_an_id), ("price", too_large)] {
            let Rejection::Undecodable(reason) = rejection(&message).await else {
                panic!("{field}: not an undecodable value");
            };
            assert!(reason.contains(field), "{reason}");
            assert!(
                reason.len() < 200,
                "{field}: {} bytes: {reason}",
                reason.len()
            );
        }
    }
}
