//! `AnyStore`: the adapter chosen at run time from the database URL.
//!
//! An enum rather than `Box<dyn EventStore>`: the port's methods return `impl Future`, which is
//! not object safe, and two variants are all there will be.

use std::time::Duration;

use super::{BookChange, CommitSignal, EventStore, Outbox, PostgresStore, SqliteStore, StoreError};
use crate::domain::{Book, BookId, StoredEvent};

/// Either adapter, behind the one [`EventStore`] port.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// Which adapter a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl AnyStore {
    /// Connects to `postgres://…` / `postgresql://…` (PostgreSQL), or to `sqlite:…` or a plain
    /// file path (SQLite, the file created if missing). Any other scheme is
    /// [`StoreError::UnsupportedUrl`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        match backend_of(url) {
            Some(Backend::Postgres) => Ok(AnyStore::Postgres(PostgresStore::connect(url).await?)),
            Some(Backend::Sqlite) => Ok(AnyStore::Sqlite(SqliteStore::connect(url).await?)),
            // The scheme alone: the rest may hold a password.
            None => Err(StoreError::UnsupportedUrl(
                url.split_once(':')
                    .map_or(url, |(scheme, _)| scheme)
                    .to_owned(),
            )),
        }
    }
}

/// A text without a URL scheme is a file path. A one-letter "scheme" is a Windows drive.
fn backend_of(url: &str) -> Option<Backend> {
    let Some((scheme, _)) = url.split_once(':') else {
        return Some(Backend::Sqlite);
    };
    let is_scheme = scheme.len() > 1
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !is_scheme {
        return Some(Backend::Sqlite);
    }
    match scheme.to_ascii_lowercase().as_str() {
        "postgres" | "postgresql" => Some(Backend::Postgres),
        "sqlite" => Some(Backend::Sqlite),
        _ => None,
    }
}

/// Runs the same call on whichever adapter `self` holds.
macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($store) => $call.await,
            AnyStore::Postgres($store) => $call.await,
        }
    };
}

impl EventStore for AnyStore {
    async fn load_book(&self, book_id: BookId) -> Result<Option<Book>, StoreError> {
        delegate!(self, store => store.load_book(book_id))
    }

    async fn list_books(&self) -> Result<Vec<Book>, StoreError> {
        delegate!(self, store => store.list_books())
    }

    async fn save(&self, change: BookChange) -> Result<Vec<StoredEvent>, StoreError> {
        delegate!(self, store => store.save(change))
    }

    async fn read_stream(&self, stream: &str) -> Result<Vec<StoredEvent>, StoreError> {
        delegate!(self, store => store.read_stream(stream))
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        delegate!(self, store => store.read_after(after, limit))
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        delegate!(self, store => store.head_position())
    }
}

impl Outbox for AnyStore {
    async fn store_id(&self) -> Result<String, StoreError> {
        delegate!(self, store => store.store_id())
    }

    async fn published_position(&self, relay: &str) -> Result<u64, StoreError> {
        delegate!(self, store => store.published_position(relay))
    }

    async fn record_published(&self, relay: &str, position: u64) -> Result<(), StoreError> {
        delegate!(self, store => store.record_published(relay, position))
    }

    async fn prune_published(&self, relay: &str, older_than: Duration) -> Result<u64, StoreError> {
        delegate!(self, store => store.prune_published(relay, older_than))
    }

    async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        delegate!(self, store => store.try_acquire_lease(name, holder, ttl))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        delegate!(self, store => store.release_lease(name, holder))
    }

    fn reads_ahead(&self) -> bool {
        match self {
            AnyStore::Sqlite(store) => store.reads_ahead(),
            AnyStore::Postgres(store) => store.reads_ahead(),
        }
    }

    async fn commit_signal(&self) -> Result<CommitSignal, StoreError> {
        delegate!(self, store => store.commit_signal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_choose_postgres() {
        for url in [
            "postgres://u:p@localhost/db",
            "postgresql://localhost/db",
            "POSTGRES://localhost/db",
        ] {
            assert_eq!(backend_of(url), Some(Backend::Postgres), "{url}");
        }
    }

    #[test]
    fn sqlite_urls_and_file_paths_choose_sqlite() {
        for url in [
            "sqlite:bookstore.db",
            "sqlite://data/bookstore.db?mode=rwc",
            "bookstore.db",
            "./data/bookstore.db",
            "/var/lib/bookstore/bookstore.db",
            r"C:\data\bookstore.db",
        ] {
            assert_eq!(backend_of(url), Some(Backend::Sqlite), "{url}");
        }
    }

    #[test]
    fn other_schemes_are_unsupported() {
        for url in [
            "mysql://localhost/db",
            "http://example.com",
            "file:bookstore.db",
        ] {
            assert_eq!(backend_of(url), None, "{url}");
        }
    }
}
