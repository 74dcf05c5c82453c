//! Events: delta events say what changed, the fact event states the whole book after a change.
//!
//! Delta events are meant for subscribers that react to a change (they carry old and new values,
//! so nobody needs to call back); fact events are meant for read models and compacted topics
//! (the latest fact of a book is all there is to know about it).

use serde::{Deserialize, Serialize};

use super::{Book, BookId, Price};

/// A delta event of the `Book` aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BookEvent {
    Added(BookAdded),
    PriceUpdated(BookPriceUpdated),
    DetailsUpdated(BookDetailsUpdated),
    Removed(BookRemoved),
}

impl BookEvent {
    /// The event type: the Avro record name and the CloudEvents `type` suffix.
    pub fn event_type(&self) -> &'static str {
        match self {
            BookEvent::Added(_) => BookAdded::TYPE,
            BookEvent::PriceUpdated(_) => BookPriceUpdated::TYPE,
            BookEvent::DetailsUpdated(_) => BookDetailsUpdated::TYPE,
            BookEvent::Removed(_) => BookRemoved::TYPE,
        }
    }

    pub fn book_id(&self) -> BookId {
        match self {
            BookEvent::Added(event) => event.book_id,
            BookEvent::PriceUpdated(event) => event.book_id,
            BookEvent::DetailsUpdated(event) => event.book_id,
            BookEvent::Removed(event) => event.book_id,
        }
    }
}

/// A book was added; carries every field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookAdded {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
    pub isbn: Option<String>,
    pub price: Price,
    pub description: Option<String>,
}

/// The price of a book changed; carries both prices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookPriceUpdated {
    pub book_id: BookId,
    pub old_price: Price,
    pub new_price: Price,
}

/// Descriptive fields changed. Carries the values of all of them after the change, and which ones
/// changed, so a subscriber can both react to the change and keep its own copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookDetailsUpdated {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
    pub isbn: Option<String>,
    pub description: Option<String>,
    pub changed: Vec<DetailField>,
}

/// A descriptive field of a book, as named in the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetailField {
    Title,
    Author,
    Isbn,
    Description,
}

impl DetailField {
    pub const ALL: [DetailField; 4] = [
        DetailField::Title,
        DetailField::Author,
        DetailField::Isbn,
        DetailField::Description,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            DetailField::Title => "title",
            DetailField::Author => "author",
            DetailField::Isbn => "isbn",
            DetailField::Description => "description",
        }
    }

    pub fn parse(name: &str) -> Option<DetailField> {
        Self::ALL.into_iter().find(|field| field.as_str() == name)
    }
}

/// A book was removed; carries the title and author it had, for subscribers that show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookRemoved {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
}

/// The complete state of a book after a change, with the aggregate version it reached.
/// A removed book's fact has `removed = true` (the relay also writes a tombstone for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookFactEvent {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
    pub isbn: Option<String>,
    pub price: Price,
    pub description: Option<String>,
    pub version: u64,
    pub removed: bool,
}

impl BookFactEvent {
    pub const TYPE: &'static str = "BookFactEvent";

    /// The fact stating `book` as it is.
    pub fn of(book: &Book) -> Self {
        Self {
            book_id: book.book_id,
            title: book.title.clone(),
            author: book.author.clone(),
            isbn: book.isbn.clone(),
            price: book.price,
            description: book.description.clone(),
            version: book.version,
            removed: book.removed,
        }
    }
}

impl BookAdded {
    pub const TYPE: &'static str = "BookAdded";
}
impl BookPriceUpdated {
    pub const TYPE: &'static str = "BookPriceUpdated";
}
impl BookDetailsUpdated {
    pub const TYPE: &'static str = "BookDetailsUpdated";
}
impl BookRemoved {
    pub const TYPE: &'static str = "BookRemoved";
}
