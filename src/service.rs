//! The application service: runs a command against the stored book and saves the outcome.
//!
//! It is the only place that reads the clock and draws ids for events, so the domain stays pure.
//! A save that loses an optimistic-concurrency race is retried against the fresh state: the
//! command is decided again, never blindly re-applied.

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

/// How often a command is decided again after losing a concurrent-write race.
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
}

impl ServiceError {
    /// True when the user's input was at fault (as opposed to the system).
    pub fn is_user_error(&self) -> bool {
        matches!(self, ServiceError::Domain(_))
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
                events: self.envelope(&decision, command_id, &context)?,
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
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Wraps the decision's events in envelopes: delta events are caused by the command, the
    /// fact by the last delta event.
    fn envelope(
        &self,
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
                payload: self.codec.encode(&payload)?,
                metadata,
            });
        }
        Ok(envelopes)
    }

    /// The events of a stream, decoded.
    pub async fn read_stream(
        &self,
        stream: &str,
    ) -> Result<Vec<(StoredEvent, EventPayload)>, ServiceError> {
        let events = self.store.read_stream(stream).await?;
        events
            .into_iter()
            .map(|event| {
                let payload = self
                    .codec
                    .decode(&event.metadata.event_type, &event.payload)?;
                Ok((event, payload))
            })
            .collect()
    }
}
