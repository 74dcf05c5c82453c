//! The application service: runs a command against the stored book and saves the outcome.
//!
//! It is the only place that reads the clock and draws ids for events, so the domain stays pure.
//! A save that loses an optimistic-concurrency race, or that the database aborted because of
//! concurrent transactions (a serialization failure or deadlock), is retried against the fresh
//! state: the command is decided again, never blindly re-applied. A command whose sender named
//! the versions it decided on ([`CommandContext::expected`]) is refused instead once
//! the book has moved past them.

use chrono::Utc;
use thiserror::Error;
use tracing::{debug, instrument};
use uuid::Uuid;

use crate::codec::{CodecError, EventCodec};
use crate::domain::{
    Book, BookCommand, BookId, Decision, DomainError, EventMetadata, EventPayload, NewEvent,
    StoredEvent, delta_stream, fact_stream,
};
use crate::store::{BookChange, EventStore, StoreError};

/// How often a command is decided again after losing a concurrent-write race (or after the
/// database aborted its save to resolve contention).
const MAX_CONFLICT_RETRIES: usize = 5;

/// Who asked, for the correlation trail. Empty by default: the command starts a new trail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandContext {
    /// Correlation id of the request this command belongs to; defaults to the command id.
    pub correlation_id: Option<Uuid>,
    /// Id of the command itself; generated when absent. Causation id of the delta events.
    pub command_id: Option<Uuid>,
    /// W3C `traceparent` of the request, carried into the events' headers.
    pub traceparent: Option<String>,
    /// What the sender expects of the stored book (HTTP `If-Match`): the command is refused
    /// with [`ServiceError::VersionMismatch`] otherwise, instead of overwriting a change the
    /// sender has not seen. `None`: nothing.
    pub expected: Option<Expected>,
}

/// A precondition on the stored book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// That it exists (and is not removed), at any version (`If-Match: *`).
    Exists,
    /// That it is at one of these versions (none: never).
    OneOf(Vec<u64>),
}

impl Expected {
    fn holds_for(&self, book: Option<&Book>) -> bool {
        match self {
            Expected::Exists => book.is_some_and(|book| !book.removed),
            Expected::OneOf(versions) => book.is_some_and(|book| versions.contains(&book.version)),
        }
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    pub book_id: BookId,
    /// The book after the command; `None` only if it never existed.
    pub state: Option<Book>,
    /// The events written (delta events, then the fact); empty when nothing changed.
    pub events: Vec<StoredEvent>,
}

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The book is not as the command expected (see [`CommandContext::expected`]).
    #[error("book {book_id} is {}, not {}: read it again and decide anew", describe(*actual), expected_text(expected))]
    VersionMismatch {
        book_id: BookId,
        expected: Expected,
        /// The stored book's version and whether it is removed; `None` when there is none.
        actual: Option<(u64, bool)>,
    },
}

fn describe(actual: Option<(u64, bool)>) -> String {
    match actual {
        None => "not there".to_owned(),
        Some((version, true)) => format!("removed at version {version}"),
        Some((version, false)) => format!("at version {version}"),
    }
}

fn expected_text(expected: &Expected) -> String {
    match expected {
        Expected::Exists => "there".to_owned(),
        Expected::OneOf(versions) => format!("at version {versions:?}"),
    }
}

impl ServiceError {
    /// True when the user's input was at fault (as opposed to the system).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            ServiceError::Domain(_)
                | ServiceError::Store(StoreError::Rejected(_))
                | ServiceError::VersionMismatch { .. }
        )
    }
}

pub struct BookService<S, C> {
    store: S,
    codec: C,
}

impl<S: EventStore, C: EventCodec> BookService<S, C> {
    pub fn new(store: S, codec: C) -> Self {
        Self { store, codec }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn codec(&self) -> &C {
        &self.codec
    }

    /// Runs `command`, saving the book and its events in one transaction.
    #[instrument(skip_all, fields(command = command.name(), book_id = %command.book_id()))]
    pub async fn execute(
        &self,
        command: BookCommand,
        context: CommandContext,
    ) -> Result<CommandOutcome, ServiceError> {
        let book_id = command.book_id();
        let command_id = context.command_id.unwrap_or_else(Uuid::now_v7);
        let mut attempt = 0;
        loop {
            let current = self.store.load_book(book_id).await?;
            if let Some(expected) = &context.expected
                && !expected.holds_for(current.as_ref())
            {
                return Err(ServiceError::VersionMismatch {
                    book_id,
                    expected: expected.clone(),
                    actual: current.as_ref().map(|book| (book.version, book.removed)),
                });
            }
            let Some(decision) = Book::execute(current.as_ref(), &command)? else {
                return Ok(CommandOutcome {
                    book_id,
                    state: current,
                    events: vec![],
                });
            };
            let change = BookChange {
                expected_version: current.as_ref().map(|book| book.version),
                state: decision.state.clone(),
                events: envelope(&self.codec, &decision, command_id, &context)?,
            };
            match self.store.save(change).await {
                Ok(events) => {
                    return Ok(CommandOutcome {
                        book_id,
                        state: Some(decision.state),
                        events,
                    });
                }
                Err(StoreError::Conflict { .. }) if attempt < MAX_CONFLICT_RETRIES => {
                    attempt += 1;
                    debug!(attempt, "concurrent change, deciding again");
                }
                Err(StoreError::Contention(error)) if attempt < MAX_CONFLICT_RETRIES => {
                    attempt += 1;
                    debug!(attempt, %error, "save aborted by the database, deciding again");
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// The events of a stream, each with its payload decoded, or why it could not be: an event
    /// written with another schema than the codec's is refused rather than misread. One event
    /// that does not decode does not hide the others.
    pub async fn read_stream(&self, stream: &str) -> Result<Vec<ReadEvent>, ServiceError> {
        let events = self.store.read_stream(stream).await?;
        Ok(events
            .into_iter()
            .map(|event| {
                let payload = self.codec.decode_saved(&event);
                ReadEvent { event, payload }
            })
            .collect())
    }
}

/// One event of [`BookService::read_stream`].
#[derive(Debug)]
pub struct ReadEvent {
    pub event: StoredEvent,
    pub payload: Result<EventPayload, CodecError>,
}

/// Wraps a decision's events in envelopes, as the service does for every command: delta events
/// first, each with its version in the book's delta stream, then the fact. The first delta event
/// is caused by the command, every later event by the one before it. Public so that benchmarks
/// write exactly what the service writes.
pub fn envelope<C: EventCodec>(
    codec: &C,
    decision: &Decision,
    command_id: Uuid,
    context: &CommandContext,
) -> Result<Vec<NewEvent>, CodecError> {
    let book_id = decision.state.book_id;
    let occurred_at = Utc::now();
    let correlation_id = context.correlation_id.unwrap_or(command_id);
    let first_version = decision.state.version + 1 - decision.events.len() as u64;
    let mut causation_id = command_id;
    let mut envelopes = Vec::with_capacity(decision.events.len() + 1);
    let deltas = decision.events.iter().cloned().map(EventPayload::Delta);
    let versions = (first_version..).map(|version| (delta_stream(book_id), version));
    let fact = (
        EventPayload::Fact(decision.fact.clone()),
        (fact_stream(book_id), decision.state.version),
    );
    for (payload, (stream, version)) in deltas.zip(versions).chain(std::iter::once(fact)) {
        let metadata = EventMetadata {
            event_id: Uuid::now_v7(),
            event_type: payload.event_type().to_owned(),
            stream,
            aggregate_id: book_id,
            aggregate_version: version,
            occurred_at,
            correlation_id,
            causation_id,
            traceparent: context.traceparent.clone(),
        };
        causation_id = metadata.event_id;
        envelopes.push(NewEvent {
            payload: codec.encode(&payload)?,
            schema_fingerprint: codec.schema_fingerprint(&metadata.event_type)?,
            metadata,
        });
    }
    Ok(envelopes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::AvroCodec;
    use crate::domain::{AddBook, Price};

    fn add(book_id: BookId) -> Decision {
        let command = BookCommand::Add(AddBook {
            book_id,
            title: "Dune".to_owned(),
            author: "Frank Herbert".to_owned(),
            isbn: None,
            price: Price::from_cents(1099).unwrap(),
            description: None,
        });
        Book::execute(None, &command).unwrap().unwrap()
    }

    fn reprice(state: &Book, cents: i64) -> Decision {
        let command = BookCommand::UpdatePrice {
            book_id: state.book_id,
            price: Price::from_cents(cents).unwrap(),
        };
        Book::execute(Some(state), &command).unwrap().unwrap()
    }

    #[test]
    fn the_delta_is_caused_by_the_command_and_the_fact_by_the_delta() {
        let codec = AvroCodec::new();
        let book_id = BookId::generate();
        let decision = add(book_id);
        let command_id = Uuid::now_v7();
        let events = envelope(&codec, &decision, command_id, &CommandContext::default()).unwrap();

        let [delta, fact] = events.as_slice() else {
            panic!("expected a delta event and the fact, got {events:?}");
        };
        assert_eq!(delta.metadata.stream, delta_stream(book_id));
        assert_eq!(fact.metadata.stream, fact_stream(book_id));
        assert_eq!(delta.metadata.aggregate_version, 1);
        assert_eq!(fact.metadata.aggregate_version, 1);
        assert_eq!(delta.metadata.causation_id, command_id);
        assert_eq!(fact.metadata.causation_id, delta.metadata.event_id);
        for event in [delta, fact] {
            assert_eq!(event.metadata.correlation_id, command_id);
            assert_eq!(event.metadata.aggregate_id, book_id);
            assert_eq!(event.metadata.traceparent, None);
        }
        assert_eq!(
            codec
                .decode(&delta.metadata.event_type, &delta.payload)
                .unwrap(),
            EventPayload::Delta(decision.events[0].clone())
        );
        assert_eq!(
            codec
                .decode(&fact.metadata.event_type, &fact.payload)
                .unwrap(),
            EventPayload::Fact(decision.fact.clone())
        );
    }

    #[test]
    fn correlation_and_trace_come_from_the_request() {
        let correlation_id = Uuid::now_v7();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned();
        let context = CommandContext {
            correlation_id: Some(correlation_id),
            command_id: None,
            traceparent: Some(traceparent.clone()),
            ..CommandContext::default()
        };
        let events = envelope(
            &AvroCodec::new(),
            &add(BookId::generate()),
            Uuid::now_v7(),
            &context,
        )
        .unwrap();

        assert_eq!(events.len(), 2);
        for event in &events {
            assert_eq!(event.metadata.correlation_id, correlation_id);
            assert_eq!(
                event.metadata.traceparent.as_deref(),
                Some(traceparent.as_str())
            );
        }
    }

    #[test]
    fn several_delta_events_take_consecutive_versions_and_chain_their_causes() {
        let added = add(BookId::generate());
        let repriced = reprice(&added.state, 1299);
        // One decision raising both events (no command does so today; the envelope must still
        // number them as the book's stream expects).
        let decision = Decision {
            events: vec![added.events[0].clone(), repriced.events[0].clone()],
            state: repriced.state.clone(),
            fact: repriced.fact.clone(),
        };
        let command_id = Uuid::now_v7();
        let events = envelope(
            &AvroCodec::new(),
            &decision,
            command_id,
            &CommandContext::default(),
        )
        .unwrap();

        let versions: Vec<u64> = events
            .iter()
            .map(|e| e.metadata.aggregate_version)
            .collect();
        assert_eq!(
            versions,
            [1, 2, 2],
            "two deltas, then the fact at the state's version"
        );
        let causes: Vec<Uuid> = events.iter().map(|e| e.metadata.causation_id).collect();
        assert_eq!(
            causes,
            [
                command_id,
                events[0].metadata.event_id,
                events[1].metadata.event_id
            ]
        );
        assert_eq!(
            events[2].metadata.stream,
            fact_stream(decision.state.book_id)
        );
    }
}
