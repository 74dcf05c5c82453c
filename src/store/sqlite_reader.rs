//! The SQLite outbox's hot read path: `read_after` on a connection of its own, outside sqlx.
//!
//! Why by hand, next to sqlx: sqlx-sqlite runs every statement on a worker thread and hands
//! each row over a channel, after copying every value of it into an owned row. Draining a
//! backlog, that cost about half of the relay's CPU in a perf profile (a thread wake-up per
//! row, the row copies and their drops), more than building and sending the Kafka records.
//! Here one blocking call reads a whole page with rusqlite straight into `StoredEvent`s. Only
//! this read goes around sqlx; every write, and every other read, still goes through the pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, Row};
use uuid::Uuid;

use super::{StoreError, fingerprint_of_column, to_u64};
use crate::domain::{BookId, EventMetadata, StoredEvent};

const READ_AFTER: &str =
    "SELECT position, event_id, event_type, stream, stream_version, aggregate_id,
            occurred_at, correlation_id, causation_id, traceparent, payload,
            schema_fingerprint
     FROM events WHERE position > ?1 ORDER BY position LIMIT ?2";

/// A read-only connection to the store's file. WAL lets it read while the pool writes.
#[derive(Debug, Clone)]
pub(super) struct OutboxReader {
    path: PathBuf,
    connection: Arc<Mutex<Connection>>,
}

impl OutboxReader {
    /// Opens `path`, which must exist (the pool created it and set it to WAL).
    pub(super) fn open(path: &Path, busy_timeout: std::time::Duration) -> Result<Self, StoreError> {
        Ok(Self {
            path: path.to_owned(),
            connection: Arc::new(Mutex::new(open_read_only(path, busy_timeout)?)),
        })
    }

    /// The database file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Committed events above `after`, in position order, at most `limit`; blocks, so callers
    /// on an async runtime run it on the blocking pool.
    pub(super) fn read_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        // A panic while holding the lock cannot leave the connection half-used: every call
        // finishes its statement before returning, so a poisoned lock is still usable.
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut statement = connection
            .prepare(READ_AFTER)
            .map_err(|error| failed(&self.path, error))?;
        let mut rows = statement
            .query((after, limit))
            .map_err(|error| failed(&self.path, error))?;
        let mut events = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(1024));
        while let Some(row) = rows.next().map_err(|error| failed(&self.path, error))? {
            events.push(event_of(row).map_err(|error| match error {
                RowError::Sqlite(error) => failed(&self.path, error),
                RowError::Store(error) => error,
            })?);
        }
        Ok(events)
    }
}

/// A read-only connection to the file at `path`, which must exist.
pub(super) fn open_read_only(
    path: &Path,
    busy_timeout: std::time::Duration,
) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection =
        Connection::open_with_flags(path, flags).map_err(|error| failed(path, error))?;
    connection
        .busy_timeout(busy_timeout)
        .map_err(|error| failed(path, error))?;
    Ok(connection)
}

enum RowError {
    Sqlite(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for RowError {
    fn from(error: rusqlite::Error) -> Self {
        match error {
            // A value of the wrong type is corrupt data, not an outage.
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..) => {
                RowError::Store(StoreError::Corrupt(error.to_string()))
            }
            other => RowError::Sqlite(other),
        }
    }
}

impl From<StoreError> for RowError {
    fn from(error: StoreError) -> Self {
        RowError::Store(error)
    }
}

fn event_of(row: &Row<'_>) -> Result<StoredEvent, RowError> {
    let position: i64 = row.get(0)?;
    let stream_version: i64 = row.get(4)?;
    Ok(StoredEvent {
        position: to_u64(position, "events.position")?,
        metadata: EventMetadata {
            event_id: uuid_at(row, 1, "events.event_id")?,
            event_type: row.get(2)?,
            stream: row.get(3)?,
            aggregate_id: BookId::new(uuid_at(row, 5, "events.aggregate_id")?),
            aggregate_version: to_u64(stream_version, "events.stream_version")?,
            occurred_at: time_at(row, 6, "events.occurred_at")?,
            correlation_id: uuid_at(row, 7, "events.correlation_id")?,
            causation_id: uuid_at(row, 8, "events.causation_id")?,
            traceparent: row.get(9)?,
        },
        payload: row.get(10)?,
        schema_fingerprint: row.get::<_, Option<i64>>(11)?.map(fingerprint_of_column),
    })
}

/// UUIDs are stored as hyphenated text.
fn uuid_at(row: &Row<'_>, index: usize, column: &str) -> Result<Uuid, RowError> {
    let text = text_at(row, index, column)?;
    Uuid::try_parse(text)
        .map_err(|error| StoreError::Corrupt(format!("{column} {text:?}: {error}")).into())
}

/// Timestamps are stored as RFC 3339 text (how sqlx writes a `DateTime<Utc>`).
fn time_at(row: &Row<'_>, index: usize, column: &str) -> Result<DateTime<Utc>, RowError> {
    let text = text_at(row, index, column)?;
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| StoreError::Corrupt(format!("{column} {text:?}: {error}")).into())
}

fn text_at<'row>(row: &'row Row<'_>, index: usize, column: &str) -> Result<&'row str, RowError> {
    row.get_ref(index)?
        .as_str()
        .map_err(|error| StoreError::Corrupt(format!("{column}: {error}")).into())
}

fn failed(path: &Path, error: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.display().to_string(),
        source: error,
    }
}
