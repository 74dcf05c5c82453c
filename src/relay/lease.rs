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

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::store::{Outbox, StoreError, answer_within};

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
        answer_within(self.ttl / 3, request).await
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
    // Tokio's clock, which the timing tests pause.
    let acquired_at = tokio::time::Instant::from_std(acquired_at);
    keep_renewed(lease.ttl, acquired_at, &lease.relay_id, || lease.acquire()).await;
    let _ = lost.send(true);
}

/// Renews with `renew` (true: this instance holds the lease) until the lease is lost, or may
/// expire before a renewal could confirm it; returns then.
///
/// The database sets the expiry after it received the request, so the lease lasts at least
/// `ttl` from when the last confirmed request was sent. Giving up at two thirds of that leaves
/// a third for the relay to stop, and every attempt is cut off at that point, however long the
/// database takes: a renewal that failed fast followed by one that hangs must not use up the
/// third. After a failure the next attempt comes sooner than the regular renewal.
async fn keep_renewed<F, R>(
    ttl: Duration,
    acquired_at: tokio::time::Instant,
    relay_id: &str,
    mut renew: F,
) where
    F: FnMut() -> R,
    R: Future<Output = Result<bool, StoreError>>,
{
    let give_up_after = ttl * 2 / 3;
    let (interval, retry_after_failure) = (ttl / 3, ttl / 15);
    let mut confirmed_at = acquired_at;
    let mut failed = false;
    loop {
        let deadline = confirmed_at + give_up_after;
        let pause = if failed {
            retry_after_failure
        } else {
            interval
        };
        tokio::time::sleep(
            pause.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
        let asked_at = tokio::time::Instant::now();
        match tokio::time::timeout(deadline.saturating_duration_since(asked_at), renew()).await {
            Ok(Ok(true)) => (confirmed_at, failed) = (asked_at, false),
            Ok(Ok(false)) => {
                warn!(%relay_id, "another relay instance holds the lease");
                return;
            }
            Ok(Err(error)) if tokio::time::Instant::now() < deadline => {
                warn!(%error, "cannot renew the relay lease; retrying");
                failed = true;
            }
            Ok(Err(error)) => {
                warn!(%error, %relay_id, "cannot renew the relay lease before it may expire");
                return;
            }
            Err(_) => {
                warn!(%relay_id, "the database did not renew the relay lease before it may expire");
                return;
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use std::future::pending;

    use tokio::time::Instant;

    use super::*;

    const TTL: Duration = Duration::from_secs(15);

    /// Runs [`keep_renewed`] with renewals that answer as `answers` says, one per attempt
    /// (`None`: never answers); returns how long after the start it gave up.
    async fn given_up_after(answers: Vec<Option<Result<bool, StoreError>>>) -> Duration {
        let started = Instant::now();
        let mut answers = answers.into_iter();
        keep_renewed(TTL, started, "relay", move || {
            let answer = answers.next().expect("no more renewals planned");
            async move {
                match answer {
                    Some(answer) => answer,
                    None => pending().await,
                }
            }
        })
        .await;
        started.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_followed_by_one_that_hangs_gives_up_a_third_before_expiry() {
        // Confirmed at 5 s (so the lease lasts until 20 s), failed fast at 10 s, the retry at
        // 11 s hangs: given up at 15 s, two thirds of the lease after the last confirmation.
        // (It was given up at 20 s: the hanging attempt had its own 5 s timeout.)
        let answers = vec![Some(Ok(true)), Some(Err(StoreError::Cancelled)), None];
        let given_up = given_up_after(answers).await;
        // Not at the failure (10 s) either: the lease still had 10 s to go then.
        assert!(
            given_up >= Duration::from_secs(15) && given_up <= Duration::from_millis(15_010),
            "given up after {given_up:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_fails_is_retried_sooner_and_keeps_the_lease() {
        // Failed at 5 s, retried at 6 s and confirmed: renewed at 11 s, 16 s, … and given up
        // only when another instance holds it (the fifth answer, at 21 s).
        let answers = vec![
            Some(Err(StoreError::Cancelled)),
            Some(Ok(true)),
            Some(Ok(true)),
            Some(Ok(true)),
            Some(Ok(false)),
        ];
        let given_up = given_up_after(answers).await;
        assert!(
            given_up >= Duration::from_secs(21) && given_up <= Duration::from_millis(21_010),
            "given up after {given_up:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_that_keep_failing_give_up_two_thirds_after_the_last_confirmation() {
        let mut answers = vec![Some(Ok(true))];
        answers.extend((0..20).map(|_| Some(Err(StoreError::Cancelled))));
        let given_up = given_up_after(answers).await;
        assert!(
            given_up >= Duration::from_secs(15) && given_up <= Duration::from_millis(15_010),
            "given up after {given_up:?}"
        );
    }
}
