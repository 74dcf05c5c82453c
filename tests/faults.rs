//! The fault-injection suite: concurrent writers on many books (changing, adding and removing
//! them) while the relay process is SIGKILLed at random moments, the broker is stopped and
//! started under a publishing relay, and the projector process is killed and restarted.
//!
//! Every fault is made to land where it hurts: a relay is killed only once it has published
//! batches of its own (a respawned relay first waits for the lease its killed predecessor could
//! not release, so the suite runs the relays with a short lease), an outage begins only while a
//! relay is publishing, and a projector is killed only once it has applied facts. A service
//! that exits on its own during the chaos fails the suite.
//!
//! Three runs: exactly-once and at-least-once on PostgreSQL (the production store), and
//! exactly-once on SQLite (the default store, one file shared by the suite's writers and the
//! services' processes).
//!
//! Afterwards every partition is read up to its end, and the suite proves, and prints as
//! figures: every committed event is on Kafka (0 lost), no book's records are out of order, no
//! duplicates reach a `read_committed` reader in exactly-once mode (and how many did in
//! at-least-once mode), every removed book has exactly one tombstone, after its removal fact,
//! and the BookReport equals the store.
//!
//! Sizes are small by default so CI runs it on every change; `BOOKSTORE_FAULTS_SCALE=4` (or
//! more) makes the run longer. The schedule of faults comes from a seed printed with the
//! figures; `BOOKSTORE_FAULTS_SEED=<seed>` replays it (the writers' timing still varies).
//! `BOOKSTORE_FAULTS_LOGS=<folder>` keeps the services' logs there (one folder per run)
//! instead of deleting them with the run.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bookstore::codec::AvroCodec;
use bookstore::codec::avro::fact_is_removal;
use bookstore::config::KafkaConfig;
use bookstore::domain::{
    AddBook, BookCommand, BookId, DomainError, EventKind, Price, StoredEvent, UpdateDetails,
};
use bookstore::projection::ReportStore;
use bookstore::service::{BookService, CommandContext, ServiceError};
use bookstore::store::{AnyStore, EventStore, Outbox, StoreError};
use common::Received;
use common::broker::{EndHanging, PrivateBroker};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use tokio::process::{Child, Command};

/// The relays' lease in this suite. A SIGKILLed relay cannot release its lease, so its
/// successor stands by until it expires: with the default 15 s, every respawned relay would
/// still be standing by when the next kill came, and the kills would prove nothing.
const LEASE_TTL_MS: &str = "2500";

/// A SIGKILLed projector holds its partitions until the broker misses its heartbeats (45 s by
/// default); a short session lets its successor take over within seconds. The short rebalance
/// timeout (`max.poll.interval.ms`) makes a projector that librdkafka leaves outside the group
/// join again with a new consumer after 21 s rather than 345 s (see
/// `Session::stuck_outside_group`), well within the suite's patience.
const PROJECTOR_KAFKA_OPTIONS: &str =
    "session.timeout.ms=6000,heartbeat.interval.ms=1000,max.poll.interval.ms=15000";

const SIGKILL: i32 = 9;

/// How long a service may take to make progress: a broker restart, then the relay's backoff
/// (up to 10 s) and the lease, on a busy 2-core machine.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(90);

/// A wait that has made no progress for this long looks for hanging transactions, and again
/// every [`HANGING_CHECK_EVERY`] after that.
const HANGING_CHECK_AFTER: Duration = Duration::from_secs(45);
const HANGING_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Only a transaction whose last write is older than this can count as hanging: longer than
/// the relays' transaction timeout (20 s, twice the suite's request timeout) plus the
/// coordinator's 10 s between looks for timed-out transactions, by when it has ended every
/// transaction it still knows of.
const HANGING_MIN_AGE: Duration = Duration::from_secs(40);

/// At most how long a reader may take to reach the end of a topic.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(180);

fn scale() -> u64 {
    std::env::var("BOOKSTORE_FAULTS_SCALE")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Where the services' logs go: a temporary folder, deleted with the run unless
/// `BOOKSTORE_FAULTS_LOGS` names a folder to keep it in.
fn logs_folder() -> tempfile::TempDir {
    match std::env::var_os("BOOKSTORE_FAULTS_LOGS") {
        Some(root) => {
            std::fs::create_dir_all(&root).unwrap();
            let mut logs = tempfile::Builder::new()
                .prefix("faults-")
                .tempdir_in(root)
                .unwrap();
            logs.disable_cleanup(true);
            eprintln!("the services' logs are kept in {}", logs.path().display());
            logs
        }
        None => tempfile::tempdir().unwrap(),
    }
}

fn seed() -> u64 {
    std::env::var("BOOKSTORE_FAULTS_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0)
}

/// A small seeded generator (SplitMix64), so that a failing schedule can be run again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// A duration between `from` and `to` milliseconds.
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

/// What one run did and proved.
#[derive(Debug, Default)]
struct Figures {
    mode: &'static str,
    database: Database,
    seed: u64,
    /// Every event in the store at the end.
    committed_events: usize,
    /// Events the writers committed while the faults were injected.
    events_during_chaos: u64,
    /// Of those, committed while the broker was down.
    events_during_outages: u64,
    writer_commands: u64,
    /// Commands refused as the workload expects: a change to a book another writer had just
    /// removed, or a conflict still there after the service's retries.
    writer_refusals: u64,
    /// Every other command error, which fails the suite.
    writer_errors: Vec<String>,
    removed_books: usize,
    /// SIGKILLs of a running relay that had published batches of its own.
    relay_kills: u32,
    /// Of those, during a broker outage.
    relay_kills_during_outage: u32,
    /// What happened at each kill.
    kill_log: Vec<String>,
    /// Longest time from a relay's start, with the broker up, to its first published batch:
    /// mostly the wait for the lease its killed predecessor could not release.
    slowest_takeover: Duration,
    /// Broker stops and starts, each under a running relay that had published.
    broker_outages: u32,
    /// Outages the running relay came through, publishing again afterwards.
    outages_ridden_out: u32,
    /// SIGKILLs of a running projector that had applied facts since it started.
    projector_kills: u32,
    /// How long the projector that went through the last faults took, after the final relay,
    /// to bring the report level with the store.
    projector_caught_up_in: Duration,
    /// Published (as the store records it) when the last chaos relay was killed.
    published_before_final_relay: u64,
    head_before_final_relay: u64,
    distinct_on_kafka: usize,
    lost: usize,
    duplicates: usize,
    order_violations: usize,
    /// Partitions whose last stable offset was below their high watermark at the audit.
    open_transactions: usize,
    /// Data records a `read_uncommitted` reader sees beyond what a `read_committed` one does:
    /// those of aborted transactions, i.e. batches the faults interrupted (exactly-once).
    aborted_records: usize,
    tombstones: usize,
    tombstone_duplicates: usize,
    /// Removed books without a tombstone, tombstones of no removal, and tombstones before
    /// their removal fact.
    tombstone_faults: usize,
    report_rows: usize,
    live_books: usize,
    report_mismatches: usize,
    /// The first lost positions, to look for in the logs.
    lost_positions: Vec<u64>,
    /// Partitions of transactions Kafka left open after their coordinator had ended them,
    /// which the relay had never committed and the suite aborted as an operator would (see
    /// [`Chaos::end_hanging_transactions`]).
    hanging_transactions_aborted: usize,
    /// Partitions of such transactions the relay had committed, whose commit markers Kafka
    /// never wrote, which the suite committed as an operator would.
    hanging_transactions_committed: usize,
    /// Hanging transactions the suite could not end (each fails the run at its wait).
    hanging_transactions_left: usize,
    elapsed: Duration,
}

impl Figures {
    fn published_share(&self) -> f64 {
        self.published_before_final_relay as f64 / self.head_before_final_relay.max(1) as f64
    }

    fn render(&self) -> String {
        let mut text = String::new();
        let mut line = |line: String| {
            text.push_str(&line);
            text.push('\n');
        };
        line(format!(
            "fault suite, {} mode on {} (seed {}, {:.0} s):",
            self.mode,
            self.database.name(),
            self.seed,
            self.elapsed.as_secs_f64()
        ));
        line(format!(
            "  events committed    {} ({} during the faults, {} of them while the broker was down)",
            self.committed_events, self.events_during_chaos, self.events_during_outages
        ));
        line(format!(
            "  writers             {} commands, {} refused as expected, {} failed; {} books removed",
            self.writer_commands,
            self.writer_refusals,
            self.writer_errors.len(),
            self.removed_books
        ));
        line(format!(
            "  relay kills         {} of running relays that had published ({} during an outage); \
             slowest takeover {:.1} s",
            self.relay_kills,
            self.relay_kills_during_outage,
            self.slowest_takeover.as_secs_f64()
        ));
        line(format!(
            "  broker outages      {} under a publishing relay ({} ridden out by it)",
            self.broker_outages, self.outages_ridden_out
        ));
        line(format!(
            "  projector kills     {} of running projectors that had applied facts; the last \
             projector caught up {:.1} s after the final relay",
            self.projector_kills,
            self.projector_caught_up_in.as_secs_f64()
        ));
        line(format!(
            "  published by the relays under faults  {} of {} events ({:.0}%), the rest by the final relay",
            self.published_before_final_relay,
            self.head_before_final_relay,
            self.published_share() * 100.0
        ));
        line(format!(
            "  on Kafka            {} distinct events, {} lost, {} duplicates, {} order violations, \
             {} open transactions; {} records of aborted transactions (interrupted batches, \
             which only a read_uncommitted reader sees)",
            self.distinct_on_kafka,
            self.lost,
            self.duplicates,
            self.order_violations,
            self.open_transactions,
            self.aborted_records
        ));
        if !self.lost_positions.is_empty() {
            line(format!("  lost positions      {:?} …", self.lost_positions));
        }
        line(format!(
            "  hanging txns        partitions Kafka left in a transaction it had ended, ended by \
             the suite as an operator would: {} aborted (never committed by the relay), {} \
             committed (committed by the relay, markers never written); {} could not be ended",
            self.hanging_transactions_aborted,
            self.hanging_transactions_committed,
            self.hanging_transactions_left
        ));
        line(format!(
            "  tombstones          {} for {} removed books, {} duplicates, {} faults",
            self.tombstones, self.removed_books, self.tombstone_duplicates, self.tombstone_faults
        ));
        line(format!(
            "  BookReport          {} rows for {} books, {} mismatches",
            self.report_rows, self.live_books, self.report_mismatches
        ));
        for kill in &self.kill_log {
            line(format!("  {kill}"));
        }
        text
    }

    /// Shows the figures whether or not the test passes: written to stderr directly, since
    /// the test harness captures `println!` and `eprintln!` of passing tests.
    fn show(&self) {
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(self.render().as_bytes());
        let _ = stderr.flush();
    }

    /// What both delivery modes promise, and what shows that the faults really landed. The
    /// figures are shown before (see [`Figures::show`]).
    fn assert_faults_landed_and_nothing_lost(&self) {
        let mode = format!("{} on {}", self.mode, self.database.name());
        assert!(self.relay_kills >= 10, "{mode}: fewer than 10 relay kills");
        assert!(
            self.relay_kills_during_outage >= 1,
            "{mode}: no relay killed during an outage"
        );
        assert!(self.broker_outages >= 3, "{mode}: fewer than 3 outages");
        assert!(
            self.outages_ridden_out >= 1,
            "{mode}: no relay came through an outage"
        );
        assert!(self.projector_kills >= 1, "{mode}: no projector kill");
        assert!(
            self.writer_errors.is_empty(),
            "{mode}: commands failed: {:?}",
            self.writer_errors
        );
        assert!(
            self.events_during_chaos >= 1_000 * scale(),
            "{mode}: the writers hardly wrote during the faults"
        );
        assert!(self.removed_books >= 1, "{mode}: no book removed");
        // Otherwise the final clean relay did the work, and the kills proved little.
        assert!(
            self.published_share() >= 0.5,
            "{mode}: most events were published only by the final relay"
        );
        assert_eq!(self.lost, 0, "{mode}: events lost");
        assert_eq!(
            self.distinct_on_kafka, self.committed_events,
            "{mode}: Kafka holds events the store does not"
        );
        assert_eq!(self.order_violations, 0, "{mode}: records out of order");
        assert_eq!(self.open_transactions, 0, "{mode}: transactions left open");
        assert_eq!(self.tombstone_faults, 0, "{mode}: tombstones wrong");
        assert_eq!(self.report_mismatches, 0, "{mode}: report differs");
    }

    /// What exactly-once mode adds: no duplicate reaches a `read_committed` reader.
    fn assert_faults_landed_and_nothing_duplicated(&self) {
        self.assert_faults_landed_and_nothing_lost();
        let text = self.render();
        assert_eq!(self.duplicates, 0, "duplicates\n{text}");
        assert_eq!(self.tombstone_duplicates, 0, "tombstone duplicates\n{text}");
    }
}

/// What the writers did.
#[derive(Debug, Default)]
struct Writes {
    commands: u64,
    events: u64,
    removed: u64,
    refusals: u64,
    errors: Vec<String>,
}

impl Writes {
    fn add(&mut self, other: Writes) {
        self.commands += other.commands;
        self.events += other.events;
        self.removed += other.removed;
        self.refusals += other.refusals;
        self.errors.extend(other.errors);
    }
}

/// Random commands on the live `books` until `stop`: mostly price and detail changes, and now
/// and then a book added or removed, so tombstones go through the faults too.
async fn write_until(
    service: Arc<BookService<AnyStore, AvroCodec>>,
    books: Arc<Mutex<Vec<BookId>>>,
    stop: Arc<AtomicBool>,
    mut rng: Rng,
) -> Writes {
    let mut writes = Writes::default();
    while !stop.load(Ordering::Relaxed) {
        let (book_id, live) = {
            let books = books.lock().unwrap();
            (books[rng.below(books.len() as u64) as usize], books.len())
        };
        let command = match rng.below(100) {
            0 if live > 10 => BookCommand::Remove { book_id },
            1 => BookCommand::Add(new_book(BookId::generate(), "Chaos late")),
            2..=11 => {
                let mut update = UpdateDetails::new(book_id);
                update.title = Some(format!("Retitled {}", rng.below(1000)));
                BookCommand::UpdateDetails(update)
            }
            _ => BookCommand::UpdatePrice {
                book_id,
                price: Price::from_cents(100 + rng.below(10_000) as i64).unwrap(),
            },
        };
        let (removal, added) = match &command {
            BookCommand::Remove { .. } => (true, None),
            BookCommand::Add(add) => (false, Some(add.book_id)),
            _ => (false, None),
        };
        match service.execute(command, CommandContext::default()).await {
            Ok(outcome) => {
                writes.commands += 1;
                writes.events += outcome.events.len() as u64;
                let mut books = books.lock().unwrap();
                if removal {
                    // Removing a removed book succeeds and changes nothing (no events).
                    if !outcome.events.is_empty() {
                        writes.removed += 1;
                    }
                    books.retain(|id| *id != book_id);
                }
                books.extend(added);
            }
            // Another writer removed the book after this one picked it, or kept changing it
            // through every retry: the workload's doing, not a fault.
            Err(ServiceError::Domain(DomainError::Removed(_)))
            | Err(ServiceError::Store(StoreError::Conflict { .. })) => writes.refusals += 1,
            Err(error) => writes.errors.push(error.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    writes
}

fn new_book(book_id: BookId, title: &str) -> AddBook {
    AddBook {
        book_id,
        title: title.to_owned(),
        author: "Fault Injector".into(),
        isbn: None,
        price: Price::from_cents(1000).unwrap(),
        description: None,
    }
}

/// A `bookstore` process, its stderr in a log file of its own.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    started: Instant,
    /// A service's Prometheus endpoint and its counter of batches done (published, or applied
    /// to the read model): what this very process has done, as no shared position can tell
    /// (a relay's successor also advances the store's published position when it recovers
    /// its predecessor's last checkpoint; a killed projector's last transaction may still
    /// commit after its death).
    metrics: Option<(SocketAddr, &'static str)>,
    /// The most batches seen done.
    seen_batches: u64,
}

impl Process {
    /// Fails the suite if the process has ended: during the faults nothing but the suite's own
    /// kills may stop a service (a relay waits out outages and lost leases, a projector waits
    /// out outages and rebalances).
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited by itself ({status}); the end of its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
    }

    /// Batches this service has done so far (0 while it starts, stands by or waits for its
    /// partitions); `None` while its metrics do not answer.
    async fn batches(&mut self) -> Option<u64> {
        let (address, counter) = self.metrics.expect("a service serves metrics");
        let batches = tokio::task::spawn_blocking(move || scrape_counter(address, counter))
            .await
            .unwrap()?;
        self.seen_batches = self.seen_batches.max(batches);
        Some(batches)
    }

    /// SIGKILL, to a process that is still running.
    async fn kill(mut self) {
        self.assert_running();
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert_eq!(
            status.signal(),
            Some(SIGKILL),
            "{} ended by itself ({status}) instead of by the SIGKILL; its log:\n{}",
            self.name,
            log_tail(&self.log)
        );
    }

    /// SIGTERM, to a process that is still running, which must then finish what it is doing
    /// and exit 0 within 30 s, as every service promises.
    async fn terminate(mut self) {
        let status = self.signal_and_wait().await;
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; its log:\n{}",
            self.name,
            log_tail(&self.log)
        );
    }

    /// SIGTERM, to a job (`relay --once`) that is still running: it must exit within 30 s,
    /// failing with "stopped before …" as a job stopped early does (or 0, had it just finished).
    async fn stop_job(mut self) {
        let status = self.signal_and_wait().await;
        let log = log_tail(&self.log);
        assert!(
            status.success() || log.contains("stopped before"),
            "{} exited with {status} after SIGTERM, not as a stopped job; its log:\n{log}",
            self.name
        );
    }

    async fn signal_and_wait(&mut self) -> std::process::ExitStatus {
        self.assert_running();
        let pid = self.child.id().expect("running").to_string();
        let signalled = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(signalled.success(), "could not signal {}", self.name);
        let Ok(status) = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await
        else {
            panic!(
                "{} did not stop within 30 s of SIGTERM; its log:\n{}",
                self.name,
                log_tail(&self.log)
            );
        };
        status.unwrap()
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The broker's log lines (of `server.log` and the files rolled from it, oldest first) that
/// concern a hanging transaction: those naming one of `transactional_ids`, and those of the
/// transaction coordinator's marker sender and of log truncation. At most the last `limit`.
/// Printed with each hanging transaction found, so that a run's output (CI keeps nothing else)
/// says what the broker did with the transaction's markers.
fn broker_log_about(logs: &Path, transactional_ids: &[String], limit: usize) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(logs)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| {
                    path.file_name()
                        .is_some_and(|name| name.to_string_lossy().starts_with("server.log"))
                })
                .collect()
        })
        .unwrap_or_default();
    // server.log.2 is older than server.log.1, which is older than server.log (number 0).
    files.sort_by_key(|path| {
        let rolled = path.file_name().and_then(|name| {
            name.to_str()?
                .strip_prefix("server.log.")?
                .parse::<u32>()
                .ok()
        });
        std::cmp::Reverse(rolled.unwrap_or(0))
    });
    let mut lines: Vec<String> = files
        .iter()
        .flat_map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|line| {
                    transactional_ids
                        .iter()
                        .any(|id| line.contains(id.as_str()))
                        || line.contains("TransactionMarker")
                        || line.contains("Truncat")
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    lines.drain(..lines.len().saturating_sub(limit));
    lines
}

/// The value of counter `name` at the metrics endpoint `address` (0 while the counter does not
/// exist yet); `None` when the endpoint does not answer.
fn scrape_counter(address: SocketAddr, name: &str) -> Option<u64> {
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let request = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    if !response.starts_with("HTTP/1.") || !response.contains(" 200 ") {
        return None;
    }
    let value = response
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok());
    Some(value.map_or(0, |value| value as u64))
}

/// The store the writers, relays and projectors share.
#[derive(Debug, Clone, Copy, Default)]
enum Database {
    /// The production store: one schema of `BOOKSTORE_TEST_DATABASE_URL` per run.
    #[default]
    Postgres,
    /// The default store: one file, written by the suite's writers, the relays and the
    /// projectors from their own processes.
    Sqlite,
}

impl Database {
    fn name(self) -> &'static str {
        match self {
            Database::Postgres => "PostgreSQL",
            Database::Sqlite => "SQLite",
        }
    }
}

/// A relay process.
struct Relay {
    process: Process,
    /// Started while the broker was down: its start waited for the broker too.
    started_in_outage: bool,
}

/// The services the suite runs and kills.
#[derive(Debug, Clone, Copy)]
enum Service {
    Relay,
    Projector,
}

/// One run of the suite: the broker, the store, the writers and the services under faults.
struct Chaos {
    broker: PrivateBroker,
    kafka: KafkaConfig,
    database_url: String,
    store: AnyStore,
    /// Holds the SQLite file, which the suite and its services share, until the run ends.
    _sqlite_folder: Option<tempfile::TempDir>,
    delivery: &'static str,
    group: String,
    relay_id: String,
    logs: tempfile::TempDir,

    spawned: u32,
    rng: Rng,
    relay: Option<Relay>,
    projector: Option<Process>,
    /// The job [`Chaos::finish`] waits for.
    job: Option<(Job, Process)>,
    head_at_last_kill: u64,
    hanging_checked_at: Option<Instant>,
    /// Whether the broker's log about hanging transactions was printed (once a run).
    hanging_logged: bool,
    figures: Figures,
}

/// With `BOOKSTORE_FAULTS_LOGS`, the broker's logs join the services' (as `broker/`), whether
/// the run passed or not.
impl Drop for Chaos {
    fn drop(&mut self) {
        if std::env::var_os("BOOKSTORE_FAULTS_LOGS").is_none() {
            return;
        }
        let kept = self.logs.path().join("broker");
        let _ = std::fs::create_dir_all(&kept);
        if let Ok(entries) = std::fs::read_dir(self.broker.logs()) {
            for entry in entries.flatten() {
                let _ = std::fs::copy(entry.path(), kept.join(entry.file_name()));
            }
        }
    }
}

impl Chaos {
    async fn start(delivery: &'static str, database: Database) -> Self {
        let seed = seed();
        let broker = PrivateBroker::start().await;
        let mut kafka = KafkaConfig::new(broker.bootstrap_servers());
        kafka.topic_prefix = common::unique("chaos");
        kafka.request_timeout_ms = 10_000;
        let (store, database_url, sqlite_folder) = match database {
            Database::Postgres => {
                let (store, url) = common::postgres_store_with_url().await;
                (AnyStore::Postgres(store), url, None)
            }
            Database::Sqlite => {
                let folder = tempfile::tempdir().unwrap();
                let url = format!("sqlite:{}", folder.path().join("bookstore.db").display());
                let store = AnyStore::connect(&url).await.unwrap();
                (store, url, Some(folder))
            }
        };
        let relay_id = format!("{}.relay", kafka.topic_prefix);
        Self {
            broker,
            kafka,
            database_url,
            store,
            _sqlite_folder: sqlite_folder,
            delivery,
            group: common::unique("report"),
            relay_id,
            logs: logs_folder(),
            spawned: 0,
            rng: Rng(seed),
            relay: None,
            projector: None,
            job: None,
            head_at_last_kill: 0,
            hanging_checked_at: None,
            hanging_logged: false,
            figures: Figures {
                mode: delivery,
                database,
                seed,
                ..Figures::default()
            },
        }
    }

    fn bookstore(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bookstore"));
        command
            .args(args)
            .env("BOOKSTORE_DATABASE_URL", &self.database_url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.kafka.bootstrap_servers)
            .env("BOOKSTORE_TOPIC_PREFIX", &self.kafka.topic_prefix)
            .env("BOOKSTORE_KAFKA_TIMEOUT_MS", "10000")
            .env("RUST_LOG", "info,rdkafka=warn,sqlx=warn")
            // The suite's own settings, unknown to the binary.
            .env_remove("BOOKSTORE_FAULTS_SCALE")
            .env_remove("BOOKSTORE_FAULTS_SEED")
            .env_remove("BOOKSTORE_FAULTS_LOGS")
            .stdout(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// `bookstore relay` in the run's delivery mode, with the suite's short lease.
    fn relay_command(&self, args: &[&str]) -> Command {
        let mut command = self.bookstore(&["relay", "--delivery", self.delivery]);
        command.args(["--lease-ttl-ms", LEASE_TTL_MS]).args(args);
        command
    }

    /// Starts `command`, serving its metrics when it is a service with a batch `counter`.
    fn spawn(
        &mut self,
        name: &str,
        mut command: Command,
        counter: Option<&'static str>,
    ) -> Process {
        self.spawned += 1;
        let name = format!("{name} #{}", self.spawned);
        let log = self.logs.path().join(format!(
            "{:02}-{}.log",
            self.spawned,
            name.replace([' ', '#'], "")
        ));
        let metrics = counter.map(|counter| {
            let address = SocketAddr::from(([127, 0, 0, 1], common::free_local_port()));
            command.args(["--metrics-addr", &address.to_string()]);
            (address, counter)
        });
        command.stderr(std::fs::File::create(&log).unwrap());
        Process {
            child: command.spawn().unwrap(),
            name,
            log,
            started: Instant::now(),
            metrics,
            seen_batches: 0,
        }
    }

    fn spawn_relay(&mut self, started_in_outage: bool) {
        assert!(self.relay.is_none(), "a relay is running already");
        // Batches of 200 (rather than the default 5,000) put many transactions in each relay's
        // life, so kills land between and inside them, yet let a respawned relay catch up.
        let command = self.relay_command(&["--batch-size", "200"]);
        let process = self.spawn("relay", command, Some("bookstore_relay_batches_total"));
        self.relay = Some(Relay {
            process,
            started_in_outage,
        });
    }

    fn spawn_projector(&mut self) {
        assert!(self.projector.is_none(), "a projector is running already");
        let mut command = self.bookstore(&["project", "--group", &self.group]);
        command.env("BOOKSTORE_KAFKA_OPTIONS", PROJECTOR_KAFKA_OPTIONS);
        let counter = Some("bookstore_projection_batches_total");
        self.projector = Some(self.spawn("projector", command, counter));
    }

    fn service(&mut self, service: Service) -> &mut Process {
        match service {
            Service::Relay => &mut self.relay.as_mut().expect("a relay runs").process,
            Service::Projector => self.projector.as_mut().expect("a projector runs"),
        }
    }

    async fn head(&self) -> u64 {
        self.store.head_position().await.unwrap()
    }

    async fn published(&self) -> u64 {
        self.store.published_position(&self.relay_id).await.unwrap()
    }

    /// Partitions of the suite's topics (the checkpoint topic too) whose last stable offset
    /// lies below their high watermark: a relay waiting there waits for a transaction to end.
    async fn partitions_with_open_transactions(&self) -> usize {
        let topics = self.kafka.topics();
        let mut open = 0;
        for topic in [topics.book, topics.book_fact, topics.relay_checkpoint] {
            let kafka = self.kafka.clone();
            open += tokio::task::spawn_blocking(move || {
                partitions_with_open_transactions(&kafka, &topic)
            })
            .await
            .unwrap();
        }
        open
    }

    fn assert_services_running(&mut self) {
        if let Some(relay) = &mut self.relay {
            relay.process.assert_running();
        }
        if let Some(projector) = &mut self.projector {
            projector.assert_running();
        }
    }

    /// Sleeps, watching that the services keep running.
    async fn pause(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.assert_services_running();
            tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        }
    }

    /// Waits until the running `service` has done more than `beyond` batches of its own;
    /// returns how many it has.
    async fn wait_for_batches(&mut self, service: Service, beyond: u64, what: &str) -> u64 {
        let (mut started, mut beyond) = (Instant::now(), beyond);
        let mut deadline = started + PROGRESS_TIMEOUT;
        loop {
            self.assert_services_running();
            if let Some(batches) = self.service(service).batches().await
                && batches > beyond
            {
                return batches;
            }
            let spawned = self.spawned;
            if self.end_hanging_transactions(started).await {
                started = Instant::now();
                deadline = started + PROGRESS_TIMEOUT;
                if self.spawned != spawned && matches!(service, Service::Relay) {
                    // A new relay: its own batches count.
                    beyond = 0;
                }
            }
            if Instant::now() >= deadline {
                let stuck = self.partitions_with_open_transactions().await;
                let seed = self.figures.seed;
                let process = self.service(service);
                panic!(
                    "{what}: {} did nothing new within {PROGRESS_TIMEOUT:?} (seed {}); \
                     partitions with a transaction open now: {stuck}; its log:\n{}",
                    process.name,
                    seed,
                    log_tail(&process.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the running relay has published batches of its own.
    async fn wait_for_relay_to_publish(&mut self, what: &str) {
        self.wait_for_batches(Service::Relay, 0, what).await;
        let relay = self.relay.as_ref().expect("a relay runs");
        let took = relay.process.started.elapsed();
        if !relay.started_in_outage && took > self.figures.slowest_takeover {
            self.figures.slowest_takeover = took;
        }
    }

    /// The running `service`'s batches as of now, waiting (a little) for its metrics to answer.
    async fn batches_now(&mut self, service: Service) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.assert_services_running();
            let process = self.service(service);
            if let Some(batches) = process.batches().await {
                return batches;
            }
            assert!(
                Instant::now() < deadline,
                "{}: its metrics do not answer",
                process.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the running relay, which must have been seen publishing batches of its own.
    async fn kill_relay(&mut self, during_outage: bool) {
        let mut relay = self.relay.take().expect("a relay runs");
        let batches = relay.process.batches().await.unwrap_or(0);
        let batches = batches.max(relay.process.seen_batches);
        assert!(
            batches > 0,
            "{} is killed before it published",
            relay.process.name
        );
        let (name, lived) = (relay.process.name.clone(), relay.process.started.elapsed());
        relay.process.kill().await;
        self.figures.relay_kills += 1;
        if during_outage {
            self.figures.relay_kills_during_outage += 1;
        }
        let head = self.head().await;
        // Each fault must land among writes, not after the writers stalled.
        assert!(
            head > self.head_at_last_kill,
            "no event committed since the previous relay kill"
        );
        self.head_at_last_kill = head;
        let line = format!(
            "kill {:2}: {name} after {:.1} s and {batches} batches of its own; \
             store's published position {} of head {head}{}",
            self.figures.relay_kills,
            lived.as_secs_f64(),
            self.published().await,
            if during_outage { ", broker down" } else { "" },
        );
        eprintln!("seed {}: {line}", self.figures.seed);
        self.figures.kill_log.push(line);
    }

    /// SIGKILLs the running projector once it has applied batches of its own, and starts
    /// another.
    async fn kill_projector(&mut self) {
        self.wait_for_batches(Service::Projector, 0, "a projector before its kill")
            .await;
        let projector = self.projector.take().expect("a projector runs");
        projector.kill().await;
        self.figures.projector_kills += 1;
        self.spawn_projector();
    }

    /// Stops the broker under the running relay, which has published, and starts it again
    /// after a while; the writers keep writing. With `kill_relay`, the relay is killed during
    /// the outage and its successor starts while the broker is still down; otherwise the relay
    /// must come through and publish again.
    async fn outage(&mut self, kill_relay: bool) {
        // A projector still setting up fails when the broker goes away (its setup is a job);
        // once it has applied something, it waits outages out.
        self.wait_for_batches(Service::Projector, 0, "a projector before an outage")
            .await;
        let head_before = self.head().await;
        self.broker.run("stop").await;
        // Counted only now that the broker is gone, so no batch confirmed meanwhile counts.
        let batches_before = self.batches_now(Service::Relay).await;
        let pause = self.rng.millis(1_000, 3_000);
        self.pause(pause).await;
        if kill_relay {
            self.kill_relay(true).await;
            self.spawn_relay(true);
            let pause = self.rng.millis(200, 1_500);
            self.pause(pause).await;
        }
        let head_during = self.head().await;
        assert!(
            head_during > head_before,
            "the writers committed nothing while the broker was down"
        );
        self.figures.events_during_outages += head_during - head_before;
        self.broker.run("start").await;
        self.figures.broker_outages += 1;
        if kill_relay {
            self.wait_for_relay_to_publish("after an outage, the relay started during it")
                .await;
        } else {
            let what = "after an outage, the relay that saw it";
            self.wait_for_batches(Service::Relay, batches_before, what)
                .await;
            self.figures.outages_ridden_out += 1;
        }
    }

    /// Waits until the running relay has published up to `position`.
    async fn wait_until_published(&mut self, position: u64) {
        let mut started = Instant::now();
        while self.published().await < position {
            self.assert_services_running();
            if self.end_hanging_transactions(started).await {
                started = Instant::now();
            }
            if started.elapsed() >= PROGRESS_TIMEOUT {
                let relay = &self.relay.as_ref().expect("a relay runs").process;
                panic!(
                    "{} did not publish up to {position} within {PROGRESS_TIMEOUT:?}; its log:\n{}",
                    relay.name,
                    log_tail(&relay.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Partitions of hanging transactions ended so far.
    fn hanging_transactions_ended(&self) -> usize {
        self.figures.hanging_transactions_aborted + self.figures.hanging_transactions_committed
    }

    /// Ends hanging transactions as the README tells operators to, when a wait that began at
    /// `waiting_since` has made no progress for [`HANGING_CHECK_AFTER`]: aborts those the relay
    /// never committed, commits those it did. Returns whether it ended any, so that the wait
    /// starts over (and, when the relay was replaced, counts the new one's batches).
    ///
    /// On Kafka 4.4.0 (one KRaft node), a transaction of a relay whose broker restarted under
    /// it sometimes stayed open on the partitions it wrote while its coordinator had ended it
    /// (about one exactly-once run in five): the coordinator sent its markers during the
    /// broker's controlled shutdown, found the partitions without a leader, took them for
    /// deleted and skipped them (KAFKA-20734; the README, "Hanging transactions"). Without a
    /// controlled shutdown the same happens at the restart instead, when the broker fences its
    /// previous incarnation. Nothing in Kafka ends such a transaction, and every
    /// `read_committed` reader of those partitions stops at it, the relay's checkpoint reader
    /// included. Two kinds were seen:
    /// * one the relay never committed (its producer timed out in an outage): aborting it
    ///   loses nothing, the relay sends its events again from its last committed checkpoint;
    /// * one the relay did commit, whose commit markers Kafka never wrote: aborting it would
    ///   hide its events for good (a run that did lost 16). `kafka.sh hanging-transactions
    ///   --commit-producer` ends it as committed, through the relay's own transactional id, so
    ///   the suite stops the relay first, the service or a `relay --once` job (its restarts
    ///   re-initialise that id, and one between the tool's requests would abort the commit),
    ///   and starts it again after.
    ///
    /// They are told apart by the transaction's checkpoint record, which a relay writes as the
    /// last record of every transaction it commits: none, or one above the position the relay
    /// recorded as published, is a transaction it never committed. (The relay records each
    /// commit within moments; a transaction counts as hanging only after [`HANGING_MIN_AGE`].)
    /// "None" rests on what was seen: a hanging transaction held every partition it wrote,
    /// the checkpoint partition included, never some of them. Either way the run then proves
    /// nothing lost, duplicated or reordered, so a wrong call fails it.
    async fn end_hanging_transactions(&mut self, waiting_since: Instant) -> bool {
        if waiting_since.elapsed() < HANGING_CHECK_AFTER
            || self
                .hanging_checked_at
                .is_some_and(|at| at.elapsed() < HANGING_CHECK_EVERY)
        {
            return false;
        }
        self.hanging_checked_at = Some(Instant::now());
        let found = self
            .broker
            .hanging_transactions(HANGING_MIN_AGE, None)
            .await;
        let mut notes = found.clone();
        let checkpoint_topic = self.kafka.topics().relay_checkpoint;
        // Each producer with a hanging transaction, and where it starts on the checkpoint
        // partition if it wrote there.
        let mut producers: std::collections::BTreeMap<u64, Option<i64>> = Default::default();
        for (partition, producer, offset) in found.iter().filter_map(|line| parse_hanging(line)) {
            let start = producers.entry(producer).or_default();
            if partition == format!("{checkpoint_topic}-0") {
                *start = Some(offset);
            }
        }
        let published = self.published().await;
        let mut ended = false;
        for (producer, offset) in producers {
            let checkpoint = match offset {
                Some(offset) => {
                    let (kafka, topic) = (self.kafka.clone(), checkpoint_topic.clone());
                    tokio::task::spawn_blocking(move || checkpoint_at(&kafka, &topic, offset))
                        .await
                        .unwrap()
                }
                None => None,
            };
            let committed_by_relay = checkpoint.is_some_and(|checkpoint| checkpoint <= published);
            let done = if committed_by_relay {
                notes.push(format!(
                    "producer {producer}'s hanging transaction has checkpoint {}, and the \
                     relay recorded {published} as published: it committed it and Kafka never \
                     wrote its commit markers; committing it",
                    checkpoint.unwrap_or_default()
                ));
                let relay = self.relay.take();
                let relay_job = self.job.take_if(|(job, _)| *job == Job::RelayOnce);
                let (replace_relay, replace_job) = (relay.is_some(), relay_job.is_some());
                if let Some(relay) = relay {
                    relay.process.terminate().await;
                }
                if let Some((_, job)) = relay_job {
                    job.stop_job().await;
                }
                let done = self
                    .broker
                    .hanging_transactions(HANGING_MIN_AGE, Some((EndHanging::Commit, producer)))
                    .await;
                if replace_relay {
                    self.spawn_relay(false);
                }
                if replace_job {
                    self.spawn_job(Job::RelayOnce);
                }
                done
            } else {
                self.broker
                    .hanging_transactions(HANGING_MIN_AGE, Some((EndHanging::Abort, producer)))
                    .await
            };
            let count = |prefix: &str| done.iter().filter(|line| line.starts_with(prefix)).count();
            let (aborted, committed) = (count("aborted "), count("committed "));
            self.figures.hanging_transactions_aborted += aborted;
            self.figures.hanging_transactions_committed += committed;
            self.figures.hanging_transactions_left += count("could not ");
            ended |= aborted + committed > 0;
            notes.extend(
                done.into_iter()
                    .filter(|line| !line.starts_with("hanging: ")),
            );
        }
        for note in notes {
            eprintln!("seed {}: {note}", self.figures.seed);
            self.figures.kill_log.push(note);
        }
        if !found.is_empty() && !self.hanging_logged {
            self.hanging_logged = true;
            let ids: Vec<String> = found
                .iter()
                .filter_map(|line| line.split("transactional id ").nth(1))
                .filter_map(|rest| rest.split(' ').next())
                .map(str::to_owned)
                .collect();
            eprintln!("seed {}: the broker's log about them:", self.figures.seed);
            for line in broker_log_about(&self.broker.logs(), &ids, 120) {
                eprintln!("  {line}");
            }
        }
        ended
    }

    /// Waits until the running projector has brought the report level with the store.
    async fn wait_for_report_to_match_store(&mut self) {
        let (started, mut progress_since) = (Instant::now(), Instant::now());
        loop {
            self.assert_services_running();
            if compare_report(&self.store).await.mismatches == 0 {
                self.figures.projector_caught_up_in = started.elapsed();
                return;
            }
            if self.end_hanging_transactions(progress_since).await {
                progress_since = Instant::now();
            }
            if progress_since.elapsed() >= PROGRESS_TIMEOUT {
                let projector = self.service(Service::Projector);
                panic!(
                    "{} did not bring the report level with the store within \
                     {PROGRESS_TIMEOUT:?} after the faults; its log:\n{}",
                    projector.name,
                    log_tail(&projector.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts `job`; [`finish`](Self::finish) follows it.
    fn spawn_job(&mut self, job: Job) {
        let (name, command) = match job {
            Job::RelayOnce => ("relay --once", self.relay_command(&["--once"])),
            Job::CatchUp => (
                "project --until-caught-up",
                self.bookstore(&["project", "--group", &self.group, "--until-caught-up"]),
            ),
        };
        let process = self.spawn(name, command, None);
        self.job = Some((job, process));
    }

    /// Runs `job` to its successful end. A `relay --once` stopped to commit a hanging
    /// transaction (see [`end_hanging_transactions`](Self::end_hanging_transactions)) is
    /// started again.
    async fn finish(&mut self, job: Job) {
        self.spawn_job(job);
        let mut started = Instant::now();
        loop {
            let (_, process) = self.job.as_mut().expect("the job runs");
            if let Some(status) = process.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} failed ({status}); the end of its log:\n{}",
                    process.name,
                    log_tail(&process.log)
                );
                self.job = None;
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "{} did not finish in 180 s; the end of its log:\n{}",
                process.name,
                log_tail(&process.log)
            );
            if self.end_hanging_transactions(started).await {
                started = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A one-off run the suite waits for, after the faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    /// `relay --once`: publishes what the killed relays left.
    RelayOnce,
    /// `project --until-caught-up`: checks that the projector left nothing behind.
    CatchUp,
}

/// The faults, while the writers write: `kills` rounds, each starting a relay (unless one
/// runs), waiting for it to publish, and ending with its SIGKILL at a random moment; every
/// fifth round, from the first, kills the projector too. Every third round but the last stops
/// the broker under the relay first: the first, third, … outage kills the relay while the
/// broker is down, the others let it come through. So relays die before, during and after
/// broker restarts, in both delivery modes.
///
/// (Until the suite could end hanging transactions, exactly-once runs killed relays only
/// before the first restart: a relay killed after one sometimes left a transaction that
/// Kafka never ended, see [`Chaos::end_hanging_transactions`].)
async fn inject_faults(chaos: &mut Chaos, kills: u32) {
    let mut outages = 0;
    let mut hanging_ended = 0;
    for round in 1..=kills {
        if chaos.relay.is_none() {
            chaos.spawn_relay(false);
        }
        chaos.wait_for_relay_to_publish("a respawned relay").await;
        if chaos.hanging_transactions_ended() > hanging_ended {
            // A hanging transaction held the relays back for a minute while the writers wrote
            // on: this relay publishes what piled up, not the final relay after the faults.
            hanging_ended = chaos.hanging_transactions_ended();
            chaos.wait_until_published(chaos.head().await).await;
        }
        if round % 5 == 1 {
            chaos.kill_projector().await;
        }
        // Not in the last round: a relay killed in an outage is followed by another one.
        if round % 3 == 0 && round < kills {
            outages += 1;
            let kill_during_outage = outages % 2 == 1;
            chaos.outage(kill_during_outage).await;
            if kill_during_outage {
                continue;
            }
        }
        let moment = chaos.rng.millis(0, 1_500);
        chaos.pause(moment).await;
        chaos.kill_relay(false).await;
    }
}

/// Four writers running [`write_until`] on shared books.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Writes>>,
}

impl Writers {
    fn start(service: BookService<AnyStore, AvroCodec>, books: Vec<BookId>, seed: u64) -> Self {
        let service = Arc::new(service);
        let books = Arc::new(Mutex::new(books));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..4)
            .map(|writer| {
                let rng = Rng(seed ^ (writer + 1));
                let (service, books, stop) = (service.clone(), books.clone(), stop.clone());
                tokio::spawn(write_until(service, books, stop, rng))
            })
            .collect();
        Self { stop, tasks }
    }

    async fn stop(self) -> Writes {
        self.stop.store(true, Ordering::Relaxed);
        let mut writes = Writes::default();
        for task in self.tasks {
            writes.add(task.await.unwrap());
        }
        writes
    }
}

async fn add_books(service: &BookService<AnyStore, AvroCodec>, count: u64) -> Vec<BookId> {
    let mut books = Vec::new();
    for index in 0..count {
        let book_id = BookId::generate();
        let add = BookCommand::Add(new_book(book_id, &format!("Chaos {index}")));
        service
            .execute(add, CommandContext::default())
            .await
            .unwrap();
        books.push(book_id);
    }
    books
}

/// One chaos run at a time: each starts a broker of its own beside its relays, projector and
/// writers, and two at once on a 2-core machine starve each other into time-outs (lost
/// leases, stalled transactions) that say nothing about the pipeline.
static ONE_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn chaos(delivery: &'static str, database: Database) -> Figures {
    let _alone = ONE_RUN_AT_A_TIME.lock().await;
    let started = Instant::now();
    let mut chaos = Chaos::start(delivery, database).await;
    let service = BookService::new(chaos.store.clone(), AvroCodec::new());
    let books = add_books(&service, 30 * scale()).await;
    let head_before_chaos = chaos.head().await;
    let writers = Writers::start(service, books, chaos.figures.seed);
    chaos.spawn_projector();
    inject_faults(&mut chaos, 10 * scale() as u32).await;
    let writes = writers.stop().await;

    let head = chaos.head().await;
    assert_eq!(
        head - head_before_chaos,
        writes.events,
        "the store holds events the writers did not commit"
    );
    let published = chaos.published().await;
    let figures = &mut chaos.figures;
    figures.writer_commands = writes.commands;
    figures.writer_refusals = writes.refusals;
    figures.writer_errors = writes.errors;
    figures.events_during_chaos = writes.events;
    figures.head_before_final_relay = head;
    figures.published_before_final_relay = published;

    // Whatever the killed relays left, a clean run publishes. The projector that went through
    // the last faults must then catch up by itself and stop as a service should; the catch-up
    // job after it checks that nothing is left.
    chaos.finish(Job::RelayOnce).await;
    chaos.wait_for_report_to_match_store().await;
    let projector = chaos.projector.take().expect("a projector runs");
    projector.terminate().await;
    chaos.finish(Job::CatchUp).await;

    audit(&mut chaos, writes.removed).await;
    chaos.figures.elapsed = started.elapsed();
    chaos.figures.show();
    std::mem::take(&mut chaos.figures)
}

/// Parses `hanging: <topic>-<partition> producer <id> epoch <e>, open since offset <o>, …` (as
/// `kafka.sh hanging-transactions` prints it) into (topic-partition, producer id, offset).
fn parse_hanging(line: &str) -> Option<(String, u64, i64)> {
    let rest = line.strip_prefix("hanging: ")?;
    let (partition, rest) = rest.split_once(" producer ")?;
    let (producer, rest) = rest.split_once(" epoch ")?;
    let (_, rest) = rest.split_once("open since offset ")?;
    let offset = rest.split(',').next()?;
    Some((
        partition.to_owned(),
        producer.parse().ok()?,
        offset.parse().ok()?,
    ))
}

/// The position in the checkpoint record at `offset` of the checkpoint topic, read
/// uncommitted (it belongs to a transaction that is still open).
fn checkpoint_at(kafka: &KafkaConfig, topic: &str, offset: i64) -> Option<u64> {
    let mut config = kafka.consumer_config(&common::unique("checkpoint-probe"));
    config.set("isolation.level", "read_uncommitted");
    let consumer: BaseConsumer = config.create().unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + kafka.request_timeout();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                use rdkafka::Message as _;
                return message
                    .payload()
                    .and_then(|value| std::str::from_utf8(value).ok())
                    .and_then(|value| value.parse().ok());
            }
            Some(Err(error)) => panic!("reading {topic} at {offset}: {error}"),
            None => {}
        }
    }
    None
}

/// Reads both topics to their end and compares them, and the report, with the store.
async fn audit(chaos: &mut Chaos, removed_by_writers: u64) {
    let events = chaos.store.read_after(0, 10_000_000).await.unwrap();
    chaos.figures.committed_events = events.len();
    let removals = removal_positions(&events);
    assert_eq!(
        removals.len() as u64,
        removed_by_writers,
        "removal facts in the store"
    );
    chaos.figures.removed_books = removals.len();
    let topics = chaos.kafka.topics();
    let mut records = Vec::new();
    let mut uncommitted = 0;
    for topic in [&topics.book, &topics.book_fact] {
        let (read, open) = read_to_end(&chaos.kafka, topic, "read_committed").await;
        records.extend(read);
        chaos.figures.open_transactions += open;
        uncommitted += read_to_end(&chaos.kafka, topic, "read_uncommitted")
            .await
            .0
            .len();
    }
    chaos.figures.aborted_records = uncommitted.saturating_sub(records.len());
    audit_records(&mut chaos.figures, &events, &records);
    audit_tombstones(&mut chaos.figures, &removals, &records);
    audit_report(&mut chaos.figures, &chaos.store).await;
}

/// Positions of the facts that say a book was removed.
fn removal_positions(events: &[StoredEvent]) -> HashSet<u64> {
    events
        .iter()
        .filter(|event| event.metadata.kind() == EventKind::Fact)
        .filter(|event| fact_is_removal(&event.payload).unwrap())
        .map(|event| event.position)
        .collect()
}

/// Every record of `topic` as a reader at `isolation` sees it, reading each partition from its
/// start up to its end as of now, and how many partitions have a transaction open.
///
/// For such a reader the end is the last stable offset: the broker's fetch answers say where it
/// is, and librdkafka reports the end of a partition (`enable.partition.eof`) once it has
/// fetched up to it. That end never lies below the one of this call, so the reader cannot stop
/// early, as it could if it stopped on a count or a quiet period.
async fn read_to_end(kafka: &KafkaConfig, topic: &str, isolation: &str) -> (Vec<Received>, usize) {
    let mut config = kafka.consumer_config(&common::unique("audit"));
    config
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation);
    let consumer: StreamConsumer = config.create().unwrap();
    let open_transactions = {
        let (kafka, topic) = (kafka.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || partitions_with_open_transactions(&kafka, &topic))
            .await
            .unwrap()
    };
    let partitions = consumer
        .fetch_metadata(Some(topic), kafka.request_timeout())
        .unwrap()
        .topics()[0]
        .partitions()
        .len() as i32;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut unfinished: HashSet<i32> = (0..partitions).collect();
    let deadline = tokio::time::Instant::now() + AUDIT_TIMEOUT;
    let mut records = Vec::new();
    while !unfinished.is_empty() {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{topic}: partitions {unfinished:?} not read to their end within \
                     {AUDIT_TIMEOUT:?} ({} records read)",
                    records.len()
                )
            });
        match message {
            Ok(message) => records.push(Received::of(&message)),
            Err(KafkaError::PartitionEOF(partition)) => {
                unfinished.remove(&partition);
            }
            Err(error) => panic!("reading {topic}: {error}"),
        }
    }
    (records, open_transactions)
}

/// Partitions of `topic` whose last stable offset lies below the high watermark: a
/// transaction is open there, and a `read_committed` reader cannot see past it.
fn partitions_with_open_transactions(kafka: &KafkaConfig, topic: &str) -> usize {
    let ends = |isolation: &str| -> Vec<i64> {
        let mut config = kafka.consumer_config(&common::unique("audit-ends"));
        config.set("isolation.level", isolation);
        let consumer: BaseConsumer = config.create().unwrap();
        let metadata = consumer
            .fetch_metadata(Some(topic), kafka.request_timeout())
            .unwrap();
        (0..metadata.topics()[0].partitions().len() as i32)
            .map(|partition| {
                consumer
                    .fetch_watermarks(topic, partition, kafka.request_timeout())
                    .unwrap()
                    .1
            })
            .collect()
    };
    let stable = ends("read_committed");
    let high = ends("read_uncommitted");
    stable
        .iter()
        .zip(&high)
        .filter(|(lso, hw)| lso < hw)
        .count()
}

/// Losses, duplicates and order among the data records (every event is one, tombstones aside).
/// A record repeating a position already read is a duplicate. Each book's first copies must
/// come in position order on each topic: positions follow the commit order, and the order of
/// a book's changes.
fn audit_records(figures: &mut Figures, events: &[StoredEvent], records: &[Received]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<(&str, &str), u64> = HashMap::new();
    for record in records.iter().filter(|record| record.value.is_some()) {
        let position = record.position();
        if !seen.insert(position) {
            figures.duplicates += 1;
            continue;
        }
        let previous = last.insert((&record.topic, &record.key), position);
        if previous.is_some_and(|previous| previous > position) {
            figures.order_violations += 1;
        }
    }
    let committed: HashSet<u64> = events.iter().map(|event| event.position).collect();
    figures.distinct_on_kafka = seen.len();
    let mut lost: Vec<u64> = committed.difference(&seen).copied().collect();
    lost.sort_unstable();
    figures.lost = lost.len();
    figures.lost_positions = lost.into_iter().take(20).collect();
}

/// Each removal fact must be followed on its partition by exactly one tombstone (in
/// at-least-once mode, copies of it are counted as duplicates), and no other tombstone may
/// exist.
fn audit_tombstones(figures: &mut Figures, removals: &HashSet<u64>, records: &[Received]) {
    let mut facts: HashMap<u64, (i32, i64)> = HashMap::new();
    let mut tombstones: HashMap<u64, Vec<(i32, i64)>> = HashMap::new();
    for record in records {
        let at = (record.partition, record.offset);
        match &record.value {
            Some(_) if removals.contains(&record.position()) => {
                facts.entry(record.position()).or_insert(at);
            }
            Some(_) => {}
            None => tombstones.entry(record.position()).or_default().push(at),
        }
    }
    figures.tombstones = tombstones.len();
    for (position, copies) in &tombstones {
        figures.tombstone_duplicates += copies.len() - 1;
        let follows_its_fact = facts
            .get(position)
            .is_some_and(|&(partition, offset)| copies[0].0 == partition && copies[0].1 > offset);
        if !removals.contains(position) || !follows_its_fact {
            figures.tombstone_faults += 1;
        }
    }
    figures.tombstone_faults += removals
        .iter()
        .filter(|position| !tombstones.contains_key(position))
        .count();
}

async fn audit_report(figures: &mut Figures, store: &AnyStore) {
    let report = compare_report(store).await;
    figures.report_rows = report.rows;
    figures.live_books = report.live_books;
    figures.report_mismatches = report.mismatches;
}

/// The BookReport next to the store.
struct ReportComparison {
    rows: usize,
    live_books: usize,
    /// Live books without a row or with a row that differs, and rows of no live book.
    mismatches: usize,
}

/// The report must hold exactly the live books, each as the store has it.
async fn compare_report(store: &AnyStore) -> ReportComparison {
    let reports = store.list_reports().await.unwrap();
    let live = store.list_books().await.unwrap();
    let by_id: HashMap<BookId, _> = reports.iter().map(|row| (row.book_id, row)).collect();
    let live_ids: HashSet<BookId> = live.iter().map(|book| book.book_id).collect();
    let wrong_or_missing = live.iter().filter(|book| {
        by_id.get(&book.book_id).is_none_or(|row| {
            row.title != book.title
                || row.author != book.author
                || row.price != book.price
                || row.isbn != book.isbn
                || row.version != book.version
        })
    });
    let extra = reports
        .iter()
        .filter(|row| !live_ids.contains(&row.book_id));
    ReportComparison {
        rows: reports.len(),
        live_books: live.len(),
        mismatches: wrong_or_missing.count() + extra.count(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_pipeline_loses_nothing_and_duplicates_nothing_under_faults() {
    let figures = chaos("exactly-once", Database::Postgres).await;
    figures.assert_faults_landed_and_nothing_duplicated();
}

/// The default deployment: exactly once, from the embedded SQLite store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_pipeline_on_sqlite_loses_nothing_and_duplicates_nothing_under_faults() {
    let figures = chaos("exactly-once", Database::Sqlite).await;
    figures.assert_faults_landed_and_nothing_duplicated();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_pipeline_loses_nothing_and_keeps_order_under_faults() {
    let figures = chaos("at-least-once", Database::Postgres).await;
    // Duplicates are allowed in this mode; the figures show how many there were.
    figures.assert_faults_landed_and_nothing_lost();
}

#[test]
fn a_hanging_transaction_line_parses_into_partition_producer_and_offset() {
    let line = "hanging: chaos-1.relay-checkpoint-0 producer 2 epoch 12, open since offset 406, \
                last write 52 s ago; coordinator: transactional id x is EMPTY at epoch 13";
    assert_eq!(
        parse_hanging(line),
        Some(("chaos-1.relay-checkpoint-0".to_owned(), 2, 406))
    );
    assert_eq!(
        parse_hanging("aborted chaos-1.book-0 producer 2 epoch 12"),
        None
    );
}

/// How the suite tells whether the relay committed a hanging transaction: by the checkpoint
/// record it holds, read uncommitted while the transaction is still open.
#[tokio::test]
async fn an_open_transactions_checkpoint_record_is_read_uncommitted() {
    use rdkafka::producer::Producer as _;
    let kafka = common::kafka_config();
    let topics = kafka.topics();
    let specs = topics.specs(kafka.partitions, kafka.replication_factor);
    bookstore::kafka::provision_topics(&kafka, &specs)
        .await
        .unwrap();
    let producer = common::transactional_producer(&kafka, &common::unique("open")).await;
    producer.begin_transaction().unwrap();
    let delivered = producer
        .send(
            rdkafka::producer::FutureRecord::to(&topics.relay_checkpoint)
                .key("relay")
                .payload("1234"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();

    let (reader, topic) = (kafka.clone(), topics.relay_checkpoint.clone());
    let read =
        tokio::task::spawn_blocking(move || checkpoint_at(&reader, &topic, delivered.offset))
            .await
            .unwrap();
    tokio::task::spawn_blocking(move || producer.abort_transaction(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, Some(1234));
}

#[test]
fn the_broker_log_about_a_hanging_transaction_keeps_its_lines_oldest_first() {
    let logs = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(logs.path().join(name), text).unwrap();
    write("server.log.2", "old: txn-a initialised\nold: unrelated\n");
    write(
        "server.log.1",
        "mid: TransactionMarkerChannelManager retry\n",
    );
    write(
        "server.log",
        "new: Truncating book-0 to 5\nnew: txn-b initialised\nnew: txn-a fenced\n",
    );
    write("controller.log", "txn-a elsewhere\n");
    let ids = ["txn-a".to_owned()];
    assert_eq!(
        broker_log_about(logs.path(), &ids, 10),
        [
            "old: txn-a initialised",
            "mid: TransactionMarkerChannelManager retry",
            "new: Truncating book-0 to 5",
            "new: txn-a fenced"
        ]
    );
    assert_eq!(
        broker_log_about(logs.path(), &ids, 2),
        ["new: Truncating book-0 to 5", "new: txn-a fenced"]
    );
}
