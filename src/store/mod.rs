//! The local store: a book's state and all the events a change raised, written in ONE transaction.
//!
//! The `events` table is both the event log (read back per stream) and the transactional outbox
//! the relay follows. Each committed event gets a `position` in one global commit order:
//!
//! * Positions come from a one-row counter (`outbox_head`) that every saving transaction
//!   increments as its last statement before COMMIT. The row lock it takes is held until the
//!   transaction ends, so transactions that append events commit one after another in position
//!   order, and a rolled back transaction gives its positions back. Hence positions are gapless
//!   and a reader that has seen position `p` committed knows every position below `p` is
//!   committed too: `position > last_seen` never skips an event that commits late, on PostgreSQL
//!   as on SQLite. The price is that appends serialise on that row for the (short) end of their
//!   transactions; a benchmark measures it.
//! * Optimistic concurrency: a save states the version it read; the book row is only written if
//!   the stored version still equals it, and `(stream, stream_version)` is unique, so a stale save
//!   fails with [`StoreError::Conflict`] and writes nothing.
//!
//! Adapters: [`SqliteStore`] (embedded default, WAL) and [`PostgresStore`] (production).

use std::future::Future;
use std::time::Duration;

use chrono::SubsecRound;
use thiserror::Error;

use crate::domain::{Book, BookId, NewEvent, StoredEvent};

mod any;
mod postgres;
mod postgres_outbox;
mod sqlite;
mod sqlite_commit_watch;
mod sqlite_migrations;
mod sqlite_outbox;
mod sqlite_reader;

pub use any::AnyStore;
pub use postgres::PostgresStore;
pub use postgres_outbox::{ListenerCheck, PgCommitSignal};
pub use sqlite::{SqliteStore, SqliteWrite};
pub use sqlite_commit_watch::{SqliteCommitWatch, WATCH_INTERVAL as SQLITE_WATCH_INTERVAL};

/// Most events one retention transaction deletes, on either store (see
/// [`SqliteStore::with_prune_chunk`] and [`PostgresStore::with_prune_chunk`] for why).
pub const PRUNE_CHUNK: usize = 10_000;

/// The pause between two chunks of retention. On SQLite, a save waiting for the write lock
/// retries after sleeps growing to 100 ms (its busy handler); chunks back to back would leave
/// it a window of microseconds, this one it cannot miss for long. On PostgreSQL saves do not
/// wait for a prune, and the pause only spreads its WAL and I/O out a little.
pub(crate) const PRUNE_PAUSE: Duration = Duration::from_millis(20);

/// One change of one book: its new state and the events that led there, saved atomically.
#[derive(Debug, Clone)]
pub struct BookChange {
    /// The version the change was decided against; `None` when the book is new.
    pub expected_version: Option<u64>,
    /// The state after the change (its `version` is the new aggregate version).
    pub state: Book,
    /// Delta events, then the fact event, in the order they happened.
    pub events: Vec<NewEvent>,
}

/// Failures of a store. `Conflict` and `Contention` are the caller's to retry (the service
/// does); `Rejected` is the change's own fault; the rest are the system's.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "book {book_id} was changed concurrently: expected {}, found {}",
        version_text(*.expected),
        version_text(*.actual)
    )]
    Conflict {
        book_id: BookId,
        expected: Option<u64>,
        actual: Option<u64>,
    },
    /// The database aborted a save to resolve contention with concurrent transactions
    /// (PostgreSQL's serialization failure or deadlock, SQLSTATE 40001 or 40P01). Nothing was
    /// written, and the same save is likely to succeed when tried again.
    #[error("the database aborted the save because of concurrent transactions: {0}")]
    Contention(sqlx::Error),
    /// The database refused the change itself: a value it cannot hold (PostgreSQL's data
    /// exceptions, SQLSTATE class 22, e.g. a character the database's encoding lacks) or one
    /// that breaks a constraint (class 23, SQLite's constraint errors), other than two saves of
    /// one book clashing, which is `Conflict`. Nothing was written, and saving the same change
    /// again fails the same way.
    #[error("the database refused the change: {}", database_message(.0))]
    Rejected(sqlx::Error),
    /// The scheme of the URL, never the rest, which may hold a password.
    #[error(
        "unsupported database URL scheme {0:?}: expected sqlite:… , a file path, or postgres://…"
    )]
    UnsupportedUrl(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// From the SQLite store's own read path (see `sqlite_reader`).
    #[error("reading SQLite database {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    /// A read on the blocking pool did not finish (the runtime is shutting down).
    #[error("the database read was cancelled")]
    Cancelled,
    /// A request the caller gave a deadline did not complete by then.
    #[error("the database did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// No connection could be opened at start: the server refused (it may still be starting,
    /// so connecting is retried until the pool's acquire timeout) or did not answer.
    #[error(
        "PostgreSQL at {address} accepted no connection within {waited:?}: it refused or did \
         not answer; is it running and reachable?"
    )]
    Unreachable {
        address: String,
        waited: std::time::Duration,
    },
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A projection batch found another position stored for a partition than the one it was
    /// read from (see `projection::OffsetAdvance`): the read model was reset, or another
    /// member applied the partition meanwhile. Nothing of the batch was written; reading again
    /// from the stored position fixes it.
    #[error(
        "the stored position of {topic} partition {partition} for group {group} is {}, not {} \
         as this member last knew it: the read model was reset or another member applied the \
         partition; nothing of the batch was written",
        offset_text(*.found),
        offset_text(*.expected)
    )]
    PositionMoved {
        group: String,
        topic: String,
        partition: i32,
        expected: Option<i64>,
        found: Option<i64>,
    },
}

/// Reads and writes books and their events. One `save` is one transaction.
pub trait EventStore: Send + Sync {
    /// The current state of a book, `None` if it was never added (a removed book is returned,
    /// marked removed).
    fn load_book(
        &self,
        book_id: BookId,
    ) -> impl Future<Output = Result<Option<Book>, StoreError>> + Send;

    /// All books that are not removed, ordered by title then id.
    fn list_books(&self) -> impl Future<Output = Result<Vec<Book>, StoreError>> + Send;

    /// Writes the book row and all `change.events` in one transaction and returns the events
    /// with the positions they were given. Fails with `Conflict`, writing nothing, when the
    /// stored version is not `change.expected_version`.
    fn save(
        &self,
        change: BookChange,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;

    /// The events of one stream in the order they were appended.
    fn read_stream(
        &self,
        stream: &str,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;

    /// Committed events with a position above `after`, in position order, at most `limit`.
    fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, StoreError>> + Send;

    /// The highest committed position (0 when there is no event).
    fn head_position(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// What the relay needs of a store besides reading events: where it got to, a lease so only one
/// relay publishes at a time, retention, and a prompt signal when new events commit.
pub trait Outbox: EventStore {
    /// This store's identity, drawn once when its schema was created (32 hex digits).
    fn store_id(&self) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// The position up to which relay `relay` has recorded everything as published (0 if none).
    fn published_position(
        &self,
        relay: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Records that everything up to `position` is published. Never moves backwards.
    fn record_published(
        &self,
        relay: &str,
        position: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes events that every relay of this store has published and that committed more
    /// than `older_than` ago; returns how many were deleted.
    ///
    /// "Every relay" means every checkpoint row: two relay ids on one store (two topic
    /// prefixes, say) each keep what they have still to publish, so pruning goes only as far
    /// as the one furthest behind. Nothing is deleted while `relay` has no checkpoint itself.
    /// A relay id that is no longer used keeps its row, and so holds pruning back for good,
    /// until the row is deleted (`DELETE FROM relay_checkpoint WHERE name = '<relay id>'`).
    ///
    /// Adapters delete in chunks of at most [`PRUNE_CHUNK`] events (unless set otherwise),
    /// each its own transaction, so a run that fails part way keeps what it deleted before.
    /// They delete from the oldest event on and stop at the first that committed within
    /// `older_than`, so a run reads at most a chunk of the events inside retention. Commit
    /// times follow positions only nearly (clocks, transactions that began earlier), so an old
    /// event after a younger one stays until that one is old too: pruning errs on keeping.
    fn prune_published(
        &self,
        relay: &str,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Takes or renews the lease `name` for `holder` for `ttl`, measured by the database's
    /// clock. True when `holder` holds it afterwards: it was free, expired, or already its own.
    fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives the lease up at once if `holder` holds it, so a standby can take over.
    fn release_lease(
        &self,
        name: &str,
        holder: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A signal that fires soon after events commit (PostgreSQL LISTEN/NOTIFY; for SQLite,
    /// saves made through this process). Callers still poll as a fallback: the signal is a
    /// hint, never the only way to learn about new events.
    fn commit_signal(&self) -> impl Future<Output = Result<CommitSignal, StoreError>> + Send;

    /// Whether the relay should read the next page of events while it sends the current one.
    /// Worth it where a read waits on a database server (the query runs in another process);
    /// a local read costs little, and overlapping it measured slower (see the relay's
    /// `ReadAhead`). Required rather than defaulted, so a wrapper cannot silently say no.
    fn reads_ahead(&self) -> bool;
}

/// Wakes the relay when events commit. See [`Outbox::commit_signal`].
pub enum CommitSignal {
    /// Saves made through this process notify it directly; for a SQLite file, a watch of the
    /// file adds the commits of other processes (see [`SqliteCommitWatch`]).
    Local(
        std::sync::Arc<tokio::sync::Notify>,
        Option<SqliteCommitWatch>,
    ),
    /// A PostgreSQL connection listening on the outbox channel, read by a task of its own.
    Postgres(PgCommitSignal),
}

/// The PostgreSQL channel a save notifies (inside its transaction, so delivered on commit).
pub const OUTBOX_CHANNEL: &str = "bookstore_outbox";

impl CommitSignal {
    /// Completes when a commit was signalled since the last call (signals in between coalesce
    /// into one). A PostgreSQL listener that breaks signals too, and again once it listens
    /// anew: the caller's polling covers the gap.
    pub async fn committed(&mut self) {
        match self {
            CommitSignal::Local(notify, _watch) => notify.notified().await,
            CommitSignal::Postgres(signal) => signal.committed().await,
        }
    }
}

/// Default bound on one query of the relay and of the projection ([`answer_within`]), whose
/// queries take milliseconds.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// `query`'s answer, or [`StoreError::Timeout`] once it has taken `limit`.
///
/// For the long-running loops (relay, projection), whose queries take milliseconds: on a
/// connection that died without a reset (a failover that moved the server's address, a NAT
/// gateway that forgot it) a query waits until TCP gives up, about 15 minutes on Linux, and
/// sqlx offers no socket timeout or keepalive to shorten that. Dropping the query rolls its
/// transaction back, as for any other error.
pub async fn answer_within<T>(
    limit: Duration,
    query: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, query)
        .await
        .unwrap_or(Err(StoreError::Timeout(limit)))
}

/// What the database said, without sqlx's "error returned from database" in front.
fn database_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// A book version in a message: "version 3", or "no book" for none.
fn version_text(version: Option<u64>) -> String {
    match version {
        Some(version) => format!("version {version}"),
        None => "no book".to_owned(),
    }
}

/// A stored position in a message: "offset 12", or "none" for none.
fn offset_text(offset: Option<i64>) -> String {
    match offset {
        Some(offset) => format!("offset {offset}"),
        None => "none".to_owned(),
    }
}

/// A position or version as the databases store it (BIGINT).
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} {value} exceeds BIGINT")))
}

/// A stored BIGINT as a position or version; a negative one means the row is corrupt.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{what} is negative: {value}")))
}

/// A schema fingerprint as the databases store it: BIGINT has no unsigned form, so the column
/// holds the fingerprint's 64 bits as a signed integer (no fingerprint is out of range).
pub(crate) fn fingerprint_column(fingerprint: u64) -> i64 {
    fingerprint.cast_signed()
}

/// The schema fingerprint a stored BIGINT holds (see [`fingerprint_column`]).
pub(crate) fn fingerprint_of_column(column: i64) -> u64 {
    column.cast_unsigned()
}

/// The start of the multi-row INSERT every save writes its events with (see [`EventColumns`]).
pub(crate) const INSERT_EVENTS: &str =
    "INSERT INTO events (position, event_id, event_type, stream, stream_version, aggregate_id,
                         occurred_at, correlation_id, causation_id, traceparent, payload,
                         schema_fingerprint) ";

/// One event's values in the form both databases store the numbers in (signed BIGINTs); the
/// identifiers and times are bound per database.
pub(crate) struct EventColumns<'a> {
    pub position: i64,
    pub version: i64,
    pub metadata: &'a crate::domain::EventMetadata,
    pub payload: &'a [u8],
    pub schema_fingerprint: Option<i64>,
}

/// The columns of every event of a save, in order; fails on a number BIGINT cannot hold.
pub(crate) fn event_columns(events: &[StoredEvent]) -> Result<Vec<EventColumns<'_>>, StoreError> {
    events
        .iter()
        .map(|event| {
            Ok(EventColumns {
                position: to_i64(event.position, "position")?,
                version: to_i64(event.metadata.aggregate_version, "stream version")?,
                metadata: &event.metadata,
                payload: &event.payload,
                schema_fingerprint: event.schema_fingerprint.map(fingerprint_column),
            })
        })
        .collect()
}

/// Gives `events` the positions `last - n + 1 ..= last`, in order: what a save that reserved
/// up to `last` in `outbox_head` writes.
///
/// `occurred_at` is cut to microseconds, the precision PostgreSQL keeps (SQLite's text has the
/// same), so that on every store `save` returns exactly what a later read returns.
pub(crate) fn with_positions(
    events: Vec<NewEvent>,
    last: u64,
) -> Result<Vec<StoredEvent>, StoreError> {
    let count = events.len() as u64;
    let first = (last + 1)
        .checked_sub(count)
        .filter(|first| *first >= 1)
        .ok_or_else(|| StoreError::Corrupt(format!("outbox_head {last} is below {count}")))?;
    Ok(events
        .into_iter()
        .zip(first..)
        .map(|(event, position)| {
            let mut metadata = event.metadata;
            metadata.occurred_at = metadata.occurred_at.trunc_subsecs(6);
            StoredEvent {
                position,
                metadata,
                payload: event.payload,
                schema_fingerprint: Some(event.schema_fingerprint),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_names_the_versions_in_words() {
        let book_id = BookId::generate();
        let conflict = |expected, actual| {
            StoreError::Conflict {
                book_id,
                expected,
                actual,
            }
            .to_string()
        };
        assert_eq!(
            conflict(Some(3), Some(5)),
            format!("book {book_id} was changed concurrently: expected version 3, found version 5")
        );
        assert_eq!(
            conflict(None, Some(1)),
            format!("book {book_id} was changed concurrently: expected no book, found version 1")
        );
    }
}
