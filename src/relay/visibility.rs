//! Watches that what the exactly-once relay commits becomes readable.
//!
//! A `read_committed` reader sees a partition only up to its last stable offset (LSO), the first
//! offset of the oldest transaction still open there. After broker restarts, Kafka 4.4.0 has
//! been seen (in the fault suite) to accept a relay's commit and never write its commit markers:
//! the transaction stays open on every partition it wrote, no reader gets past it, nothing the
//! relay commits afterwards is readable either, and the relay itself goes on without an error.
//! A transaction another producer left open (and Kafka never ended) looks the same to readers.
//!
//! So the relay watches the checkpoint partition, which every one of its transactions writes
//! last: a committed checkpoint record that stays at or above the partition's LSO for longer
//! than `patience` means readers are stuck behind a transaction that will not end. It logs an
//! error that points to the README ("Hanging transactions") and sets
//! `bookstore_relay_unreadable_commit_seconds`; both clear when the records become readable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use tokio::sync::watch;
use tracing::{debug, error, info};

use super::metrics;
use crate::config::KafkaConfig;

/// How often the checkpoint partition's last stable offset is asked for.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The watch of one publisher; dropping it ends the watch.
pub struct VisibilityWatch {
    committed: watch::Sender<Option<(i64, Instant)>>,
    /// How long the oldest unreadable commit has been so, in milliseconds (0: none).
    unreadable_ms: Arc<AtomicU64>,
    gauge: Arc<GaugeTurn>,
}

/// The watch's turn at `bookstore_relay_unreadable_commit_seconds`, which ends when the watch
/// is dropped (its publisher retired). The gauge is cleared then, at once, and the watch's task
/// never sets it again: while no publisher runs, the relay's start loop sets it (a transaction
/// held open on the checkpoint partition keeps the starts failing), and a task that noticed its
/// retirement only at its next check, up to [`CHECK_EVERY`] later, would overwrite that with
/// a 0 (enough to reset an alert's `for:` clause).
#[derive(Default)]
struct GaugeTurn {
    over: Mutex<bool>,
}

impl GaugeTurn {
    fn set(&self, unreadable_for: Duration) {
        // Under the lock, so that `end` cannot come between the check and the write.
        let over = self.over.lock().unwrap_or_else(PoisonError::into_inner);
        if !*over {
            metrics::record_unreadable_commit(unreadable_for);
        }
    }

    fn end(&self) {
        let mut over = self.over.lock().unwrap_or_else(PoisonError::into_inner);
        *over = true;
        metrics::record_unreadable_commit(Duration::ZERO);
    }
}

impl Drop for VisibilityWatch {
    fn drop(&mut self) {
        self.gauge.end();
    }
}

impl VisibilityWatch {
    /// Starts watching partition 0 of the checkpoint `topic`.
    pub fn start(
        config: &KafkaConfig,
        topic: &str,
        patience: Duration,
    ) -> Result<Self, KafkaError> {
        // Its high watermark must be the last stable offset, whatever the passthrough options.
        let consumer: BaseConsumer = super::checkpoint::committed_reader_config(
            config,
            &format!("{topic}.visibility-watch"),
        )
        .create()?;
        let (committed, commits) = watch::channel(None);
        let unreadable_ms = Arc::new(AtomicU64::new(0));
        let gauge = Arc::new(GaugeTurn::default());
        tokio::spawn(run(
            Arc::new(consumer),
            topic.to_owned(),
            commits,
            patience,
            (unreadable_ms.clone(), gauge.clone()),
            config.request_timeout(),
        ));
        Ok(Self {
            committed,
            unreadable_ms,
            gauge,
        })
    }

    /// The relay committed a transaction whose checkpoint record is at `offset`.
    pub fn committed(&self, offset: i64) {
        self.committed.send_replace(Some((offset, Instant::now())));
    }

    /// How long the oldest commit not yet readable has been so, as of the last check.
    pub fn unreadable_for(&self) -> Duration {
        Duration::from_millis(self.unreadable_ms.load(Ordering::Relaxed))
    }
}

async fn run(
    consumer: Arc<BaseConsumer>,
    topic: String,
    mut commits: watch::Receiver<Option<(i64, Instant)>>,
    patience: Duration,
    (unreadable_ms, gauge): (Arc<AtomicU64>, Arc<GaugeTurn>),
    timeout: Duration,
) {
    let mut tracker = Tracker::new(patience);
    loop {
        tokio::time::sleep(CHECK_EVERY.min(patience)).await;
        if commits.has_changed().is_err() {
            // The publisher is gone, and the gauge was cleared when it went.
            return;
        }
        let latest = *commits.borrow_and_update();
        let asking = consumer.clone();
        let partition_topic = topic.clone();
        // The consumer reads committed, so its high watermark is the last stable offset.
        let last_stable = tokio::task::spawn_blocking(move || {
            asking.fetch_watermarks(&partition_topic, 0, timeout)
        })
        .await
        .expect("the watermark request panicked");
        let last_stable = match last_stable {
            Ok((_, last_stable)) => last_stable,
            Err(error) => {
                debug!(%error, "could not ask for the checkpoint partition's last stable offset");
                continue;
            }
        };
        let now = Instant::now();
        let verdict = tracker.observe(last_stable, latest, now);
        let unreadable_for = tracker.unreadable_for(now);
        unreadable_ms.store(unreadable_for.as_millis() as u64, Ordering::Relaxed);
        gauge.set(unreadable_for);
        match verdict {
            Verdict::Fine => {}
            Verdict::Stuck { offset, for_ } => error!(
                topic,
                offset,
                last_stable,
                seconds = for_.as_secs(),
                "a transaction this relay committed is still unreadable: every read_committed \
                 reader of its partitions (the projection included) is stuck behind a \
                 transaction that Kafka does not end. If it is one of this relay's own, Kafka \
                 lost its commit markers: stop the relay and commit it, never abort it; see the \
                 README, \"Hanging transactions\""
            ),
            Verdict::Readable { after } => info!(
                topic,
                seconds = after.as_secs(),
                "what this relay committed is readable again"
            ),
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// A committed checkpoint at `offset` has been unreadable for longer than the patience;
    /// said once per stall.
    Stuck {
        offset: i64,
        for_: Duration,
    },
    /// A stall said before has ended.
    Readable {
        after: Duration,
    },
}

/// The oldest committed checkpoint seen unreadable, and whether its stall was reported.
#[derive(Debug)]
struct Tracker {
    patience: Duration,
    pending: Option<(i64, Instant)>,
    reported: bool,
}

impl Tracker {
    fn new(patience: Duration) -> Self {
        Self {
            patience,
            pending: None,
            reported: false,
        }
    }

    /// `last_stable`: the partition's last stable offset now; `latest`: the relay's last
    /// committed checkpoint (offset, when).
    fn observe(
        &mut self,
        last_stable: i64,
        latest: Option<(i64, Instant)>,
        now: Instant,
    ) -> Verdict {
        if let Some((offset, since)) = self.pending
            && last_stable > offset
        {
            self.pending = None;
            if std::mem::take(&mut self.reported) {
                return Verdict::Readable {
                    after: now.saturating_duration_since(since),
                };
            }
        }
        if self.pending.is_none()
            && let Some((offset, at)) = latest
            && offset >= last_stable
        {
            self.pending = Some((offset, at));
        }
        match self.pending {
            Some((offset, since)) if !self.reported => {
                let for_ = now.saturating_duration_since(since);
                if for_ >= self.patience {
                    self.reported = true;
                    return Verdict::Stuck { offset, for_ };
                }
                Verdict::Fine
            }
            _ => Verdict::Fine,
        }
    }

    fn unreadable_for(&self, now: Instant) -> Duration {
        self.pending.map_or(Duration::ZERO, |(_, since)| {
            now.saturating_duration_since(since)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(40);

    /// The gauge's value, from the Prometheus text format.
    fn gauge(handle: &metrics_exporter_prometheus::PrometheusHandle) -> Option<f64> {
        handle.render().lines().find_map(|line| {
            let value = line
                .strip_prefix(metrics::UNREADABLE_COMMIT)?
                .strip_prefix(' ')?;
            Some(value.parse().unwrap())
        })
    }

    #[test]
    fn a_retired_watch_clears_the_gauge_at_once_and_never_sets_it_again() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = ::metrics::set_default_local_recorder(&recorder);
        let turn = GaugeTurn::default();

        turn.set(Duration::from_secs(90));
        assert_eq!(gauge(&handle), Some(90.0));
        turn.end();
        assert_eq!(
            gauge(&handle),
            Some(0.0),
            "cleared when the publisher is retired"
        );

        // The start loop finds the checkpoint partition held open and says how long.
        metrics::record_unreadable_commit(Duration::from_secs(120));
        // The retired watch's task, at a check begun before its retirement.
        turn.set(Duration::ZERO);
        assert_eq!(
            gauge(&handle),
            Some(120.0),
            "the start loop's figure stands"
        );
    }

    #[test]
    fn a_commit_that_becomes_readable_is_never_reported() {
        let start = Instant::now();
        let mut tracker = Tracker::new(PATIENCE);
        // Checked a moment after the commit, before its markers are written.
        assert_eq!(
            tracker.observe(100, Some((100, start)), start + Duration::from_millis(5)),
            Verdict::Fine
        );
        assert_eq!(
            tracker.unreadable_for(start + Duration::from_millis(5)),
            Duration::from_millis(5)
        );
        // Readable at the next check, and later commits too.
        let later = start + Duration::from_secs(5);
        assert_eq!(
            tracker.observe(150, Some((149, later)), later),
            Verdict::Fine
        );
        assert_eq!(tracker.unreadable_for(later), Duration::ZERO);
        assert_eq!(
            tracker.observe(150, Some((149, later)), later),
            Verdict::Fine
        );
        assert_eq!(tracker.unreadable_for(later), Duration::ZERO);
    }

    #[test]
    fn a_commit_that_stays_unreadable_is_reported_once_and_its_end_too() {
        let start = Instant::now();
        let mut tracker = Tracker::new(PATIENCE);
        assert_eq!(
            tracker.observe(90, Some((100, start)), start),
            Verdict::Fine
        );
        // Later commits keep coming; the oldest unreadable one is what counts.
        let at = |seconds| start + Duration::from_secs(seconds);
        assert_eq!(
            tracker.observe(90, Some((120, at(20))), at(20)),
            Verdict::Fine
        );
        assert_eq!(
            tracker.observe(90, Some((140, at(41))), at(41)),
            Verdict::Stuck {
                offset: 100,
                for_: Duration::from_secs(41)
            }
        );
        assert_eq!(
            tracker.observe(90, Some((160, at(60))), at(60)),
            Verdict::Fine
        );
        assert_eq!(tracker.unreadable_for(at(60)), Duration::from_secs(60));
        // The transaction in the way ends: readable again, said once.
        assert_eq!(
            tracker.observe(200, Some((180, at(70))), at(70)),
            Verdict::Readable {
                after: Duration::from_secs(70)
            }
        );
        assert_eq!(tracker.unreadable_for(at(70)), Duration::ZERO);
        assert_eq!(
            tracker.observe(200, Some((180, at(70))), at(75)),
            Verdict::Fine
        );
    }

    #[test]
    fn nothing_committed_is_nothing_to_watch() {
        let start = Instant::now();
        let mut tracker = Tracker::new(PATIENCE);
        let much_later = start + Duration::from_secs(600);
        assert_eq!(tracker.observe(0, None, much_later), Verdict::Fine);
        assert_eq!(tracker.unreadable_for(much_later), Duration::ZERO);
    }
}
