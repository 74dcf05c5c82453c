//! The `Book` aggregate: its state, the rules its fields obey, and how commands change it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::command::{AddBook, BookCommand, UpdateDetails};
use super::event::{
    BookAdded, BookDetailsUpdated, BookEvent, BookFactEvent, BookPriceUpdated, BookRemoved,
    DetailField,
};
use super::limits::{AUTHOR_MAX_CHARS, DESCRIPTION_MAX_CHARS, ISBN_MAX_CHARS, TITLE_MAX_CHARS};
use super::{DomainError, Price, ValidationError};

/// Identity of a book: a UUID, also the Kafka record key (as its hyphenated text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BookId(Uuid);

impl BookId {
    pub fn new(id: Uuid) -> Self {
        Self(id)
    }

    /// A fresh, time-ordered id (UUIDv7), so new books sort by creation in indexes.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for BookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for BookId {
    type Err = ValidationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(text.trim())
            .map(BookId)
            .map_err(|_| ValidationError::new("book_id", "must be a UUID"))
    }
}

impl From<Uuid> for BookId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

/// The state of one book after all its events. `version` counts the delta events applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
    pub isbn: Option<String>,
    pub price: Price,
    pub description: Option<String>,
    pub version: u64,
    pub removed: bool,
}

/// What a command changed: the delta events, the state after them and the fact that states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub events: Vec<BookEvent>,
    pub state: Book,
    pub fact: BookFactEvent,
}

impl Book {
    /// Runs `command` against `state` (None: the book does not exist yet).
    ///
    /// Returns `Ok(None)` when the command changes nothing: then neither a delta nor a fact
    /// event is raised and nothing needs to be written.
    pub fn execute(
        state: Option<&Book>,
        command: &BookCommand,
    ) -> Result<Option<Decision>, DomainError> {
        let events = Self::decide(state, command)?;
        if events.is_empty() {
            return Ok(None);
        }
        let mut next = state.cloned();
        for event in &events {
            next = Self::apply(next, event);
        }
        // `decide` only returns events that create or change an existing book.
        let state = next.expect("non-empty events always leave a book");
        let fact = BookFactEvent::of(&state);
        Ok(Some(Decision {
            events,
            state,
            fact,
        }))
    }

    /// The delta events `command` raises against `state`; empty when it changes nothing.
    pub fn decide(
        state: Option<&Book>,
        command: &BookCommand,
    ) -> Result<Vec<BookEvent>, DomainError> {
        match command {
            BookCommand::Add(add) => decide_add(state, add),
            BookCommand::UpdatePrice { book_id, price } => {
                let book = existing(state, *book_id)?;
                if book.price == *price {
                    return Ok(vec![]);
                }
                Ok(vec![BookEvent::PriceUpdated(BookPriceUpdated {
                    book_id: book.book_id,
                    old_price: book.price,
                    new_price: *price,
                })])
            }
            BookCommand::UpdateDetails(update) => decide_update_details(state, update),
            BookCommand::Remove { book_id } => {
                let book = match state {
                    Some(book) if book.removed => return Ok(vec![]),
                    _ => existing(state, *book_id)?,
                };
                Ok(vec![BookEvent::Removed(BookRemoved {
                    book_id: book.book_id,
                    title: book.title.clone(),
                    author: book.author.clone(),
                })])
            }
        }
    }

    /// Folds one delta event into the state. Events that do not fit the state (a change to a
    /// book that does not exist) leave it as it is: `decide` never produces them.
    pub fn apply(state: Option<Book>, event: &BookEvent) -> Option<Book> {
        match (state, event) {
            (None, BookEvent::Added(added)) => Some(Book {
                book_id: added.book_id,
                title: added.title.clone(),
                author: added.author.clone(),
                isbn: added.isbn.clone(),
                price: added.price,
                description: added.description.clone(),
                version: 1,
                removed: false,
            }),
            (Some(mut book), BookEvent::PriceUpdated(update)) => {
                book.price = update.new_price;
                book.version += 1;
                Some(book)
            }
            (Some(mut book), BookEvent::DetailsUpdated(update)) => {
                book.title = update.title.clone();
                book.author = update.author.clone();
                book.isbn = update.isbn.clone();
                book.description = update.description.clone();
                book.version += 1;
                Some(book)
            }
            (Some(mut book), BookEvent::Removed(_)) => {
                book.removed = true;
                book.version += 1;
                Some(book)
            }
            (state, _) => state,
        }
    }
}

fn existing(state: Option<&Book>, book_id: BookId) -> Result<&Book, DomainError> {
    match state {
        None => Err(DomainError::NotFound(book_id)),
        Some(book) if book.removed => Err(DomainError::Removed(book_id)),
        Some(book) => Ok(book),
    }
}

fn decide_add(state: Option<&Book>, add: &AddBook) -> Result<Vec<BookEvent>, DomainError> {
    if state.is_some() {
        return Err(DomainError::AlreadyExists(add.book_id));
    }
    let details = validate_details(
        &add.title,
        &add.author,
        add.isbn.as_deref(),
        add.description.as_deref(),
    )?;
    Ok(vec![BookEvent::Added(BookAdded {
        book_id: add.book_id,
        title: details.title,
        author: details.author,
        isbn: details.isbn,
        price: add.price,
        description: details.description,
    })])
}

fn decide_update_details(
    state: Option<&Book>,
    update: &UpdateDetails,
) -> Result<Vec<BookEvent>, DomainError> {
    let book = existing(state, update.book_id)?;
    let details = validate_details(
        update.title.as_deref().unwrap_or(&book.title),
        update.author.as_deref().unwrap_or(&book.author),
        match &update.isbn {
            Some(isbn) => isbn.as_deref(),
            None => book.isbn.as_deref(),
        },
        match &update.description {
            Some(description) => description.as_deref(),
            None => book.description.as_deref(),
        },
    )?;
    let changed: Vec<DetailField> = [
        (DetailField::Title, details.title != book.title),
        (DetailField::Author, details.author != book.author),
        (DetailField::Isbn, details.isbn != book.isbn),
        (
            DetailField::Description,
            details.description != book.description,
        ),
    ]
    .into_iter()
    .filter_map(|(field, changed)| changed.then_some(field))
    .collect();
    if changed.is_empty() {
        return Ok(vec![]);
    }
    Ok(vec![BookEvent::DetailsUpdated(BookDetailsUpdated {
        book_id: book.book_id,
        title: details.title,
        author: details.author,
        isbn: details.isbn,
        description: details.description,
        changed,
    })])
}

/// The descriptive fields of a book after trimming, once they passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidDetails {
    pub title: String,
    pub author: String,
    pub isbn: Option<String>,
    pub description: Option<String>,
}

/// Checks every rule of the descriptive fields. Surrounding white space is trimmed first and an
/// empty optional field counts as absent.
pub fn validate_details(
    title: &str,
    author: &str,
    isbn: Option<&str>,
    description: Option<&str>,
) -> Result<ValidDetails, ValidationError> {
    Ok(ValidDetails {
        title: required("title", title, TITLE_MAX_CHARS)?,
        author: required("author", author, AUTHOR_MAX_CHARS)?,
        isbn: optional("isbn", isbn, ISBN_MAX_CHARS)?,
        description: optional("description", description, DESCRIPTION_MAX_CHARS)?,
    })
}

fn required(field: &'static str, value: &str, max_chars: usize) -> Result<String, ValidationError> {
    optional(field, Some(value), max_chars)?
        .ok_or_else(|| ValidationError::new(field, "must not be empty"))
}

fn optional(
    field: &'static str,
    value: Option<&str>,
    max_chars: usize,
) -> Result<Option<String>, ValidationError> {
    let Some(value) = value
        .map(str::trim)
        .filter(|value| !value.chars().all(|c| is_invisible(c) || c.is_whitespace()))
    else {
        return Ok(None);
    };
    // Browsers send a textarea's line breaks as CR LF, and older Mac text ends lines with CR
    // alone; both are stored as the newline the contract allows, not refused.
    let value = if value.contains('\r') {
        value.replace("\r\n", "\n").replace('\r', "\n")
    } else {
        value.to_owned()
    };
    if value.chars().count() > max_chars {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(Some(value))
}

/// Characters that show nothing on their own and that `str::trim` keeps (it strips only
/// Unicode white space): format characters such as U+200B ZERO WIDTH SPACE and U+FEFF, fillers
/// such as U+3164 HANGUL FILLER and U+2800 BRAILLE PATTERN BLANK, variation selectors and tags.
/// A value made only of them and white space looks empty wherever it is shown, so it counts as
/// empty; inside visible text they stay, since joiners and variation selectors shape emoji and
/// scripts.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{2800}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}
