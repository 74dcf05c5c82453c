//! Brings a SQLite database's schema up to date, one process at a time.
//!
//! sqlx's SQLite migrator takes no lock (its PostgreSQL one takes an advisory lock), so two
//! processes opening a new database at once, such as `serve` and `relay` started together,
//! both applied the same migration and one failed with "table book_report already exists".
//! SQLite offers nothing to hold across sqlx's per-migration transactions, so an exclusive
//! lock on a file beside the database (`<database>-migrations.lock`) serialises them: the
//! second process waits, then finds every migration applied. The file stays, as deleting a
//! lock file would race with the next process opening it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use sqlx::SqlitePool;

use super::StoreError;

/// Holds the lock of the database file `database` until dropped; `None` for an in-memory
/// database, which no other process can see. Taken before the first connection, since a new
/// file's switch to WAL can fail at once with "database is locked" when another process
/// makes it at the same moment.
pub async fn lock(database: &Path) -> Result<Option<File>, StoreError> {
    if is_in_memory(database) {
        return Ok(None);
    }
    lock_exclusively(lock_path(database)).await.map(Some)
}

/// sqlx names the database of `sqlite::memory:` `file:sqlx-in-memory-<n>` (and keeps its
/// in-memory flag private), so that name must be recognised too, or every in-memory store
/// leaves a lock file of that name in the working directory.
fn is_in_memory(database: &Path) -> bool {
    const SQLX_IN_MEMORY: &str = "file:sqlx-in-memory-";
    database.as_os_str().is_empty()
        || database == Path::new(":memory:")
        || database
            .to_str()
            .is_some_and(|name| name.starts_with(SQLX_IN_MEMORY))
}

/// Runs the migrations of `migrations/sqlite` on `pool` (under [`lock`]).
pub async fn run(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut migrator = sqlx::migrate!("migrations/sqlite");
    // An older version must still open a database a newer one migrated (a rolling deploy, or the
    // old relay publishing what the new one cannot: see docs/contracts.md), so applied migrations
    // this build does not know are ignored. That is only safe while every migration is additive, so
    // that older versions' reads and writes work unchanged: new tables, indexes, and columns that
    // are nullable or have a default; never a rename, a drop, a type change, a constraint that
    // older versions' writes could break, or a new meaning for data they read or write
    // (tests/store_migrations.rs checks the SQL). A migration both versions know still fails on a
    // checksum mismatch (`VersionMismatch`).
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-migrations.lock");
    PathBuf::from(name)
}

/// Opens (creating) `path` and waits for an exclusive lock on it, on the blocking pool. The
/// lock is released when the file is dropped.
async fn lock_exclusively(path: PathBuf) -> Result<File, StoreError> {
    let locked = tokio::task::spawn_blocking(move || {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(|_| StoreError::Cancelled)?;
    locked.map_err(|error| {
        StoreError::Database(sqlx::Error::Io(std::io::Error::new(
            error.kind(),
            format!("locking the database for its migrations: {error}"),
        )))
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::sqlite::SqliteConnectOptions;

    use super::super::SqliteStore;

    /// Guards the name sqlx gives in-memory databases: if it changes, in-memory stores would
    /// start leaving lock files in the working directory again.
    #[tokio::test]
    async fn in_memory_databases_take_no_lock_file() {
        for url in ["sqlite::memory:", "sqlite::memory:?cache=shared"] {
            let options = SqliteConnectOptions::from_str(url).unwrap();
            let lock = super::lock(options.get_filename()).await.unwrap();
            assert!(
                lock.is_none(),
                "{url} ({}) took a lock file",
                options.get_filename().display()
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("on-disk.db");
        assert!(super::lock(&file).await.unwrap().is_some());
        assert!(dir.path().join("on-disk.db-migrations.lock").exists());
    }

    /// Several stores opening one new database at once: before the lock, the losers of the
    /// race failed with "table … already exists" or "database is locked".
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stores_opening_a_new_database_at_once_all_succeed() {
        for attempt in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("new-{attempt}.db"));
            let path = path.to_str().unwrap();
            let opened =
                futures::future::join_all((0..4).map(|_| SqliteStore::connect(path))).await;
            for store in opened {
                store.unwrap_or_else(|error| panic!("attempt {attempt}: {error}"));
            }
        }
    }
}
