//! The pure domain core: the `Book` aggregate, its commands and the events they raise.
//!
//! Nothing in here performs I/O, reads a clock or draws a random number: `decide` turns a command
//! and the current state into events, `apply` folds an event into the state. Everything that needs
//! the outside world (ids, timestamps, persistence) happens in [`crate::service`] and the adapters.

mod book;
mod command;
mod envelope;
mod error;
mod event;
mod price;

pub use book::{Book, BookId, Decision, ValidDetails, validate_details};
pub use command::{AddBook, BookCommand, UpdateDetails};
pub use envelope::{
    EventKind, EventMetadata, EventPayload, NewEvent, STREAM_PREFIX, StoredEvent, canonical_stream,
    delta_stream, fact_stream,
};
pub use error::{DomainError, ValidationError};
pub use event::{
    BookAdded, BookDetailsUpdated, BookEvent, BookFactEvent, BookPriceUpdated, BookRemoved,
    DetailField,
};
pub use price::Price;

/// Limits of the `Book` fields, part of the public contract (the Avro docs repeat them).
pub mod limits {
    /// Maximum length of a title, in characters.
    pub const TITLE_MAX_CHARS: usize = 200;
    /// Maximum length of an author's name, in characters.
    pub const AUTHOR_MAX_CHARS: usize = 150;
    /// Maximum length of an ISBN, in characters.
    pub const ISBN_MAX_CHARS: usize = 13;
    /// Maximum length of a description, in characters. Keeps every record far below Kafka's
    /// default 1 MiB message limit, so a valid book can always be published.
    pub const DESCRIPTION_MAX_CHARS: usize = 10_000;
}
