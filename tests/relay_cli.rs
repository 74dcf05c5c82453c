//! `bookstore relay` as a process: Prometheus metrics while it follows the outbox, and a
//! graceful exit on SIGTERM.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bookstore::codec::AvroCodec;
use bookstore::domain::{AddBook, BookCommand, BookId, Price};
use bookstore::service::{BookService, CommandContext};
use bookstore::store::SqliteStore;

fn scrape(addr: &str) -> Option<String> {
    let mut response = ureq::get(&format!("http://{addr}/metrics")).call().ok()?;
    response.body_mut().read_to_string().ok()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `bookstore relay --metrics-addr addr` on the SQLite file `database` and the topics of `kafka`.
fn spawn_relay(
    database: &std::path::Path,
    kafka: &bookstore::config::KafkaConfig,
    addr: &str,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .arg("relay")
        .args(["--metrics-addr", addr])
        .env(
            "BOOKSTORE_DATABASE_URL",
            format!("sqlite:{}", database.display()),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", &kafka.bootstrap_servers)
        .env("BOOKSTORE_TOPIC_PREFIX", &kafka.topic_prefix)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Adds `count` books titled `<title> <n>`: two events each.
async fn add_books(service: &BookService<SqliteStore, AvroCodec>, count: usize, title: &str) {
    for index in 0..count {
        let command = BookCommand::Add(AddBook {
            book_id: BookId::generate(),
            title: format!("{title} {index}"),
            author: "Prometheus".into(),
            isbn: None,
            price: Price::ZERO,
            description: None,
        });
        service
            .execute(command, CommandContext::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn following_relay_serves_metrics_and_stops_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("outbox.db");
    let store = SqliteStore::connect(database.to_str().unwrap())
        .await
        .unwrap();
    let service = BookService::new(store, AvroCodec::new());
    let kafka = common::kafka_config();
    let addr = format!("127.0.0.1:{}", common::free_local_port());

    let mut child = spawn_relay(&database, &kafka, &addr);
    add_books(&service, 7, "Metered").await;

    // The backlog gauge is set when the store's copy of the position is written, just after
    // the batch: wait for both.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = scrape(&addr).unwrap_or_default();
        if metric(&text, "bookstore_relay_published_events_total") >= 14.0
            && text.contains("bookstore_relay_backlog_events 0")
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed 14 published events and an empty backlog:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        metric(&text, "bookstore_relay_published_events_total"),
        14.0
    );
    assert_eq!(
        metric(&text, "bookstore_relay_last_published_position"),
        14.0
    );

    common::terminate_gracefully(&mut child, "the relay").await;
}

/// While the relay cannot publish (here: another instance holds the lease), no batch ends, so
/// the relay never sets its gauges itself; the process still reads its progress back from the
/// store, and the backlog shows what waits.
#[tokio::test]
async fn the_backlog_gauge_grows_while_the_relay_cannot_publish() {
    use bookstore::store::Outbox;

    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("outbox.db");
    let store = SqliteStore::connect(database.to_str().unwrap())
        .await
        .unwrap();
    let kafka = common::kafka_config();
    let relay_id = format!("{}.relay", kafka.topic_prefix);
    assert!(
        store
            .try_acquire_lease(&relay_id, "another instance", Duration::from_secs(600))
            .await
            .unwrap()
    );
    let service = BookService::new(store, AvroCodec::new());
    let addr = format!("127.0.0.1:{}", common::free_local_port());
    let mut child = spawn_relay(&database, &kafka, &addr);
    add_books(&service, 3, "Waiting").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(&addr).unwrap_or_default();
        if text.contains("bookstore_relay_backlog_events 6") {
            assert_eq!(
                metric(&text, "bookstore_relay_published_events_total"),
                0.0,
                "published without the lease:\n{text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog gauge never showed the 6 waiting events:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    common::terminate_gracefully(&mut child, "the relay").await;
}

/// Started while the broker is unreachable (an orchestrator starts services in any order), the
/// relay waits for it; asked to stop then, it must not first wait out a metadata request of the
/// whole Kafka timeout (20 s here; 30 s by default, when orchestrators kill).
#[tokio::test]
async fn a_relay_waiting_for_an_unreachable_broker_stops_promptly_on_sigterm() {
    let folder = tempfile::tempdir().unwrap();
    let database = folder.path().join("bookstore.db");
    // Nothing listens there: every connection is refused, and librdkafka retries until the
    // request times out.
    let nowhere = format!("127.0.0.1:{}", common::free_local_port());
    let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .arg("relay")
        .env(
            "BOOKSTORE_DATABASE_URL",
            format!("sqlite:{}", database.display()),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", &nowhere)
        .env("BOOKSTORE_KAFKA_TIMEOUT_MS", "20000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // In its first attempt to reach the broker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay must wait, not fail"
    );

    let signalled = Instant::now();
    common::terminate_gracefully(&mut relay, "the relay").await;
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "stopped {took:?} after SIGTERM"
    );
}
