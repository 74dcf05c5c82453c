//! `bookstore bench --json` end to end with tiny sizes against the real broker and PostgreSQL:
//! every required key is there and every ratio is a positive finite number. No timing is
//! asserted; the figures of so small a run mean nothing.

mod common;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

const REQUIRED: [&str; 5] = [
    "relay_vs_producer_ratio",
    "projection_vs_consumer_ratio",
    "commit_to_ack_p99_ms",
    "commit_to_report_p99_ms",
    "relay_backlog_rss_mib",
];

fn positive_finite(value: &Value) -> bool {
    value
        .as_f64()
        .is_some_and(|number| number.is_finite() && number > 0.0)
}

/// Runs `bookstore bench --json` against the test broker and PostgreSQL with `args` added,
/// and returns its one JSON object.
async fn bench_json(args: &[&str]) -> Value {
    let work_dir = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .arg("bench")
        .arg("--json")
        .args(["--postgres-url", &common::postgres_url()])
        .args(["--bootstrap-servers", &common::bootstrap_servers()])
        .args(["--work-dir", work_dir.path().to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
        .await
        .expect("the bench did not finish within 10 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("stdout is not ONE JSON object ({error}): {stdout}"))
}

#[tokio::test]
async fn bench_json_has_every_figure_and_positive_finite_ratios() {
    let report = bench_json(&[
        "--stores",
        "sqlite,postgres",
        "--relay-events",
        "200",
        "--batch-size",
        "50",
        "--rounds",
        "2",
        "--writers",
        "2",
        "--writer-seconds",
        "0.5",
        "--append-events",
        "40",
        "--latency-rate",
        "100",
        "--latency-seconds",
        "1",
        "--backlog-events",
        "2000",
        "--broker-warm-up-events",
        "100",
    ])
    .await;

    for key in REQUIRED {
        let value = &report[key];
        assert!(
            positive_finite(value),
            "{key} is {value}, not a positive finite number"
        );
    }
    let figures = report["figures"].as_object().expect("a figures map");
    for store in ["sqlite", "postgres"] {
        for suffix in [
            "relay_exactly_once",
            "relay_at_least_once",
            "relay_exactly_once_vs_at_least_once",
            "writers_with_relay",
            "projection",
            "commit_to_ack_p99",
            "commit_to_report_p99",
            "append_x1",
            "append_x2",
        ] {
            let key = format!("{store}_{suffix}");
            assert!(figures.contains_key(&key), "figure {key} is missing");
        }
    }
    // The headline keys are the first store's figures, as the table prints them.
    assert_eq!(report["headline_store"], "sqlite");
    for (key, figure, field) in [
        (
            "relay_vs_producer_ratio",
            "sqlite_relay_exactly_once",
            "ratio",
        ),
        ("projection_vs_consumer_ratio", "sqlite_projection", "ratio"),
        ("commit_to_ack_p99_ms", "sqlite_commit_to_ack_p99", "value"),
        (
            "commit_to_report_p99_ms",
            "sqlite_commit_to_report_p99",
            "value",
        ),
        ("relay_backlog_rss_mib", "relay_backlog_rss", "value"),
    ] {
        assert_eq!(report[key], figures[figure][field], "{key} is not {figure}");
    }
    // On SQLite the relay also runs in a process of its own, woken by the file watch.
    assert!(
        figures.contains_key("sqlite_relay_process_commit_to_ack_p99"),
        "figure sqlite_relay_process_commit_to_ack_p99 is missing"
    );
    for (key, figure) in figures {
        assert!(
            positive_finite(&figure["value"]),
            "{key} has value {}",
            figure["value"]
        );
        if let Some(ratio) = figure.get("ratio") {
            assert!(positive_finite(ratio), "{key} has ratio {ratio}");
        }
    }
    // Measured against their baselines round by round: the ratio is the median of the two
    // rounds' ratios, so it lies within their range.
    for store in ["sqlite", "postgres"] {
        for suffix in ["relay_exactly_once", "relay_at_least_once", "projection"] {
            let figure = &figures[&format!("{store}_{suffix}")];
            let range = &figure["ratio_range"];
            assert_eq!(range["rounds"], 2, "{store}_{suffix}: {figure}");
            let (min, max) = (range["min"].as_f64(), range["max"].as_f64());
            let ratio = figure["ratio"].as_f64();
            assert!(
                matches!((min, ratio, max), (Some(min), Some(ratio), Some(max)) if min <= ratio && ratio <= max),
                "{store}_{suffix}: ratio outside its range: {figure}"
            );
        }
    }
}

/// The backlog's child relay can drain in at-least-once mode (to profile that mode alone), and
/// says so in the figure and the settings.
#[tokio::test]
async fn backlog_can_be_drained_at_least_once() {
    let report = bench_json(&[
        "--only",
        "backlog",
        "--backlog-events",
        "2000",
        "--backlog-delivery",
        "at-least-once",
        "--broker-warm-up-events",
        "0",
    ])
    .await;
    assert_eq!(report["settings"]["backlog_delivery"], "at-least-once");
    let figure = &report["figures"]["relay_backlog_rss"];
    assert_eq!(
        figure["measurement"],
        "relay peak RSS draining the backlog (at-least-once)"
    );
    assert!(positive_finite(&figure["value"]), "{figure}");
    assert_eq!(figure["extra"]["events"], 2000.0);
}

/// SIGTERM stops a run where it is and still runs its cleanup: its stores' folder is gone (the
/// same cleanup drops its PostgreSQL schemas and deletes its topics). Without the handler the
/// signal's default action killed it and left them behind.
#[tokio::test]
async fn sigterm_stops_the_bench_and_it_cleans_up() {
    let work_dir = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .arg("bench")
        .args(["--only", "append", "--stores", "sqlite"])
        // Minutes of saves, far more than the seconds it is given; small enough to build
        // its workload (synchronously, so a signal waits for it) in a few seconds.
        .args(["--append-events", "300000"])
        .args(["--bootstrap-servers", &common::bootstrap_servers()])
        .args(["--work-dir", work_dir.path().to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The run's folder, once its first store is in it.
    let has_store = |dir: &std::path::Path| {
        std::fs::read_dir(dir).unwrap().any(|entry| {
            let folder = entry.unwrap().path();
            folder.is_dir() && std::fs::read_dir(folder).unwrap().next().is_some()
        })
    };
    let started = tokio::time::Instant::now();
    while !has_store(work_dir.path()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the bench made no store within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    common::send_sigterm(&child, "the bench");
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the bench did not stop within 30 s of SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: interrupted"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(work_dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// SIGTERM during the latency measurement, whose relay and projector run as tasks of the
/// bench's own process: both are stopped and waited for before the cleanup deletes the stores
/// and topics they use. Without the wait the cleanup began at once, beside them still running,
/// and the process exit cut them off.
#[tokio::test]
async fn sigterm_waits_for_the_benchs_own_relay_and_projector_before_cleaning_up() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let work_dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .arg("bench")
        .args(["--only", "latency,projection", "--stores", "sqlite"])
        .args([
            "--relay-events",
            "500",
            "--rounds",
            "1",
            "--batch-size",
            "100",
        ])
        .args(["--broker-warm-up-events", "0", "--backlog-events", "0"])
        .args(["--latency-seconds", "120"])
        .args(["--bootstrap-servers", &common::bootstrap_servers()])
        .args(["--work-dir", work_dir.path().to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let started = tokio::time::Instant::now();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("the bench went quiet before its latency measurement")
            .unwrap()
            .unwrap_or_else(|| panic!("the bench ended early: {seen:#?}"));
        let measuring = line.contains("measuring latency at a fixed offered load");
        seen.push(line);
        if measuring {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(180), "{seen:#?}");
    }
    // Long enough for the relay and the projector to be running.
    tokio::time::sleep(Duration::from_secs(5)).await;
    common::send_sigterm(&child, "the bench");
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        let mut rest = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            rest.push(line);
        }
        rest
    })
    .await
    .expect("the bench did not stop within 60 s of SIGTERM");
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(1), "{rest:#?}");
    let at = |text: &str| {
        rest.iter()
            .position(|line| line.contains(text))
            .unwrap_or_else(|| panic!("no {text:?} after SIGTERM: {rest:#?}"))
    };
    let cleanup = at("cleaning up the run's stores and topics");
    assert!(at("relay stopped") < cleanup, "{rest:#?}");
    assert!(at("projection stopped") < cleanup, "{rest:#?}");
    assert!(rest.iter().any(|line| line.contains("error: interrupted")));
}
