//! What the relay needs of SQLite: checkpoint, lease, retention and a commit signal.

use std::time::Duration;

use super::{CommitSignal, Outbox, PRUNE_PAUSE, SqliteStore, StoreError, to_i64, to_u64};

/// Takes the lease when it is free, expired or already the holder's. Times are the database's
/// clock in epoch milliseconds (julianday works on every SQLite version).
const ACQUIRE_LEASE: &str = "INSERT INTO relay_lease (name, holder, expires_at_ms) VALUES (?1, ?2, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) + ?3) \
     ON CONFLICT (name) DO UPDATE \
     SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
     WHERE relay_lease.holder = excluded.holder OR relay_lease.expires_at_ms < CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) \
     RETURNING holder";

/// One chunk of retention: of the first `?3` events up to position `?1` (the lowest checkpoint
/// of all relays), deletes those before the first that committed at or after `?2` (the cutoff,
/// ISO-8601 text in UTC, so text order is time order).
///
/// It reads at most `?3` rows, walking the rowid from the oldest event left, whatever lies
/// inside retention. Positions are handed out in commit order, so `committed_at` grows with
/// them, but not strictly: it is the wall clock of whichever process saved, and clocks step
/// back. An old event after a younger one stays until the younger one is old too, erring on
/// keeping; an event inside retention or past a relay's checkpoint is never deleted.
const PRUNE_CHUNK_SQL: &str = "WITH chunk AS ( \
         SELECT position, committed_at FROM events \
         WHERE position <= ?1 ORDER BY position LIMIT ?3) \
     DELETE FROM events WHERE position IN ( \
         SELECT position FROM chunk \
         WHERE position < (SELECT coalesce(min(position), ?1 + 1) FROM chunk \
                           WHERE committed_at >= ?2))";

impl Outbox for SqliteStore {
    async fn store_id(&self) -> Result<String, StoreError> {
        let id = sqlx::query_scalar("SELECT store_id FROM store_identity WHERE id = 1")
            .fetch_one(self.pool())
            .await?;
        Ok(id)
    }

    async fn published_position(&self, relay: &str) -> Result<u64, StoreError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM relay_checkpoint WHERE name = ?1")
                .bind(relay)
                .fetch_optional(self.pool())
                .await?;
        to_u64(position.unwrap_or(0), "relay_checkpoint.position")
    }

    async fn record_published(&self, relay: &str, position: u64) -> Result<(), StoreError> {
        let _turn = self.writer_turn().await;
        sqlx::query(
            "INSERT INTO relay_checkpoint (name, position) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE \
             SET position = MAX(relay_checkpoint.position, excluded.position), \
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        )
        .bind(relay)
        .bind(to_i64(position, "position")?)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Deletes in chunks of [`SqliteStore::with_prune_chunk`] events, each its own short
    /// transaction, pausing between them so that waiting saves take the write lock.
    ///
    /// Each chunk reads at most that many events, the oldest left, and deletes the leading run
    /// of them that committed before the cutoff; the run ends at the first event that did not
    /// (see `PRUNE_CHUNK_SQL`). `committed_at` has no index (one would cost every save), and a
    /// chunk that looked for old events anywhere below the checkpoint would read every event
    /// inside retention, holding the write lock all along, on every run.
    async fn prune_published(&self, relay: &str, older_than: Duration) -> Result<u64, StoreError> {
        // The lowest checkpoint of all relays, and none unless `relay` has one.
        let (lowest, own): (Option<i64>, Option<bool>) =
            sqlx::query_as("SELECT min(position), max(name = ?1) FROM relay_checkpoint")
                .bind(relay)
                .fetch_one(self.pool())
                .await?;
        let (Some(lowest), Some(true)) = (lowest, own) else {
            return Ok(0);
        };
        // committed_at is ISO-8601 text in UTC, so text order is time order.
        let cutoff: String = sqlx::query_scalar("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?1)")
            .bind(format!("-{} seconds", older_than.as_secs_f64()))
            .fetch_one(self.pool())
            .await?;
        let chunk = self.prune_chunk();
        let mut deleted = 0;
        loop {
            let turn = self.writer_turn().await;
            let chunk_deleted = sqlx::query(PRUNE_CHUNK_SQL)
                .bind(lowest)
                .bind(&cutoff)
                .bind(i64::try_from(chunk).unwrap_or(i64::MAX))
                .execute(self.pool())
                .await?
                .rows_affected();
            drop(turn);
            deleted += chunk_deleted;
            // A chunk short of full met the checkpoint or an event inside retention.
            if chunk_deleted < chunk as u64 {
                return Ok(deleted);
            }
            tokio::time::sleep(PRUNE_PAUSE).await;
        }
    }

    async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let _turn = self.writer_turn().await;
        let acquired: Option<String> = sqlx::query_scalar(ACQUIRE_LEASE)
            .bind(name)
            .bind(holder)
            .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
            .fetch_optional(self.pool())
            .await?;
        Ok(acquired.is_some())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let _turn = self.writer_turn().await;
        sqlx::query("DELETE FROM relay_lease WHERE name = ?1 AND holder = ?2")
            .bind(name)
            .bind(holder)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn commit_signal(&self) -> Result<CommitSignal, StoreError> {
        Ok(CommitSignal::Local(
            self.commits(),
            self.watch_other_processes()?,
        ))
    }

    /// Pages are read in process by rusqlite; overlapping them with the sends measured slower.
    fn reads_ahead(&self) -> bool {
        false
    }
}
