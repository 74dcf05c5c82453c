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
    let mut child = bookstore(url, &common::unique("up"))
        .args(["up", "--demo-data", "--addr", "127.0.0.1:0"])
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

    common::terminate_gracefully(&mut child, "bookstore up").await;
}
