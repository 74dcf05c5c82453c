//! Fixtures of the store tests: a fresh database per test, and changes built without a codec.
//!
//! Every test gets a store nobody else writes to: a temporary file for SQLite, a schema of its
//! own (`t_<uuid>`) for PostgreSQL, so tests run in parallel and positions start at 1 each time.
//! PostgreSQL comes from `BOOKSTORE_TEST_DATABASE_URL` (see `tests/common`); without it the
//! tests fail and say how to start one.
#![allow(dead_code)] // each test binary uses a different part

use std::future::Future;
use std::str::FromStr;

use bookstore::domain::{
    Book, BookFactEvent, BookId, EventMetadata, NewEvent, delta_stream, fact_stream,
};
use bookstore::store::{BookChange, PostgresStore, SqliteStore};
use chrono::Utc;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tempfile::TempDir;
use uuid::Uuid;

use crate::common;

/// A SQLite store in a file of its own; the file goes when the `TempDir` is dropped.
pub async fn sqlite_store() -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bookstore.db");
    let store = SqliteStore::connect(path.to_str().expect("UTF-8 temp path"))
        .await
        .expect("open SQLite store");
    (store, dir)
}

/// A PostgreSQL schema of one test's own, dropped by [`PgSchema::drop`].
pub struct PgSchema {
    pub name: String,
    admin: PgPool,
}

impl PgSchema {
    pub async fn create() -> Self {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&common::postgres_url())
            .await
            .expect("connect to BOOKSTORE_TEST_DATABASE_URL");
        let name = format!("t_{}", Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await
            .expect("create test schema");
        Self { name, admin }
    }

    /// Connection options whose `search_path` is this schema only.
    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&common::postgres_url())
            .expect("BOOKSTORE_TEST_DATABASE_URL is a postgres:// URL")
            .options([("search_path", self.name.as_str())])
    }

    /// A pool of `size` connections into this schema.
    pub async fn pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .connect_with(self.options())
            .await
            .expect("connect to the test schema")
    }

    /// A store in this schema, with its tables migrated.
    pub async fn store(&self) -> PostgresStore {
        self.store_with_pool(5).await
    }

    pub async fn store_with_pool(&self, size: u32) -> PostgresStore {
        PostgresStore::with_pool(self.pool(size).await)
            .await
            .expect("migrate the test schema")
    }

    /// The URL of this schema, for code that only takes a URL.
    pub fn url(&self) -> String {
        let url = common::postgres_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}options=-c%20search_path%3D{}", self.name)
    }

    pub async fn drop(self) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.name
        )))
        .execute(&self.admin)
        .await
        .expect("drop test schema");
        self.admin.close().await;
    }
}

/// A PostgreSQL database of one test's own, on the server of `BOOKSTORE_TEST_DATABASE_URL`, for
/// what a schema cannot give: NOTIFY channels of its own (they are per database), or another
/// encoding. Dropped by [`PgDatabase::drop`].
pub struct PgDatabase {
    pub name: String,
    admin: PgPool,
}

impl PgDatabase {
    /// `settings` go after `CREATE DATABASE <name>`, e.g. `ENCODING 'LATIN1' …`.
    pub async fn create(settings: &str) -> Self {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&common::postgres_url())
            .await
            .expect("connect to BOOKSTORE_TEST_DATABASE_URL");
        let name = format!("t_{}", Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} {settings}"
        )))
        .execute(&admin)
        .await
        .expect("create test database (the test role needs CREATEDB)");
        Self { name, admin }
    }

    /// Connection options for this database.
    pub fn options(&self) -> PgConnectOptions {
        PgConnectOptions::from_str(&common::postgres_url())
            .expect("BOOKSTORE_TEST_DATABASE_URL is a postgres:// URL")
            .database(&self.name)
    }

    /// A connection to the test database it was created from, to watch this one's sessions.
    pub fn admin(&self) -> &PgPool {
        &self.admin
    }

    pub async fn drop(self) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {} WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await
        .expect("drop test database");
        self.admin.close().await;
    }
}

/// Runs `body` against a store in a fresh schema, then drops the schema. A failing test keeps
/// its schema for a look afterwards.
pub async fn with_postgres_store<F, Fut>(body: F)
where
    F: FnOnce(PostgresStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let schema = PgSchema::create().await;
    let store = schema.store().await;
    body(store.clone()).await;
    store.pool().close().await;
    schema.drop().await;
}

/// A new book at version 1.
pub fn new_book(title: &str, price: &str) -> Book {
    Book {
        book_id: BookId::generate(),
        title: title.to_owned(),
        author: "Test Author".to_owned(),
        isbn: None,
        price: price.parse().expect("test price"),
        description: None,
        version: 1,
        removed: false,
    }
}

/// The change that adds `book`: `BookAdded` and its fact.
pub fn added(book: &Book) -> BookChange {
    change(None, book.clone(), "BookAdded")
}

/// The change of `book`'s price, decided against `book` as it is; returns the state after it.
pub fn repriced(book: &Book, price: &str) -> (Book, BookChange) {
    let mut next = book.clone();
    next.price = price.parse().expect("test price");
    next.version += 1;
    let change = change(Some(book.version), next.clone(), "BookPriceUpdated");
    (next, change)
}

/// The change that removes `book`; returns the state after it.
pub fn removed(book: &Book) -> (Book, BookChange) {
    let mut next = book.clone();
    next.removed = true;
    next.version += 1;
    let change = change(Some(book.version), next.clone(), "BookRemoved");
    (next, change)
}

/// One delta event and the fact, as the service would envelope them. The payload is a readable
/// placeholder: the store never looks inside it.
fn change(expected_version: Option<u64>, state: Book, delta_type: &str) -> BookChange {
    let book_id = state.book_id;
    let version = state.version;
    let delta = event(delta_stream(book_id), delta_type, book_id, version);
    let fact = event(fact_stream(book_id), BookFactEvent::TYPE, book_id, version);
    BookChange {
        expected_version,
        state,
        events: vec![delta, fact],
    }
}

pub fn event(stream: String, event_type: &str, book_id: BookId, version: u64) -> NewEvent {
    let correlation_id = Uuid::now_v7();
    NewEvent {
        metadata: EventMetadata {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_owned(),
            stream,
            aggregate_id: book_id,
            aggregate_version: version,
            occurred_at: Utc::now(),
            correlation_id,
            causation_id: correlation_id,
            traceparent: None,
        },
        payload: format!("{event_type} {book_id} v{version}").into_bytes(),
        // The high bit set: the databases keep fingerprints in signed columns.
        schema_fingerprint: 0xF00D_0000_0000_0000 | version,
    }
}
