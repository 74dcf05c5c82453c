//! An [`Outbox`] that times what the relay asks of the store, so a drain can be timed from the
//! relay's first read (after its producer is ready) and its wall time split into store reads,
//! store bookkeeping (checkpoint, head, lease, retention) and the rest (publishing).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::domain::{Book, BookId, StoredEvent};
use crate::store::{BookChange, CommitSignal, EventStore, Outbox, StoreError};

/// Where the relay's time in the store went. Shared by the clones of a [`TimedOutbox`].
#[derive(Debug, Default)]
pub struct OutboxClock {
    first_read: OnceLock<Instant>,
    first_read_seen: Notify,
    read_nanos: AtomicU64,
    reads: AtomicU64,
    bookkeeping_nanos: AtomicU64,
    bookkeeping_calls: AtomicU64,
    /// The longest single call of either kind.
    longest_nanos: AtomicU64,
}

impl OutboxClock {
    /// When the relay first read the outbox: its producer was ready by then.
    pub fn first_read(&self) -> Option<Instant> {
        self.first_read.get().copied()
    }

    /// Completes once the relay has read the outbox (at once if it already has).
    pub async fn wait_for_first_read(&self) {
        let notified = self.first_read_seen.notified();
        if self.first_read.get().is_some() {
            return;
        }
        notified.await;
    }

    /// Time spent in `read_after`, and how many calls.
    pub fn reads(&self) -> (Duration, u64) {
        (
            Duration::from_nanos(self.read_nanos.load(Ordering::Relaxed)),
            self.reads.load(Ordering::Relaxed),
        )
    }

    /// Time spent in checkpoint, head, lease and retention calls, and how many calls.
    pub fn bookkeeping(&self) -> (Duration, u64) {
        (
            Duration::from_nanos(self.bookkeeping_nanos.load(Ordering::Relaxed)),
            self.bookkeeping_calls.load(Ordering::Relaxed),
        )
    }

    /// The longest single store call: a stall here stalls the relay's loop.
    pub fn longest_call(&self) -> Duration {
        Duration::from_nanos(self.longest_nanos.load(Ordering::Relaxed))
    }

    fn add(&self, nanos: &AtomicU64, calls: &AtomicU64, since: Instant) {
        let elapsed = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        nanos.fetch_add(elapsed, Ordering::Relaxed);
        calls.fetch_add(1, Ordering::Relaxed);
        self.longest_nanos.fetch_max(elapsed, Ordering::Relaxed);
    }

    fn add_read(&self, since: Instant) {
        self.add(&self.read_nanos, &self.reads, since);
    }

    fn add_bookkeeping(&self, since: Instant) {
        self.add(&self.bookkeeping_nanos, &self.bookkeeping_calls, since);
    }
}

/// Wraps an outbox; every call goes through unchanged.
#[derive(Debug, Clone)]
pub struct TimedOutbox<O> {
    inner: O,
    clock: Arc<OutboxClock>,
}

impl<O> TimedOutbox<O> {
    pub fn new(inner: O) -> Self {
        Self {
            inner,
            clock: Arc::new(OutboxClock::default()),
        }
    }

    pub fn clock(&self) -> Arc<OutboxClock> {
        self.clock.clone()
    }
}

impl<O: Outbox> EventStore for TimedOutbox<O> {
    async fn load_book(&self, book_id: BookId) -> Result<Option<Book>, StoreError> {
        self.inner.load_book(book_id).await
    }

    async fn list_books(&self) -> Result<Vec<Book>, StoreError> {
        self.inner.list_books().await
    }

    async fn save(&self, change: BookChange) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.save(change).await
    }

    async fn read_stream(&self, stream: &str) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.read_stream(stream).await
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let started = Instant::now();
        if self.clock.first_read.set(started).is_ok() {
            self.clock.first_read_seen.notify_waiters();
        }
        let events = self.inner.read_after(after, limit).await;
        self.clock.add_read(started);
        events
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let head = self.inner.head_position().await;
        self.clock.add_bookkeeping(started);
        head
    }
}

impl<O: Outbox> Outbox for TimedOutbox<O> {
    async fn store_id(&self) -> Result<String, StoreError> {
        self.inner.store_id().await
    }

    async fn published_position(&self, relay: &str) -> Result<u64, StoreError> {
        self.inner.published_position(relay).await
    }

    async fn record_published(&self, relay: &str, position: u64) -> Result<(), StoreError> {
        let started = Instant::now();
        let recorded = self.inner.record_published(relay, position).await;
        self.clock.add_bookkeeping(started);
        recorded
    }

    async fn prune_published(&self, relay: &str, older_than: Duration) -> Result<u64, StoreError> {
        let started = Instant::now();
        let pruned = self.inner.prune_published(relay, older_than).await;
        self.clock.add_bookkeeping(started);
        pruned
    }

    async fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let started = Instant::now();
        let acquired = self.inner.try_acquire_lease(name, holder, ttl).await;
        self.clock.add_bookkeeping(started);
        acquired
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.inner.release_lease(name, holder).await
    }

    async fn commit_signal(&self) -> Result<CommitSignal, StoreError> {
        self.inner.commit_signal().await
    }
}
