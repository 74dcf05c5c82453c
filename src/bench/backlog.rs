//! Peak memory of the relay draining a large backlog: `bookstore relay --once` runs as a child
//! process over a fresh store holding `backlog_events` events, and its peak resident set
//! (`VmHWM` in `/proc/<pid>/status`, read every 50 ms while it runs) is the figure.
//!
//! Writing a million events through `save` would take minutes, and only the relay is measured
//! here, so the backlog is written with ONE bulk SQL statement straight into `events`, then
//! `outbox_head` is moved to its end. The rows are copies of one real book's two events (a
//! `BookAdded` and its fact, saved through the store first): every copy has its own event id,
//! book id and stream (so keys spread over the partitions as real books do), version 1, and the
//! template's timestamps and Avro bodies. The relay does not read `books`, so no rows go there.
//!
//! With `relay_wrapper` set (e.g. `perf record -g -o relay.perf --`), the child runs under that
//! command and the memory is read from the relay process below it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tracing::info;

use super::stores::{BenchStore, StoreFactory};
use super::workload::Workload;
use super::{BenchConfig, BenchError, BenchReport, Figure, KafkaRun, Target, Unit};
use crate::config::KafkaConfig;
use crate::relay::DeliveryMode;
use crate::store::{AnyStore, EventStore};

const SQLITE_BULK: &str =
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
INSERT INTO events (position, event_id, event_type, stream, stream_version, aggregate_id,
                    occurred_at, correlation_id, causation_id, traceparent, payload,
                    schema_fingerprint)
SELECT 2 * n.i + t.position,
       printf('%08x-%04x-7000-8000-000000000000', n.i, t.position),
       t.event_type,
       CASE t.position WHEN 1 THEN 'bookstore::book-' ELSE 'bookstore::book-fact-' END
           || printf('%08x-0000-7000-9000-000000000000', n.i),
       1,
       printf('%08x-0000-7000-9000-000000000000', n.i),
       t.occurred_at, t.correlation_id, t.causation_id, t.traceparent, t.payload,
       t.schema_fingerprint
FROM n CROSS JOIN events AS t
WHERE t.position IN (1, 2)";

const POSTGRES_BULK: &str =
    "INSERT INTO events (position, event_id, event_type, stream, stream_version, aggregate_id,
                    occurred_at, correlation_id, causation_id, traceparent, payload,
                    schema_fingerprint)
SELECT 2 * n.i + t.position,
       (lpad(to_hex(n.i), 8, '0') || '-' || lpad(to_hex(t.position), 4, '0')
           || '-7000-8000-000000000000')::uuid,
       t.event_type,
       CASE t.position WHEN 1 THEN 'bookstore::book-' ELSE 'bookstore::book-fact-' END
           || lpad(to_hex(n.i), 8, '0') || '-0000-7000-9000-000000000000',
       1,
       (lpad(to_hex(n.i), 8, '0') || '-0000-7000-9000-000000000000')::uuid,
       t.occurred_at, t.correlation_id, t.causation_id, t.traceparent, t.payload,
       t.schema_fingerprint
FROM generate_series(1, $1) AS n(i) CROSS JOIN events AS t
WHERE t.position IN (1, 2)
ORDER BY 1";

pub async fn measure(
    config: &BenchConfig,
    factory: &mut StoreFactory,
    kafka: &mut KafkaRun,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let program = config.relay_program.clone().ok_or_else(|| {
        BenchError::Setting("the backlog measurement needs the bookstore executable".into())
    })?;
    let kind = config.backlog_store;
    let bench = factory.fresh(kind).await?;
    let started = Instant::now();
    let events = write_backlog(&bench, config.backlog_events).await?;
    info!(%kind, events, seconds = started.elapsed().as_secs_f64(), "bulk backlog written");

    let drained = drain_in_child(
        &program,
        &config.relay_wrapper,
        &bench.url,
        &kafka.fresh(),
        config.batch_size,
        config.backlog_delivery,
    )
    .await?;
    if drained.published != events {
        return Err(BenchError::Incomplete(format!(
            "the child relay published {} of {events} events",
            drained.published
        )));
    }
    let rate = super::workload::per_second(events, drained.elapsed);
    let peak_mib = drained.peak_kib as f64 / 1024.0;
    report.push(
        Figure::new(
            "relay_backlog_rss",
            format!(
                "relay peak RSS draining the backlog ({})",
                super::mode_label(config.backlog_delivery)
            ),
            peak_mib,
            Unit::Mebibytes,
        )
        .store(kind)
        .detail(format!(
            "{events} events in {:.1} s = {rate:.0} events/s incl. start-up{}",
            drained.elapsed.as_secs_f64(),
            if config.relay_wrapper.is_empty() {
                ""
            } else {
                " (under --relay-wrapper: not representative)"
            }
        ))
        .target(Target::ValueAtMost(64.0))
        .extra("events", events as f64)
        .extra("seconds", drained.elapsed.as_secs_f64())
        .extra("events_per_second", rate),
    );
    Ok(())
}

/// Writes about `events` events (rounded up to an even number, at least two) in bulk; returns
/// how many there are.
async fn write_backlog(bench: &BenchStore, events: u64) -> Result<u64, BenchError> {
    let template = Workload::new(0).addition(0)?;
    bench.store.save(template).await?;
    let copies = i64::try_from(events.saturating_sub(2).div_ceil(2))
        .map_err(|_| BenchError::Setting("--backlog-events is too large".into()))?;
    let head = 2 + 2 * copies;
    match &bench.store {
        AnyStore::Sqlite(store) => {
            let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
            sqlx::query(SQLITE_BULK)
                .bind(copies)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE outbox_head SET last_position = ?1 WHERE id = 1")
                .bind(head)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        AnyStore::Postgres(store) => {
            let mut tx = store.pool().begin().await?;
            sqlx::query(POSTGRES_BULK)
                .bind(copies)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE outbox_head SET last_position = $1 WHERE id = 1")
                .bind(head)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            sqlx::query("ANALYZE events").execute(store.pool()).await?;
        }
    }
    let stored = bench.store.head_position().await?;
    if stored != head as u64 {
        return Err(BenchError::Incomplete(format!(
            "the backlog head is {stored}, expected {head}"
        )));
    }
    Ok(stored)
}

/// What the child relay did.
#[derive(Debug, Clone, Copy)]
pub struct ChildDrain {
    pub published: u64,
    pub elapsed: Duration,
    pub peak_kib: u64,
}

/// Runs `bookstore relay --once --delivery <delivery>` (under `wrapper`, if any) over
/// `database_url` and watches its peak resident set until it exits.
pub async fn drain_in_child(
    program: &Path,
    wrapper: &[String],
    database_url: &str,
    kafka: &KafkaConfig,
    batch_size: usize,
    delivery: DeliveryMode,
) -> Result<ChildDrain, BenchError> {
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = tokio::process::Command::new(first);
            command.args(rest).arg(program);
            command
        }
        None => tokio::process::Command::new(program),
    };
    command
        .args(["relay", "--once", "--delivery", super::mode_label(delivery)])
        .args(["--batch-size", &batch_size.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    configure_child(&mut command, database_url, kafka);
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(BenchError::io(format!("starting {}", program.display())))?;
    let child_pid = child.id().unwrap_or_default();
    let relay_name = process_name(program);
    let mut stdout = child.stdout.take();
    let mut peak_kib = 0;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(BenchError::io("waiting for the relay"))?,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                // Under `perf record` the relay is a process below the wrapper; under
                // valgrind it is the wrapper's own process.
                let pid = if wrapper.is_empty() {
                    child_pid
                } else {
                    descendant_named(child_pid, &relay_name).unwrap_or(child_pid)
                };
                if let Some(kib) = peak_resident_kib(pid) {
                    peak_kib = peak_kib.max(kib);
                }
            }
        }
    };
    let elapsed = started.elapsed();
    let mut output = String::new();
    if let Some(stdout) = stdout.as_mut() {
        stdout
            .read_to_string(&mut output)
            .await
            .map_err(BenchError::io("reading the relay's output"))?;
    }
    if !status.success() {
        return Err(BenchError::Incomplete(format!(
            "the child relay exited with {status}; output: {output}"
        )));
    }
    if peak_kib == 0 {
        return Err(BenchError::Incomplete(
            "the relay's peak memory could not be read from /proc".into(),
        ));
    }
    Ok(ChildDrain {
        published: published_count(&output).unwrap_or(0),
        elapsed,
        peak_kib,
    })
}

/// Gives a child `bookstore` the database `database_url` and the broker settings of `kafka`:
/// what may hold a secret (the database URL's password, client options such as
/// `sasl.password`, the registry's credentials) in its environment, where only the same user
/// can read it, and the rest as flags. A command line is readable by every local user (`ps`,
/// `/proc/<pid>/cmdline`).
pub(super) fn configure_child(
    command: &mut tokio::process::Command,
    database_url: &str,
    kafka: &KafkaConfig,
) {
    command
        .args(kafka_arguments(kafka))
        .env("BOOKSTORE_DATABASE_URL", database_url);
    let options: Vec<String> = kafka
        .client_options
        .iter()
        .map(crate::config::ClientOptions::to_argument)
        .collect();
    // Set even when empty: the child would otherwise take the options of this process's
    // environment, which `kafka` may have replaced.
    command.env("BOOKSTORE_KAFKA_OPTIONS", options.join(","));
    match &kafka.schema_registry_basic_auth {
        Some(user_info) => command.env("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", user_info.expose()),
        None => command.env_remove("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
    };
}

/// The flags that give a child `bookstore` the broker settings of `kafka` that hold no secret.
fn kafka_arguments(kafka: &KafkaConfig) -> Vec<String> {
    let mut arguments = vec![
        "--bootstrap-servers".to_owned(),
        kafka.bootstrap_servers.clone(),
        "--topic-prefix".to_owned(),
        kafka.topic_prefix.clone(),
        "--topic-partitions".to_owned(),
        kafka.partitions.to_string(),
        format!("--topic-replication-factor={}", kafka.replication_factor),
        "--kafka-timeout-ms".to_owned(),
        kafka.request_timeout_ms.to_string(),
    ];
    if let Some(url) = kafka.schema_registry() {
        arguments.push("--schema-registry-url".to_owned());
        arguments.push(url.to_owned());
    }
    if let Some(ca) = &kafka.schema_registry_ca_location {
        arguments.push("--schema-registry-ca-location".to_owned());
        arguments.push(ca.display().to_string());
    }
    arguments
}

/// "published N events in B batches; last position P" → N.
fn published_count(output: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|line| line.strip_prefix("published "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
}

/// `VmHWM` of `pid` in KiB, if the process still exists.
fn peak_resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The name the kernel gives a process started from `program` (at most 15 bytes).
fn process_name(program: &Path) -> String {
    let name = program
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.chars().take(15).collect()
}

/// The first process below `root` (at any depth) whose name is `name`.
fn descendant_named(root: u32, name: &str) -> Option<u32> {
    let mut parents = vec![root];
    let processes: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/stat"))).ok()?;
            // "pid (comm) state ppid …"; comm may contain spaces, so split at the last ')'.
            let (head, tail) = stat.rsplit_once(')')?;
            let comm = head.split_once('(')?.1.to_owned();
            let ppid = tail.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid, comm))
        })
        .collect();
    while let Some(parent) = parents.pop() {
        for (pid, ppid, comm) in &processes {
            if *ppid != parent {
                continue;
            }
            if comm == name {
                return Some(*pid);
            }
            parents.push(*pid);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_count_is_read_from_the_relay_output() {
        let output = "published 1000000 events in 2000 batches; last position 1000000\n";
        assert_eq!(published_count(output), Some(1_000_000));
        assert_eq!(published_count("nothing"), None);
    }

    #[test]
    fn the_peak_of_this_process_is_readable() {
        assert!(peak_resident_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }
}
