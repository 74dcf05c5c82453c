//! The outbox relay: follows committed events in position order and publishes them to Kafka.
//!
//! ## What it promises, and why it holds
//!
//! * **No loss, no skip.** Positions are gapless and assigned in commit order (see
//!   [`crate::store`]), so reading `position > resume point` in order sees every committed
//!   event. The resume point only moves after the publisher confirmed the batch durable
//!   (transaction committed, or every record acknowledged with `acks=all`). Where the store no
//!   longer matches that (a hole in the positions read, or a resume point beyond the store's
//!   head after a database restore), the relay stops with [`RelayError::Gap`] or
//!   [`RelayError::AheadOfStore`] rather than skip events.
//! * **Per-book order.** Events are read in position order, a book's records share a key and
//!   so a partition, the producer is idempotent (no reordering on retry), and after a failure
//!   everything not confirmed is resent from its first event after a fresh `start`.
//! * **No duplicates for `read_committed` readers** in exactly-once mode: batch and checkpoint
//!   commit in one Kafka transaction, and a restart resumes from the committed checkpoint
//!   (see [`checkpoint`]). In at-least-once mode a crash can resend the batches not yet fully
//!   acknowledged: up to two (`AT_LEAST_ONCE_BATCHES_AHEAD` in the publisher), and those whose
//!   position the store had not recorded yet (it is written in the background, moments after
//!   the acknowledgement; a retry within the process resumes from what it saw acknowledged).
//! * **One active relay per store.** A lease in the database names the active instance; others
//!   wait as standbys. It is renewed by a task of its own, so waiting on Kafka does not let it
//!   lapse, and an instance that loses it discards what it has queued before it could expire
//!   (see the `lease` module). The Kafka transactional id fences an instance that lost its
//!   lease but still tries to publish (a paused process waking up).
//! * **Outages.** Any publish error leads to a pause with exponential backoff, a fresh producer
//!   and a resume from the recovered position, until the broker answers again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::domain::{EventKind, StoredEvent};
use crate::shutdown::Shutdown;
use crate::store::{CommitSignal, Outbox, StoreError, answer_within};
use checkpoint::CheckpointError;
use lease::Lease;

pub mod checkpoint;
mod lease;
pub mod metrics;
mod publisher;
pub mod record;
mod setup;
pub mod visibility;

pub use publisher::{
    DeliveryMode, EventPublisher, KafkaPublisher, PoisonCause, PublishError,
    TRANSACTIONAL_PRODUCERS,
};
pub use setup::{RelaySetupError, kafka_relay, wire_format};

/// How the relay runs. Defaults suit a laptop and a production service alike.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Names this relay's lease, checkpoint and Kafka transactional id.
    pub relay_id: String,
    /// Identifies this process among the instances competing for the lease.
    pub instance_id: String,
    /// Most events per batch (one Kafka transaction in exactly-once mode). A batch is filled
    /// page by page while a backlog lasts, and committed at once when the relay has caught up,
    /// so large batches cost no latency at low load.
    pub batch_size: usize,
    /// Most events read from the outbox at a time; the next page is read while the previous
    /// one is being sent.
    pub page_size: usize,
    /// A batch being filled from a backlog is committed after this long at the latest.
    pub max_batch_time: Duration,
    /// Exactly-once only: after committing everything there was, how long to let new events
    /// gather before the next batch, for fewer, fuller transactions when following the
    /// writers. None by default (`--batch-linger-ms`): since the two transactional producers
    /// take turns, a linger no longer steadied the p99 (docs/benchmarks.md, items 7 and 29).
    pub batch_linger: Duration,
    /// Fallback polling interval when no commit signal arrives.
    pub poll_interval: Duration,
    /// How long a lease lasts without renewal; renewed at a third of it.
    pub lease_ttl: Duration,
    /// After shutdown is requested, how long batches in flight get to be confirmed before they
    /// are abandoned (and sent again after a restart). Default 10 s: a broker outage would
    /// otherwise hold a stop for up to the acknowledgement timeout (twice the request timeout, 60 s
    /// by default).
    pub shutdown_grace: Duration,
    /// Published events older than this are deleted from the outbox.
    pub retention: Duration,
    /// How often retention runs.
    pub prune_interval: Duration,
    /// First pause after an error; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest wait for one query of the publishing (a page of events, the head, a position,
    /// listening for commits), after which it counts as a store error and is retried. Default
    /// [`QUERY_TIMEOUT`](crate::store::QUERY_TIMEOUT). The lease does not cover this: its
    /// renewals may find a working connection while the publishing waits on a dead one (see
    /// [`answer_within`]).
    pub store_timeout: Duration,
}

impl RelayConfig {
    pub fn new(relay_id: impl Into<String>) -> Self {
        Self {
            relay_id: relay_id.into(),
            instance_id: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            batch_size: 5_000,
            page_size: 500,
            max_batch_time: Duration::from_millis(100),
            batch_linger: Duration::ZERO,
            poll_interval: Duration::from_millis(250),
            lease_ttl: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(10),
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(600),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            store_timeout: crate::store::QUERY_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Kafka or the store records more as published than the store holds. Fatal: events saved
    /// from now on take positions at or below `published`, which the relay would never read.
    #[error(
        "events up to position {published} are recorded as published, but the store's outbox \
         ends at position {head}: the database was restored, or failed over to a copy that lost \
         committed events; publishing on would skip the next {} events saved (see the README, \
         \"Restoring the database\")",
        published - head
    )]
    AheadOfStore { published: u64, head: u64 },
    /// Positions are gapless (see the `store` module), so a missing one was deleted before this
    /// relay published it. Fatal: going on would skip it for good.
    #[error(
        "the outbox has no events at positions {first}..={last}, which this relay has not \
         published: deleted by another relay id's pruning, or lost by the database; publishing \
         on would skip them"
    )]
    Gap { first: u64, last: u64 },
}

impl RelayError {
    /// Whether retrying cannot help: the store no longer matches what was published, or holds
    /// a row it cannot read (which only mending the row can fix).
    fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::AheadOfStore { .. } | Self::Gap { .. } | Self::Store(StoreError::Corrupt(_))
        )
    }
}

/// Checks that `page` continues right after position `after` without a hole.
fn check_contiguous(after: u64, page: &[StoredEvent]) -> Result<(), RelayError> {
    for (expected, event) in (after + 1..).zip(page) {
        if event.position != expected {
            return Err(RelayError::Gap {
                first: expected,
                last: event.position.saturating_sub(1),
            });
        }
    }
    Ok(())
}

/// What a run did, for `--once` and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayReport {
    pub published_events: u64,
    pub batches: u64,
    pub last_position: u64,
    /// With [`RunMode::Once`]: whether everything committed at the start was published, rather
    /// than the run stopping for shutdown first.
    pub finished: bool,
}

/// Until when `run` goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunMode {
    /// Until shutdown.
    Follow,
    /// Until everything committed when the run started is published.
    Once,
}

pub struct Relay<O, P> {
    outbox: O,
    publisher: P,
    config: RelayConfig,
    /// The first page of the next batch, read while a backlog's batch commits.
    next_batch: Option<ReadAhead>,
}

/// How publishing under a lease ended.
enum Ended {
    /// By itself: see the [`Stop`].
    Stopped(Result<Stop, RelayError>),
    /// The lease was lost meanwhile.
    LeaseLost,
    /// Shutdown was requested and the grace period passed.
    GraceOver,
}

/// How waiting for the lease ended.
enum Leased {
    /// This instance holds it, since the request sent at this instant.
    Now(Instant),
    /// Shutdown came first.
    Never,
    /// Another relay, active meanwhile, published up to the run's target (its position as
    /// the store has it).
    NotNeeded { published: u64 },
}

/// Why an active period ended.
enum Stop {
    Shutdown,
    Done,
    LeaseLost,
}

impl<O: Outbox + Clone + 'static, P: EventPublisher> Relay<O, P> {
    pub fn new(outbox: O, publisher: P, config: RelayConfig) -> Self {
        Self {
            outbox,
            publisher,
            config,
            next_batch: None,
        }
    }

    /// Adjusts the configuration after wiring (tests and benchmarks tune sizes and timings).
    pub fn tuned(mut self, tune: impl FnOnce(&mut RelayConfig)) -> Self {
        tune(&mut self.config);
        self
    }

    /// Runs until shutdown (or, in `Once` mode, until the backlog at start is published).
    /// Returns an error only for what waiting cannot fix: an event that cannot be encoded.
    /// Outages of Kafka or of the store are waited out.
    pub async fn run(
        mut self,
        mode: RunMode,
        mut shutdown: Shutdown,
    ) -> Result<RelayReport, RelayError> {
        let mut report = RelayReport::default();
        let target = match mode {
            RunMode::Once => Some(self.ask(self.outbox.head_position()).await?),
            RunMode::Follow => None,
        };
        loop {
            let acquired_at = match self.wait_for_lease(target, &mut shutdown).await {
                Leased::Now(acquired_at) => acquired_at,
                Leased::Never => break,
                Leased::NotNeeded { published } => {
                    info!(
                        published,
                        "another relay has published everything this run was to publish"
                    );
                    report.last_position = report.last_position.max(published);
                    report.finished = true;
                    break;
                }
            };
            let outcome = self
                .publish_while_leased(acquired_at, target, &mut report, &mut shutdown)
                .await;
            // Hand the lease over at once rather than making a standby wait for it to expire
            // (which it does anyway if the database does not answer in time).
            let lease = self.lease();
            let _ = tokio::time::timeout(lease.retry_interval(), lease.release()).await;
            match outcome? {
                Stop::Shutdown => break,
                Stop::Done => {
                    report.finished = true;
                    break;
                }
                Stop::LeaseLost => {
                    warn!("lost the relay lease; standing by");
                    // Not straight back: a producer that failed fatally for a reason that
                    // persists (an authorisation error, say) would otherwise be replaced in a
                    // tight loop, since a lease released at once is free at once.
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(self.lease().retry_interval()) => {}
                    }
                }
            }
        }
        info!(
            published = report.published_events,
            last_position = report.last_position,
            "relay stopped"
        );
        Ok(report)
    }

    /// This instance's hold on the relay's lease, as configured now.
    fn lease(&self) -> Lease<O> {
        Lease::new(
            self.outbox.clone(),
            self.config.relay_id.clone(),
            self.config.instance_id.clone(),
            self.config.lease_ttl,
        )
    }

    /// Waits until this instance holds the lease (see [`Leased`]). With a `target` (a run
    /// `Once`), standing by ends too when the active relay has published up to it: `relay
    /// --once` beside a running relay would otherwise wait for as long as that one runs.
    async fn wait_for_lease(&self, target: Option<u64>, shutdown: &mut Shutdown) -> Leased {
        let lease = self.lease();
        let mut announced = false;
        loop {
            if shutdown.is_triggered() {
                return Leased::Never;
            }
            let asked_at = Instant::now();
            match lease.acquire().await {
                Ok(true) => {
                    info!(relay_id = %self.config.relay_id, instance = %self.config.instance_id, "relay is active");
                    return Leased::Now(asked_at);
                }
                Ok(false) => {
                    if !announced {
                        info!(relay_id = %self.config.relay_id, "another relay is active; standing by");
                        announced = true;
                    }
                    if let Some(target) = target {
                        // Bounded, and given up for shutdown: a database that does not answer
                        // must not keep a stop waiting.
                        let progress = tokio::select! {
                            _ = shutdown.wait() => return Leased::Never,
                            progress = tokio::time::timeout(
                                lease.retry_interval(),
                                self.outbox.published_position(&self.config.relay_id),
                            ) => progress,
                        };
                        match progress {
                            Ok(Ok(published)) if published >= target => {
                                return Leased::NotNeeded { published };
                            }
                            Ok(Ok(_)) => {}
                            Ok(Err(error)) => {
                                debug!(%error, "cannot read the active relay's progress");
                            }
                            Err(_) => debug!("reading the active relay's progress timed out"),
                        }
                    }
                }
                Err(error) => {
                    metrics::record_store_error();
                    warn!(%error, "cannot take the relay lease; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return Leased::Never,
                _ = tokio::time::sleep(lease.retry_interval()) => {}
            }
        }
    }

    /// Publishes while the lease, taken at `acquired_at`, is kept (see the `lease` module).
    /// When it is lost, whatever is in flight is abandoned and the publisher's queue discarded
    /// before the lease can expire, so that a successor's records are never overtaken by this
    /// one's.
    async fn publish_while_leased(
        &mut self,
        acquired_at: Instant,
        target: Option<u64>,
        report: &mut RelayReport,
        shutdown: &mut Shutdown,
    ) -> Result<Stop, RelayError> {
        let mut lease = self.lease().keep(acquired_at);
        let recorder = PositionRecorder::spawn(
            self.outbox.clone(),
            self.config.relay_id.clone(),
            self.config.store_timeout,
        );
        let (mut stopping, grace) = (shutdown.clone(), self.config.shutdown_grace);
        let ended = tokio::select! {
            stop = self.publish_batches(&recorder, target, report, shutdown) => Ended::Stopped(stop),
            () = lease.lost() => Ended::LeaseLost,
            () = async {
                stopping.wait().await;
                tokio::time::sleep(grace).await;
            } => Ended::GraceOver,
        };
        let stop = match ended {
            Ended::Stopped(stop) => stop,
            Ended::LeaseLost => {
                self.abandon_in_flight().await;
                Ok(Stop::LeaseLost)
            }
            Ended::GraceOver => {
                warn!(
                    ?grace,
                    "batches in flight not confirmed in time; abandoning them (a restart sends them again)"
                );
                self.abandon_in_flight().await;
                Ok(Stop::Shutdown)
            }
        };
        recorder.finish().await;
        stop
    }

    /// Drops what is in flight: the publisher's queue and the next batch read ahead.
    async fn abandon_in_flight(&mut self) {
        self.publisher.stop().await;
        self.next_batch = None;
    }

    async fn publish_batches(
        &mut self,
        recorder: &PositionRecorder,
        target: Option<u64>,
        report: &mut RelayReport,
        shutdown: &mut Shutdown,
    ) -> Result<Stop, RelayError> {
        self.next_batch = None;
        let mut backoff = self.config.min_backoff;
        // A database that does not answer right after the lease was taken (a failover) is
        // waited out like any other store outage; the lease keeper stops this if it lasts.
        let mut signal = loop {
            match self.ask(self.outbox.commit_signal()).await {
                Ok(signal) => break signal,
                Err(error) => {
                    metrics::record_store_error();
                    warn!(%error, ?backoff, "cannot listen for commits; retrying");
                    if !pause(shutdown, &mut backoff, self.config.max_backoff).await {
                        return Ok(Stop::Shutdown);
                    }
                }
            }
        };
        backoff = self.config.min_backoff;
        let mut unconfirmed = Unconfirmed::default();
        let mut pruned_at: Option<Instant> = None;
        // Retention runs beside the publishing: a large one (after an outage longer than the
        // retention) takes seconds, in chunks, and must not hold the batches up.
        let mut pruning: Option<tokio::task::JoinHandle<()>> = None;
        let Some(mut position) = self
            .start_publisher(recorder, report.last_position, shutdown, &mut backoff)
            .await?
        else {
            return Ok(Stop::Shutdown);
        };
        // Published already, by this run or an earlier one: reported even when nothing is left.
        report.last_position = report.last_position.max(position);
        loop {
            if shutdown.is_triggered() {
                // Finish what is in flight, so a restart does not send it again.
                if let Err(error) = self.settle(&mut unconfirmed, report, recorder).await {
                    warn!(%error, "could not confirm the last batches before stopping; they will be sent again");
                    // librdkafka still retries what was queued after the failed record: drop it
                    // before the lease is released, or a successor's resend could be overtaken.
                    self.abandon_in_flight().await;
                }
                return Ok(Stop::Shutdown);
            }
            if pruned_at.is_none_or(|at| at.elapsed() >= self.config.prune_interval)
                && pruning
                    .as_ref()
                    .is_none_or(tokio::task::JoinHandle::is_finished)
            {
                pruning = Some(tokio::spawn(prune(
                    self.outbox.clone(),
                    self.config.relay_id.clone(),
                    self.config.retention,
                )));
                pruned_at = Some(Instant::now());
            }
            if target.is_some_and(|target| position >= target) {
                return Ok(Stop::Done);
            }
            let error = match self.publish_next_batch(position, target).await {
                Ok(Some((mut batch, confirmed))) => {
                    position = batch.last;
                    backoff = self.config.min_backoff;
                    let caught_up = batch.caught_up;
                    let refused = batch.refused.take();
                    if batch.events > 0 {
                        unconfirmed.push(batch);
                    }
                    unconfirmed.confirm(confirmed, report, recorder);
                    if let Some((position, source)) = refused {
                        // Everything before the event is published; nothing after it may be.
                        if let Err(error) = self.settle(&mut unconfirmed, report, recorder).await {
                            warn!(%error, "could not confirm the events before the one that cannot be published; they will be sent again");
                        }
                        return Err(poisoned(position, source));
                    }
                    // While a backlog lasts, a batch is confirmed by the next one's commit (or
                    // acknowledgements). Caught up, it is settled before the relay lingers.
                    // Why not leave it to commit meanwhile: at 1,000 events/s on SQLite, both
                    // variants tried measured a worse exactly-once commit → ack p99 (58-178 ms
                    // against 29-52 ms in `relay,latency` runs; docs/benchmarks.md, item 26).
                    let settled = if caught_up || target.is_some_and(|target| position >= target) {
                        self.settle(&mut unconfirmed, report, recorder).await
                    } else {
                        Ok(())
                    };
                    match settled {
                        Ok(()) if caught_up && !self.config.batch_linger.is_zero() => {
                            let mut shutdown = shutdown.clone();
                            tokio::select! {
                                _ = shutdown.wait() => {}
                                _ = tokio::time::sleep(self.config.batch_linger) => {}
                            }
                            continue;
                        }
                        Ok(()) => continue,
                        Err(error) => error,
                    }
                }
                Ok(None) => match self.settle(&mut unconfirmed, report, recorder).await {
                    Ok(()) => {
                        self.wait_for_commit(&mut signal, shutdown).await;
                        continue;
                    }
                    Err(error) => error,
                },
                Err(error) => error,
            };
            if error.is_fatal() {
                // Record what was acknowledged before the hole, so that it is not sent again.
                if let Err(settling) = self.settle(&mut unconfirmed, report, recorder).await {
                    warn!(error = %settling, "could not confirm the last batches before stopping");
                }
                error!(%error, "relay stops");
                return Err(error);
            }
            // Whatever was not confirmed is sent again after the restart below, unless the
            // restart finds it published.
            self.next_batch = None;
            match error {
                RelayError::Publish(PublishError::Poison { position, source }) => {
                    unconfirmed.abandon();
                    return Err(poisoned(position, source));
                }
                RelayError::Publish(PublishError::Fenced(error)) => {
                    unconfirmed.abandon();
                    metrics::record_send_error();
                    warn!(%error, "the producer is fenced (another relay instance took over) or failed for good");
                    return Ok(Stop::LeaseLost);
                }
                error => {
                    count_error(&error);
                    warn!(%error, ?backoff, "publishing failed; retrying from the last confirmed position");
                    if !pause(shutdown, &mut backoff, self.config.max_backoff).await {
                        return Ok(Stop::Shutdown);
                    }
                    match self
                        .start_publisher(recorder, report.last_position, shutdown, &mut backoff)
                        .await?
                    {
                        Some(resumed) => {
                            unconfirmed.resume_after(resumed, report, recorder);
                            position = resumed;
                        }
                        None => return Ok(Stop::Shutdown),
                    }
                }
            }
        }
    }

    /// Awaits every batch handed to the publisher, and records what that confirms.
    async fn settle(
        &mut self,
        unconfirmed: &mut Unconfirmed,
        report: &mut RelayReport,
        recorder: &PositionRecorder,
    ) -> Result<(), RelayError> {
        if !unconfirmed.is_empty() {
            let confirmed = self.publisher.settle().await?;
            unconfirmed.confirm(confirmed, report, recorder);
        }
        Ok(())
    }

    /// Publishes the events after `position` as one batch, filled page by page while there is
    /// a backlog (up to `batch_size` events or `max_batch_time`), each page read (see
    /// [`ReadAhead`]) while the previous one is handed to the publisher. Returns the batch and
    /// the last position the publisher confirmed meanwhile (this batch's last, or an earlier
    /// one's, see [`EventPublisher::commit_batch`]). `None` if there was nothing to publish.
    async fn publish_next_batch(
        &mut self,
        position: u64,
        target: Option<u64>,
    ) -> Result<Option<(PublishedBatch, Option<u64>)>, RelayError> {
        let page_size = self.config.page_size.min(self.config.batch_size).max(1);
        let mut requested = page_size;
        let mut page = match self.next_batch.take() {
            Some(read) if read.after == position => read.finish().await?,
            _ => {
                self.ask(self.outbox.read_after(position, requested))
                    .await?
            }
        };
        if page.is_empty() {
            return Ok(None);
        }
        check_contiguous(position, &page)?;
        let span = info_span!(
            "publish_batch",
            first = position + 1,
            last = tracing::field::Empty,
            events = tracing::field::Empty
        );
        async {
            let started = Instant::now();
            let mut batch = PublishedBatch::default();
            self.publisher.begin_batch()?;
            loop {
                batch.caught_up = page.len() < requested;
                batch.add(&page);
                let room = self.config.batch_size.saturating_sub(batch.events as usize);
                let full = batch.caught_up
                    || room == 0
                    || started.elapsed() >= self.config.max_batch_time
                    || target.is_some_and(|target| batch.last >= target);
                requested = page_size.min(room);
                let read_ahead = !full && self.outbox.reads_ahead();
                let next = read_ahead.then(|| self.read_ahead(batch.last, requested));
                match self.publisher.send(&page).await {
                    Ok(()) => {}
                    Err(PublishError::Poison { position, source }) => {
                        // What precedes it is in the batch and is committed below; the
                        // relay stops after that (see `publish_batches`).
                        batch.cut_before(&page, position);
                        batch.refused = Some((position, source));
                        break;
                    }
                    Err(error) => return Err(error.into()),
                }
                if full {
                    break;
                }
                // On a store error the open batch is abandoned: the next `start` aborts it.
                page = match next {
                    Some(next) => next.finish().await?,
                    None => {
                        self.ask(self.outbox.read_after(batch.last, requested))
                            .await?
                    }
                };
                if page.is_empty() {
                    batch.caught_up = true;
                    break;
                }
                check_contiguous(batch.last, &page)?;
            }
            // A backlog goes on: the next batch's first page is read while this one commits.
            if self.outbox.reads_ahead()
                && batch.refused.is_none()
                && !batch.caught_up
                && target.is_none_or(|target| batch.last < target)
            {
                self.next_batch = Some(self.read_ahead(batch.last, page_size));
            }
            let confirmed = self.publisher.commit_batch().await?;
            tracing::Span::current()
                .record("last", batch.last)
                .record("events", batch.events);
            debug!(?confirmed, "batch published");
            Ok(Some((batch, confirmed)))
        }
        .instrument(span)
        .await
    }

    /// `query`'s answer, or a timeout once it has taken the configured
    /// [`store_timeout`](RelayConfig::store_timeout).
    async fn ask<T>(
        &self,
        query: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        answer_within(self.config.store_timeout, query).await
    }

    /// Reads the page after `after` on a task of its own (see [`ReadAhead`]).
    fn read_ahead(&self, after: u64, limit: usize) -> ReadAhead {
        ReadAhead::start(&self.outbox, after, limit, self.config.store_timeout)
    }

    /// The store's copy of the published position, and its head.
    async fn published_and_head(&self) -> Result<(u64, u64), StoreError> {
        let recorded = self
            .ask(self.outbox.published_position(&self.config.relay_id))
            .await?;
        let head = self.ask(self.outbox.head_position()).await?;
        Ok((recorded, head))
    }

    /// Starts the publisher, retrying with backoff while Kafka (or the store) is unavailable,
    /// and returns the position to resume after: the furthest of what the publisher knows
    /// (exactly once: Kafka's checkpoint), what the store recorded, and `confirmed`, what this
    /// process saw confirmed (the store's copy is written in the background and can lag it, or
    /// have failed to be written). `None` if shutdown came first.
    async fn start_publisher(
        &mut self,
        recorder: &PositionRecorder,
        confirmed: u64,
        shutdown: &mut Shutdown,
        backoff: &mut Duration,
    ) -> Result<Option<u64>, RelayError> {
        // Since when starts have found the checkpoint partition held open at one offset.
        let mut held_open: Option<(i64, Instant)> = None;
        loop {
            let error = match self.publisher.start().await {
                Ok(known_by_publisher) => {
                    match self.published_and_head().await {
                        Ok((recorded, head)) => {
                            let position =
                                known_by_publisher.unwrap_or(0).max(recorded).max(confirmed);
                            if position > head {
                                let error = RelayError::AheadOfStore {
                                    published: position,
                                    head,
                                };
                                error!(%error, "relay stops");
                                return Err(error);
                            }
                            info!(position, "resuming after position");
                            metrics::record_position(position);
                            if held_open.is_some() {
                                metrics::record_unreadable_commit(Duration::ZERO);
                            }
                            if position > recorded {
                                // A crash came between the Kafka commit and the store's copy,
                                // or the copy has not caught up yet.
                                recorder.record(position);
                            }
                            return Ok(Some(position));
                        }
                        Err(error) => RelayError::Store(error),
                    }
                }
                Err(PublishError::Poison { position, source }) => {
                    return Err(PublishError::Poison { position, source }.into());
                }
                Err(PublishError::Checkpoint(CheckpointError::OpenTransaction {
                    topic,
                    last_stable,
                    high_watermark,
                    waited,
                })) => {
                    // No publisher runs to watch its commits, so the gauge of unreadable
                    // commits says how long the partition has been held open instead: a
                    // hanging transaction (the README's alert) keeps every start failing here.
                    let since = match held_open {
                        Some((offset, since)) if offset == last_stable => since,
                        _ => Instant::now()
                            .checked_sub(waited)
                            .unwrap_or_else(Instant::now),
                    };
                    held_open = Some((last_stable, since));
                    metrics::record_unreadable_commit(since.elapsed());
                    RelayError::Publish(PublishError::Checkpoint(
                        CheckpointError::OpenTransaction {
                            topic,
                            last_stable,
                            high_watermark,
                            waited,
                        },
                    ))
                }
                Err(error) => RelayError::Publish(error),
            };
            count_error(&error);
            warn!(%error, ?backoff, "cannot start publishing; retrying");
            if !pause(shutdown, backoff, self.config.max_backoff).await {
                return Ok(None);
            }
        }
    }

    async fn wait_for_commit(&self, signal: &mut CommitSignal, shutdown: &mut Shutdown) {
        let mut shutdown = shutdown.clone();
        tokio::select! {
            _ = signal.committed() => debug!("woken by a commit"),
            _ = tokio::time::sleep(self.config.poll_interval) => {}
            _ = shutdown.wait() => {}
        }
    }
}

/// Counts an error the relay waits out as the store's or Kafka's.
fn count_error(error: &RelayError) {
    match error {
        RelayError::Store(_) => metrics::record_store_error(),
        _ => metrics::record_send_error(),
    }
}

/// The error that stops the relay at an event it cannot publish, logged and counted.
fn poisoned(position: u64, source: PoisonCause) -> RelayError {
    metrics::record_send_error();
    error!(position, %source, "event cannot be published; relay stops");
    PublishError::Poison { position, source }.into()
}

/// Deletes the events every relay of the store has published that are older than `retention`.
async fn prune<O: Outbox>(outbox: O, relay_id: String, retention: Duration) {
    match outbox.prune_published(&relay_id, retention).await {
        Ok(0) => {}
        Ok(deleted) => info!(deleted, "pruned published events past retention"),
        Err(error) => warn!(%error, "outbox retention failed"),
    }
}

/// What one committed batch held.
#[derive(Debug, Default)]
struct PublishedBatch {
    events: u64,
    facts: u64,
    last: u64,
    /// The outbox had nothing more when the batch was committed.
    caught_up: bool,
    /// The event the publisher refused (see [`PublishError::Poison`]); the batch ends before it.
    refused: Option<(u64, PoisonCause)>,
}

impl PublishedBatch {
    /// Takes the events of `page` from `position` on (added last) back out of the batch.
    fn cut_before(&mut self, page: &[StoredEvent], position: u64) {
        let cut = page.iter().filter(|event| event.position >= position);
        for event in cut {
            self.events -= 1;
            if event.metadata.kind() == EventKind::Fact {
                self.facts -= 1;
            }
        }
        self.last = position - 1;
        self.caught_up = false;
    }

    fn add(&mut self, page: &[StoredEvent]) {
        self.events += page.len() as u64;
        self.facts += page
            .iter()
            .filter(|event| event.metadata.kind() == EventKind::Fact)
            .count() as u64;
        if let Some(last) = page.last() {
            self.last = last.position;
        }
    }
}

/// Batches handed to the publisher and not yet confirmed durable, oldest first. They count as
/// published (report, metrics, the store's copy of the position) only once confirmed.
#[derive(Default)]
struct Unconfirmed {
    batches: VecDeque<PublishedBatch>,
}

impl Unconfirmed {
    fn push(&mut self, batch: PublishedBatch) {
        self.batches.push_back(batch);
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Counts every batch up to `confirmed` as published.
    fn confirm(
        &mut self,
        confirmed: Option<u64>,
        report: &mut RelayReport,
        recorder: &PositionRecorder,
    ) {
        let Some(confirmed) = confirmed else {
            return;
        };
        while let Some(batch) = self.batches.pop_front_if(|batch| batch.last <= confirmed) {
            report.published_events += batch.events;
            report.batches += 1;
            metrics::record_batch(batch.events, batch.facts, batch.last);
        }
        report.last_position = confirmed;
        recorder.record(confirmed);
    }

    fn abandon(&mut self) {
        self.batches.clear();
    }

    /// After a restart at `resumed`: counts the batches found published (an exactly-once batch
    /// whose commit was under way when a later one failed) and forgets the rest, which are
    /// sent again.
    fn resume_after(
        &mut self,
        resumed: u64,
        report: &mut RelayReport,
        recorder: &PositionRecorder,
    ) {
        if self
            .batches
            .front()
            .is_some_and(|batch| batch.last <= resumed)
        {
            self.confirm(Some(resumed), report, recorder);
        }
        self.abandon();
    }
}

/// Copies the published position into the store, off the publishing path.
///
/// The store's copy serves retention, metrics and at-least-once restarts (exactly-once resumes
/// from Kafka's checkpoint). On SQLite its write waits behind the writers for the database
/// lock, measured at up to a second under load, and must not hold the next batch up. Only the
/// latest position matters, so positions published meanwhile collapse into one write.
struct PositionRecorder {
    positions: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a stopping relay waits for the store to record its last published position.
const RECORDER_FINISH_TIMEOUT: Duration = Duration::from_secs(3);

impl PositionRecorder {
    /// Each write is given `timeout` (see [`RelayConfig::store_timeout`]).
    fn spawn<O: Outbox + 'static>(outbox: O, relay_id: String, timeout: Duration) -> Self {
        let (positions, receiver) = watch::channel(0);
        let task = tokio::spawn(record_positions(outbox, relay_id, receiver, timeout));
        Self { positions, task }
    }

    fn record(&self, position: u64) {
        self.positions.send_replace(position);
    }

    /// Writes the last position recorded, if not written yet, and stops; gives up after
    /// [`RECORDER_FINISH_TIMEOUT`] (a database out of reach would hold a stop for its pool's
    /// acquire timeout). Giving up loses nothing: the position is the store's copy, and a
    /// restart resumes from Kafka's checkpoint (exactly once) or sends those batches again.
    async fn finish(self) {
        drop(self.positions);
        let mut task = self.task;
        match tokio::time::timeout(RECORDER_FINISH_TIMEOUT, &mut task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "the published-position writer failed"),
            Err(_) => {
                task.abort();
                warn!(
                    timeout = ?RECORDER_FINISH_TIMEOUT,
                    "the store did not record the last published position in time"
                );
            }
        }
    }
}

async fn record_positions<O: Outbox>(
    outbox: O,
    relay_id: String,
    mut positions: watch::Receiver<u64>,
    timeout: Duration,
) {
    // `changed` reports a value sent before the sender was dropped, so the last one is written.
    while positions.changed().await.is_ok() {
        let position = *positions.borrow_and_update();
        // Failing to write it loses nothing (see above): log and go on.
        let recorded = outbox.record_published(&relay_id, position);
        if let Err(error) = answer_within(timeout, recorded).await {
            warn!(%error, position, "could not record the published position");
        }
        if let Ok(head) = answer_within(timeout, outbox.head_position()).await {
            metrics::record_backlog(head.saturating_sub(position));
        }
    }
}

/// The next page of a batch, read on another task while the current page is handed to the
/// producer (or, for the first page of a backlog's next batch, while the batch commits), where
/// the store says reads are worth overlapping ([`Outbox::reads_ahead`]).
///
/// Timed on PostgreSQL (pages of 500), reading a page took 2-5 ms (the server's query, then
/// decoding the rows) and enqueuing its records 1-2 ms, one after the other on the relay's
/// task. Child relays draining 600,000 events, four pairs alternated: at-least-once 87k → 94k
/// events/s, exactly-once 80k → 89k. On SQLite, whose pages are read in process by rusqlite,
/// overlapping measured slower (at-least-once 156k → 139k events/s, six pairs; exactly-once
/// unchanged), so it reads in turn.
///
/// Reading ahead changes nothing of what is read: positions are gapless and committed in
/// order, so the next page is the events after this page's last, whenever it is read. Dropped
/// unfinished (the send or the commit failed), the read is aborted.
struct ReadAhead {
    after: u64,
    read: tokio::task::JoinHandle<Result<Vec<StoredEvent>, StoreError>>,
}

impl ReadAhead {
    fn start<O: Outbox + Clone + 'static>(
        outbox: &O,
        after: u64,
        limit: usize,
        timeout: Duration,
    ) -> Self {
        let outbox = outbox.clone();
        let read =
            tokio::spawn(
                async move { answer_within(timeout, outbox.read_after(after, limit)).await },
            );
        Self { after, read }
    }

    async fn finish(mut self) -> Result<Vec<StoredEvent>, StoreError> {
        match (&mut self.read).await {
            Ok(page) => page,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => Err(StoreError::Cancelled),
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.read.abort();
    }
}

/// Sleeps for `backoff` (doubling it for next time); false if shutdown came first.
async fn pause(shutdown: &mut Shutdown, backoff: &mut Duration, max: Duration) -> bool {
    let sleep = *backoff;
    *backoff = (*backoff * 2).min(max);
    tokio::select! {
        _ = shutdown.wait() => false,
        _ = tokio::time::sleep(sleep) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the counter `name`, from the Prometheus text format.
    fn counter(handle: &metrics_exporter_prometheus::PrometheusHandle, name: &str) -> Option<f64> {
        handle.render().lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            Some(value.parse().unwrap())
        })
    }

    #[test]
    fn a_database_failure_is_counted_as_the_store_s_not_as_a_send_error() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = ::metrics::set_default_local_recorder(&recorder);
        count_error(&RelayError::Store(StoreError::Timeout(
            Duration::from_secs(1),
        )));
        assert_eq!(counter(&handle, metrics::STORE_ERRORS), Some(1.0));
        assert_eq!(counter(&handle, metrics::SEND_ERRORS), None);
        count_error(&RelayError::Publish(PublishError::Retryable(
            rdkafka::error::KafkaError::Canceled,
        )));
        assert_eq!(counter(&handle, metrics::SEND_ERRORS), Some(1.0));
    }
    use crate::store::SqliteStore;

    fn batch(events: u64, last: u64) -> PublishedBatch {
        PublishedBatch {
            events,
            last,
            ..PublishedBatch::default()
        }
    }

    #[tokio::test]
    async fn a_restart_counts_the_batches_it_finds_published_and_forgets_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let store = SqliteStore::connect(path.to_str().unwrap()).await.unwrap();
        let recorder =
            PositionRecorder::spawn(store.clone(), "relay".into(), crate::store::QUERY_TIMEOUT);
        let mut report = RelayReport::default();
        let mut unconfirmed = Unconfirmed::default();
        // The first batch's commit was under way when the second failed, and it committed.
        unconfirmed.push(batch(5, 10));
        unconfirmed.push(batch(7, 17));
        unconfirmed.resume_after(10, &mut report, &recorder);
        let counted = (
            report.published_events,
            report.batches,
            report.last_position,
        );
        assert_eq!(counted, (5, 1, 10));
        assert!(unconfirmed.is_empty());
        // The restart finds nothing more published: nothing is counted, nothing moves back.
        unconfirmed.push(batch(7, 17));
        unconfirmed.resume_after(10, &mut report, &recorder);
        let counted = (
            report.published_events,
            report.batches,
            report.last_position,
        );
        assert_eq!(counted, (5, 1, 10));
        assert!(unconfirmed.is_empty());
        recorder.finish().await;
        assert_eq!(store.published_position("relay").await.unwrap(), 10);
    }
}
