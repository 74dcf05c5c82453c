//! The reporting projection: consumer group `bookstore.book-report` reads `bookstore.book-fact`
//! and keeps the `BookReport` read model for the marketing dashboard.
//!
//! (Module header to be completed with the guarantees: idempotent, version-guarded apply;
//! offsets durable with the rows; rebalance safety; DLQ.)

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{BookFactEvent, BookId, Price};
use crate::store::StoreError;

/// One row of the read model: a book as the marketing dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookReport {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
    pub price: Price,
    pub isbn: Option<String>,
    /// The aggregate version of the fact the row was built from.
    pub version: u64,
    /// When the row was last written.
    pub updated_at: DateTime<Utc>,
}

/// What a fact record asks of the read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportChange {
    /// Insert or replace the book's row, unless the row already has this version or a newer one.
    Upsert(BookFactEvent),
    /// Delete the book's row (a tombstone, or a fact of a removed book), remembering `version`
    /// when known so an older fact arriving later cannot bring the book back.
    Delete { book_id: BookId, version: Option<u64> },
}

/// The consumer position to store with a batch: next offset to read per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffset {
    pub partition: i32,
    pub next_offset: i64,
}

/// Reads and writes the read model.
pub trait ReportStore: Send + Sync {
    /// Applies `changes` in order and stores `offsets` for `group`/`topic`, all in ONE
    /// transaction: the rows and the position they reflect are durable together.
    fn apply_batch(
        &self,
        group: &str,
        topic: &str,
        changes: &[ReportChange],
        offsets: &[PartitionOffset],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The stored next offsets of `group` on `topic`, per partition.
    fn stored_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> impl Future<Output = Result<Vec<PartitionOffset>, StoreError>> + Send;

    /// Every row, ordered by title then id.
    fn list_reports(&self) -> impl Future<Output = Result<Vec<BookReport>, StoreError>> + Send;

    /// One book's row.
    fn report(
        &self,
        book_id: BookId,
    ) -> impl Future<Output = Result<Option<BookReport>, StoreError>> + Send;

    /// Deletes every row, remembered version and stored offset of `group` (for `--rebuild`).
    fn reset(&self, group: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}
