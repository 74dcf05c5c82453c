//! `SqliteStore`: the [`EventStore`] in one SQLite file, the embedded default.
//!
//! * WAL journal: readers (the relay following the outbox) never wait for the writer.
//! * `synchronous = FULL`: a save is on disk when it returns. With WAL, `NORMAL` would be
//!   faster but can lose the last commits on power loss, and durability is the product.
//! * SQLite has one writer at a time. A save opens its transaction with `BEGIN IMMEDIATE`, taking
//!   the write lock up front: two deferred transactions that both read and then try to write
//!   can deadlock on the upgrade and one fails with `SQLITE_BUSY` at once, whereas immediate ones
//!   just queue on the busy timeout. The single writer also means the `outbox_head` increment
//!   trivially hands out positions in commit order.
//! * The writers of one process take turns in arrival order before they ask SQLite for the
//!   write lock ([`SqliteStore::begin_write`]). SQLite keeps no queue: a writer that finds the
//!   lock taken sleeps in its busy handler (1, 2, 5, … up to 100 ms a try) and tries again, so
//!   under back-to-back transactions of another writer (a projection catching up) it keeps
//!   waking into the next one. A save then waited up to a second behind 20 ms batches; in
//!   turns it waits for the writers ahead of it only. And a writer waiting for its turn holds
//!   no connection, whereas each one in the busy handler held one of the pool's ten, so ten
//!   queued saves left reads (which WAL never makes wait for the writer) without a connection.
//!   Writers in other processes still meet at SQLite's lock and its busy timeout.
//! * UUIDs are stored as hyphenated text, prices as their canonical decimal text ("15.99"),
//!   timestamps as RFC 3339 UTC text; `committed_at` has one fixed width, so its text order is
//!   time order, which retention relies on.
//! * SQLite cannot notify other processes of a commit, so the commit signal is local: every
//!   save through this store (or a clone of it) wakes the relay of the same process, and a
//!   relay in another process finds new events by polling.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};
use uuid::fmt::Hyphenated;

use super::sqlite_commit_watch::SqliteCommitWatch;
use super::sqlite_reader::OutboxReader;
use super::{
    BookChange, EventStore, INSERT_EVENTS, PRUNE_CHUNK, StoreError, event_columns,
    fingerprint_of_column, to_i64, to_u64, with_positions,
};
use crate::domain::{Book, BookId, EventMetadata, Price, StoredEvent};

/// How long a writer waits for the write lock before failing with `SQLITE_BUSY`. Saves are
/// short, so only a long queue of concurrent writers gets near it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The URL scheme of the embedded store.
const SCHEME: &str = "sqlite:";

/// The store in a SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Most events one retention transaction deletes.
    prune_chunk: usize,
    /// The outbox's hot read path; `None` for a database that is not a file (in memory), which
    /// is read through the pool instead.
    reader: Option<OutboxReader>,
    /// Signalled after every commit that appended events; see [`Self::commits`].
    commits: Arc<Notify>,
    /// Held by the writer whose turn it is; see [`Self::begin_write`]. Shared by clones.
    writer_turn: Arc<Mutex<()>>,
}

/// A write transaction of [`SqliteStore::begin_write`]: SQLite's write lock, and this
/// process's writer turn until it is committed or dropped (dropping rolls back).
#[derive(Debug)]
pub struct SqliteWrite {
    // Declared first, so dropped first: the rollback is on its way before the turn passes on.
    tx: sqlx::Transaction<'static, Sqlite>,
    _turn: OwnedMutexGuard<()>,
}

impl SqliteWrite {
    /// Commits, then passes the turn on.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Rolls back, then passes the turn on.
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

impl std::ops::Deref for SqliteWrite {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for SqliteWrite {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl SqliteStore {
    /// Opens (creating it if missing) the database named by a `sqlite:` URL or a plain file path,
    /// and brings its schema up to date.
    /// The scheme is matched without regard to case (`SQLite:` too, as for `postgres:`); sqlx
    /// only knows it in lower case and would take the whole text for a file name.
    pub async fn connect(url_or_path: &str) -> Result<Self, StoreError> {
        let scheme = url_or_path.get(..SCHEME.len());
        let options = if scheme.is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME)) {
            let url = format!("{SCHEME}{}", &url_or_path[SCHEME.len()..]);
            SqliteConnectOptions::from_str(&url)?
        } else {
            SqliteConnectOptions::new().filename(url_or_path)
        };
        Self::connect_with(options).await
    }

    /// Opens the database described by `options`. The settings the store relies on (file
    /// creation, WAL, full sync, busy timeout, foreign keys) override whatever `options` says.
    pub async fn connect_with(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let path = options.get_filename().to_owned();
        let lock = super::sqlite_migrations::lock(&path).await?;
        // No ping before handing out a connection (sqlx's default): a connection to a local
        // file does not go stale the way a network one does, and the ping is one more round trip
        // to the connection's worker thread for every save and every projection batch.
        let pool = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        super::sqlite_migrations::run(&pool).await?;
        drop(lock);
        let reader = if path.is_file() {
            Some(OutboxReader::open(&path, BUSY_TIMEOUT)?)
        } else {
            None
        };
        Ok(Self {
            pool,
            prune_chunk: PRUNE_CHUNK,
            reader,
            commits: Arc::new(Notify::new()),
            writer_turn: Arc::new(Mutex::new(())),
        })
    }

    /// Waits for this process's writer turn (first come, first served), then begins a
    /// transaction holding SQLite's write lock (`BEGIN IMMEDIATE`). Every write of this store
    /// and of the read model kept in its file goes through here, or takes the same turn for a
    /// single statement.
    pub async fn begin_write(&self) -> Result<SqliteWrite, StoreError> {
        let turn = self.writer_turn().await;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(SqliteWrite { tx, _turn: turn })
    }

    /// This process's writer turn, for a single statement that writes outside a transaction;
    /// hold it until the statement finished.
    pub(crate) async fn writer_turn(&self) -> OwnedMutexGuard<()> {
        self.writer_turn.clone().lock_owned().await
    }

    /// The connection pool, for modules that keep their own tables in the same file. Their
    /// writes belong in [`Self::begin_write`]: one straight on the pool skips this process's
    /// writer turn and waits in SQLite's busy handler instead.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Sets how many events one retention transaction deletes at most ([`PRUNE_CHUNK`] unless
    /// set; at least 1). SQLite has one writer at a time, so a retention transaction holds off
    /// every save: one DELETE of 4 million events held the write lock for 20 s, longer than a
    /// save waits for it (10 s). In chunks, each its own transaction, saves go on in between.
    pub fn with_prune_chunk(mut self, events: usize) -> Self {
        self.prune_chunk = events.max(1);
        self
    }

    pub(crate) fn prune_chunk(&self) -> usize {
        self.prune_chunk
    }

    /// Notified after every commit that appended events (`notify_one`, so a wake-up that
    /// finds the relay busy is kept for its next wait). Shared by clones of this store.
    pub(crate) fn commits(&self) -> Arc<Notify> {
        self.commits.clone()
    }

    /// Signals [`Self::commits`] for the commits other processes make to the file too; `None`
    /// for a database that is not a file (no other process can reach it).
    pub(crate) fn watch_other_processes(&self) -> Result<Option<SqliteCommitWatch>, StoreError> {
        match &self.reader {
            Some(reader) => SqliteCommitWatch::start(reader.path(), BUSY_TIMEOUT, self.commits()),
            None => Ok(None),
        }
    }

    async fn stored_version(&self, book_id: BookId) -> Result<Option<u64>, StoreError> {
        stored_version(&mut *self.pool.acquire().await?, book_id).await
    }

    /// The body of [`EventStore::save`]; its errors are classified by the caller.
    async fn save_in_transaction(
        &self,
        change: BookChange,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let book_id = change.state.book_id;
        let expected = change.expected_version;
        let mut tx = self.begin_write().await?;
        if let Written::No { actual } = write_book(&mut tx, &change).await? {
            return Err(conflict(book_id, expected, actual));
        }
        if change.events.is_empty() {
            tx.commit().await?;
            return Ok(vec![]);
        }
        let last = reserve_positions(&mut tx, change.events.len()).await?;
        let events = with_positions(change.events, last)?;
        if let Err(error) = insert_events(&mut tx, &events).await {
            tx.rollback().await?;
            if !is_stream_version_clash(&error) {
                return Err(error);
            }
            let actual = self.stored_version(book_id).await?;
            return Err(conflict(book_id, expected, actual));
        }
        tx.commit().await?;
        self.commits.notify_one();
        Ok(events)
    }
}

impl EventStore for SqliteStore {
    async fn load_book(&self, book_id: BookId) -> Result<Option<Book>, StoreError> {
        let row: Option<BookRow> = sqlx::query_as(
            "SELECT book_id, title, author, isbn, price, description, version, removed
             FROM books WHERE book_id = ?",
        )
        .bind(book_id.as_uuid().hyphenated())
        .fetch_optional(&self.pool)
        .await
        .map_err(read_failed)?;
        row.map(BookRow::into_book).transpose()
    }

    async fn list_books(&self) -> Result<Vec<Book>, StoreError> {
        let rows: Vec<BookRow> = sqlx::query_as(
            "SELECT book_id, title, author, isbn, price, description, version, removed
             FROM books WHERE removed = 0 ORDER BY title, book_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(read_failed)?;
        rows.into_iter().map(BookRow::into_book).collect()
    }

    async fn save(&self, change: BookChange) -> Result<Vec<StoredEvent>, StoreError> {
        self.save_in_transaction(change)
            .await
            .map_err(classify_save_error)
    }

    async fn read_stream(&self, stream: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, event_id, event_type, stream, stream_version, aggregate_id,
                    occurred_at, correlation_id, causation_id, traceparent, payload,
                    schema_fingerprint
             FROM events WHERE stream = ? ORDER BY stream_version",
        )
        .bind(stream)
        .fetch_all(&self.pool)
        .await
        .map_err(read_failed)?;
        rows.into_iter().map(EventRow::into_event).collect()
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        // Beyond i64::MAX there is nothing to read and no limit to apply: clamping is exact.
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        if let Some(reader) = &self.reader {
            let reader = reader.clone();
            return match tokio::task::spawn_blocking(move || reader.read_after(after, limit)).await
            {
                Ok(events) => events,
                Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
                Err(_) => Err(StoreError::Cancelled),
            };
        }
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, event_id, event_type, stream, stream_version, aggregate_id,
                    occurred_at, correlation_id, causation_id, traceparent, payload,
                    schema_fingerprint
             FROM events WHERE position > ? ORDER BY position LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(read_failed)?;
        rows.into_iter().map(EventRow::into_event).collect()
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let last: i64 = sqlx::query_scalar("SELECT last_position FROM outbox_head WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(read_failed)?
            .ok_or_else(missing_head)?;
        to_u64(last, "outbox_head.last_position")
    }
}

/// Whether the book row was written; when not, the version found instead.
enum Written {
    Yes,
    No { actual: Option<u64> },
}

/// Inserts a new book or updates it if it still has the expected version. The parameters are
/// numbered so that insert and update share one binding order.
async fn write_book(
    conn: &mut SqliteConnection,
    change: &BookChange,
) -> Result<Written, StoreError> {
    let book = &change.state;
    let sql = match change.expected_version {
        None => {
            "INSERT INTO books (book_id, title, author, isbn, price, description, version, removed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (book_id) DO NOTHING"
        }
        Some(_) => {
            "UPDATE books
             SET title = ?2, author = ?3, isbn = ?4, price = ?5, description = ?6, version = ?7,
                 removed = ?8, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE book_id = ?1 AND version = ?9"
        }
    };
    let mut query = sqlx::query(sql)
        .bind(book.book_id.as_uuid().hyphenated())
        .bind(book.title.as_str())
        .bind(book.author.as_str())
        .bind(book.isbn.as_deref())
        .bind(book.price.to_string())
        .bind(book.description.as_deref())
        .bind(to_i64(book.version, "book version")?)
        .bind(book.removed);
    if let Some(expected) = change.expected_version {
        query = query.bind(to_i64(expected, "expected version")?);
    }
    if query.execute(&mut *conn).await?.rows_affected() == 1 {
        return Ok(Written::Yes);
    }
    let actual = stored_version(conn, book.book_id).await?;
    Ok(Written::No { actual })
}

async fn stored_version(
    conn: &mut SqliteConnection,
    book_id: BookId,
) -> Result<Option<u64>, StoreError> {
    let version: Option<i64> = sqlx::query_scalar("SELECT version FROM books WHERE book_id = ?")
        .bind(book_id.as_uuid().hyphenated())
        .fetch_optional(conn)
        .await
        .map_err(read_failed)?;
    version.map(|v| to_u64(v, "books.version")).transpose()
}

/// Moves the head forward by `count` and returns the last position reserved. Run last before
/// the insert, so the write lock is held for as little as possible after it.
async fn reserve_positions(conn: &mut SqliteConnection, count: usize) -> Result<u64, StoreError> {
    let count = to_i64(count as u64, "event count")?;
    let last: i64 = sqlx::query_scalar(
        "UPDATE outbox_head SET last_position = last_position + ? WHERE id = 1
         RETURNING last_position",
    )
    .bind(count)
    .fetch_optional(conn)
    .await?
    .ok_or_else(missing_head)?;
    to_u64(last, "outbox_head.last_position")
}

/// All events of one change in a single multi-row INSERT.
async fn insert_events(
    conn: &mut SqliteConnection,
    events: &[StoredEvent],
) -> Result<(), StoreError> {
    let mut insert = QueryBuilder::<Sqlite>::new(INSERT_EVENTS);
    insert.push_values(event_columns(events)?, |mut row, columns| {
        let meta = columns.metadata;
        row.push_bind(columns.position)
            .push_bind(meta.event_id.hyphenated())
            .push_bind(meta.event_type.as_str())
            .push_bind(meta.stream.as_str())
            .push_bind(columns.version)
            .push_bind(meta.aggregate_id.as_uuid().hyphenated())
            .push_bind(meta.occurred_at)
            .push_bind(meta.correlation_id.hyphenated())
            .push_bind(meta.causation_id.hyphenated())
            .push_bind(meta.traceparent.as_deref())
            .push_bind(columns.payload)
            .push_bind(columns.schema_fingerprint);
    });
    insert.build().execute(conn).await?;
    Ok(())
}

/// A constraint the change breaks (other than the one that means a concurrent save of the same
/// book, a `Conflict` by now) is [`StoreError::Rejected`]; other errors stay as they are.
fn classify_save_error(error: StoreError) -> StoreError {
    use sqlx::error::ErrorKind;
    match error {
        StoreError::Database(sqlx::Error::Database(db))
            if matches!(
                db.kind(),
                ErrorKind::UniqueViolation
                    | ErrorKind::ForeignKeyViolation
                    | ErrorKind::NotNullViolation
                    | ErrorKind::CheckViolation
            ) =>
        {
            StoreError::Rejected(sqlx::Error::Database(db))
        }
        other => other,
    }
}

/// SQLite names the columns of the violated constraint in its message; `events.stream` only
/// occurs in the `(stream, stream_version)` one.
fn is_stream_version_clash(error: &StoreError) -> bool {
    match error {
        StoreError::Database(sqlx::Error::Database(db)) => {
            db.is_unique_violation() && db.message().contains("events.stream,")
        }
        _ => false,
    }
}

#[derive(sqlx::FromRow)]
struct BookRow {
    book_id: Hyphenated,
    title: String,
    author: String,
    isbn: Option<String>,
    price: String,
    description: Option<String>,
    version: i64,
    removed: bool,
}

impl BookRow {
    fn into_book(self) -> Result<Book, StoreError> {
        let book_id = BookId::new(self.book_id.into_uuid());
        let price = Price::from_str(&self.price).map_err(|error| {
            StoreError::Corrupt(format!(
                "book {book_id} has price {:?}: {error}",
                self.price
            ))
        })?;
        Ok(Book {
            book_id,
            title: self.title,
            author: self.author,
            isbn: self.isbn,
            price,
            description: self.description,
            version: to_u64(self.version, "books.version")?,
            removed: self.removed,
        })
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    position: i64,
    event_id: Hyphenated,
    event_type: String,
    stream: String,
    stream_version: i64,
    aggregate_id: Hyphenated,
    occurred_at: DateTime<Utc>,
    correlation_id: Hyphenated,
    causation_id: Hyphenated,
    traceparent: Option<String>,
    payload: Vec<u8>,
    schema_fingerprint: Option<i64>,
}

impl EventRow {
    fn into_event(self) -> Result<StoredEvent, StoreError> {
        Ok(StoredEvent {
            position: to_u64(self.position, "events.position")?,
            metadata: EventMetadata {
                event_id: self.event_id.into_uuid(),
                event_type: self.event_type,
                stream: self.stream,
                aggregate_id: BookId::new(self.aggregate_id.into_uuid()),
                aggregate_version: to_u64(self.stream_version, "events.stream_version")?,
                occurred_at: self.occurred_at,
                correlation_id: self.correlation_id.into_uuid(),
                causation_id: self.causation_id.into_uuid(),
                traceparent: self.traceparent,
            },
            payload: self.payload,
            schema_fingerprint: self.schema_fingerprint.map(fingerprint_of_column),
        })
    }
}

fn conflict(book_id: BookId, expected: Option<u64>, actual: Option<u64>) -> StoreError {
    StoreError::Conflict {
        book_id,
        expected,
        actual,
    }
}

/// A value that does not decode (a text that is no UUID, a wrong type) is corrupt data, not an
/// outage.
fn read_failed(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(error.to_string())
        }
        other => StoreError::Database(other),
    }
}

fn missing_head() -> StoreError {
    StoreError::Corrupt("outbox_head has no row".to_owned())
}
