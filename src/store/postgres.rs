//! `PostgresStore`: the [`EventStore`] on PostgreSQL, for production.
//!
//! Saves run at READ COMMITTED, stated in their `BEGIN` whatever the database's
//! `default_transaction_isolation` says: at REPEATABLE READ or SERIALIZABLE, a save that waited
//! for the `outbox_head` row would fail with a serialization failure (40001) instead of reading
//! the head its predecessor committed, so concurrent saves of different books would fail.
//! Should the database still abort a save to resolve contention (40001, or a deadlock, 40P01),
//! the save fails with [`StoreError::Contention`], which the service retries.
//!
//! What keeps the outbox gapless is the `outbox_head` row: every save increments it as its
//! last step before inserting its events, and the row lock that takes is held until COMMIT, so
//! a second save waits there and reads the head only once the first one is committed (and
//! visible). Positions are therefore handed out in commit order, and a rolled back save
//! releases its reservation before anyone else could build on it. The lock is released only
//! once the commit is flushed, so what appends serialise on is the reservation, the event
//! insert and one WAL flush; both statements are therefore single round trips (the
//! notification rides along with the reservation).
//!
//! A session that holds the `outbox_head` row lock and then stops (a client frozen mid-save, a
//! network cut) would hold up every save until it ends. So where neither the URL, the role nor
//! the database sets `idle_in_transaction_session_timeout`, [`PostgresStore::connect`] sets it
//! to 60 s ([`IDLE_IN_TRANSACTION_TIMEOUT`]) for its sessions. Nothing of the store, the relay
//! or the projection idles inside a transaction: their statements follow each other without
//! waiting for anything else.
//!
//! That flush is only waited for under `synchronous_commit` `on` (or `local`, `remote_write`,
//! `remote_apply`). Under `off`, set for the server, the role or the database, a commit is visible
//! (and the relay publishes its events) before it is durable: a crash then loses events consumers
//! have already seen, and the next saves hand out their positions again. So where a session of
//! [`PostgresStore::connect`] starts with `off`, the store sets it to `on` for the session, and
//! says so in a warning. The sessions of a pool given to [`PostgresStore::with_pool`] are left as
//! they are; the store only warns at start if it finds `off` there.
//!
//! Each save also sends `NOTIFY bookstore_outbox, '<last position>'` ([`OUTBOX_CHANNEL`]).
//! PostgreSQL delivers it only if and when the transaction commits, so a listening relay wakes
//! up for exactly the committed appends and never reads ahead of them. The channel is per
//! database, not per schema: stores sharing a database wake each other's relays (harmless, as
//! a wake-up only makes the relay poll).

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::postgres_outbox::ListenerCheck;
use super::{
    BookChange, EventStore, INSERT_EVENTS, OUTBOX_CHANNEL, PRUNE_CHUNK, StoreError, event_columns,
    fingerprint_of_column, to_i64, to_u64, with_positions,
};
use crate::domain::{Book, BookId, EventMetadata, Price, StoredEvent};

/// How long a migration waits for a lock (a table's, or another instance's migrations')
/// before it gives up and tries again after [`MIGRATION_RETRY_PAUSE`].
///
/// An `ALTER TABLE` waits for every transaction that uses the table, and while it waits in
/// PostgreSQL's lock queue every newer statement on the table queues behind it: a backup or
/// an analyst's open transaction on `events` would otherwise stop every save (and the relay's
/// reads) for as long as it lasted, with nothing timing out. Given up in time, the migration
/// lets them through and tries again; the saves wait at most this long each time.
const MIGRATION_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The pause between two attempts of a migration that waited too long for a lock.
const MIGRATION_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long connecting at start waits for a server that refuses connections (sqlx's default
/// acquire timeout, stated because the error names it).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The store in a PostgreSQL database (in the schema first on the connection's `search_path`).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Most events one retention transaction deletes.
    prune_chunk: usize,
    /// When the relay's listening session must prove it is still connected.
    listener_check: ListenerCheck,
}

impl PostgresStore {
    /// Connects to `postgres://…` and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_options(PgConnectOptions::from_str(url)?).await
    }

    /// Connects with explicit options, e.g. a `search_path` that puts the tables in a schema of
    /// their own: `options.options([("search_path", "my_schema")])`. Sessions where nothing
    /// sets `idle_in_transaction_session_timeout` get 60 s, and sessions that start with
    /// `synchronous_commit` `off` get `on` (see the module doc).
    pub async fn connect_with_options(options: PgConnectOptions) -> Result<Self, StoreError> {
        Self::connect_within(options, CONNECT_TIMEOUT).await
    }

    /// Connects, retrying a refused connection for up to `timeout` (a server still starting),
    /// then fails naming the server: sqlx's own error for that case says only that its pool
    /// timed out.
    async fn connect_within(
        options: PgConnectOptions,
        timeout: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let address = format!("{}:{}", options.get_host(), options.get_port());
        let warned = Arc::new(AtomicBool::new(false));
        let pool = PgPoolOptions::new()
            .acquire_timeout(timeout)
            .after_connect(move |conn, _| {
                let warned = warned.clone();
                Box::pin(async move {
                    limit_idle_in_transaction(conn).await?;
                    require_durable_commits(conn, &warned).await
                })
            })
            .connect_with(options)
            .await
            .map_err(|error| match error {
                sqlx::Error::PoolTimedOut => StoreError::Unreachable {
                    address,
                    waited: timeout,
                },
                other => StoreError::Database(other),
            })?;
        Self::migrated(pool).await
    }

    /// Uses an existing pool (to choose its size or timeouts) and brings the schema up to date.
    /// The pool's sessions are left as they are: set `idle_in_transaction_session_timeout`
    /// yourself, and keep `synchronous_commit` on; a warning is logged if a session has it
    /// `off` (see the module doc).
    pub async fn with_pool(pool: PgPool) -> Result<Self, StoreError> {
        if let Some(source) = commits_not_durable(&mut *pool.acquire().await?).await? {
            tracing::warn!(
                %source,
                "synchronous_commit is off in the sessions of the pool given to the PostgreSQL \
                 store: saves become visible, and are relayed, before they are durable, so a \
                 database crash can lose events consumers have already seen; set it to on"
            );
        }
        Self::migrated(pool).await
    }

    /// Brings the schema of `pool`'s database up to date and makes the store of it.
    async fn migrated(pool: PgPool) -> Result<Self, StoreError> {
        let mut migrator = sqlx::migrate!("migrations/postgres");
        // An older version must still start against a database a newer one migrated (a rolling
        // deploy, or the old relay publishing what the new one cannot: see docs/contracts.md), so
        // applied migrations this build does not know are ignored. That is only safe while every
        // migration is additive, so that older versions' reads and writes work unchanged: new
        // tables, indexes, and columns that are nullable or have a default; never a rename, a drop,
        // a type change, a constraint that older versions' writes could break, or a new meaning for
        // data they read or write (tests/store_migrations.rs checks the SQL). A migration both
        // versions know still fails on a checksum mismatch (`VersionMismatch`).
        migrator.set_ignore_missing(true);
        migrate_without_queueing(&pool, &migrator).await?;
        Ok(Self {
            pool,
            prune_chunk: PRUNE_CHUNK,
            listener_check: ListenerCheck::default(),
        })
    }

    /// Sets how many events one retention transaction deletes at most ([`PRUNE_CHUNK`] unless
    /// set; at least 1). Saves do not wait for a prune here (it deletes other rows), but one
    /// DELETE of everything past retention, millions of events after a long outage or when
    /// retention is first enabled, is one huge transaction: a burst of WAL that replicas fall
    /// behind on, a snapshot held for minutes that keeps vacuum from cleaning up any table
    /// (`outbox_head`, which every save updates, included), and a retention task stuck in it.
    /// In chunks, each its own transaction, each of these stays small.
    pub fn with_prune_chunk(mut self, events: usize) -> Self {
        self.prune_chunk = events.max(1);
        self
    }

    pub(crate) fn prune_chunk(&self) -> usize {
        self.prune_chunk
    }

    /// Sets when the relay's listening session must show that it is still connected
    /// ([`ListenerCheck::default`] unless set).
    pub fn with_listener_check(mut self, check: ListenerCheck) -> Self {
        self.listener_check = check;
        self
    }

    pub(crate) fn listener_check(&self) -> ListenerCheck {
        self.listener_check
    }

    /// The connection pool, for modules that keep their own tables in the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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
        let mut tx = self.pool.begin_with(BEGIN_SAVE).await?;
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
            // The failed statement aborted the transaction: the version is read outside it.
            tx.rollback().await?;
            if !is_stream_version_clash(&error) {
                return Err(error);
            }
            let actual = self.stored_version(book_id).await?;
            return Err(conflict(book_id, expected, actual));
        }
        tx.commit().await?;
        Ok(events)
    }
}

impl EventStore for PostgresStore {
    async fn load_book(&self, book_id: BookId) -> Result<Option<Book>, StoreError> {
        let row: Option<BookRow> = sqlx::query_as(
            "SELECT book_id, title, author, isbn, price, description, version, removed
             FROM books WHERE book_id = $1",
        )
        .bind(book_id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(read_failed)?;
        row.map(BookRow::into_book).transpose()
    }

    async fn list_books(&self) -> Result<Vec<Book>, StoreError> {
        let rows: Vec<BookRow> = sqlx::query_as(
            "SELECT book_id, title, author, isbn, price, description, version, removed
             FROM books WHERE NOT removed ORDER BY title, book_id",
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
             FROM events WHERE stream = $1 ORDER BY stream_version",
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
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT position, event_id, event_type, stream, stream_version, aggregate_id,
                    occurred_at, correlation_id, causation_id, traceparent, payload,
                    schema_fingerprint
             FROM events WHERE position > $1 ORDER BY position LIMIT $2",
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

/// How long a session of the store may sit idle inside a transaction before PostgreSQL ends
/// it, releasing its locks, where nothing else sets `idle_in_transaction_session_timeout`.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";

/// Sets [`IDLE_IN_TRANSACTION_TIMEOUT`] for the session unless the timeout is set already (by
/// the URL's options, the role or the database): `0` means it is not.
async fn limit_idle_in_transaction(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('idle_in_transaction_session_timeout', $1, false) \
         WHERE current_setting('idle_in_transaction_session_timeout') = '0'",
    )
    .bind(IDLE_IN_TRANSACTION_TIMEOUT)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets `synchronous_commit` to `on` for the session if it is `off` (see the module doc), and
/// says so once per pool (`warned`). Other values are as strong or chosen by the operator
/// (`local`, `remote_write`, `remote_apply`), and are left alone.
async fn require_durable_commits(
    conn: &mut PgConnection,
    warned: &AtomicBool,
) -> Result<(), sqlx::Error> {
    let Some(source) = commits_not_durable(conn).await? else {
        return Ok(());
    };
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut *conn)
        .await?;
    if !warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            %source,
            "synchronous_commit is off for the PostgreSQL store's sessions; the store sets it \
             to on in its own sessions, as saves would otherwise become visible, and be relayed, \
             before they are durable"
        );
    }
    Ok(())
}

/// Where the session's `synchronous_commit` `off` comes from (`database`, `user`, `client`,
/// …), or `None` if it is not `off`.
async fn commits_not_durable(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT source FROM pg_settings WHERE name = 'synchronous_commit' AND setting = 'off'",
    )
    .fetch_optional(conn)
    .await
}

/// How a save begins its transaction: at READ COMMITTED whatever the database's default (see
/// the module doc).
const BEGIN_SAVE: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// A serialization failure or a deadlock is [`StoreError::Contention`], which the service
/// retries; a data exception (SQLSTATE class 22) or an integrity violation (class 23; the one
/// that means a concurrent save of the same book is a `Conflict` by now) is
/// [`StoreError::Rejected`]; other errors stay as they are.
fn classify_save_error(error: StoreError) -> StoreError {
    let StoreError::Database(sqlx::Error::Database(db)) = error else {
        return error;
    };
    let code = db.code().map(|code| code.into_owned()).unwrap_or_default();
    let error = sqlx::Error::Database(db);
    match code.as_str() {
        "40001" | "40P01" => StoreError::Contention(error),
        code if code.starts_with("22") || code.starts_with("23") => StoreError::Rejected(error),
        _ => StoreError::Database(error),
    }
}

/// Whether the book row was written; when not, the version found instead.
enum Written {
    Yes,
    No { actual: Option<u64> },
}

/// Inserts a new book or updates it if it still has the expected version.
///
/// A new book uses `ON CONFLICT DO NOTHING` rather than catching the unique violation, which
/// would abort the transaction; this way the conflicting version can still be read in it. A
/// concurrent insert of the same id makes this statement wait for that transaction's outcome.
async fn write_book(conn: &mut PgConnection, change: &BookChange) -> Result<Written, StoreError> {
    let book = &change.state;
    let sql = match change.expected_version {
        None => {
            "INSERT INTO books (book_id, title, author, isbn, price, description, version, removed)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (book_id) DO NOTHING"
        }
        Some(_) => {
            "UPDATE books
             SET title = $2, author = $3, isbn = $4, price = $5, description = $6, version = $7,
                 removed = $8, updated_at = now()
             WHERE book_id = $1 AND version = $9"
        }
    };
    let mut query = sqlx::query(sql)
        .bind(book.book_id.as_uuid())
        .bind(book.title.as_str())
        .bind(book.author.as_str())
        .bind(book.isbn.as_deref())
        .bind(book.price.amount())
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
    conn: &mut PgConnection,
    book_id: BookId,
) -> Result<Option<u64>, StoreError> {
    let version: Option<i64> = sqlx::query_scalar("SELECT version FROM books WHERE book_id = $1")
        .bind(book_id.as_uuid())
        .fetch_optional(conn)
        .await
        .map_err(read_failed)?;
    version.map(|v| to_u64(v, "books.version")).transpose()
}

/// Moves the head forward by `count`, queues the notification of the new head and returns the
/// last position reserved.
///
/// This takes the row lock that serialises appends, so it runs as late as possible: only the
/// event insert follows it before COMMIT. The notification rides in the same round trip;
/// PostgreSQL holds it back until COMMIT and drops it on ROLLBACK.
async fn reserve_positions(conn: &mut PgConnection, count: usize) -> Result<u64, StoreError> {
    let count = to_i64(count as u64, "event count")?;
    let last: i64 = sqlx::query_scalar(
        "WITH reserved AS (
             UPDATE outbox_head SET last_position = last_position + $1 WHERE id = 1
             RETURNING last_position
         )
         SELECT last_position, pg_notify($2, last_position::text) FROM reserved",
    )
    .bind(count)
    .bind(OUTBOX_CHANNEL)
    .fetch_optional(conn)
    .await?
    .ok_or_else(missing_head)?;
    to_u64(last, "outbox_head.last_position")
}

/// All events of one change in a single multi-row INSERT.
async fn insert_events(conn: &mut PgConnection, events: &[StoredEvent]) -> Result<(), StoreError> {
    let mut insert = QueryBuilder::<Postgres>::new(INSERT_EVENTS);
    insert.push_values(event_columns(events)?, |mut row, columns| {
        let meta = columns.metadata;
        row.push_bind(columns.position)
            .push_bind(meta.event_id)
            .push_bind(meta.event_type.as_str())
            .push_bind(meta.stream.as_str())
            .push_bind(columns.version)
            .push_bind(meta.aggregate_id.as_uuid())
            .push_bind(meta.occurred_at)
            .push_bind(meta.correlation_id)
            .push_bind(meta.causation_id)
            .push_bind(meta.traceparent.as_deref())
            .push_bind(columns.payload)
            .push_bind(columns.schema_fingerprint);
    });
    insert.build().execute(conn).await?;
    Ok(())
}

fn is_stream_version_clash(error: &StoreError) -> bool {
    match error {
        StoreError::Database(sqlx::Error::Database(db)) => {
            db.is_unique_violation() && db.constraint() == Some("events_stream_version_unique")
        }
        _ => false,
    }
}

#[derive(sqlx::FromRow)]
struct BookRow {
    book_id: Uuid,
    title: String,
    author: String,
    isbn: Option<String>,
    price: Decimal,
    description: Option<String>,
    version: i64,
    removed: bool,
}

impl BookRow {
    fn into_book(self) -> Result<Book, StoreError> {
        let book_id = BookId::new(self.book_id);
        let price = Price::new(self.price).map_err(|error| {
            StoreError::Corrupt(format!("book {book_id} has price {}: {error}", self.price))
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
    event_id: Uuid,
    event_type: String,
    stream: String,
    stream_version: i64,
    aggregate_id: Uuid,
    occurred_at: DateTime<Utc>,
    correlation_id: Uuid,
    causation_id: Uuid,
    traceparent: Option<String>,
    payload: Vec<u8>,
    schema_fingerprint: Option<i64>,
}

impl EventRow {
    fn into_event(self) -> Result<StoredEvent, StoreError> {
        Ok(StoredEvent {
            position: to_u64(self.position, "events.position")?,
            metadata: EventMetadata {
                event_id: self.event_id,
                event_type: self.event_type,
                stream: self.stream,
                aggregate_id: BookId::new(self.aggregate_id),
                aggregate_version: to_u64(self.stream_version, "events.stream_version")?,
                occurred_at: self.occurred_at,
                correlation_id: self.correlation_id,
                causation_id: self.causation_id,
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

/// A value that does not decode is corrupt data, not an outage.
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

/// Runs the migrations not applied yet, each waiting at most [`MIGRATION_LOCK_TIMEOUT`] for a
/// lock, and tries again for as long as a lock is held (logging who holds it up), so that a
/// migration never sits in a table's lock queue in front of the saves.
async fn migrate_without_queueing(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<(), StoreError> {
    loop {
        let mut conn = pool.acquire().await?;
        let timeout_ms = MIGRATION_LOCK_TIMEOUT.as_millis();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET lock_timeout = {timeout_ms}"
        )))
        .execute(&mut *conn)
        .await?;
        // `run_direct` is what `run` calls on the connection it acquires; `run` on a borrowed
        // connection makes this future not `Send` (sqlx's "Acquire is not general enough").
        let error = match migrator.run_direct(None, &mut *conn, false).await {
            Ok(()) => {
                // Back to the pool as it came.
                sqlx::query("RESET lock_timeout")
                    .execute(&mut *conn)
                    .await?;
                return Ok(());
            }
            Err(error) => error,
        };
        // sqlx unlocks its advisory lock only after a success: the session ends with it.
        conn.close_on_drop();
        if !waited_for_a_lock(&error) {
            return Err(error.into());
        }
        tracing::warn!(
            %error,
            waited = ?MIGRATION_LOCK_TIMEOUT,
            retry_in = ?MIGRATION_RETRY_PAUSE,
            "a migration could not take its lock: another session holds the table (a long \
             transaction, a backup) or another instance is migrating; trying again"
        );
        drop(conn);
        tokio::time::sleep(MIGRATION_RETRY_PAUSE).await;
    }
}

/// Whether a migration failed on `lock_timeout` (SQLSTATE 55P03, lock_not_available).
fn waited_for_a_lock(error: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let (MigrateError::Execute(error) | MigrateError::ExecuteMigration(error, _)) = error else {
        return false;
    };
    error
        .as_database_error()
        .and_then(|error| error.code())
        .is_some_and(|code| code == "55P03")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::{Duration, Instant};

    use super::*;

    #[tokio::test]
    async fn a_server_that_refuses_connections_is_named_in_the_error() {
        // Port 1 on loopback: nothing listens, so every attempt is refused at once.
        let options = PgConnectOptions::from_str("postgres://u:hunter2@127.0.0.1:1/x").unwrap();
        let started = Instant::now();
        let error = PostgresStore::connect_within(options, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let message = error.to_string();
        assert!(matches!(error, StoreError::Unreachable { .. }), "{message}");
        assert!(message.contains("127.0.0.1:1"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}
