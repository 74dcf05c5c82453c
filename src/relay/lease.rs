//! The relay lease: which instance of a store's relay may publish, renewed beside the
//! publishing rather than between its batches.
//!
//! Why beside: a batch can wait on Kafka for minutes (a broker outage holds its
//! acknowledgements up to twice the request timeout, see `KafkaConfig::relay_producer_config`,
//! and a restart retries until the broker answers). Renewed only between batches, the lease then expired, a standby took it
//! and started sending from the store's recorded position, and when the broker came back the old
//! instance's queued records went out too. In exactly-once mode the successor's
//! `init_transactions` fences them; in at-least-once mode nothing does, so one book's events
//! could land out of order. Renewing from a task of its own keeps the lease through a Kafka
//! outage (the database answers), and when the lease really is lost (the database is out of
//! reach, or another instance holds it) the keeper says so while a third of its time is still
//! left, so that the relay stops and discards what it has queued before anyone can take over.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::store::{Outbox, StoreError};

/// The lease of one relay (`relay_id`) as held by one instance of it.
#[derive(Debug, Clone)]
pub struct Lease<O> {
    outbox: O,
    relay_id: String,
    instance_id: String,
    ttl: Duration,
}

impl<O: Outbox + Clone + 'static> Lease<O> {
    pub fn new(outbox: O, relay_id: String, instance_id: String, ttl: Duration) -> Self {
        Self {
            outbox,
            relay_id,
            instance_id,
            ttl,
        }
    }

    /// Takes or renews the lease: true if this instance holds it now. The request is given
    /// a third of the lease's time; a slower database counts as an error.
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        let request = self
            .outbox
            .try_acquire_lease(&self.relay_id, &self.instance_id, self.ttl);
        tokio::time::timeout(self.ttl / 3, request)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.ttl / 3)))
    }

    /// Gives the lease up at once, so that a standby need not wait for it to expire.
    pub async fn release(&self) -> Result<(), StoreError> {
        self.outbox
            .release_lease(&self.relay_id, &self.instance_id)
            .await
    }

    /// How long to wait between attempts to take the lease, and between renewals.
    pub fn retry_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Renews the lease, taken with a request sent at `acquired_at`, every third of its time
    /// until the returned keeper is dropped.
    pub fn keep(&self, acquired_at: Instant) -> LeaseKeeper {
        let (lost_sender, lost) = watch::channel(false);
        let task = tokio::spawn(renew(self.clone(), acquired_at, lost_sender));
        LeaseKeeper { lost, task }
    }
}

/// Renews until the lease is lost, then says so and ends.
async fn renew<O: Outbox + Clone + 'static>(
    lease: Lease<O>,
    acquired_at: Instant,
    lost: watch::Sender<bool>,
) {
    // The database sets the expiry after it received the request, so the lease lasts at least
    // `ttl` from when the request was sent. Giving up at two thirds of that leaves a third for
    // the relay to stop.
    let give_up_after = lease.ttl * 2 / 3;
    let mut confirmed_at = acquired_at;
    loop {
        let wait = lease
            .retry_interval()
            .min(give_up_after.saturating_sub(confirmed_at.elapsed()));
        tokio::time::sleep(wait).await;
        let asked_at = Instant::now();
        match lease.acquire().await {
            Ok(true) => confirmed_at = asked_at,
            Ok(false) => {
                warn!(relay_id = %lease.relay_id, "another relay instance holds the lease");
                break;
            }
            Err(error) if confirmed_at.elapsed() >= give_up_after => {
                warn!(%error, relay_id = %lease.relay_id, "cannot renew the relay lease before it may expire");
                break;
            }
            Err(error) => warn!(%error, "cannot renew the relay lease; retrying"),
        }
    }
    let _ = lost.send(true);
}

/// Keeps a lease renewed (see [`Lease::keep`]); stops renewing when dropped.
#[derive(Debug)]
pub struct LeaseKeeper {
    lost: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Completes once the lease is lost, or may expire before the next renewal.
    pub async fn lost(&mut self) {
        // An error means the renewing task ended without saying so (it panicked): the lease
        // is not being renewed, so it is as good as lost.
        let _ = self.lost.wait_for(|lost| *lost).await;
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
