//! What the relay needs of SQLite: checkpoint, lease, retention and an in-process commit signal.

use std::time::Duration;

use super::{CommitSignal, Outbox, SqliteStore, StoreError, to_i64, to_u64};

/// Takes the lease when it is free, expired or already the holder's. Times are the database's
/// clock in epoch milliseconds (julianday works on every SQLite version).
const ACQUIRE_LEASE: &str = "INSERT INTO relay_lease (name, holder, expires_at_ms) VALUES (?1, ?2, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) + ?3) \
     ON CONFLICT (name) DO UPDATE \
     SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
     WHERE relay_lease.holder = excluded.holder OR relay_lease.expires_at_ms < CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) \
     RETURNING holder";

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

    async fn prune_published(&self, relay: &str, older_than: Duration) -> Result<u64, StoreError> {
        // The lowest checkpoint of all relays, and none unless `relay` has one. committed_at
        // is ISO-8601 text in UTC, so text order is time order.
        let deleted = sqlx::query(
            "DELETE FROM events \
             WHERE position <= (SELECT min(position) FROM relay_checkpoint) \
               AND EXISTS (SELECT 1 FROM relay_checkpoint WHERE name = ?1) \
               AND committed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2)",
        )
        .bind(relay)
        .bind(format!("-{} seconds", older_than.as_secs_f64()))
        .execute(self.pool())
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let acquired: Option<String> = sqlx::query_scalar(ACQUIRE_LEASE)
            .bind(name)
            .bind(holder)
            .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
            .fetch_optional(self.pool())
            .await?;
        Ok(acquired.is_some())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM relay_lease WHERE name = ?1 AND holder = ?2")
            .bind(name)
            .bind(holder)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn commit_signal(&self) -> Result<CommitSignal, StoreError> {
        Ok(CommitSignal::Local(self.commits()))
    }

    /// Pages are read in process by rusqlite; overlapping them with the sends measured slower.
    fn reads_ahead(&self) -> bool {
        false
    }
}
