//! Commands: what a user asks of a book. Prices arrive already parsed (a `Price` is always valid);
//! text fields are checked by the aggregate.

use super::{BookId, Price};

/// Adds a new book. The caller chooses the id (see [`BookId::generate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddBook {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
    pub isbn: Option<String>,
    pub price: Price,
    pub description: Option<String>,
}

/// Changes some descriptive fields; `None` leaves a field as it is. For the optional fields,
/// `Some(None)` (or an empty text) clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateDetails {
    pub book_id: BookId,
    pub title: Option<String>,
    pub author: Option<String>,
    pub isbn: Option<Option<String>>,
    pub description: Option<Option<String>>,
}

impl UpdateDetails {
    /// An update of `book_id` that changes nothing yet.
    pub fn new(book_id: BookId) -> Self {
        Self {
            book_id,
            title: None,
            author: None,
            isbn: None,
            description: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookCommand {
    Add(AddBook),
    UpdatePrice { book_id: BookId, price: Price },
    UpdateDetails(UpdateDetails),
    Remove { book_id: BookId },
}

impl BookCommand {
    /// The book the command is about.
    pub fn book_id(&self) -> BookId {
        match self {
            BookCommand::Add(add) => add.book_id,
            BookCommand::UpdatePrice { book_id, .. } | BookCommand::Remove { book_id } => *book_id,
            BookCommand::UpdateDetails(update) => update.book_id,
        }
    }

    /// A short name for logs and the causation trail.
    pub fn name(&self) -> &'static str {
        match self {
            BookCommand::Add(_) => "AddBook",
            BookCommand::UpdatePrice { .. } => "UpdateBookPrice",
            BookCommand::UpdateDetails(_) => "UpdateBookDetails",
            BookCommand::Remove { .. } => "RemoveBook",
        }
    }
}
