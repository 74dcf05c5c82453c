//! The dashboard in a real browser over the whole loop: a book added through the JSON API goes
//! into the outbox, the relay publishes its fact to Kafka, the projector applies it to the
//! read model, and headless Chromium, loading the server-rendered page without any help,
//! shows it in a table row.
//!
//! Needs the test broker (see `tests/common`) and Chromium (Debian: `apt-get install -y
//! chromium chromium-driver`). Without Chromium the test FAILS and says how to install it.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bookstore::config::RelaySettings;
use bookstore::http::{self, HttpState};
use bookstore::projection::{ProjectionConfig, ProjectionMode, default_group, kafka_projector};
use bookstore::relay::{RunMode, kafka_relay};
use bookstore::shutdown::ShutdownTrigger;
use bookstore::store::SqliteStore;
use tokio::net::TcpListener;

/// How long the book may take from the API to the page (relay, Kafka, projector, browser).
const DEADLINE: Duration = Duration::from_secs(60);
/// How long one browser run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(30);

const INSTALL_HINT: &str = "this test needs headless Chromium: on Debian/Ubuntu run \
     `apt-get update && apt-get install -y chromium chromium-driver`, or set CHROMIUM to the \
     browser's path";

/// The Chromium binary: `$CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
fn chromium() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("CHROMIUM") {
        Some(path) => vec![PathBuf::from(path)],
        None => vec!["chromium".into(), "chromium-browser".into()],
    };
    for candidate in candidates {
        let answers = std::process::Command::new(&candidate)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if answers {
            return candidate;
        }
    }
    panic!("no Chromium found: {INSTALL_HINT}");
}

/// The DOM of `url` after it loaded, as headless Chromium serialises it, from a fresh profile.
/// Chromium and every process it started are killed if it takes longer than
/// [`BROWSER_TIMEOUT`].
async fn dump_dom(chromium: &PathBuf, url: &str) -> Result<String, String> {
    let profile = tempfile::tempdir().map_err(|error| error.to_string())?;
    let child = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so a hung browser can be stopped with its helper processes.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| {
            format!(
                "could not start {}: {error} ({INSTALL_HINT})",
                chromium.display()
            )
        })?;
    let group = child.id();
    match tokio::time::timeout(BROWSER_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) if output.status.success() => {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
        Ok(Ok(output)) => Err(format!(
            "chromium exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )),
        Ok(Err(error)) => Err(format!("chromium: {error}")),
        Err(_) => {
            if let Some(group) = group {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{group}")])
                    .status();
            }
            Err(format!(
                "chromium did not finish within {BROWSER_TIMEOUT:?}"
            ))
        }
    }
}

/// Whether `dom` has the table row of `book_id` with a cell holding exactly `title`.
fn row_shows_title(dom: &str, book_id: &str, title: &str) -> bool {
    let Some(start) = dom.find(&format!("<tr data-book-id=\"{book_id}\">")) else {
        return false;
    };
    let row = &dom[start..];
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    row.contains(&format!("<td>{title}</td>"))
}

async fn add_book(base: &str, title: &str) -> String {
    let url = format!("{base}/api/books");
    let body = serde_json::json!({"title": title, "author": "Headless Reader", "price": "9.99"});
    let reply = tokio::task::spawn_blocking(move || {
        let mut response = ureq::post(&url)
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap_or_else(|error| panic!("POST {url}: {error}"));
        response.body_mut().read_to_string().unwrap()
    })
    .await
    .unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    reply["book_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn book_added_through_the_api_shows_in_the_dashboard_in_a_browser() {
    let chromium = chromium();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("bookstore.db").to_str().unwrap())
        .await
        .unwrap();
    let kafka = common::kafka_config();
    let (trigger, shutdown) = ShutdownTrigger::new();

    let settings = RelaySettings {
        poll_interval_ms: 50,
        ..RelaySettings::default()
    };
    let relay = kafka_relay(store.clone(), &kafka, &settings).await.unwrap();
    let relay = tokio::spawn(relay.run(RunMode::Follow, shutdown.clone()));
    let group = default_group(&kafka.topic_prefix);
    let projector = kafka_projector(store.clone(), &kafka, ProjectionConfig::new(group))
        .await
        .unwrap();
    let projector = tokio::spawn(projector.run(ProjectionMode::Follow, shutdown.clone()));
    let metrics = bookstore::telemetry::prometheus_handle().unwrap();
    let state =
        HttpState::new(store, metrics).with_relay_id(format!("{}.relay", kafka.topic_prefix));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(http::serve(listener, http::router(state), shutdown));

    let title = common::unique("Seen in a browser");
    let book_id = add_book(&base, &title).await;

    let started = Instant::now();
    let mut last = String::new();
    let found = loop {
        match dump_dom(&chromium, &format!("{base}/")).await {
            Ok(dom) if row_shows_title(&dom, &book_id, &title) => break true,
            Ok(dom) => last = dom,
            Err(error) if error.contains(INSTALL_HINT) => panic!("{error}"),
            Err(error) => last = error,
        }
        if started.elapsed() > DEADLINE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    trigger.trigger();
    let stopped = tokio::time::timeout(Duration::from_secs(30), async {
        relay.await.unwrap().expect("relay failed");
        projector.await.unwrap().expect("projector failed");
        server.await.unwrap().expect("server failed");
    })
    .await;
    assert!(
        found,
        "the book {title:?} ({book_id}) did not show in the dashboard within {DEADLINE:?}; \
         the last page or error was:\n{last}"
    );
    assert!(
        stopped.is_ok(),
        "relay, projector or server did not stop within 30 s"
    );
}
