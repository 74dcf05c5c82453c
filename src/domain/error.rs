//! Errors a command can be refused with. They are the user's fault, never the system's.

use thiserror::Error;

use super::BookId;

/// A field broke one of its rules. Names the field and the rule so the message can be shown as is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field} {rule}")]
pub struct ValidationError {
    /// The field, as named in commands and in the Avro contract (`title`, `price`, …).
    pub field: &'static str,
    /// The rule it broke, phrased to follow the field name ("must not be empty").
    pub rule: String,
}

impl ValidationError {
    pub fn new(field: &'static str, rule: impl Into<String>) -> Self {
        Self {
            field,
            rule: rule.into(),
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    #[error("invalid book: {0}")]
    Invalid(#[from] ValidationError),
    #[error("book {0} already exists")]
    AlreadyExists(BookId),
    #[error("book {0} does not exist")]
    NotFound(BookId),
    #[error("book {0} has been removed")]
    Removed(BookId),
}
