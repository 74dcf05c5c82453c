//! What the relay needs of PostgreSQL: checkpoint, lease, retention and LISTEN for commits.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{
    CommitSignal, OUTBOX_CHANNEL, Outbox, PRUNE_PAUSE, PostgresStore, StoreError, to_i64, to_u64,
};

/// Takes the lease when it is free, expired or already the holder's. Times are the database's
/// clock in epoch milliseconds.
const ACQUIRE_LEASE: &str = "INSERT INTO relay_lease (name, holder, expires_at_ms) VALUES ($1, $2, (extract(epoch from clock_timestamp()) * 1000)::bigint + $3) \
     ON CONFLICT (name) DO UPDATE \
     SET holder = EXCLUDED.holder, expires_at_ms = EXCLUDED.expires_at_ms \
     WHERE relay_lease.holder = EXCLUDED.holder OR relay_lease.expires_at_ms < (extract(epoch from clock_timestamp()) * 1000)::bigint \
     RETURNING holder";

/// One chunk of retention: of the first `$4` events after position `$1` up to the lowest
/// checkpoint of all relays, deletes those before the first that committed less than `$3`
/// seconds ago, and none at all unless relay `$2` has a checkpoint itself; returns how many it
/// deleted and the last of their positions.
///
/// It reads at most `$4` events by the primary key, whatever lies inside retention:
/// `committed_at` has no index (one would cost every save), and a chunk that looked for old
/// events anywhere below the checkpoint would read every event inside retention on every run.
/// Positions are handed out in commit order, so `committed_at` grows with them, but not
/// strictly: it is when the save's transaction began, and one that began earlier can take its
/// positions after one that began later. An old event after a younger one therefore stays until
/// the younger one is old too, erring on keeping; an event inside retention or past a relay's
/// checkpoint is never deleted.
///
/// What may go is decided anew by each chunk. The next chunk starts after the last position
/// deleted instead of at the start of the table: deleted rows stay in the primary key index,
/// as dead entries, until vacuum, and every chunk would walk over all of them again.
///
/// `= ANY (ARRAY(…))`, not `IN (…)`: with `IN`, PostgreSQL 15 hash-joined the chunk's
/// positions against a sequential scan of the whole table (380 ms per chunk of 10,000 on 2
/// million events), so every chunk read all of it; with an array it looks each position up in
/// the primary key (30 ms).
const PRUNE_CHUNK_AFTER: &str = "WITH chunk AS MATERIALIZED ( \
         SELECT position, committed_at FROM events \
         WHERE position > $1 \
           AND position <= (SELECT min(position) FROM relay_checkpoint) \
           AND EXISTS (SELECT 1 FROM relay_checkpoint WHERE name = $2) \
         ORDER BY position LIMIT $4), \
     deleted AS ( \
         DELETE FROM events WHERE position = ANY (ARRAY( \
             SELECT position FROM chunk \
             WHERE position < (SELECT coalesce(min(position), 9223372036854775807) FROM chunk \
                               WHERE committed_at >= now() - make_interval(secs => $3)))) \
         RETURNING position) \
     SELECT count(*), max(position) FROM deleted";

impl Outbox for PostgresStore {
    async fn store_id(&self) -> Result<String, StoreError> {
        let id = sqlx::query_scalar("SELECT store_id FROM store_identity WHERE id = 1")
            .fetch_one(self.pool())
            .await?;
        Ok(id)
    }

    async fn published_position(&self, relay: &str) -> Result<u64, StoreError> {
        let position: Option<i64> =
            sqlx::query_scalar("SELECT position FROM relay_checkpoint WHERE name = $1")
                .bind(relay)
                .fetch_optional(self.pool())
                .await?;
        to_u64(position.unwrap_or(0), "relay_checkpoint.position")
    }

    async fn record_published(&self, relay: &str, position: u64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO relay_checkpoint (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE \
             SET position = GREATEST(relay_checkpoint.position, EXCLUDED.position), \
                 updated_at = now()",
        )
        .bind(relay)
        .bind(to_i64(position, "position")?)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Deletes in chunks of [`PostgresStore::with_prune_chunk`] events, each its own statement
    /// and so its own transaction, pausing between them.
    async fn prune_published(&self, relay: &str, older_than: Duration) -> Result<u64, StoreError> {
        let chunk = self.prune_chunk();
        let mut after = 0;
        let mut deleted = 0;
        loop {
            let (chunk_deleted, last): (i64, Option<i64>) = sqlx::query_as(PRUNE_CHUNK_AFTER)
                .bind(after)
                .bind(relay)
                .bind(older_than.as_secs_f64())
                .bind(i64::try_from(chunk).unwrap_or(i64::MAX))
                .fetch_one(self.pool())
                .await?;
            let chunk_deleted = to_u64(chunk_deleted, "deleted events")?;
            deleted += chunk_deleted;
            // A chunk short of full met the checkpoint or an event inside retention.
            match last {
                Some(last) if chunk_deleted >= chunk as u64 => after = last,
                _ => return Ok(deleted),
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
        let acquired: Option<String> = sqlx::query_scalar(ACQUIRE_LEASE)
            .bind(name)
            .bind(holder)
            .bind(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
            .fetch_optional(self.pool())
            .await?;
        Ok(acquired.is_some())
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM relay_lease WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// A page of 500 events took 2-5 ms to read (the server's query, then decoding the rows),
    /// against 1-2 ms to hand to the producer.
    fn reads_ahead(&self) -> bool {
        true
    }

    async fn commit_signal(&self) -> Result<CommitSignal, StoreError> {
        let listener = listen(self.pool()).await?;
        Ok(CommitSignal::Postgres(PgCommitSignal::spawn(
            self.pool().clone(),
            listener,
            self.listener_check(),
        )))
    }
}

/// The outbox channel's notifications, read on a task of its own as they arrive and turned
/// into one coalescing wake-up.
///
/// Reading all the time matters: PostgreSQL keeps a notification in its queue (one for the
/// whole server) until every session listening has taken it, and a session can only hand over
/// as many as its connection's buffers hold. A listener read only while the relay waits for
/// commits (not while it retries a Kafka outage, say) would stall its session and make the
/// queue grow with every save, until every COMMIT that notifies fails with "too many
/// notifications in the NOTIFY queue".
///
/// A session that is silent for long is asked a query (see [`ListenerCheck`]), so that a
/// connection that died without a word is replaced rather than listened to for good.
///
/// Dropping it ends the task and with it the listening session (its connection goes back to
/// the pool); closing the pool ends the task too.
pub struct PgCommitSignal {
    commits: Arc<Notify>,
    task: JoinHandle<()>,
}

/// First pause before listening again after the listener broke; doubles up to the maximum.
const RELISTEN_MIN_PAUSE: Duration = Duration::from_millis(500);
const RELISTEN_MAX_PAUSE: Duration = Duration::from_secs(5);

/// When the listening session must show that it is still connected: after `silent_for`
/// without a notification, it must answer a query within `answer_within`, or it is replaced by
/// a new one (and the relay polls over the gap).
///
/// A connection can die without a word: a NAT gateway or load balancer that forgets an idle
/// connection (AWS's NAT gateway does after 350 s), a failover that moves the server's address,
/// a cable pulled. The client learns of it only when it sends something, and a listening
/// session only ever reads; sqlx sets no TCP keepalive. Without the check such a session was
/// listened to for good, and every commit after it waited for the relay's next poll (250 ms by
/// default) instead of waking it. The query also keeps an idle connection from being forgotten
/// in the first place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerCheck {
    pub silent_for: Duration,
    pub answer_within: Duration,
}

impl Default for ListenerCheck {
    /// 30 s silent, 10 s to answer: well inside the idle timeouts of NAT gateways and load
    /// balancers (4 min and more), and a query every 30 s costs nothing.
    fn default() -> Self {
        Self {
            silent_for: Duration::from_secs(30),
            answer_within: Duration::from_secs(10),
        }
    }
}

impl ListenerCheck {
    /// Whether `listener`'s session answers a query in time. A notification that arrives
    /// meanwhile is kept for the next `try_recv`. The query is the session's `LISTEN` again,
    /// which changes nothing (PostgreSQL ignores a LISTEN for a channel the session listens
    /// on) and keeps it named in `pg_stat_activity` as the session that listens.
    async fn ask(&self, listener: &mut PgListener) -> Result<(), ListenerBroke> {
        let listen_again = format!("LISTEN \"{OUTBOX_CHANNEL}\"");
        let query = sqlx::query(sqlx::AssertSqlSafe(listen_again)).execute(&mut *listener);
        match tokio::time::timeout(self.answer_within, query).await {
            Ok(answer) => answer.map(drop).map_err(ListenerBroke::Database),
            Err(_) => Err(ListenerBroke::Unanswered(*self)),
        }
    }
}

/// Why the listening session is given up.
#[derive(Debug, thiserror::Error)]
enum ListenerBroke {
    #[error("{0}")]
    Database(sqlx::Error),
    /// The session's connection is most likely dead. Dropping the listener makes sqlx send
    /// `UNLISTEN *` on it from a task of its own, which holds the connection (one of the pool's)
    /// until the operating system gives the connection up.
    #[error(
        "its session did not answer a query within {:?} after {:?} without a notification",
        .0.answer_within,
        .0.silent_for
    )]
    Unanswered(ListenerCheck),
}

impl PgCommitSignal {
    fn spawn(pool: PgPool, listener: PgListener, check: ListenerCheck) -> Self {
        let commits = Arc::new(Notify::new());
        let task = tokio::spawn(drain(pool, listener, commits.clone(), check));
        Self { commits, task }
    }

    /// Completes when a notification arrived since the last call, or the listener broke or
    /// listens again.
    pub async fn committed(&self) {
        self.commits.notified().await;
    }
}

impl Drop for PgCommitSignal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for PgCommitSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCommitSignal").finish_non_exhaustive()
    }
}

/// A session of `pool` that listens on the outbox channel.
async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(OUTBOX_CHANNEL).await?;
    Ok(listener)
}

/// Reads every notification as it arrives and signals `commits` (`notify_one`, so a wake-up
/// that finds the relay busy is kept for its next wait). When the listener fails, it signals
/// as well (the relay polls, covering the gap) and listens anew on a fresh session, pausing
/// between attempts while the database is out of reach. Ends when the pool is closed.
///
/// `try_recv`, not `recv`: when the session's connection ends in some ways (end of stream,
/// aborted, timed out, broken pipe), sqlx listens again on a new one by itself, and `recv`
/// hides that, so the commits made in between, whose notifications went nowhere, woke nobody.
/// `try_recv` says so; other failures (a reset, a FATAL from the server) are errors here, and
/// so is a session that stays silent and then does not answer `check`'s query in time.
///
/// Waiting for `try_recv` under a timeout is safe: sqlx keeps what it has read of a message
/// in the connection's buffer until the whole message is there, so a wait cut short loses none.
async fn drain(pool: PgPool, mut listener: PgListener, commits: Arc<Notify>, check: ListenerCheck) {
    loop {
        let error = match tokio::time::timeout(check.silent_for, listener.try_recv()).await {
            Ok(Ok(Some(_notification))) => {
                commits.notify_one();
                continue;
            }
            Ok(Ok(None)) => {
                // sqlx has connected and listens again (it reconnects eagerly, before this
                // returns); what committed while nobody listened is found by this poll.
                tracing::warn!("outbox listener lost its session and listens on a new one");
                commits.notify_one();
                continue;
            }
            Ok(Err(_)) if pool.is_closed() => return,
            Ok(Err(error)) => ListenerBroke::Database(error),
            Err(_silent) => match check.ask(&mut listener).await {
                Ok(()) => continue,
                Err(error) => error,
            },
        };
        tracing::warn!(%error, "outbox listener failed; polling until it listens again");
        commits.notify_one();
        drop(listener);
        let mut pause = RELISTEN_MIN_PAUSE;
        listener = loop {
            tokio::time::sleep(pause).await;
            // Bounded too: the pool's idle connections may have died with the listener's,
            // and a dead one takes a ping or a LISTEN that never comes back. Giving up on it
            // drops it, so the next attempt takes another one or connects anew.
            match tokio::time::timeout(check.answer_within, listen(&pool)).await {
                Ok(Ok(listener)) => break listener,
                Ok(Err(_)) if pool.is_closed() => return,
                Ok(Err(error)) => tracing::debug!(%error, "outbox listener cannot listen yet"),
                Err(_) => tracing::debug!(
                    waited = ?check.answer_within,
                    "outbox listener got no answer when it listened again; trying again"
                ),
            }
            pause = (pause * 2).min(RELISTEN_MAX_PAUSE);
        };
        tracing::info!("outbox listener listens again");
        // What committed while nobody listened is found by the poll this triggers.
        commits.notify_one();
    }
}
