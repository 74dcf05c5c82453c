//! Opening a store on a database another version set up, and the sessions PostgreSQL gives it.
//!
//! An older version must still open a database a newer one migrated (a rolling deploy, or the
//! old relay publishing what the new one cannot; see docs/contracts.md): it ignores applied
//! migrations it does not know, which is safe because migrations are additive (checked here
//! too). A migration both versions know but with another checksum still fails.
//!
//! A save's events are relayed once committed, so a commit must be durable when it becomes
//! visible: the store's own PostgreSQL sessions never run with `synchronous_commit` `off`.

mod common;
#[path = "store_suite/fixtures.rs"]
mod fixtures;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bookstore::store::{EventStore, PostgresStore, SqliteStore, StoreError};
use sqlx::migrate::MigrateError;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{PgConnection, SqlitePool};

use fixtures::{PgSchema, added, new_book, sqlite_store};

/// What a newer version leaves in `_sqlx_migrations` when it applies a migration this build
/// does not have: the next version after the newest applied one. `{}` is the placeholder of
/// the checksum.
fn future_migration(placeholder: &str) -> String {
    format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         SELECT max(version) + 1, 'added by a newer version', TRUE, {placeholder}, 1 \
         FROM _sqlx_migrations"
    )
}

/// Any checksum but the real one.
const ODD_CHECKSUM: [u8; 4] = [0xDE, 0xAD, 0xBE, 0xEF];

/// Saves a new book and reads it back: the store works.
async fn assert_saves_and_reads(store: &impl EventStore) {
    let book = new_book("Opened by an older version", "9.99");
    let saved = store.save(added(&book)).await.expect("save a book");
    assert_eq!(saved.len(), 2);
    let loaded = store.load_book(book.book_id).await.expect("load the book");
    assert_eq!(loaded, Some(book));
}

fn assert_version_mismatch(opened: Result<impl std::fmt::Debug, StoreError>) {
    match opened {
        Err(StoreError::Migration(MigrateError::VersionMismatch(1))) => {}
        other => panic!("expected VersionMismatch(1), got {other:?}"),
    }
}

async fn sqlite_migration_versions(pool: &SqlitePool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .expect("read the applied migrations")
}

async fn postgres_migration_versions(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .expect("read the applied migrations")
}

fn sqlite_path(dir: &tempfile::TempDir) -> String {
    dir.path()
        .join("bookstore.db")
        .to_str()
        .expect("UTF-8 temp path")
        .to_owned()
}

#[tokio::test]
async fn sqlite_store_opens_a_database_a_newer_version_migrated() {
    let (store, dir) = sqlite_store().await;
    sqlx::query(sqlx::AssertSqlSafe(future_migration("?1")))
        .bind(&ODD_CHECKSUM[..])
        .execute(store.pool())
        .await
        .expect("record a future migration");
    let versions = sqlite_migration_versions(store.pool()).await;
    store.pool().close().await;
    drop(store);

    let store = SqliteStore::connect(&sqlite_path(&dir))
        .await
        .expect("an older version opens the database");
    assert_saves_and_reads(&store).await;
    assert_eq!(sqlite_migration_versions(store.pool()).await, versions);
}

#[tokio::test]
async fn sqlite_store_refuses_a_known_migration_with_another_checksum() {
    let (store, dir) = sqlite_store().await;
    sqlx::query("UPDATE _sqlx_migrations SET checksum = ?1 WHERE version = 1")
        .bind(&ODD_CHECKSUM[..])
        .execute(store.pool())
        .await
        .expect("alter a checksum");
    store.pool().close().await;
    drop(store);

    assert_version_mismatch(SqliteStore::connect(&sqlite_path(&dir)).await);
}

#[tokio::test]
async fn postgres_store_opens_a_database_a_newer_version_migrated() {
    let schema = PgSchema::create().await;
    let store = schema.store().await;
    sqlx::query(sqlx::AssertSqlSafe(future_migration("$1")))
        .bind(&ODD_CHECKSUM[..])
        .execute(store.pool())
        .await
        .expect("record a future migration");
    let versions = postgres_migration_versions(store.pool()).await;
    store.pool().close().await;

    // Both ways in: the store's own connections, and a pool of the caller's.
    let store = PostgresStore::connect_with_options(schema.options())
        .await
        .expect("an older version connects");
    assert_saves_and_reads(&store).await;
    store.pool().close().await;
    let store = schema.store().await;
    assert_saves_and_reads(&store).await;
    assert_eq!(postgres_migration_versions(store.pool()).await, versions);
    store.pool().close().await;
    schema.drop().await;
}

#[tokio::test]
async fn postgres_store_refuses_a_known_migration_with_another_checksum() {
    let schema = PgSchema::create().await;
    let store = schema.store().await;
    sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 1")
        .bind(&ODD_CHECKSUM[..])
        .execute(store.pool())
        .await
        .expect("alter a checksum");
    store.pool().close().await;

    assert_version_mismatch(PostgresStore::connect_with_options(schema.options()).await);
    schema.drop().await;
}

/// Ignoring a newer version's migrations is only safe while each migration is additive: the
/// older version's statements must work on the newer schema. Every statement of every
/// migration must be one of these kinds (a unique index on an existing table could refuse
/// older versions' writes: a new table declares its own), and an added column must be
/// nullable or have a default (else older versions' inserts fail).
#[test]
fn migrations_are_additive() {
    const ADDITIVE: [&str; 4] = [
        "CREATE TABLE ",
        "CREATE INDEX ",
        "INSERT INTO ",
        "ALTER TABLE ",
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut checked = 0;
    for backend in ["postgres", "sqlite"] {
        for entry in std::fs::read_dir(root.join(backend)).expect("read the migrations") {
            let path = entry.expect("a migration").path();
            let name = path.display();
            let text = std::fs::read_to_string(&path).expect("read a migration");
            let code: Vec<&str> = text
                .lines()
                .map(|line| line.split("--").next().unwrap_or_default())
                .collect();
            for statement in code.join("\n").split(';') {
                let statement = statement.split_whitespace().collect::<Vec<_>>().join(" ");
                if statement.is_empty() {
                    continue;
                }
                let upper = statement.to_uppercase();
                assert!(
                    ADDITIVE.iter().any(|kind| upper.starts_with(kind)),
                    "{name}: not additive: {statement}"
                );
                if upper.starts_with("ALTER TABLE ") {
                    let Some((_, column)) = upper.split_once(" ADD COLUMN ") else {
                        panic!("{name}: an ALTER TABLE that adds no column: {statement}");
                    };
                    assert!(
                        !column.contains("NOT NULL") || column.contains("DEFAULT"),
                        "{name}: a NOT NULL column without a default: {statement}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} statements found");
}

async fn synchronous_commit(conn: &mut PgConnection) -> String {
    sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(conn)
        .await
        .expect("show synchronous_commit")
}

/// The setting in each of `sessions` sessions of `pool` held at once, so that each is a
/// different connection.
async fn settings_of_sessions(pool: &PgPool, sessions: usize) -> Vec<String> {
    let mut held = vec![];
    let mut settings = vec![];
    for _ in 0..sessions {
        let mut conn = pool.acquire().await.expect("a session");
        settings.push(synchronous_commit(&mut conn).await);
        held.push(conn);
    }
    settings
}

fn with_synchronous_commit(options: PgConnectOptions, value: &str) -> PgConnectOptions {
    options.options([("synchronous_commit", value)])
}

/// The warnings logged on this thread while it runs: the tests run on a current-thread
/// runtime, so the pool's connection tasks log here too.
struct Warnings(Arc<Mutex<Vec<u8>>>);

impl Warnings {
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let buffer = Arc::new(Mutex::new(vec![]));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || SharedWriter(writer.clone()))
            .finish();
        (Self(buffer), tracing::subscriber::set_default(subscriber))
    }

    fn mentioning(&self, text: &str) -> usize {
        let logged = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        logged.lines().filter(|line| line.contains(text)).count()
    }
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn postgres_store_sessions_commit_durably_when_the_session_default_is_off() {
    let schema = PgSchema::create().await;
    let off = with_synchronous_commit(schema.options(), "off");
    // The option does reach the session: a plain pool of it commits asynchronously.
    let plain = PgPoolOptions::new()
        .connect_with(off.clone())
        .await
        .expect("connect");
    assert_eq!(settings_of_sessions(&plain, 1).await, ["off"]);
    plain.close().await;

    let (warnings, _guard) = Warnings::capture();
    let store = PostgresStore::connect_with_options(off)
        .await
        .expect("connect the store");
    assert_eq!(settings_of_sessions(store.pool(), 3).await, ["on"; 3]);
    assert_saves_and_reads(&store).await;
    assert_eq!(
        warnings.mentioning("synchronous_commit is off"),
        1,
        "one warning for all the sessions"
    );
    store.pool().close().await;
    schema.drop().await;
}

#[tokio::test]
async fn postgres_store_leaves_other_synchronous_commit_settings_alone() {
    let schema = PgSchema::create().await;
    for value in ["local", "remote_write", "remote_apply", "on"] {
        let (warnings, _guard) = Warnings::capture();
        let options = with_synchronous_commit(schema.options(), value);
        let store = PostgresStore::connect_with_options(options)
            .await
            .expect("connect the store");
        assert_eq!(settings_of_sessions(store.pool(), 2).await, [value; 2]);
        assert_eq!(warnings.mentioning("synchronous_commit"), 0, "{value}");
        store.pool().close().await;
    }
    schema.drop().await;
}

#[tokio::test]
async fn postgres_store_warns_of_a_given_pool_that_commits_asynchronously() {
    let schema = PgSchema::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(with_synchronous_commit(schema.options(), "off"))
        .await
        .expect("connect");

    let (warnings, _guard) = Warnings::capture();
    let store = PostgresStore::with_pool(pool)
        .await
        .expect("open the store");
    assert_eq!(warnings.mentioning("synchronous_commit is off"), 1);
    // The pool's sessions are the caller's: left as they are.
    assert_eq!(settings_of_sessions(store.pool(), 1).await, ["off"]);
    store.pool().close().await;
    schema.drop().await;
}

/// A migration that must wait for a table's lock (a backup, an analyst's open transaction)
/// must not sit in the lock queue in front of everything else on that table: queued behind
/// it, every save and every read of the relay would wait for as long as the other
/// transaction lasted. It gives up after a short wait, lets them through, and tries again
/// until it can take the lock.
#[tokio::test]
async fn a_pending_postgres_migration_does_not_hold_up_the_table_it_waits_for() {
    let schema = PgSchema::create().await;
    let store = schema.store().await;
    assert_saves_and_reads(&store).await;
    // As on a database an older version set up: the newest migration not applied yet.
    let newest: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        newest, 5,
        "this test undoes migration 5; update it with the migrations"
    );
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 5")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query("ALTER TABLE events DROP COLUMN schema_fingerprint")
        .execute(store.pool())
        .await
        .unwrap();
    store.pool().close().await;

    // A long transaction that has read the events.
    let holder_pool = schema.pool(1).await;
    let mut holder = holder_pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM events")
        .execute(&mut *holder)
        .await
        .unwrap();
    let options = schema.options();
    let upgrading = tokio::spawn(PostgresStore::connect_with_options(options));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    // Meanwhile another session reads the events (as the relay does), and is not held up for
    // longer than the migration's lock timeout.
    let reader_pool = schema.pool(1).await;
    let mut reader = reader_pool.acquire().await.unwrap();
    sqlx::query("SET statement_timeout = '10s'")
        .execute(&mut *reader)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    sqlx::query("SELECT count(*) FROM events")
        .execute(&mut *reader)
        .await
        .expect("the read waited behind the migration in the table's lock queue");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "the read waited {:?}",
        started.elapsed()
    );
    assert!(
        !upgrading.is_finished(),
        "migrated past a lock it could not take"
    );

    holder.rollback().await.unwrap();
    let store = tokio::time::timeout(std::time::Duration::from_secs(30), upgrading)
        .await
        .expect("the migration did not go through once the lock was free")
        .unwrap()
        .expect("the store opens once the lock is free");
    assert_eq!(
        postgres_migration_versions(store.pool()).await.last(),
        Some(&5)
    );
    assert_saves_and_reads(&store).await;
    drop(reader);
    reader_pool.close().await;
    holder_pool.close().await;
    store.pool().close().await;
    schema.drop().await;
}
