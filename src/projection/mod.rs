//! The reporting projection: consumer group `bookstore.book-report` reads `bookstore.book-fact`
//! and keeps the `BookReport` read model for the marketing dashboard.
//!
//! ## What it promises, and why it holds
//!
//! * **Effectively exactly-once state.** Delivery is at least once: a record can be applied
//!   twice (after a crash, a rebalance, a `--rebuild`, a second group), never skipped. Applying is
//!   idempotent and version-guarded, so applying twice changes nothing: a fact replaces a row only
//!   when its aggregate version is newer than the row's, and a deletion is remembered with its
//!   version so an older fact arriving later cannot bring the book back (see [`ReportStore`]).
//!   Every book's facts share a key, hence a partition, hence an order; but even out of order
//!   the newest version wins, so the read model converges to the last fact of every book.
//! * **No loss.** The rows of a batch and the next offsets of its partitions commit in ONE
//!   database transaction ([`ReportStore::apply_batch`]). The database is the source of truth
//!   for the position: every assigned partition starts at the offset stored there (or at the
//!   beginning when there is none), and Kafka's group offsets are committed afterwards, for lag
//!   tooling only. A crash between the two commits re-reads nothing that was not applied.
//! * **Rebalance safety.** A batch never spans a rebalance: rebalance callbacks only run inside
//!   `poll`, and a revocation waits in its callback until the batch being applied (while the
//!   next one is polled) is committed, so the previous owner of a partition has committed its
//!   last batch before it acknowledges the revocation, and the next owner reads the stored
//!   offset only after that. Records of a partition revoked while a batch
//!   was being collected are dropped unapplied; their new owner reads them from the stored
//!   offset (see [`consumer`]). A paused instance that wakes up after losing its partitions can
//!   still apply a stale batch: the version guard makes that harmless.
//! * **Poison records do not stop it.** A record it cannot decode goes to
//!   `bookstore.book-fact.dlq` with its key, value and headers plus the reason and its origin
//!   ([`dlq`]); its offset is stored only once the dead-letter queue acknowledged it.
//!
//! | module | owns |
//! | --- | --- |
//! | [`projector`] | the run loop: batches, backoff, `--until-caught-up`, `--rebuild`, status |
//! | [`consumer`] | the Kafka consumer: assignment at the stored offsets, batches, commits |
//! | [`fact`] | what one fact-topic record asks of the read model, or why it cannot be applied |
//! | [`dlq`] | the dead-letter queue: sending, listing and replaying |
//! | [`lag`] | how far the read model is behind the topic, from the stored offsets |
//! | `report_sqlite`, `report_postgres`, `report_any` | the [`ReportStore`] adapters |
//! | [`metrics`] | the `bookstore_projection_*` metrics |

use std::cmp::Ordering;
use std::collections::HashMap;
use std::future::Future;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::{BookFactEvent, BookId, Price};
use crate::store::StoreError;

pub mod consumer;
pub mod dlq;
pub mod fact;
pub mod lag;
pub mod metrics;
pub mod projector;
mod report_any;
mod report_postgres;
mod report_sqlite;

pub use dlq::{
    DeadLetter, DlqError, ReplayPlan, ReplayReport, list_dead_letters, replay_dead_letters,
};
pub use fact::{FactReader, MISSING_SCHEMA_PATIENCE, Rejection, UntimedChange};
pub use lag::{LagError, LagMeter, PartitionLag, ProjectionLag};
pub use projector::{
    APPLY_GRACE, DEFAULT_BATCH_BYTES, ProjectionConfig, ProjectionError, ProjectionMode,
    ProjectionReport, ProjectionStatus, Projector, default_group, kafka_projector,
};

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
    /// When the book changed: the time of the fact the row was built from (its `ce_time`), so
    /// that replaying or rebuilding gives the very same rows.
    pub updated_at: DateTime<Utc>,
}

/// What a fact record asks of the read model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportChange {
    /// Insert or replace the book's row, unless the row already has this version or a newer
    /// one, or the book was deleted at this version or a newer one.
    Upsert {
        fact: BookFactEvent,
        /// When the change happened; becomes [`BookReport::updated_at`].
        changed_at: DateTime<Utc>,
    },
    /// Delete the book's row (a tombstone, or a fact of a removed book), remembering `version`
    /// so an older fact arriving later cannot bring the book back. Without a version (a
    /// tombstone from another producer) the row goes whatever its version, and the version it
    /// had is remembered.
    Delete {
        book_id: BookId,
        version: Option<u64>,
    },
}

/// What compacting a batch needs to know of a change: whose, at which version, and whether it
/// deletes (a deletion wins a tie).
pub trait Versioned {
    fn book_id(&self) -> BookId;
    /// The aggregate version the change is about, when it states one.
    fn version(&self) -> Option<u64>;
    fn is_deletion(&self) -> bool;
}

impl<T: Versioned> Versioned for &T {
    fn book_id(&self) -> BookId {
        (*self).book_id()
    }

    fn version(&self) -> Option<u64> {
        (*self).version()
    }

    fn is_deletion(&self) -> bool {
        (*self).is_deletion()
    }
}

impl ReportChange {
    pub fn book_id(&self) -> BookId {
        match self {
            ReportChange::Upsert { fact, .. } => fact.book_id,
            ReportChange::Delete { book_id, .. } => *book_id,
        }
    }

    /// The aggregate version the change is about, when it states one.
    pub fn version(&self) -> Option<u64> {
        match self {
            ReportChange::Upsert { fact, .. } => Some(fact.version),
            ReportChange::Delete { version, .. } => *version,
        }
    }
}

impl Versioned for ReportChange {
    fn book_id(&self) -> BookId {
        ReportChange::book_id(self)
    }

    fn version(&self) -> Option<u64> {
        ReportChange::version(self)
    }

    fn is_deletion(&self) -> bool {
        matches!(self, ReportChange::Delete { .. })
    }
}

/// A position in the order of [`ReportStore::list_reports`]: the title and id of a row, where
/// [`ReportStore::list_reports_page`] continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportKey {
    pub title: String,
    pub book_id: BookId,
}

impl ReportKey {
    /// The position of `report`.
    pub fn of(report: &BookReport) -> Self {
        Self {
            title: report.title.clone(),
            book_id: report.book_id,
        }
    }
}

/// A column [`ReportStore::list_reports_sorted`] sorts by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReportColumn {
    #[default]
    Title,
    Author,
    Price,
    Isbn,
    Version,
}

impl ReportColumn {
    /// Ascending order of two rows by this column. Texts compare without regard to case;
    /// books without an ISBN come after those with one.
    fn compare(self, a: &BookReport, b: &BookReport) -> Ordering {
        match self {
            ReportColumn::Title => compare_text(&a.title, &b.title),
            ReportColumn::Author => compare_text(&a.author, &b.author),
            ReportColumn::Price => a.price.cmp(&b.price),
            ReportColumn::Isbn => match (&a.isbn, &b.isbn) {
                (Some(a), Some(b)) => compare_text(a, b),
                (a, b) => a.is_none().cmp(&b.is_none()),
            },
            ReportColumn::Version => a.version.cmp(&b.version),
        }
    }
}

/// Case-insensitive, then bytewise so that texts differing only in case keep one order.
fn compare_text(a: &str, b: &str) -> Ordering {
    a.to_lowercase()
        .cmp(&b.to_lowercase())
        .then_with(|| a.cmp(b))
}

/// The order of [`ReportStore::list_reports_sorted`]: by `column` (descending if asked), then
/// by title (ascending, case-insensitive) and id, so equal values keep one stable order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportOrder {
    pub column: ReportColumn,
    pub descending: bool,
}

impl ReportOrder {
    /// The order of two rows, exactly (Unicode case folding by [`str::to_lowercase`]).
    pub fn compare(self, a: &BookReport, b: &BookReport) -> Ordering {
        let primary = self.column.compare(a, b);
        let primary = if self.descending {
            primary.reverse()
        } else {
            primary
        };
        primary
            .then_with(|| compare_text(&a.title, &b.title))
            .then_with(|| a.book_id.cmp(&b.book_id))
    }

    /// The same order as an SQL `ORDER BY` list over `book_report`, `price` spelled as
    /// `price_as_number` (the adapter's column as a number). `lower()` folds case as the
    /// database does, so the caller sorts the rows again exactly. Only fixed words go into it.
    pub(crate) fn sql(self, price_as_number: &str) -> String {
        let dir = if self.descending { "DESC" } else { "ASC" };
        let then = "lower(title) ASC, title ASC, book_id ASC";
        match self.column {
            ReportColumn::Title => format!("lower(title) {dir}, title {dir}, book_id ASC"),
            ReportColumn::Author => format!("lower(author) {dir}, author {dir}, {then}"),
            ReportColumn::Price => format!("{price_as_number} {dir}, {then}"),
            ReportColumn::Isbn => {
                format!("isbn IS NULL {dir}, lower(isbn) {dir}, isbn {dir}, {then}")
            }
            ReportColumn::Version => format!("version {dir}, {then}"),
        }
    }
}

/// What [`ReportStore::report_totals`] counts, over every row of the read model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportTotals {
    pub books: u64,
    /// The exact sum of the prices.
    pub price_sum: Decimal,
    /// The newest [`BookReport::updated_at`]; `None` without books.
    pub last_change: Option<DateTime<Utc>>,
}

/// A stored consumer position: the next offset to read of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionOffset {
    pub partition: i32,
    pub next_offset: i64,
}

impl From<(i32, i64)> for PartitionOffset {
    /// A `(partition, next_offset)` row.
    fn from((partition, next_offset): (i32, i64)) -> Self {
        Self {
            partition,
            next_offset,
        }
    }
}

/// The position a batch stores for a partition, and the one it was read from.
///
/// `stored` is what the member last stored for the partition, or the position it was assigned
/// at (`None`: nothing was stored, it read from the beginning). [`ReportStore::apply_batch`]
/// writes nothing when the database holds another position: the read model was reset under the
/// member (`--rebuild`), or another member applied the partition meanwhile (a member that lost
/// its partitions while paused). Storing over it would claim rows the reset deleted, or move
/// another member's position back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OffsetAdvance {
    pub partition: i32,
    pub stored: Option<i64>,
    pub next_offset: i64,
}

impl OffsetAdvance {
    /// The first advance of a partition nothing is stored for.
    pub fn first(partition: i32, next_offset: i64) -> Self {
        Self {
            partition,
            stored: None,
            next_offset,
        }
    }

    /// The advance of a partition from `stored` to `next_offset`.
    pub fn from(partition: i32, stored: i64, next_offset: i64) -> Self {
        Self {
            partition,
            stored: Some(stored),
            next_offset,
        }
    }
}

/// Checks that each of `expected` (partition, position) is the position `stored` holds; the
/// first that is not is the error [`ReportStore::apply_batch`] returns for it.
pub(crate) fn check_positions(
    group: &str,
    topic: &str,
    expected: impl IntoIterator<Item = (i32, Option<i64>)>,
    stored: &[PartitionOffset],
) -> Result<(), StoreError> {
    for (partition, expected) in expected {
        let found = stored
            .iter()
            .find(|offset| offset.partition == partition)
            .map(|offset| offset.next_offset);
        if found != expected {
            return Err(StoreError::PositionMoved {
                group: group.to_owned(),
                topic: topic.to_owned(),
                partition,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Reads and writes the read model.
///
/// Every adapter applies a change under the same rules, so that the outcome of a set of changes
/// does not depend on their order or on repeats, only on the highest version per book:
///
/// * `Upsert` at `v` writes the row when there is no row with a version `>= v` and no
///   remembered deletion with a version `>= v`; writing it forgets an older deletion.
/// * `Delete` at `v` removes the row when its version is `<= v` and remembers the deletion at
///   `v` (keeping the higher of two remembered versions), unless a newer row exists.
/// * `Delete` without a version removes the row whatever its version and remembers that version.
pub trait ReportStore: Send + Sync {
    /// Applies `changes` in order and stores `offsets` for `group`/`topic`, all in ONE
    /// transaction: the rows and the position they reflect are durable together.
    ///
    /// Fails with [`StoreError::PositionMoved`], writing nothing, when a partition's stored
    /// position is not the one its [`OffsetAdvance`] was read from. A [`reset`](Self::reset)
    /// and a batch are serialised: the batch is either wholly before it (and emptied by it) or
    /// after it (and then finds its positions gone).
    fn apply_batch(
        &self,
        group: &str,
        topic: &str,
        changes: &[ReportChange],
        offsets: &[OffsetAdvance],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The stored next offsets of `group` on `topic`, per partition.
    fn stored_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> impl Future<Output = Result<Vec<PartitionOffset>, StoreError>> + Send;

    /// Every consumer group with stored offsets, in order: the groups projecting into this
    /// read model.
    fn stored_groups(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Every row, ordered by title then id.
    ///
    /// Reads the whole read model into memory: for the command line and tests. What serves
    /// requests reads a bounded part of it: [`list_reports_page`](Self::list_reports_page),
    /// [`list_reports_sorted`](Self::list_reports_sorted) and
    /// [`report_totals`](Self::report_totals).
    fn list_reports(&self) -> impl Future<Output = Result<Vec<BookReport>, StoreError>> + Send;

    /// At most `limit` rows in the order of [`list_reports`](Self::list_reports) (title, then
    /// id), starting right after `after` (from the first row without it): keyset pagination.
    /// Walking the pages, each starting after the last row of the one before, yields every row
    /// that exists and keeps its title throughout the walk exactly once, whatever else is
    /// written meanwhile (a row retitled during the walk moves: it can be missed or seen
    /// twice); `after` need not be a row that still exists.
    ///
    /// The SQL adapters read it through the index on `(title, book_id)`: the cost is the page,
    /// not the table. Text is in the database's order: bytewise in SQLite, the collation of the
    /// column in PostgreSQL (the same for a `C` or `C.UTF-8` database, not for `en_US` and the
    /// like).
    fn list_reports_page(
        &self,
        after: Option<&ReportKey>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<BookReport>, StoreError>> + Send;

    /// The first `limit` rows in `order` (see [`ReportOrder`]), for a bounded view of the
    /// report such as the dashboard.
    ///
    /// The SQL adapters sort in the database and send only these rows; no index serves these
    /// orders, so the database still reads every row (a top-N sort, in memory bounded by
    /// `limit`). Their case-insensitive comparison is the database's `lower()`, which SQLite
    /// applies to ASCII letters only: which rows make the cut can differ from
    /// [`ReportOrder::compare`] for titles that differ only in non-ASCII case, so a caller
    /// showing them sorts them again with it.
    fn list_reports_sorted(
        &self,
        order: ReportOrder,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<BookReport>, StoreError>> + Send;

    /// How many books the read model holds, the exact sum of their prices and the newest
    /// change, computed in the database over every row.
    fn report_totals(&self) -> impl Future<Output = Result<ReportTotals, StoreError>> + Send;

    /// One book's row.
    fn report(
        &self,
        book_id: BookId,
    ) -> impl Future<Output = Result<Option<BookReport>, StoreError>> + Send;

    /// Deletes every row, every remembered version and the stored offsets of every group (for
    /// `--rebuild`), in one transaction; returns the groups whose offsets it deleted. Every
    /// group's offsets go, not only the rebuilding one's: the rows are shared, so offsets kept
    /// by another group (of another topic, say) would name rows that are gone, and that group
    /// would never read them again.
    fn reset(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// The changes of a batch with everything dropped that cannot affect the outcome: per book,
/// only the change with the highest version counts (a deletion wins a tie), since the rules of
/// [`ReportStore`] make the outcome depend on nothing else. A book with a versionless deletion
/// keeps all its changes in order, as that one depends on what came before it.
pub fn compact_changes(changes: Vec<ReportChange>) -> Vec<ReportChange> {
    let decisive = decisive_changes(&changes);
    changes
        .into_iter()
        .zip(decisive)
        .filter_map(|(change, decisive)| (decisive != Decisive::No).then_some(change))
        .collect()
}

/// Per change of `changes`, whether another change of the batch supersedes it: what
/// [`compact_changes`] would drop. Dropping them early is safe whatever else the batch holds,
/// as long as every one of them is dropped for a change that stays (see
/// [`consumer`](self::consumer)'s `collect_batch`).
pub(crate) fn superseded(changes: &[impl Versioned]) -> Vec<bool> {
    decisive_changes(changes)
        .into_iter()
        .map(|decisive| decisive == Decisive::No)
        .collect()
}

/// Whether a change of a batch can affect the outcome, and how it must be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decisive {
    /// Another change of the same book supersedes it.
    No,
    /// The only change of its book that counts: it can be applied in any order relative to
    /// the changes of other books, so set-wise with them.
    Alone,
    /// Its book has a versionless deletion: every change of the book counts, in batch order.
    InOrder,
}

/// Per change of `changes`, whether and how it counts (see [`compact_changes`]).
///
/// One map lookup per change and one more per change to answer, with foldhash instead of the
/// standard SipHash: the polling thread runs this over every record of a batch (5,000 by
/// default), where three SipHash lookups per record were most of its compaction time.
fn decisive_changes(changes: &[impl Versioned]) -> Vec<Decisive> {
    /// Per book: whether it has a versionless deletion, and its newest change so far.
    struct Book {
        versionless: bool,
        newest: usize,
    }
    let mut books: foldhash::HashMap<BookId, Book> =
        HashMap::with_capacity_and_hasher(changes.len(), Default::default());
    for (index, change) in changes.iter().enumerate() {
        let book = books.entry(change.book_id()).or_insert(Book {
            versionless: false,
            newest: index,
        });
        book.versionless |= change.version().is_none();
        if supersedes(change, &changes[book.newest]) {
            book.newest = index;
        }
    }
    changes
        .iter()
        .enumerate()
        .map(|(index, change)| match &books[&change.book_id()] {
            Book {
                versionless: true, ..
            } => Decisive::InOrder,
            Book { newest, .. } if *newest == index => Decisive::Alone,
            Book { .. } => Decisive::No,
        })
        .collect()
}

/// How an adapter applies a batch: the changes that count, split so that most of them can be
/// written by a few set-wise statements instead of one statement per book.
///
/// Every book in `upserts` and `deletes` appears once in the two together (its decisive change,
/// see [`compact_changes`]), so each set-wise statement touches a book at most once and the
/// order between them does not matter. Books with a versionless deletion, whose outcome depends
/// on the order of their changes, are in `in_order`, to be applied one change after the other;
/// they share no book with the sets.
#[derive(Debug, Default)]
pub(crate) struct BatchPlan<'a> {
    pub upserts: Vec<(&'a BookFactEvent, DateTime<Utc>)>,
    /// Deletions with a version: (book, version).
    pub deletes: Vec<(BookId, u64)>,
    pub in_order: Vec<&'a ReportChange>,
}

impl<'a> BatchPlan<'a> {
    pub fn new(changes: &'a [ReportChange]) -> Self {
        let mut plan = BatchPlan::default();
        for (change, decisive) in changes.iter().zip(decisive_changes(changes)) {
            match (decisive, change) {
                (Decisive::No, _) => {}
                (Decisive::InOrder, change) => plan.in_order.push(change),
                (Decisive::Alone, ReportChange::Upsert { fact, changed_at }) => {
                    plan.upserts.push((fact, *changed_at));
                }
                (
                    Decisive::Alone,
                    ReportChange::Delete {
                        book_id,
                        version: Some(version),
                    },
                ) => plan.deletes.push((*book_id, *version)),
                // A versionless deletion makes its book order-dependent; kept for completeness.
                (Decisive::Alone, change @ ReportChange::Delete { version: None, .. }) => {
                    plan.in_order.push(change);
                }
            }
        }
        plan
    }
}

/// Whether `candidate` decides the outcome rather than `kept` (both of one book, with versions).
fn supersedes(candidate: &impl Versioned, kept: &impl Versioned) -> bool {
    let (new, old) = (candidate.version(), kept.version());
    new > old || (new == old && candidate.is_deletion())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(book_id: BookId, version: u64) -> ReportChange {
        ReportChange::Upsert {
            fact: BookFactEvent {
                book_id,
                title: format!("v{version}"),
                author: "A".into(),
                isbn: None,
                price: Price::ZERO,
                description: None,
                version,
                removed: false,
            },
            changed_at: DateTime::UNIX_EPOCH,
        }
    }

    fn delete(book_id: BookId, version: Option<u64>) -> ReportChange {
        ReportChange::Delete { book_id, version }
    }

    #[test]
    fn compaction_keeps_the_newest_change_per_book_in_batch_order() {
        let (a, b) = (BookId::generate(), BookId::generate());
        let changes = vec![upsert(a, 1), upsert(b, 1), upsert(a, 3), upsert(a, 2)];
        assert_eq!(compact_changes(changes), vec![upsert(b, 1), upsert(a, 3)]);
    }

    #[test]
    fn compaction_prefers_a_deletion_of_the_same_version() {
        let a = BookId::generate();
        let changes = vec![delete(a, Some(4)), upsert(a, 4), upsert(a, 2)];
        assert_eq!(compact_changes(changes), vec![delete(a, Some(4))]);
    }

    /// Three books: `a` upserted out of order, `b` deleted at the version of its last upsert
    /// (the deletion wins the tie), `c` with a versionless deletion (order-dependent).
    fn mixed_batch(a: BookId, b: BookId, c: BookId) -> Vec<ReportChange> {
        vec![
            upsert(a, 2),
            upsert(b, 1),
            delete(c, None),
            upsert(a, 5),
            delete(b, Some(3)),
            upsert(b, 3),
            upsert(c, 4),
            upsert(a, 4),
        ]
    }

    #[test]
    fn plan_splits_decisive_changes_into_sets_and_keeps_order_dependent_books_in_order() {
        let (a, b, c) = (BookId::generate(), BookId::generate(), BookId::generate());
        let changes = mixed_batch(a, b, c);
        let plan = BatchPlan::new(&changes);
        let upserts: Vec<(BookId, u64)> = plan
            .upserts
            .iter()
            .map(|(fact, _)| (fact.book_id, fact.version))
            .collect();
        assert_eq!(upserts, vec![(a, 5)]);
        assert_eq!(plan.deletes, vec![(b, 3)]);
        assert_eq!(plan.in_order, vec![&changes[2], &changes[6]]);
    }

    #[test]
    fn compaction_keeps_every_change_of_a_book_with_a_versionless_deletion() {
        let (a, b) = (BookId::generate(), BookId::generate());
        let changes = vec![upsert(a, 1), delete(a, None), upsert(a, 2), upsert(b, 1)];
        assert_eq!(compact_changes(changes.clone()), changes);
    }

    /// The polling thread drops what `superseded` marks before the records' times are read;
    /// the changes it keeps must compact to the same as the whole batch.
    #[test]
    fn what_is_superseded_early_is_what_compaction_drops() {
        let (a, b, c) = (BookId::generate(), BookId::generate(), BookId::generate());
        let untimed = |change: &ReportChange| match change {
            ReportChange::Upsert { fact, .. } => UntimedChange::Upsert(fact.clone()),
            ReportChange::Delete { book_id, version } => UntimedChange::Delete {
                book_id: *book_id,
                version: *version,
            },
        };
        let changes = mixed_batch(a, b, c);
        let early: Vec<UntimedChange> = changes.iter().map(untimed).collect();
        let superseded = superseded(&early);
        assert_eq!(
            superseded,
            [true, true, false, false, false, true, false, true]
        );
        let kept: Vec<ReportChange> = changes
            .iter()
            .zip(&superseded)
            .filter(|(_, superseded)| !**superseded)
            .map(|(change, _)| change.clone())
            .collect();
        assert_eq!(compact_changes(kept.clone()), kept);
        assert_eq!(compact_changes(changes), kept);
    }
}
