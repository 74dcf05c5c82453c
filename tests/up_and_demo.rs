//! `bookstore demo` and `bookstore up` as a new user runs them, on both stores.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

fn bookstore(database_url: &str, prefix: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"));
    command
        .env("BOOKSTORE_DATABASE_URL", database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", common::bootstrap_servers())
        .env("BOOKSTORE_TOPIC_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    command
}

async fn demo_passes_every_check_and_can_run_again(database_url: &str) {
    let prefix = common::unique("demo");
    for run in 1..=2 {
        let output = bookstore(database_url, &prefix)
            .arg("demo")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "run {run}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.matches("PASS").count(), 5, "{stdout}");
        assert!(stdout.contains("the BookReport row says 15.99"), "{stdout}");
        assert!(stdout.contains("all 5 checks passed"));
    }
}

#[tokio::test]
async fn demo_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("demo.db").display());
    demo_passes_every_check_and_can_run_again(&url).await;
}

#[tokio::test]
async fn demo_on_postgres() {
    let (_, url) = common::postgres_store_with_url().await;
    demo_passes_every_check_and_can_run_again(&url).await;
}

/// Beside a running relay with a relay id of its own, the demo, told that id, leaves the
/// publishing to it: before, it took a lease of its own under the default id and published the
/// store's whole outbox a second time.
#[tokio::test]
async fn demo_beside_a_running_relay_publishes_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("shop.db").display());
    let prefix = common::unique("demo-beside");
    let mut kafka = bookstore::config::KafkaConfig::new(common::bootstrap_servers());
    kafka.topic_prefix = prefix.clone();
    let topics = kafka.topics();
    let provisioned = bookstore(&url, &prefix)
        .args(["kafka", "provision"])
        .output()
        .await
        .unwrap();
    assert!(provisioned.status.success(), "{provisioned:?}");
    // A book first, so that the relay is known to be active (it published it) before the demo.
    let added = bookstore(&url, &prefix)
        .args([
            "books",
            "add",
            "--title",
            "Emma",
            "--author",
            "Jane Austen",
            "--price",
            "3.50",
        ])
        .output()
        .await
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let mut relay = bookstore(&url, &prefix)
        .args(["relay", "--relay-id", "shop-relay"])
        .spawn()
        .unwrap();
    common::consume_committed(
        &kafka,
        &[&topics.book, &topics.book_fact],
        2,
        Duration::from_secs(60),
        Duration::ZERO,
    )
    .await;

    let output = bookstore(&url, &prefix)
        .env("BOOKSTORE_RELAY_ID", "shop-relay")
        .arg("demo")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    common::terminate_gracefully(&mut relay, "bookstore relay").await;

    let records = common::consume_committed(
        &kafka,
        &[&topics.book, &topics.book_fact],
        6,
        Duration::from_secs(30),
        Duration::from_secs(3),
    )
    .await;
    let mut positions: Vec<u64> = records.iter().map(common::Received::position).collect();
    positions.sort_unstable();
    let published = positions.len();
    positions.dedup();
    assert_eq!(published, positions.len(), "published twice: {records:?}");
}

#[tokio::test]
async fn up_on_sqlite_fills_its_dashboard_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("up.db").display());
    up_serves_a_dashboard_that_fills_with_demo_books_and_stops_on_sigterm(&url).await;
}

#[tokio::test]
async fn up_on_postgres_fills_its_dashboard_and_stops_on_sigterm() {
    let (_, url) = common::postgres_store_with_url().await;
    up_serves_a_dashboard_that_fills_with_demo_books_and_stops_on_sigterm(&url).await;
}

async fn up_serves_a_dashboard_that_fills_with_demo_books_and_stops_on_sigterm(url: &str) {
    // As `relay` and `project` do, `up` also serves its metrics on an address of their own.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = bookstore(url, &common::unique("up"))
        .args(["up", "--demo-data", "--addr", "127.0.0.1:0"])
        .env("BOOKSTORE_METRICS_ADDR", metrics_addr.to_string())
        .env("BOOKSTORE_PROJECTION_BATCH_SIZE", "2")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("no banner within 60 s")
        .unwrap()
        .unwrap();
    let dashboard = banner
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {banner:?}"))
        .to_owned();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "the report never showed 3 demo books"
        );
        let books: Option<serde_json::Value> = ureq::get(&format!("{dashboard}api/books"))
            .call()
            .ok()
            .and_then(|mut response| response.body_mut().read_to_string().ok())
            .and_then(|body| serde_json::from_str(&body).ok());
        if books
            .as_ref()
            .and_then(|books| books.as_array())
            .is_some_and(|rows| rows.len() >= 3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let page = ureq::get(&dashboard)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(page.contains("Pride and Prejudice"), "{page}");

    // `up` measures the projection lag too, for every partition of the fact topic.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = ureq::get(&format!("{dashboard}metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let gauges = metrics
            .lines()
            .filter(|line| line.starts_with("bookstore_projection_lag_records{partition="))
            .count();
        if gauges == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lag gauge per partition in /metrics: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = ureq::get(&format!("http://{metrics_addr}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains("bookstore_projection_applied_facts_total"),
        "{metrics}"
    );

    common::terminate_gracefully(&mut child, "bookstore up").await;
}

/// The demo feed of `up --demo-data` outlives the books it changes: a book removed under it
/// (through the API, say) is no longer changed and the others still are, and with every book
/// removed it waits for shutdown. (It used to end with the domain's "removed" error, and `up`
/// stops every part when one ends.) No broker needed: the feed only writes to the store.
#[tokio::test]
async fn demo_data_goes_on_when_its_books_are_removed() {
    use bookstore::codec::AvroCodec;
    use bookstore::demo::{DemoPace, feed_demo_data};
    use bookstore::domain::BookCommand;
    use bookstore::service::{BookService, CommandContext};
    use bookstore::shutdown::ShutdownTrigger;
    use bookstore::store::{EventStore, SqliteStore};

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("demo.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    let service = BookService::new(store.clone(), AvroCodec::new());
    let (trigger, shutdown) = ShutdownTrigger::new();
    let pace = DemoPace {
        add_every: Duration::from_millis(1),
        change_every: Duration::from_millis(5),
    };
    let feed = tokio::spawn({
        let service = BookService::new(store.clone(), AvroCodec::new());
        async move { feed_demo_data(&service, pace, shutdown).await }
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let books = loop {
        let books = store.list_books().await.unwrap();
        if books.len() == 12 {
            break books;
        }
        assert!(
            Instant::now() < deadline,
            "the demo added {} books",
            books.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (survivor, removed) = books.split_last().unwrap();
    for book in removed {
        let remove = BookCommand::Remove {
            book_id: book.book_id,
        };
        service
            .execute(remove, CommandContext::default())
            .await
            .unwrap();
    }
    let version_of = |book_id| {
        let store = store.clone();
        async move { store.load_book(book_id).await.unwrap().unwrap().version }
    };
    let removed_at = version_of(survivor.book_id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while version_of(survivor.book_id).await < removed_at + 20 {
        assert!(
            !feed.is_finished(),
            "the feed ended when it met a removed book"
        );
        assert!(
            Instant::now() < deadline,
            "the survivor's price was not changed 20 times"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for book in removed {
        let book = store.load_book(book.book_id).await.unwrap().unwrap();
        assert!(book.removed, "{book:?}");
    }

    let remove = BookCommand::Remove {
        book_id: survivor.book_id,
    };
    service
        .execute(remove, CommandContext::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!feed.is_finished(), "the feed ended with no book left");
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(5), feed)
        .await
        .expect("the feed stops at shutdown")
        .unwrap();
}

/// `bookstore up` waits for every part when it stops, the demo feed among them: a feed inside a
/// save on a database that stopped answering (its connections died without a word) must still
/// stop at once, not when TCP gives up.
#[tokio::test]
async fn demo_data_stops_on_shutdown_while_the_database_does_not_answer() {
    use bookstore::codec::AvroCodec;
    use bookstore::demo::{DemoPace, feed_demo_data};
    use bookstore::service::BookService;
    use bookstore::shutdown::ShutdownTrigger;
    use bookstore::store::{EventStore, PostgresStore};
    use std::str::FromStr;

    let (_, url) = common::postgres_store_with_url().await;
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
    let (proxy, pool) = common::freezing_proxy::FreezingProxy::before_postgres(options).await;
    let store = PostgresStore::with_pool(pool).await.unwrap();
    let (trigger, shutdown) = ShutdownTrigger::new();
    let pace = DemoPace {
        add_every: Duration::from_millis(1),
        change_every: Duration::from_millis(1),
    };
    let feed = tokio::spawn({
        let service = BookService::new(store.clone(), AvroCodec::new());
        async move { feed_demo_data(&service, pace, shutdown).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.list_books().await.unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the demo added no books");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    proxy.freeze();
    // Long enough for the feed to be inside a save on a frozen connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(5), feed)
        .await
        .expect("the demo feed did not stop")
        .unwrap();
}
