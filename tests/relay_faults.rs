//! The relay under faults: its process SIGKILLed mid-batch and restarted, the broker stopped
//! and started in the middle of a run, and the broker not up yet when the relay and the
//! projection start. Afterwards a `read_committed` reader must see every committed event
//! exactly once, in per-book order.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bookstore::codec::AvroCodec;
use bookstore::config::{KafkaConfig, RelaySettings};
use bookstore::domain::{AddBook, BookCommand, BookId, Price, StoredEvent};
use bookstore::projection::ReportStore;
use bookstore::relay::{DeliveryMode, RunMode, kafka_relay};
use bookstore::service::{BookService, CommandContext};
use bookstore::shutdown::ShutdownTrigger;
use bookstore::store::{EventStore, Outbox, SqliteStore};
use common::Received;
use common::broker::{EndHanging, PrivateBroker};

async fn write_books(service: &BookService<SqliteStore, AvroCodec>, books: usize, updates: i64) {
    let mut ids = Vec::new();
    for index in 0..books {
        let book_id = BookId::generate();
        let add = AddBook {
            book_id,
            title: format!("Book {index}"),
            author: "Fault Author".into(),
            isbn: None,
            price: Price::from_cents(100).unwrap(),
            description: Some("x".repeat(200)),
        };
        service
            .execute(BookCommand::Add(add), CommandContext::default())
            .await
            .unwrap();
        ids.push(book_id);
    }
    for update in 1..=updates {
        for book_id in &ids {
            let price = Price::from_cents(100 + update).unwrap();
            let command = BookCommand::UpdatePrice {
                book_id: *book_id,
                price,
            };
            service
                .execute(command, CommandContext::default())
                .await
                .unwrap();
        }
    }
}

fn assert_exactly_once_in_order(events: &[StoredEvent], records: &[Received]) {
    let positions: Vec<u64> = records.iter().map(Received::position).collect();
    let unique: HashSet<u64> = positions.iter().copied().collect();
    assert_eq!(
        positions.len() - unique.len(),
        0,
        "duplicates seen by a read_committed reader"
    );
    let expected: HashSet<u64> = events.iter().map(|event| event.position).collect();
    let missing = expected.difference(&unique).count();
    assert_eq!(missing, 0, "events lost");
    assert_eq!(unique, expected);
    let mut per_key: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    for record in records {
        per_key
            .entry((&record.topic, &record.key))
            .or_default()
            .push(record.version());
    }
    for ((topic, key), versions) in per_key {
        assert!(
            versions.windows(2).all(|pair| pair[0] < pair[1]),
            "{key} out of order on {topic}: {versions:?}"
        );
    }
}

/// Each record's first copy, in the order read: at-least-once may send a batch again after an
/// error, and what counts then is that nothing is missing and each book's first copies come in
/// order.
fn first_copies(records: &[Received]) -> Vec<Received> {
    let mut seen = HashSet::new();
    records
        .iter()
        .filter(|record| seen.insert(record.position()))
        .cloned()
        .collect()
}

async fn read_all(kafka: &KafkaConfig, expected: usize) -> Vec<Received> {
    let topics = kafka.topics();
    common::consume_committed(
        kafka,
        &[&topics.book, &topics.book_fact],
        expected,
        Duration::from_secs(90),
        Duration::from_secs(3),
    )
    .await
}

async fn published(store: &SqliteStore, relay_id: &str) -> u64 {
    store.published_position(relay_id).await.unwrap()
}

/// What the broker-outage tests start from: a broker of the test's own (to stop and start), a
/// configuration for it with short request timeouts, relay settings with small batches, and an
/// empty SQLite outbox.
struct Outage {
    broker: PrivateBroker,
    kafka: KafkaConfig,
    settings: RelaySettings,
    store: SqliteStore,
    service: BookService<SqliteStore, AvroCodec>,
    relay_id: String,
    _dir: tempfile::TempDir,
}

impl Outage {
    async fn start(delivery: DeliveryMode) -> Self {
        let broker = PrivateBroker::start().await;
        let mut kafka = KafkaConfig::new(broker.bootstrap_servers());
        kafka.topic_prefix = common::unique("t");
        kafka.request_timeout_ms = 10_000;
        let settings = RelaySettings {
            delivery,
            batch_size: 20,
            poll_interval_ms: 100,
            ..RelaySettings::default()
        };
        let (_dir, _database, store, service) = written_outbox(0, 0).await;
        let relay_id = format!("{}.relay", kafka.topic_prefix);
        Self {
            broker,
            kafka,
            settings,
            store,
            service,
            relay_id,
            _dir,
        }
    }
}

/// Waits until the relay has published something (a minute at most).
async fn wait_for_progress(store: &SqliteStore, relay_id: &str) {
    wait_until_published(
        store,
        relay_id,
        1,
        Duration::from_secs(60),
        "relay made no progress",
    )
    .await;
}

/// Waits until the relay has recorded `position` as published; fails with `what` after
/// `within`.
async fn wait_until_published(
    store: &SqliteStore,
    relay_id: &str,
    position: u64,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    while published(store, relay_id).await < position {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A SQLite outbox in a fresh folder with `books` books written, each updated `updates` times.
async fn written_outbox(
    books: usize,
    updates: i64,
) -> (
    tempfile::TempDir,
    PathBuf,
    SqliteStore,
    BookService<SqliteStore, AvroCodec>,
) {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("outbox.db");
    let store = SqliteStore::connect(database.to_str().unwrap())
        .await
        .unwrap();
    let service = BookService::new(store.clone(), AvroCodec::new());
    write_books(&service, books, updates).await;
    (dir, database, store, service)
}

/// `bookstore <subcommand>` on the outbox at `database` and the topics of `kafka`.
fn bookstore_process(
    subcommand: &str,
    database: &Path,
    kafka: &KafkaConfig,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"));
    command
        .arg(subcommand)
        .env(
            "BOOKSTORE_DATABASE_URL",
            format!("sqlite:{}", database.display()),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
        .env("BOOKSTORE_TOPIC_PREFIX", &kafka.topic_prefix)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    command
}

fn relay_process(database: &Path, kafka: &KafkaConfig, once: bool) -> tokio::process::Command {
    let mut command = bookstore_process("relay", database, kafka);
    command
        .args(["--batch-size", "25"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if once {
        command.arg("--once");
    }
    command
}

#[tokio::test]
async fn relay_killed_mid_batch_and_restarted_publishes_each_event_exactly_once() {
    let (_dir, database, store, _service) = written_outbox(150, 4).await;
    let events = store.read_after(0, 1_000_000).await.unwrap();
    let head = events.last().unwrap().position;
    let kafka = common::kafka_config();
    let relay_id = format!("{}.relay", kafka.topic_prefix);

    // Kills that left events to publish: the restart had something to resume.
    let mut kills_mid_stream = 0;
    for round in 1..=3u64 {
        let before = published(&store, &relay_id).await;
        let mut child = relay_process(&database, &kafka, false).spawn().unwrap();
        // Kill as soon as this run has made progress, so the kill lands between or inside
        // the following batches.
        let deadline = Instant::now() + Duration::from_secs(60);
        while published(&store, &relay_id).await <= before {
            assert!(Instant::now() < deadline, "round {round}: no progress");
            assert!(child.try_wait().unwrap().is_none(), "relay exited early");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(30 * round)).await;
        child.start_kill().unwrap(); // SIGKILL
        let status = child.wait().await.unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "round {round}: the relay ended before it was killed: {status}"
        );
        if published(&store, &relay_id).await >= head {
            break;
        }
        kills_mid_stream += 1;
    }
    assert!(
        kills_mid_stream >= 1,
        "every kill came after the last batch"
    );

    let output = relay_process(&database, &kafka, true)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "relay --once failed");
    assert!(String::from_utf8_lossy(&output.stdout).contains("last position"));
    assert_eq!(published(&store, &relay_id).await, head);

    let records = read_all(&kafka, events.len()).await;
    assert_exactly_once_in_order(&events, &records);
}

#[tokio::test]
async fn relay_survives_a_broker_stop_and_start_without_loss_or_duplicates() {
    let Outage {
        broker,
        kafka,
        settings,
        store,
        service,
        relay_id,
        _dir,
    } = Outage::start(DeliveryMode::ExactlyOnce).await;
    let relay = kafka_relay(store.clone(), &kafka, &settings).await.unwrap();
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));

    write_books(&service, 20, 2).await;
    wait_for_progress(&store, &relay_id).await;

    broker.run("stop").await;
    write_books(&service, 20, 2).await; // committed while the broker is down
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.run("start").await;
    write_books(&service, 10, 1).await;

    let head = store.head_position().await.unwrap();
    wait_until_published(
        &store,
        &relay_id,
        head,
        Duration::from_secs(180),
        "relay did not catch up after the broker returned",
    )
    .await;
    stop.trigger();
    running.await.unwrap().unwrap();

    let events = store.read_after(0, 1_000_000).await.unwrap();
    let records = read_all(&kafka, events.len()).await;
    assert_exactly_once_in_order(&events, &records);
}

#[tokio::test]
async fn relay_and_projection_started_before_the_broker_wait_for_it() {
    let broker = PrivateBroker::not_started();
    let mut kafka = KafkaConfig::new(broker.bootstrap_servers());
    kafka.topic_prefix = common::unique("t");
    let (_dir, database, store, _service) = written_outbox(5, 1).await;
    let head = store.head_position().await.unwrap();

    let service_process = |command: &str| {
        bookstore_process(command, &database, &kafka)
            .env("BOOKSTORE_KAFKA_TIMEOUT_MS", "2000")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut relay = service_process("relay");
    let mut projector = service_process("project");

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay gave up on a broker not started yet"
    );
    assert!(
        projector.try_wait().unwrap().is_none(),
        "the projection gave up on a broker not started yet"
    );

    broker.run("start").await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let relay_id = format!("{}.relay", kafka.topic_prefix);
    while published(&store, &relay_id).await < head || store.list_reports().await.unwrap().len() < 5
    {
        assert!(
            Instant::now() < deadline,
            "relay and projection did not catch up once the broker started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    common::terminate_gracefully(&mut relay, "the relay").await;
    common::terminate_gracefully(&mut projector, "the projection").await;
    for child in [relay, projector] {
        let output = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("waiting for Kafka"),
            "no word of the wait:\n{stderr}"
        );
    }

    let events = store.read_after(0, 1_000_000).await.unwrap();
    let records = read_all(&kafka, events.len()).await;
    assert_exactly_once_in_order(&events, &records);
}

/// A broker outage longer than the relay lease must not hand the lease to a standby: the
/// active relay renews it while it waits on Kafka. Otherwise, in at-least-once mode (which has
/// no fencing), the standby would send from the store's recorded position while the first
/// relay's queued records went out too once the broker returned, and a book's events could
/// land out of order.
#[tokio::test]
async fn an_at_least_once_relay_keeps_its_lease_through_a_broker_outage() {
    let Outage {
        broker,
        kafka,
        settings,
        store,
        service,
        relay_id,
        _dir,
    } = Outage::start(DeliveryMode::AtLeastOnce).await;
    let lease_ttl = Duration::from_secs(3);
    let start = |instance: &'static str| {
        let (store, kafka, settings) = (store.clone(), kafka.clone(), settings.clone());
        async move {
            let relay = kafka_relay(store, &kafka, &settings)
                .await
                .unwrap()
                .tuned(|config| {
                    config.instance_id = instance.into();
                    config.lease_ttl = lease_ttl;
                });
            let (stop, shutdown) = ShutdownTrigger::new();
            (stop, tokio::spawn(relay.run(RunMode::Follow, shutdown)))
        }
    };
    let (stop_active, active) = start("active").await;
    write_books(&service, 10, 1).await;
    wait_for_progress(&store, &relay_id).await;
    let (stop_standby, standby) = start("standby").await;

    broker.run("stop").await;
    write_books(&service, 10, 2).await; // committed while the broker is down
    tokio::time::sleep(lease_ttl * 3).await;
    assert!(
        !store
            .try_acquire_lease(&relay_id, "probe", lease_ttl)
            .await
            .unwrap(),
        "the lease lapsed while the active relay waited on Kafka"
    );
    broker.run("start").await;

    let head = store.head_position().await.unwrap();
    wait_until_published(
        &store,
        &relay_id,
        head,
        Duration::from_secs(180),
        "relay did not catch up after the broker returned",
    )
    .await;
    stop_standby.trigger();
    stop_active.trigger();
    let standby_report = standby.await.unwrap().unwrap();
    let active_report = active.await.unwrap().unwrap();
    assert_eq!(standby_report.published_events, 0, "the standby published");
    assert!(active_report.published_events >= head);

    let events = store.read_after(0, 1_000_000).await.unwrap();
    let records = read_all(&kafka, events.len()).await;
    assert_exactly_once_in_order(&events, &first_copies(&records));
}

/// Ctrl-C or SIGTERM while the broker is down: the relay gives its batches in flight the
/// grace period, then abandons them and stops, instead of waiting out the message timeout
/// (300 s). Nothing is lost: a restart sends them again.
#[tokio::test]
async fn a_relay_asked_to_stop_during_a_broker_outage_stops_after_its_grace_period() {
    let Outage {
        broker,
        kafka,
        settings,
        store,
        service,
        relay_id,
        _dir,
    } = Outage::start(DeliveryMode::AtLeastOnce).await;
    let grace = Duration::from_secs(2);
    let relay = kafka_relay(store.clone(), &kafka, &settings)
        .await
        .unwrap()
        .tuned(|config| config.shutdown_grace = grace);
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
    write_books(&service, 5, 1).await;
    wait_for_progress(&store, &relay_id).await;

    broker.run("stop").await;
    write_books(&service, 5, 1).await; // sent, never acknowledged
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    stop.trigger();
    tokio::time::timeout(grace + Duration::from_secs(8), running)
        .await
        .expect("the relay did not stop after its grace period")
        .unwrap()
        .unwrap();
    assert!(
        asked.elapsed() >= grace,
        "stopped before the grace period: {:?}",
        asked.elapsed()
    );
    let head = store.head_position().await.unwrap();
    assert!(
        published(&store, &relay_id).await < head,
        "the outage did not hold anything back"
    );

    broker.run("start").await;
    kafka_relay(store.clone(), &kafka, &settings)
        .await
        .unwrap()
        .run(RunMode::Once, bookstore::shutdown::Shutdown::never())
        .await
        .unwrap();
    let events = store.read_after(0, 1_000_000).await.unwrap();
    let records = read_all(&kafka, events.len()).await;
    assert_exactly_once_in_order(&events, &first_copies(&records));
}

/// The operator's tool for hanging transactions (`kafka.sh hanging-transactions`, see the
/// README) against two real ones: transactions open on a partition that their coordinator
/// knows nothing of, as a lost marker leaves them. The one ended as committed becomes readable
/// to `read_committed` readers, the aborted one never does, and neither holds readers up after.
#[tokio::test]
async fn hanging_transactions_end_as_committed_or_aborted_with_the_operator_tool() {
    use rdkafka::consumer::Consumer;

    let broker = PrivateBroker::start().await;
    let mut kafka = KafkaConfig::new(broker.bootstrap_servers());
    kafka.topic_prefix = common::unique("hanging");
    let topics = kafka.topics();
    let specs = topics.specs(kafka.partitions, kafka.replication_factor);
    bookstore::kafka::provision_topics(&kafka, &specs)
        .await
        .unwrap();
    let topic = topics.book.as_str();
    let to_commit = broker
        .orphan_transaction(topic, 0, "operator-commits", "committed by the tool")
        .await;
    let to_abort = broker
        .orphan_transaction(topic, 1, "operator-aborts", "aborted by the tool")
        .await;

    // Whether the tool printed a line starting with `prefix`.
    let assert_printed = |lines: &[String], prefix: String| {
        assert!(
            lines.iter().any(|line| line.starts_with(&prefix)),
            "{prefix} not in {lines:?}"
        );
    };
    let found = broker.hanging_transactions(Duration::ZERO, None).await;
    for (partition, producer) in [(0, to_commit), (1, to_abort)] {
        assert_printed(
            &found,
            format!("hanging: {topic}-{partition} producer {producer} "),
        );
    }
    let reader = kafka.consumer(&common::unique("probe")).unwrap();
    let stable_end = |partition| {
        reader
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap()
            .1
    };
    assert_eq!(
        (stable_end(0), stable_end(1)),
        (0, 0),
        "read_committed readers stop at each"
    );

    let committed = broker
        .hanging_transactions(Duration::ZERO, Some((EndHanging::Commit, to_commit)))
        .await;
    assert_printed(
        &committed,
        format!("committed {topic}-0 producer {to_commit} "),
    );
    let aborted = broker
        .hanging_transactions(Duration::ZERO, Some((EndHanging::Abort, to_abort)))
        .await;
    assert_printed(&aborted, format!("aborted {topic}-1 producer {to_abort} "));

    let received = common::consume_committed(
        &kafka,
        &[topic],
        1,
        Duration::from_secs(30),
        Duration::from_secs(3),
    )
    .await;
    let values: Vec<_> = received
        .iter()
        .map(|record| (record.partition, record.value.clone()))
        .collect();
    assert_eq!(values, [(0, Some(b"committed by the tool".to_vec()))]);
    // Each partition: the record and the marker; readable to its end.
    assert_eq!((stable_end(0), stable_end(1)), (2, 2));
    assert!(
        broker
            .hanging_transactions(Duration::ZERO, None)
            .await
            .is_empty()
    );
}

/// A hanging transaction on the checkpoint partition keeps every start of an exactly-once
/// relay waiting (the README, "Hanging transactions"). No publisher runs then to watch its own
/// commits, so `bookstore_relay_unreadable_commit_seconds`, the gauge the README says to alert
/// on, counts how long the partition has been held open, across the starts (it read 0), and
/// goes back to 0 once the relay starts. Read from the `/metrics` of a relay process of its
/// own: the gauge has no label (one relay per process), and relays of other tests of this
/// binary would set it too.
#[tokio::test]
async fn a_relay_kept_from_starting_by_a_hanging_transaction_counts_it_in_its_gauge() {
    let broker = PrivateBroker::start().await;
    let mut kafka = KafkaConfig::new(broker.bootstrap_servers());
    kafka.topic_prefix = common::unique("held-open");
    // Each start waits one request timeout for the partition.
    kafka.request_timeout_ms = 2_000;
    let topics = kafka.topics();
    let specs = topics.specs(kafka.partitions, kafka.replication_factor);
    bookstore::kafka::provision_topics(&kafka, &specs)
        .await
        .unwrap();
    let producer = broker
        .orphan_transaction(&topics.relay_checkpoint, 0, "another-producer", "7")
        .await;
    let (_dir, database, store, _service) = written_outbox(3, 1).await;
    let relay_id = format!("{}.relay", kafka.topic_prefix);
    let [port] = common::free_local_ports::<1>();
    let addr = format!("127.0.0.1:{port}");
    let mut relay = bookstore_process("relay", &database, &kafka)
        .args(["--metrics-addr", &addr, "--delivery", "exactly-once"])
        .args(["--kafka-timeout-ms", &kafka.request_timeout_ms.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let read_gauge = || {
        let text = ureq::get(&format!("http://{addr}/metrics"))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix("bookstore_relay_unreadable_commit_seconds "))
            .map(|value| value.parse::<f64>().unwrap())
    };
    let gauge = || read_gauge().unwrap_or(0.0);

    let deadline = Instant::now() + Duration::from_secs(60);
    while gauge() < 6.0 {
        assert!(
            Instant::now() < deadline,
            "the gauge stayed at {} while the checkpoint partition was held open",
            gauge()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(published(&store, &relay_id).await, 0);

    let aborted = broker
        .hanging_transactions(Duration::ZERO, Some((EndHanging::Abort, producer)))
        .await;
    assert!(
        aborted.iter().any(|line| line.starts_with("aborted ")),
        "{aborted:?}"
    );
    let head = store.head_position().await.unwrap();
    wait_until_published(
        &store,
        &relay_id,
        head,
        Duration::from_secs(60),
        "the relay did not publish once the transaction was aborted",
    )
    .await;
    assert_eq!(read_gauge(), Some(0.0));
    common::terminate_gracefully(&mut relay, "the relay").await;
}
