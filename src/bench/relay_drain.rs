//! Relay drain throughput against a raw producer sending the very same records.
//!
//! A backlog is written to a fresh store first (concurrent writers, not timed). Then, per round
//! and per delivery mode, on fresh topics each time:
//!
//! * **raw producer**: `RecordMapper` turns the stored events into records before the clock
//!   starts (keys, values, header names and values: every byte; only librdkafka's header list
//!   of each record is built as it is sent, see `PreparedRecord`); a `FutureProducer` with the
//!   relay's client settings (`KafkaConfig::relay_producer_config`) sends them. Exactly-once:
//!   transactional producers (initialised before the clock), as many as the relay takes turns
//!   with ([`TRANSACTIONAL_PRODUCERS`], which spares the next transaction the coordinator's
//!   `CONCURRENT_TRANSACTIONS` refusal), each in turn beginning a transaction, sending
//!   `batch_size` events' records, awaiting their acknowledgements and committing while the
//!   next batch is sent, as the relay does (a commit waits for the previous one; see
//!   `CommitInFlight` in the publisher), until done. The relay may cut batches earlier (after
//!   `RelayConfig::max_batch_time`) and adds a checkpoint record to each.
//!   At-least-once: an idempotent `acks=all` producer (readied by one acknowledged record
//!   before the clock) that sends everything and awaits every acknowledgement.
//! * **relay**: `Relay::run(RunMode::Once)` over the same store, timed from its first outbox
//!   read (its producer is ready by then; [`TimedOutbox`]) to the end of its last
//!   `record_published` call. The store time inside that window is reported too, split into
//!   reads and bookkeeping; start-up before it and teardown after it are reported apart.
//!
//! The relay and its baseline run back to back in each round, in alternating order. The median
//! of the rounds is reported for each, and as the ratio the median of the rounds' ratios
//! (see [`Figure::against_rounds`]).

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tracing::info;

use super::stores::StoreFactory;
use super::timed_outbox::TimedOutbox;
use super::workload::{Workload, save_all};
use super::{
    BenchConfig, BenchError, BenchReport, Figure, KafkaRun, Measurement, StoreKind, Target, Unit,
    median, mode_key, mode_label,
};
use crate::config::{KafkaConfig, RelaySettings};
use crate::domain::{EventKind, StoredEvent};
use crate::kafka::provision_topics;
use crate::relay::record::{OutboundRecord, RecordMapper};
use crate::relay::{DeliveryMode, RunMode, TRANSACTIONAL_PRODUCERS, kafka_relay, wire_format};
use crate::shutdown::Shutdown;
use crate::store::{AnyStore, EventStore};

const MODES: [DeliveryMode; 2] = [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce];

/// One timed drain of the backlog.
#[derive(Debug, Clone, Copy, Default)]
pub struct Drain {
    pub events: u64,
    pub elapsed: Duration,
    /// Relay only: from `run` to its first outbox read (lease, producer, checkpoint).
    pub startup: Duration,
    /// Relay only: from the last position recorded published until `run` returned (dropping
    /// the producers: rust-rdkafka joins each one's polling thread, which polls in 100 ms
    /// slices). Not part of `elapsed`, as the baseline's producer teardown is not either.
    pub teardown: Duration,
    /// Relay only: time inside `read_after` (on PostgreSQL mostly beside the sends, see
    /// `Outbox::reads_ahead`), and in checkpoint/head/lease/retention calls.
    pub store_reads: Duration,
    pub store_bookkeeping: Duration,
    pub batches: u64,
}

impl Drain {
    pub fn events_per_second(&self) -> f64 {
        super::workload::per_second(self.events, self.elapsed)
    }
}

/// What the relay measurement leaves for the projection measurement: topics holding the facts.
#[derive(Debug, Clone)]
pub struct PublishedFacts {
    pub kafka: KafkaConfig,
    pub facts: u64,
}

/// Writes the backlog, drains it with the relay and the raw producer in both modes, and adds
/// the figures; then measures the projection on the facts of the first exactly-once drain.
pub async fn measure(
    config: &BenchConfig,
    factory: &mut StoreFactory,
    kafka: &mut KafkaRun,
    kind: StoreKind,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let bench = factory.fresh(kind).await?;
    let workload = Workload::new(config.updates_per_book);
    let histories = workload.histories(workload.books_for(config.relay_events))?;
    let written = save_all(&bench.store, histories, config.writers).await?;
    info!(%kind, events = written.events, seconds = written.elapsed.as_secs_f64(), "backlog written");
    let events = read_everything(&bench.store).await?;
    let facts = events
        .iter()
        .filter(|event| event.metadata.kind() == EventKind::Fact)
        .count() as u64;

    let mut raw: [Vec<Drain>; 2] = [vec![], vec![]];
    let mut relay: [Vec<Drain>; 2] = [vec![], vec![]];
    let mut bytes = 0;
    let mut published = None;
    // With only the projection to feed, one exactly-once drain is all that is needed.
    let measuring = config.runs(Measurement::Relay);
    for round in 1..=config.rounds {
        for (index, mode) in MODES.into_iter().enumerate() {
            if !measuring && (mode != DeliveryMode::ExactlyOnce || published.is_some()) {
                continue;
            }
            // Which of the pair goes first alternates, so neither always meets the broker
            // fresh from the other's load.
            let raw_first = round % 2 == 1;
            if measuring && raw_first {
                bytes = baseline_drain(kafka, &events, mode, config, &mut raw[index]).await?;
            }
            let topics = kafka.fresh();
            let drain = relay_drain(topics.clone(), &bench.store, mode, config.batch_size).await?;
            check_complete(&drain, events.len())?;
            if published.is_none() && mode == DeliveryMode::ExactlyOnce {
                published = Some(PublishedFacts {
                    kafka: topics,
                    facts,
                });
            }
            relay[index].push(drain);
            if measuring && !raw_first {
                bytes = baseline_drain(kafka, &events, mode, config, &mut raw[index]).await?;
            }
            info!(
                %kind, round, mode = mode_label(mode),
                relay = relay[index].last().map_or(0.0, Drain::events_per_second),
                raw = raw[index].last().map_or(0.0, Drain::events_per_second),
                "drained (events/s)"
            );
        }
    }

    if measuring {
        add_figures(report, kind, &raw, &relay, bytes, events.len() as u64);
        // Events per second of each style, in this order.
        let mut rates = Vec::new();
        for style in [CommitStyle::Flushing, CommitStyle::InTurn] {
            let (drain, _) = producer_drain(
                kafka.fresh(),
                &events,
                DeliveryMode::ExactlyOnce,
                config.batch_size,
                style,
            )
            .await?;
            rates.push(drain.events_per_second());
        }
        report.push(
            Figure::new(
                format!("{kind}_producer_commit_flush"),
                "raw transactional producer, commit flushes (1 round)",
                rates[0],
                Unit::EventsPerSecond,
            )
            .store(kind)
            .against(
                "raw transactional producer, acks awaited, commits in turn (1 round)",
                rates[1],
                None,
            ),
        );
    }
    if config.runs(Measurement::Projection)
        && let Some(published) = published
    {
        super::projection::measure(config, factory, kind, &published, report).await?;
    }
    Ok(())
}

/// One round's baseline: the raw producer drains `events` in `mode` onto fresh topics; the
/// drain goes to `drains`. Returns the bytes of the records sent.
async fn baseline_drain(
    kafka: &mut KafkaRun,
    events: &[StoredEvent],
    mode: DeliveryMode,
    config: &BenchConfig,
    drains: &mut Vec<Drain>,
) -> Result<u64, BenchError> {
    let (drain, bytes) = producer_drain(
        kafka.fresh(),
        events,
        mode,
        config.batch_size,
        CommitStyle::Overlapped,
    )
    .await?;
    drains.push(drain);
    Ok(bytes)
}

/// Warms the broker (a JVM: its transaction and produce paths run interpreted until the JIT
/// has seen them often) with the raw producers on throwaway topics: `events` events in
/// transactions of 50, then the same acknowledged. Nothing is measured.
pub async fn warm_up_broker(
    config: &BenchConfig,
    kafka: &mut KafkaRun,
    events: u64,
) -> Result<(), BenchError> {
    let workload = Workload::new(config.updates_per_book);
    let events: Vec<StoredEvent> = workload
        .histories(workload.books_for(events))?
        .into_iter()
        .flatten()
        .flat_map(|change| change.events)
        .zip(1..)
        .map(|(event, position)| StoredEvent {
            position,
            metadata: event.metadata,
            payload: event.payload,
            schema_fingerprint: Some(event.schema_fingerprint),
        })
        .collect();
    let started = Instant::now();
    for mode in MODES {
        producer_drain(kafka.fresh(), &events, mode, 50, CommitStyle::Overlapped).await?;
    }
    info!(
        seconds = started.elapsed().as_secs_f64(),
        "broker warmed up"
    );
    Ok(())
}

fn check_complete(drain: &Drain, expected: usize) -> Result<(), BenchError> {
    if drain.events == expected as u64 {
        return Ok(());
    }
    Err(BenchError::Incomplete(format!(
        "the relay published {} of {expected} events",
        drain.events
    )))
}

fn add_figures(
    report: &mut BenchReport,
    kind: StoreKind,
    raw: &[Vec<Drain>; 2],
    relay: &[Vec<Drain>; 2],
    bytes: u64,
    events: u64,
) {
    let bytes_per_event = bytes as f64 / events.max(1) as f64;
    let megabytes =
        |events_per_second: f64| format!("{:.1} MB/s", events_per_second * bytes_per_event / 1e6);
    let target = match kind {
        StoreKind::Sqlite => 0.8,
        StoreKind::Postgres => 0.6,
    };
    let rate = |drains: &[Drain]| {
        median(
            &drains
                .iter()
                .map(Drain::events_per_second)
                .collect::<Vec<_>>(),
        )
    };
    // Round by round: (a, b) of the same round, for `Figure::against_rounds`.
    let rounds = |a: &[Drain], b: &[Drain]| -> Vec<(f64, f64)> {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a.events_per_second(), b.events_per_second()))
            .collect()
    };
    for (index, mode) in MODES.into_iter().enumerate() {
        let relay_rate = rate(&relay[index]);
        let raw_rate = rate(&raw[index]);
        let baseline = match mode {
            DeliveryMode::ExactlyOnce => "raw transactional producer, same batches",
            DeliveryMode::AtLeastOnce => "raw idempotent producer, acks=all",
        };
        let mean = |pick: fn(&Drain) -> Duration| {
            let drains = &relay[index];
            drains.iter().map(|d| pick(d).as_secs_f64()).sum::<f64>() / drains.len().max(1) as f64
        };
        let elapsed = mean(|d| d.elapsed);
        let share = |part: f64| if elapsed > 0.0 { part / elapsed } else { 0.0 };
        let figure = Figure::new(
            format!("{kind}_relay_{}", mode_key(mode)),
            format!("relay drain, {}", mode_label(mode)),
            relay_rate,
            Unit::EventsPerSecond,
        )
        .store(kind)
        .detail(megabytes(relay_rate))
        .against_rounds(
            baseline,
            &rounds(&relay[index], &raw[index]),
            Some(megabytes(raw_rate)),
        )
        .target(Target::RatioAtLeast(target))
        .extra("megabytes_per_second", relay_rate * bytes_per_event / 1e6)
        .extra(
            "baseline_megabytes_per_second",
            raw_rate * bytes_per_event / 1e6,
        )
        .extra("bytes_per_event", bytes_per_event)
        .extra("startup_ms", mean(|d| d.startup) * 1e3)
        .extra("teardown_ms", mean(|d| d.teardown) * 1e3)
        .extra("store_read_share", share(mean(|d| d.store_reads)))
        .extra(
            "store_bookkeeping_share",
            share(mean(|d| d.store_bookkeeping)),
        )
        .extra(
            "batches",
            relay[index].first().map_or(0.0, |d| d.batches as f64),
        );
        report.push(figure);
    }
    report.push(
        Figure::new(
            format!("{kind}_relay_exactly_once_vs_at_least_once"),
            "relay exactly-once vs at-least-once",
            rate(&relay[0]),
            Unit::EventsPerSecond,
        )
        .store(kind)
        .against_rounds("relay at-least-once", &rounds(&relay[0], &relay[1]), None)
        .target(Target::RatioAtLeast(0.9)),
    );
    report.push(
        Figure::new(
            format!("{kind}_producer_exactly_once_vs_at_least_once"),
            "raw producer transactional vs idempotent",
            rate(&raw[0]),
            Unit::EventsPerSecond,
        )
        .store(kind)
        .against_rounds("raw idempotent producer", &rounds(&raw[0], &raw[1]), None),
    );
}

/// Every event of the store, in position order.
pub async fn read_everything(store: &AnyStore) -> Result<Vec<StoredEvent>, BenchError> {
    let mut events = Vec::new();
    loop {
        let after = events
            .last()
            .map_or(0, |event: &StoredEvent| event.position);
        let page = store.read_after(after, 10_000).await?;
        if page.is_empty() {
            return Ok(events);
        }
        events.extend(page);
    }
}

/// Drains the store with the relay in `mode` onto the topics of `kafka`.
pub async fn relay_drain(
    kafka: KafkaConfig,
    store: &AnyStore,
    mode: DeliveryMode,
    batch_size: usize,
) -> Result<Drain, BenchError> {
    let outbox = TimedOutbox::new(store.clone());
    let clock = outbox.clock();
    let settings = RelaySettings {
        delivery: mode,
        batch_size,
        ..RelaySettings::default()
    };
    let relay = kafka_relay(outbox, &kafka, &settings).await?;
    let started = Instant::now();
    let outcome = relay.run(RunMode::Once, Shutdown::never()).await?;
    let finished = Instant::now();
    let first_read = clock.first_read().unwrap_or(started);
    let drained = clock.last_recorded().unwrap_or(finished);
    Ok(Drain {
        events: outcome.published_events,
        elapsed: drained.duration_since(first_read),
        startup: first_read.duration_since(started),
        teardown: finished.duration_since(drained),
        store_reads: clock.reads(),
        store_bookkeeping: clock.bookkeeping(),
        batches: outcome.batches,
    })
}

/// Sends the records of `events` with a raw producer in `mode`; returns the drain and the bytes
/// of the records (keys, values and headers).
pub async fn producer_drain(
    kafka: KafkaConfig,
    events: &[StoredEvent],
    mode: DeliveryMode,
    batch_size: usize,
    style: CommitStyle,
) -> Result<(Drain, u64), BenchError> {
    let topics = kafka.topics();
    provision_topics(
        &kafka,
        &topics.specs(kafka.partitions, kafka.replication_factor),
    )
    .await?;
    let mapper = RecordMapper::new(topics, wire_format(&kafka).await?);
    let mut batches = Vec::with_capacity(events.len().div_ceil(batch_size));
    for chunk in events.chunks(batch_size.max(1)) {
        let mut records = Vec::with_capacity(chunk.len());
        for event in chunk {
            records.extend(mapper.records(event)?.into_iter().map(PreparedRecord::from));
        }
        batches.push(records);
    }
    let bytes = batches.iter().flatten().map(PreparedRecord::bytes).sum();
    let producers = raw_producers(&kafka, mode).await?;
    let started = Instant::now();
    match mode {
        DeliveryMode::ExactlyOnce => {
            send_in_transactions(&producers, &batches, &kafka, style).await?;
        }
        DeliveryMode::AtLeastOnce => send_acknowledged(&producers[0], &batches).await?,
    }
    let drain = Drain {
        events: events.len() as u64,
        elapsed: started.elapsed(),
        ..Drain::default()
    };
    // Freed after the clock: the relay writes its header values into buffers it reuses, so
    // freeing a record's 13 header names and values is the baseline's cost alone.
    drop(batches);
    Ok((drain, bytes))
}

/// A record of the relay's, every byte of it computed before the baseline's clock starts:
/// key, value, and each header's name and value.
///
/// Only librdkafka's own header list is built inside the clock, as the record is sent: a
/// producer sending these headers must do that for each record (librdkafka takes the list with
/// the record), and the relay does it too. Until 2026-12-06 (fourth session) the baseline took
/// records whose header lists were built before its clock, 13 `rd_kafka_header_add` calls (each
/// an allocation) per record that only the relay paid inside its window. The prepared records
/// are freed after the clock stops (the relay frees its keys and values inside its window, so
/// that part favours the baseline).
struct PreparedRecord<'a> {
    topic: &'a str,
    key: String,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl<'a> From<OutboundRecord<'a>> for PreparedRecord<'a> {
    fn from(record: OutboundRecord<'a>) -> Self {
        let headers = record
            .headers
            .iter()
            .map(|header| (header.key.to_owned(), header.value.map(<[u8]>::to_vec)))
            .collect();
        Self {
            topic: record.topic,
            key: record.key,
            value: record.value,
            headers,
        }
    }
}

impl PreparedRecord<'_> {
    fn bytes(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.as_ref().map_or(0, Vec::len))
            .sum();
        (self.key.len() + self.value.as_ref().map_or(0, Vec::len) + headers) as u64
    }

    /// librdkafka's header list of the record.
    fn native_headers(&self) -> OwnedHeaders {
        self.headers.iter().fold(
            OwnedHeaders::new_with_capacity(self.headers.len()),
            |headers, (name, value)| {
                headers.insert(Header {
                    key: name,
                    value: value.as_deref(),
                })
            },
        )
    }
}

/// Producers with the relay's settings: as many transactional ones (initialised) as the relay
/// takes turns with for exactly-once, one idempotent producer for at-least-once.
async fn raw_producers(
    kafka: &KafkaConfig,
    mode: DeliveryMode,
) -> Result<Vec<FutureProducer>, BenchError> {
    if mode == DeliveryMode::AtLeastOnce {
        return Ok(vec![raw_producer(kafka, mode, None).await?]);
    }
    let mut producers = Vec::with_capacity(TRANSACTIONAL_PRODUCERS);
    for turn in 0..TRANSACTIONAL_PRODUCERS {
        let transactional_id = format!("{}.raw.{turn}", kafka.topic_prefix);
        producers.push(raw_producer(kafka, mode, Some(&transactional_id)).await?);
    }
    Ok(producers)
}

/// A producer with the relay's settings, transactional (and initialised) for exactly-once.
async fn raw_producer(
    kafka: &KafkaConfig,
    mode: DeliveryMode,
    transactional_id: Option<&str>,
) -> Result<FutureProducer, BenchError> {
    let settings = kafka.relay_producer_config(transactional_id);
    let producer: FutureProducer = settings.create()?;
    match mode {
        DeliveryMode::ExactlyOnce => {
            let initialiser = producer.clone();
            let timeout = kafka.request_timeout();
            tokio::task::spawn_blocking(move || initialiser.init_transactions(timeout)).await??;
        }
        DeliveryMode::AtLeastOnce => {
            // `init_transactions` readies the transactional producer before its clock starts;
            // ready the idempotent one too. A record sent before librdkafka has its producer
            // id waits for a 500 ms retry (librdkafka PR #5032), which made this baseline
            // look 4x slower than the transactional one. One acknowledged record outside the
            // measured topics gets it ready.
            let topic = kafka.topics().relay_checkpoint;
            let warm_up = FutureRecord::<str, str>::to(&topic)
                .key("bench.warm-up")
                .payload("0");
            await_all(vec![send_warm_up(&producer, warm_up)?]).await?;
        }
    }
    Ok(producer)
}

/// One transaction per batch, the producers taking turns: send, await every acknowledgement,
/// commit, as the relay does ([`crate::kafka::commit_transaction`]), in the given style.
async fn send_in_transactions(
    producers: &[FutureProducer],
    batches: &[Vec<PreparedRecord<'_>>],
    kafka: &KafkaConfig,
    style: CommitStyle,
) -> Result<(), BenchError> {
    let timeout = kafka.request_timeout();
    let mut committing: Option<tokio::task::JoinHandle<Result<(), KafkaError>>> = None;
    for (batch, producer) in batches.iter().zip(producers.iter().cycle()) {
        producer.begin_transaction()?;
        let mut deliveries = Vec::with_capacity(batch.len());
        for record in batch {
            deliveries.push(send(producer, record).await?);
        }
        match style {
            CommitStyle::Overlapped => {
                await_all(deliveries).await?;
                if let Some(previous) = committing.take() {
                    previous.await??;
                }
                let committer = producer.clone();
                committing = Some(tokio::spawn(async move {
                    crate::kafka::commit_transaction(&committer, timeout).await
                }));
            }
            CommitStyle::InTurn => {
                await_all(deliveries).await?;
                crate::kafka::commit_transaction(producer, timeout).await?;
            }
            CommitStyle::Flushing => {
                // The commit fails if any record of the transaction failed.
                drop(deliveries);
                let committer = producer.clone();
                tokio::task::spawn_blocking(move || committer.commit_transaction(timeout))
                    .await??;
            }
        }
    }
    if let Some(last) = committing {
        last.await??;
    }
    Ok(())
}

/// How a raw transactional producer gets its records delivered and its transactions committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitStyle {
    /// Await every delivery, then commit while the next batch is sent, which commits only once
    /// that commit succeeded: the relay's way (since 2026-12-07), the baseline.
    Overlapped,
    /// Await every delivery, commit, and only then begin the next batch.
    InTurn,
    /// Commit at once and let `commit_transaction` flush: left to flush in-flight records
    /// itself, rust-rdkafka's `commit_transaction` polls for 100 ms per flush.
    Flushing,
}

fn send_warm_up(
    producer: &FutureProducer,
    record: FutureRecord<'_, str, str>,
) -> Result<DeliveryFuture, BenchError> {
    producer
        .send_result(record)
        .map_err(|(error, _)| BenchError::from(error))
}

/// Everything sent at once, then every acknowledgement awaited.
async fn send_acknowledged(
    producer: &FutureProducer,
    batches: &[Vec<PreparedRecord<'_>>],
) -> Result<(), BenchError> {
    let mut deliveries = Vec::with_capacity(batches.iter().map(Vec::len).sum());
    for record in batches.iter().flatten() {
        deliveries.push(send(producer, record).await?);
    }
    await_all(deliveries).await
}

async fn await_all(deliveries: Vec<DeliveryFuture>) -> Result<(), BenchError> {
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => return Err(error.into()),
            Err(_canceled) => return Err(KafkaError::Canceled.into()),
        }
    }
    Ok(())
}

/// Enqueues one record, waiting while the local queue is full (as the relay does).
async fn send(
    producer: &FutureProducer,
    record: &PreparedRecord<'_>,
) -> Result<DeliveryFuture, BenchError> {
    let mut future_record = FutureRecord::to(record.topic)
        .key(record.key.as_str())
        .headers(record.native_headers());
    if let Some(value) = &record.value {
        future_record = future_record.payload(value.as_slice());
    }
    loop {
        match producer.send_result(future_record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                future_record = returned;
            }
            Err((error, _)) => return Err(error.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, Headers, OwnedHeaders};

    use super::PreparedRecord;
    use crate::relay::record::OutboundRecord;

    fn pairs(headers: &OwnedHeaders) -> Vec<(String, Option<Vec<u8>>)> {
        headers
            .iter()
            .map(|header| (header.key.to_owned(), header.value.map(<[u8]>::to_vec)))
            .collect()
    }

    /// The baseline must send the very records the relay sends: every header, in order, with
    /// the same bytes (a header without a value included).
    #[test]
    fn a_prepared_record_sends_the_same_headers_in_the_same_order() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some("0190a6e2-0000-7000-8000-000000000001"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("bookstore.BookAdded"),
            })
            .insert(Header::<&str> {
                key: "empty",
                value: None,
            })
            .insert(Header {
                key: "ce_id",
                value: Some("repeated names are kept"),
            });
        let expected = pairs(&headers);
        let record = OutboundRecord {
            topic: "bookstore.book",
            key: "book".to_owned(),
            value: Some(vec![1, 2, 3]),
            headers,
        };
        let prepared = PreparedRecord::from(record);
        assert_eq!(pairs(&prepared.native_headers()), expected);
        let header_bytes: usize = expected
            .iter()
            .map(|(name, value)| name.len() + value.as_ref().map_or(0, Vec::len))
            .sum();
        assert_eq!(prepared.bytes(), (4 + 3 + header_bytes) as u64);
        assert_eq!(prepared.topic, "bookstore.book");
        assert_eq!(prepared.key, "book");
        assert_eq!(prepared.value.as_deref(), Some(&[1u8, 2, 3][..]));
    }
}
