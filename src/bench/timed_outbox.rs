//! An [`Outbox`] that times what the relay asks of the store, so a drain can be timed from the
//! relay's first read (after its producer is ready) and its wall time split into store reads,
//! store bookkeeping (checkpoint, head, lease, retention) and the rest (publishing).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::domain::{Book, BookId, StoredEvent};
use crate::store::{BookChange, CommitSignal, EventStore, Outbox, StoreError};

/// The outbox calls the relay makes, timed one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreCall {
    ReadAfter,
    RecordPublished,
    HeadPosition,
    Lease,
    Prune,
}

impl StoreCall {
    pub const ALL: [StoreCall; 5] = [
        StoreCall::ReadAfter,
        StoreCall::RecordPublished,
        StoreCall::HeadPosition,
        StoreCall::Lease,
        StoreCall::Prune,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StoreCall::ReadAfter => "read_after",
            StoreCall::RecordPublished => "record_published",
            StoreCall::HeadPosition => "head_position",
            StoreCall::Lease => "lease",
            StoreCall::Prune => "prune",
        }
    }
}

/// Count, total and longest duration of one kind of call.
#[derive(Debug, Default)]
struct CallStats {
    calls: AtomicU64,
    nanos: AtomicU64,
    longest_nanos: AtomicU64,
}

/// What one kind of call cost, as read from an [`OutboxClock`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CallCost {
    pub calls: u64,
    pub total: Duration,
    pub longest: Duration,
}

impl CallCost {
    pub fn mean(&self) -> Duration {
        self.total / u32::try_from(self.calls.max(1)).unwrap_or(u32::MAX)
    }
}

/// Where the relay's time in the store went. Shared by the clones of a [`TimedOutbox`].
#[derive(Debug, Default)]
pub struct OutboxClock {
    first_read: OnceLock<Instant>,
    first_read_seen: Notify,
    /// When the last `record_published` call returned: everything published so far is
    /// committed to Kafka and recorded in the store.
    last_recorded: Mutex<Option<Instant>>,
    calls: [CallStats; 5],
    /// Kept only for a traced outbox ([`TimedOutbox::traced`]).
    trace: Option<Mutex<RelayTrace>>,
}

/// When the relay picked events up and when it recorded them published, for following each
/// event through the relay.
#[derive(Debug, Clone, Default)]
pub struct RelayTrace {
    /// `read_after` calls that returned events: the last position returned, and when.
    pub reads: Vec<(u64, Instant)>,
    /// `record_published` calls (made right after a batch's Kafka commit): position, when.
    pub published: Vec<(u64, Instant)>,
}

impl RelayTrace {
    /// When `position` was first returned by a read.
    pub fn picked_up(&self, position: u64) -> Option<Instant> {
        first_reaching(&self.reads, position)
    }

    /// When the relay first recorded `position` (or a later one) published.
    pub fn published(&self, position: u64) -> Option<Instant> {
        first_reaching(&self.published, position)
    }
}

/// The instant of the first entry at or past `position`; entries ascend by position.
fn first_reaching(entries: &[(u64, Instant)], position: u64) -> Option<Instant> {
    let index = entries.partition_point(|(reached, _)| *reached < position);
    entries.get(index).map(|(_, at)| *at)
}

impl OutboxClock {
    /// When the relay first read the outbox: its producer was ready by then.
    pub fn first_read(&self) -> Option<Instant> {
        self.first_read.get().copied()
    }

    /// When the relay last finished recording a position published.
    pub fn last_recorded(&self) -> Option<Instant> {
        *self.last_recorded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completes once the relay has read the outbox (at once if it already has).
    pub async fn wait_for_first_read(&self) {
        let notified = self.first_read_seen.notified();
        if self.first_read.get().is_some() {
            return;
        }
        notified.await;
    }

    /// What the calls of one kind cost.
    pub fn cost(&self, call: StoreCall) -> CallCost {
        let stats = &self.calls[call as usize];
        CallCost {
            calls: stats.calls.load(Ordering::Relaxed),
            total: Duration::from_nanos(stats.nanos.load(Ordering::Relaxed)),
            longest: Duration::from_nanos(stats.longest_nanos.load(Ordering::Relaxed)),
        }
    }

    /// Time spent in `read_after`.
    pub fn reads(&self) -> Duration {
        self.cost(StoreCall::ReadAfter).total
    }

    /// Time spent in checkpoint, head, lease and retention calls.
    pub fn bookkeeping(&self) -> Duration {
        StoreCall::ALL
            .into_iter()
            .filter(|&call| call != StoreCall::ReadAfter)
            .map(|call| self.cost(call).total)
            .sum()
    }

    /// What a traced outbox saw (empty for an untraced one).
    pub fn trace(&self) -> RelayTrace {
        self.trace
            .as_ref()
            .map(|trace| trace.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    fn note(&self, pick: impl FnOnce(&mut RelayTrace) -> &mut Vec<(u64, Instant)>, position: u64) {
        if let Some(trace) = &self.trace {
            let mut trace = trace.lock().unwrap_or_else(|p| p.into_inner());
            pick(&mut trace).push((position, Instant::now()));
        }
    }

    fn add(&self, call: StoreCall, since: Instant) {
        let elapsed = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let stats = &self.calls[call as usize];
        stats.nanos.fetch_add(elapsed, Ordering::Relaxed);
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.longest_nanos.fetch_max(elapsed, Ordering::Relaxed);
    }
}

/// `relay_<call>_{calls,mean_ms,max_ms}` for every kind of call the relay made, for a figure's
/// extras.
pub fn call_extras(clock: &OutboxClock) -> Vec<(String, f64)> {
    let mut extras = vec![];
    for call in StoreCall::ALL {
        let cost = clock.cost(call);
        if cost.calls == 0 {
            continue;
        }
        let name = call.name();
        extras.push((format!("relay_{name}_calls"), cost.calls as f64));
        extras.push((
            format!("relay_{name}_mean_ms"),
            cost.mean().as_secs_f64() * 1e3,
        ));
        extras.push((
            format!("relay_{name}_max_ms"),
            cost.longest.as_secs_f64() * 1e3,
        ));
    }
    extras
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

    /// Also keeps a [`RelayTrace`] (one entry per batch).
    pub fn traced(inner: O) -> Self {
        Self {
            inner,
            clock: Arc::new(OutboxClock {
                trace: Some(Mutex::default()),
                ..OutboxClock::default()
            }),
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
        self.clock.add(StoreCall::ReadAfter, started);
        if let Ok(Some(last)) = events.as_ref().map(|events| events.last()) {
            self.clock.note(|trace| &mut trace.reads, last.position);
        }
        events
    }

    async fn head_position(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let head = self.inner.head_position().await;
        self.clock.add(StoreCall::HeadPosition, started);
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
        self.clock.note(|trace| &mut trace.published, position);
        let started = Instant::now();
        let recorded = self.inner.record_published(relay, position).await;
        self.clock.add(StoreCall::RecordPublished, started);
        *self
            .clock
            .last_recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        recorded
    }

    async fn prune_published(&self, relay: &str, older_than: Duration) -> Result<u64, StoreError> {
        let started = Instant::now();
        let pruned = self.inner.prune_published(relay, older_than).await;
        self.clock.add(StoreCall::Prune, started);
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
        self.clock.add(StoreCall::Lease, started);
        acquired
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.inner.release_lease(name, holder).await
    }

    async fn commit_signal(&self) -> Result<CommitSignal, StoreError> {
        self.inner.commit_signal().await
    }

    fn reads_ahead(&self) -> bool {
        self.inner.reads_ahead()
    }
}
