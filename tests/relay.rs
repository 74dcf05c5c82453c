//! The outbox relay against the real broker: what reaches `bookstore.book` and
//! `bookstore.book-fact`, in which order, how often, and what happens around restarts, a
//! second instance and new commits.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bookstore::codec::fingerprint::schema_fingerprint;
use bookstore::codec::headers as h;
use bookstore::codec::registry::subject_for;
use bookstore::codec::wire::{FramedDecoder, frame_confluent};
use bookstore::codec::{AvroCodec, CodecError, EventCodec};
use bookstore::config::{KafkaConfig, RelaySettings};
use bookstore::domain::{
    AddBook, BookCommand, BookId, EventKind, EventPayload, Price, StoredEvent,
};
use bookstore::kafka::Topics;
use bookstore::relay::visibility::VisibilityWatch;
use bookstore::relay::{
    DeliveryMode, EventPublisher, KafkaPublisher, PoisonCause, PublishError, Relay, RelayError,
    RelayReport, RunMode, kafka_relay,
    record::{RecordMapper, tombstone_id},
};
use bookstore::service::{BookService, CommandContext};
use bookstore::shutdown::{Shutdown, ShutdownTrigger};
use bookstore::store::{EventStore, Outbox, SqliteStore, StoreError};
use common::Received;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tempfile::TempDir;

const READ_TIMEOUT: Duration = Duration::from_secs(60);
const QUIET: Duration = Duration::from_secs(2);

struct Fixture {
    service: BookService<SqliteStore, AvroCodec>,
    kafka: KafkaConfig,
    _dir: TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(dir.path().join("outbox.db").to_str().unwrap())
            .await
            .unwrap();
        Self {
            service: BookService::new(store, AvroCodec::new()),
            kafka: common::kafka_config(),
            _dir: dir,
        }
    }

    fn store(&self) -> SqliteStore {
        self.service.store().clone()
    }

    async fn add_book(&self, title: &str, price: &str) -> BookId {
        let book_id = BookId::generate();
        let command = BookCommand::Add(AddBook {
            book_id,
            title: title.into(),
            author: "Test Author".into(),
            isbn: None,
            price: price.parse().unwrap(),
            description: None,
        });
        self.service
            .execute(command, CommandContext::default())
            .await
            .unwrap();
        book_id
    }

    async fn reprice(&self, book_id: BookId, cents: i64) {
        let command = BookCommand::UpdatePrice {
            book_id,
            price: Price::from_cents(cents).unwrap(),
        };
        self.service
            .execute(command, CommandContext::default())
            .await
            .unwrap();
    }

    async fn remove(&self, book_id: BookId) {
        self.service
            .execute(BookCommand::Remove { book_id }, CommandContext::default())
            .await
            .unwrap();
    }

    /// `books` books, each added and then repriced `updates` times, interleaved across books.
    async fn write_books(&self, books: usize, updates: i64) -> Vec<BookId> {
        let mut ids = Vec::new();
        for index in 0..books {
            ids.push(self.add_book(&format!("Book {index}"), "1.00").await);
        }
        for update in 1..=updates {
            for book_id in &ids {
                self.reprice(*book_id, 100 + update).await;
            }
        }
        ids
    }

    async fn relay(&self, delivery: DeliveryMode) -> Relay<SqliteStore, KafkaPublisher> {
        let settings = RelaySettings {
            delivery,
            batch_size: 50,
            ..RelaySettings::default()
        };
        kafka_relay(self.store(), &self.kafka, &settings)
            .await
            .unwrap()
    }

    /// A relay whose batches (and pages) hold at most `size` events.
    async fn relay_in_batches_of(
        &self,
        delivery: DeliveryMode,
        size: usize,
    ) -> Relay<SqliteStore, KafkaPublisher> {
        self.relay(delivery).await.tuned(|config| {
            config.batch_size = size;
            config.page_size = size;
        })
    }

    /// Runs a relay in batches of `size` until it stops with an error, and returns that.
    async fn relay_once_until_it_fails(&self, delivery: DeliveryMode, size: usize) -> RelayError {
        self.relay_in_batches_of(delivery, size)
            .await
            .run(RunMode::Once, Shutdown::never())
            .await
            .unwrap_err()
    }

    async fn relay_once(&self, delivery: DeliveryMode) -> RelayReport {
        self.relay(delivery)
            .await
            .run(RunMode::Once, Shutdown::never())
            .await
            .unwrap()
    }

    /// A bare exactly-once publisher with the transactional ids of `relay_id`, on the topics a
    /// relay of this fixture provisioned.
    fn exactly_once_publisher(&self, relay_id: &str) -> KafkaPublisher {
        let topics = self.kafka.topics();
        KafkaPublisher::new(
            self.kafka.clone(),
            RecordMapper::new(topics.clone(), bookstore::codec::WireFormat::SingleObject),
            DeliveryMode::ExactlyOnce,
            relay_id.into(),
            topics.relay_checkpoint,
        )
    }

    /// Creates the topics (as a relay's setup would) and returns their names.
    async fn provision_topics(&self) -> Topics {
        let topics = self.kafka.topics();
        let specs = topics.specs(self.kafka.partitions, self.kafka.replication_factor);
        bookstore::kafka::provision_topics(&self.kafka, &specs)
            .await
            .unwrap();
        topics
    }

    async fn all_events(&self) -> Vec<StoredEvent> {
        self.store().read_after(0, 1_000_000).await.unwrap()
    }

    async fn read_topics(&self, expected: usize) -> Vec<Received> {
        read_event_topics(&self.kafka, expected).await
    }
}

/// What a `read_committed` reader finds on the event topics of `kafka`: `expected` records,
/// and any that come within [`QUIET`] after them.
async fn read_event_topics(kafka: &KafkaConfig, expected: usize) -> Vec<Received> {
    let topics = kafka.topics();
    common::consume_committed(
        kafka,
        &[&topics.book, &topics.book_fact],
        expected,
        READ_TIMEOUT,
        QUIET,
    )
    .await
}

/// Asserts that the records are exactly the store's events (each once), and that every book's
/// records on each topic come in version order on one partition.
fn assert_exactly_the_events_in_order(events: &[StoredEvent], records: &[Received]) {
    let data_records: Vec<&Received> = records.iter().filter(|r| r.value.is_some()).collect();
    let positions: Vec<u64> = data_records.iter().map(|r| r.position()).collect();
    let unique: HashSet<u64> = positions.iter().copied().collect();
    assert_eq!(unique.len(), positions.len(), "duplicates on Kafka");
    let expected: HashSet<u64> = events.iter().map(|event| event.position).collect();
    assert_eq!(unique, expected, "Kafka holds other events than the store");

    let mut per_key: BTreeMap<(&str, &str), Vec<(i32, u64)>> = BTreeMap::new();
    for record in &data_records {
        per_key
            .entry((record.topic.as_str(), record.key.as_str()))
            .or_default()
            .push((record.partition, record.version()));
    }
    for ((topic, key), seen) in per_key {
        let partitions: HashSet<i32> = seen.iter().map(|(partition, _)| *partition).collect();
        assert_eq!(
            partitions.len(),
            1,
            "{key} spread over partitions of {topic}"
        );
        let versions: Vec<u64> = seen.iter().map(|(_, version)| *version).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        assert_eq!(versions, sorted, "{key} out of order on {topic}");
    }
}

/// Kafka's Java client partitioner for a keyed record: murmur2 of the key bytes, made positive,
/// modulo the partition count (`org.apache.kafka.common.utils.Utils.murmur2`). Written out here
/// so the test states the contract independently of librdkafka.
fn java_partition(key: &str, partitions: i32) -> i32 {
    let data = key.as_bytes();
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    ((h & 0x7fff_ffff) % partitions as u32) as i32
}

#[tokio::test]
async fn relay_publishes_every_event_once_in_per_book_order_with_cloud_events_headers() {
    let fixture = Fixture::new().await;
    fixture.write_books(12, 4).await;
    let events = fixture.all_events().await;
    assert_eq!(events.len(), 12 * 5 * 2);

    let report = fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    assert_eq!(report.published_events, events.len() as u64);
    assert_eq!(report.last_position, events.last().unwrap().position);

    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);

    let topics = fixture.kafka.topics();
    let decoder = FramedDecoder::new(AvroCodec::new());
    let codec = AvroCodec::new();
    let by_position: HashMap<u64, &StoredEvent> =
        events.iter().map(|event| (event.position, event)).collect();
    for record in &records {
        let event = by_position[&record.position()];
        let metadata = &event.metadata;
        let expected_topic = match metadata.kind() {
            EventKind::Delta => &topics.book,
            EventKind::Fact => &topics.book_fact,
        };
        assert_eq!(&record.topic, expected_topic);
        assert_eq!(record.key, metadata.aggregate_id.to_string());
        assert_eq!(
            record.partition,
            java_partition(&record.key, fixture.kafka.partitions),
            "not where a Java producer would put key {}",
            record.key
        );
        assert_eq!(record.header(h::CE_SPECVERSION), "1.0");
        assert_eq!(record.header(h::CE_ID), metadata.event_id.to_string());
        assert_eq!(
            record.header(h::CE_TYPE),
            format!("bookstore.events.{}", metadata.event_type)
        );
        assert_eq!(record.header(h::CE_SOURCE), "/bookstore");
        assert_eq!(record.header(h::CONTENT_TYPE), "application/avro");
        let time = chrono::DateTime::parse_from_rfc3339(record.header(h::CE_TIME)).unwrap();
        assert_eq!(time, metadata.occurred_at);
        assert_eq!(record.header(h::STREAM), metadata.stream);
        assert_eq!(
            record.header(h::CORRELATION_ID),
            metadata.correlation_id.to_string()
        );
        let decoded = decoder.decode(record.value.as_deref().unwrap()).unwrap();
        let stored = codec.decode(&metadata.event_type, &event.payload).unwrap();
        assert_eq!(decoded, stored);
    }
}

#[tokio::test]
async fn removed_book_gets_a_removed_fact_then_a_tombstone_on_the_fact_topic() {
    let fixture = Fixture::new().await;
    let book_id = fixture.add_book("Gone Soon", "3.50").await;
    fixture.remove(book_id).await;
    fixture.relay_once(DeliveryMode::ExactlyOnce).await;

    // BookAdded, BookRemoved, two facts, one tombstone.
    let records = fixture.read_topics(5).await;
    let facts: Vec<&Received> = records
        .iter()
        .filter(|record| record.topic == fixture.kafka.topics().book_fact)
        .collect();
    assert_eq!(facts.len(), 3, "{facts:?}");
    let decoder = FramedDecoder::new(AvroCodec::new());
    let EventPayload::Fact(last_fact) = decoder.decode(facts[1].value.as_deref().unwrap()).unwrap()
    else {
        panic!("not a fact");
    };
    assert!(last_fact.removed);
    assert_eq!(last_fact.version, 2);
    let tombstone = facts[2];
    assert_eq!(tombstone.value, None);
    assert_eq!(tombstone.key, book_id.to_string());
    assert_eq!(tombstone.partition, facts[1].partition);
    // A consumer deduplicating by ce_id must not take the tombstone for the fact again, and a
    // null value has no content type.
    let fact_id = facts[1].header(h::CE_ID);
    assert_eq!(
        tombstone.header(h::CE_ID),
        tombstone_id(fact_id.parse().unwrap()).to_string()
    );
    assert_ne!(tombstone.header(h::CE_ID), fact_id);
    assert!(!tombstone.headers.contains_key(h::CONTENT_TYPE));
    assert_eq!(
        tombstone.header(h::AGGREGATE_VERSION),
        facts[1].header(h::AGGREGATE_VERSION)
    );
    assert_eq!(tombstone.header(h::CE_TYPE), facts[1].header(h::CE_TYPE));
}

/// A row the store cannot read is not an outage: waiting would read it again for good, so the
/// relay stops and names it.
#[tokio::test]
async fn a_corrupt_outbox_row_stops_the_relay_with_its_reason() {
    let fixture = Fixture::new().await;
    fixture.write_books(2, 0).await;
    sqlx::query("UPDATE events SET occurred_at = 'last Tuesday' WHERE position = 3")
        .execute(fixture.store().pool())
        .await
        .unwrap();

    let failed = tokio::time::timeout(
        Duration::from_secs(60),
        fixture.relay_once_until_it_fails(DeliveryMode::ExactlyOnce, 50),
    )
    .await
    .expect("the relay went on retrying a row it cannot read");
    match failed {
        RelayError::Store(StoreError::Corrupt(reason)) => {
            assert!(reason.contains("occurred_at"), "{reason}");
        }
        other => panic!("expected the corrupt row, got {other}"),
    }
}

#[tokio::test]
async fn a_restarted_relay_resumes_without_publishing_anything_twice() {
    let fixture = Fixture::new().await;
    fixture.write_books(5, 2).await;
    fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    fixture.write_books(3, 1).await;

    // Simulate a crash between the Kafka commit and the store's copy of the checkpoint: the
    // store forgets how far the relay got, Kafka's checkpoint must win.
    sqlx::query("UPDATE relay_checkpoint SET position = 0")
        .execute(fixture.store().pool())
        .await
        .unwrap();
    let second = fixture.relay_once(DeliveryMode::ExactlyOnce).await;

    let events = fixture.all_events().await;
    assert_eq!(second.published_events, 3 * 2 * 2);
    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
    // With nothing left, a run still reports how far the topics go (as `relay --once` prints).
    let third = fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    assert_eq!(third.published_events, 0);
    assert_eq!(third.last_position, events.last().unwrap().position);
}

#[tokio::test]
async fn at_least_once_mode_publishes_every_event_in_order() {
    let fixture = Fixture::new().await;
    fixture.write_books(8, 3).await; // 64 events
    // Small batches, so later batches are sent while earlier ones await acknowledgements.
    let relay = fixture
        .relay_in_batches_of(DeliveryMode::AtLeastOnce, 10)
        .await;
    let report = relay.run(RunMode::Once, Shutdown::never()).await.unwrap();
    let events = fixture.all_events().await;
    assert_eq!(events.len(), 64);
    assert_eq!(report.published_events, 64, "every batch confirmed");
    assert_eq!(report.batches, 7);
    assert_eq!(report.last_position, events.last().unwrap().position);
    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
    let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
    assert_eq!(
        fixture.store().published_position(&relay_id).await.unwrap(),
        events.last().unwrap().position
    );
}

#[tokio::test]
async fn a_backlog_is_published_in_full_batches_filled_page_by_page() {
    let fixture = Fixture::new().await;
    fixture.write_books(20, 4).await; // 200 events
    let relay = fixture
        .relay(DeliveryMode::ExactlyOnce)
        .await
        .tuned(|config| {
            config.page_size = 7;
            config.max_batch_time = Duration::from_secs(60);
        });
    let report = relay.run(RunMode::Once, Shutdown::never()).await.unwrap();
    let events = fixture.all_events().await;
    assert_eq!(events.len(), 200);
    assert_eq!(report.published_events, 200);
    assert_eq!(report.batches, 4, "batches of 50 events, each 8 pages");
    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
}

#[tokio::test]
async fn a_second_relay_stands_by_until_the_active_one_stops() {
    let fixture = Fixture::new().await;
    let (stop_first, first_shutdown) = ShutdownTrigger::new();
    let first = fixture.relay(DeliveryMode::ExactlyOnce).await;
    let first = tokio::spawn(first.run(RunMode::Follow, first_shutdown));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (stop_second, second_shutdown) = ShutdownTrigger::new();
    let second = fixture.relay(DeliveryMode::ExactlyOnce).await;
    let second = tokio::spawn(second.run(RunMode::Follow, second_shutdown));

    fixture.write_books(4, 2).await;
    let before_handover = fixture.all_events().await.len();
    fixture.read_topics(before_handover).await;
    stop_first.trigger();
    let first_report = first.await.unwrap().unwrap();
    assert_eq!(first_report.published_events, before_handover as u64);

    // The standby takes over at once (the lease is released) and goes on from there.
    fixture.write_books(2, 1).await;
    let events = fixture.all_events().await;
    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
    stop_second.trigger();
    let second_report = second.await.unwrap().unwrap();
    assert_eq!(
        second_report.published_events,
        (events.len() - before_handover) as u64
    );
}

/// When another instance holds the lease (here: taken by hand while the relay runs), the relay
/// notices at its next renewal, stops publishing and stands by; once the lease is free again it
/// takes it back and goes on from where it stopped.
#[tokio::test]
async fn a_relay_whose_lease_is_taken_stands_by_until_it_is_free() {
    for delivery in [DeliveryMode::AtLeastOnce, DeliveryMode::ExactlyOnce] {
        let fixture = Fixture::new().await;
        let lease_ttl = Duration::from_secs(3);
        let relay = fixture.relay(delivery).await.tuned(|config| {
            config.instance_id = "active".into();
            config.lease_ttl = lease_ttl;
        });
        let (stop, shutdown) = ShutdownTrigger::new();
        let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
        fixture.write_books(2, 1).await;
        let published_first = fixture.all_events().await;
        fixture.read_topics(published_first.len()).await;

        let store = fixture.store();
        let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
        // The relay renews every third of the lease, and a renewal that comes between the
        // release and the take finds the lease free and takes it back: try again until the
        // take comes first.
        let mut taken = false;
        for _ in 0..10 {
            store.release_lease(&relay_id, "active").await.unwrap();
            taken = store
                .try_acquire_lease(&relay_id, "thief", Duration::from_secs(60))
                .await
                .unwrap();
            if taken {
                break;
            }
        }
        assert!(
            taken,
            "{delivery:?}: the relay took its lease back ten times"
        );
        // The next renewal (within a third of the lease) finds the thief.
        tokio::time::sleep(lease_ttl).await;
        fixture.write_books(2, 1).await;
        tokio::time::sleep(lease_ttl).await;
        assert_eq!(
            store.published_position(&relay_id).await.unwrap(),
            published_first.last().unwrap().position,
            "{delivery:?}: published without the lease"
        );

        store.release_lease(&relay_id, "thief").await.unwrap();
        let events = fixture.all_events().await;
        let records = fixture.read_topics(events.len()).await;
        assert_exactly_the_events_in_order(&events, &records);
        stop.trigger();
        let report = running.await.unwrap().unwrap();
        assert_eq!(report.published_events, events.len() as u64, "{delivery:?}");
    }
}

/// Relays of several stores may share the topics, and so the checkpoint partition. One that
/// dies mid-transaction leaves its transaction open until the broker aborts it, and until then
/// a `read_committed` reader sees nothing past its first record, this relay's later checkpoints
/// included. A relay starting meanwhile must wait for it rather than resume from an older
/// checkpoint, which would send committed batches again.
#[tokio::test]
async fn a_checkpoint_behind_another_producers_open_transaction_is_still_found() {
    let fixture = Fixture::new().await;
    let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
    let (stop, shutdown) = ShutdownTrigger::new();
    let relay = fixture.relay(DeliveryMode::ExactlyOnce).await;
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
    fixture.write_books(2, 1).await;
    let first = fixture.all_events().await.last().unwrap().position;
    wait_until_published(&fixture, &relay_id, first).await;

    // Another store's relay, dead with a transaction open on the checkpoint partition.
    let topics = fixture.kafka.topics();
    let other = open_transaction_on_the_checkpoint(&fixture, &relay_id).await;

    // This store's relay commits more checkpoints after it, then stops.
    fixture.write_books(2, 1).await;
    let last = fixture.all_events().await.last().unwrap().position;
    wait_until_published(&fixture, &relay_id, last).await;
    stop.trigger();
    running.await.unwrap().unwrap();

    let store_id = fixture.store().store_id().await.unwrap();
    let mut publisher = KafkaPublisher::new(
        fixture.kafka.clone(),
        RecordMapper::new(topics.clone(), bookstore::codec::WireFormat::SingleObject),
        DeliveryMode::ExactlyOnce,
        format!("{relay_id}.{store_id}"),
        topics.relay_checkpoint.clone(),
    );
    let starting = tokio::spawn(async move { publisher.start().await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    if starting.is_finished() {
        panic!(
            "started without waiting for another producer's open transaction, resuming after \
             {:?} (its last checkpoint: {last})",
            starting.await.unwrap()
        );
    }
    abort(other).await;
    assert_eq!(starting.await.unwrap().unwrap(), Some(last));
}

/// A transaction that keeps the checkpoint partition open for the whole wait ends the relay's
/// start with an error that says what is holding it and where the remedy is (the relay logs it
/// and tries again), not with a bare timeout.
#[tokio::test]
async fn a_checkpoint_held_open_for_the_whole_wait_is_reported_as_an_open_transaction() {
    let fixture = Fixture::new().await;
    let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
    let topics = fixture.provision_topics().await;
    let other = open_transaction_on_the_checkpoint(&fixture, &relay_id).await;

    let mut impatient = fixture.kafka.clone();
    impatient.request_timeout_ms = 2_000;
    let mut publisher = KafkaPublisher::new(
        impatient,
        RecordMapper::new(topics.clone(), bookstore::codec::WireFormat::SingleObject),
        DeliveryMode::ExactlyOnce,
        relay_id,
        topics.relay_checkpoint.clone(),
    );
    let refused = publisher.start().await.unwrap_err().to_string();
    abort(other).await;
    assert!(refused.contains("a transaction has held"), "{refused}");
    assert!(refused.contains("Hanging transactions"), "{refused}");
}

/// A commit that stays unreadable (behind a transaction that does not end) is noticed, and
/// so is its end.
#[tokio::test]
async fn a_committed_checkpoint_left_unreadable_is_noticed_until_it_is_readable() {
    let fixture = Fixture::new().await;
    let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
    let topics = fixture.provision_topics().await;
    let patience = Duration::from_secs(1);
    let watch = VisibilityWatch::start(&fixture.kafka, &topics.relay_checkpoint, patience).unwrap();

    let blocking = open_transaction_on_the_checkpoint(&fixture, &relay_id).await;
    // This relay's commit, behind it.
    let relay = common::transactional_producer(&fixture.kafka, &relay_id).await;
    relay.begin_transaction().unwrap();
    let delivered = relay
        .send(
            FutureRecord::to(&topics.relay_checkpoint)
                .key(relay_id.as_str())
                .payload("7"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let committer = relay.clone();
    tokio::task::spawn_blocking(move || committer.commit_transaction(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    watch.committed(delivered.offset);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while watch.unreadable_for() < patience {
        assert!(tokio::time::Instant::now() < deadline, "never noticed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    abort(blocking).await;
    while watch.unreadable_for() > Duration::ZERO {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never readable again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A transactional producer of another store's relay, with a transaction open on the
/// checkpoint partition (as one that died mid-transaction leaves it); abort it to end it.
async fn open_transaction_on_the_checkpoint(fixture: &Fixture, relay_id: &str) -> FutureProducer {
    let other =
        common::transactional_producer(&fixture.kafka, &format!("{relay_id}.another-store")).await;
    other.begin_transaction().unwrap();
    other
        .send(
            FutureRecord::to(&fixture.kafka.topics().relay_checkpoint)
                .key("another-store")
                .payload("1"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    other
}

/// Aborts `producer`'s open transaction.
async fn abort(producer: FutureProducer) {
    tokio::task::spawn_blocking(move || producer.abort_transaction(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
}

async fn wait_until_published(fixture: &Fixture, relay_id: &str, position: u64) {
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    while fixture.store().published_position(relay_id).await.unwrap() < position {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not published in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `relay --once` beside a running relay of the same id stands by, and finishes once that one
/// has published everything committed when the run started, rather than waiting for it to stop
/// (it may never).
#[tokio::test]
async fn a_run_once_beside_an_active_relay_finishes_when_that_one_has_published_it_all() {
    let fixture = Fixture::new().await;
    let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
    let (stop_active, active_shutdown) = ShutdownTrigger::new();
    let active = fixture.relay(DeliveryMode::ExactlyOnce).await;
    let active = tokio::spawn(active.run(RunMode::Follow, active_shutdown));
    fixture.write_books(2, 1).await;
    let head = fixture.all_events().await.last().unwrap().position;
    wait_until_published(&fixture, &relay_id, head).await;
    fixture.write_books(2, 1).await;
    let head = fixture.all_events().await.last().unwrap().position;

    let (_never, shutdown) = ShutdownTrigger::new();
    let once = fixture.relay(DeliveryMode::ExactlyOnce).await;
    let once = tokio::time::timeout(READ_TIMEOUT, once.run(RunMode::Once, shutdown))
        .await
        .expect("relay --once waited for the active relay to stop")
        .unwrap();
    assert!(once.finished, "{once:?}");
    assert_eq!(once.published_events, 0, "{once:?}");
    assert!(once.last_position >= head, "{once:?} before {head}");

    stop_active.trigger();
    let active = active.await.unwrap().unwrap();
    let events = fixture.all_events().await;
    assert_eq!(active.published_events, events.len() as u64);
    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
}

/// `relay --once` is a job: a run stopped by shutdown must not look like one that published
/// everything (the command then fails instead of printing what it published).
#[tokio::test]
async fn a_run_once_says_whether_it_finished_or_was_stopped() {
    let fixture = Fixture::new().await;
    fixture.write_books(2, 1).await;
    let (stop, shutdown) = ShutdownTrigger::new();
    stop.trigger();
    let stopped = fixture
        .relay(DeliveryMode::ExactlyOnce)
        .await
        .run(RunMode::Once, shutdown)
        .await
        .unwrap();
    assert!(!stopped.finished, "{stopped:?}");
    let finished = fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    assert!(finished.finished, "{finished:?}");
    assert_eq!(finished.published_events, 8);
}

#[tokio::test]
async fn a_publisher_that_lost_its_transactional_id_is_fenced() {
    let fixture = Fixture::new().await;
    fixture.write_books(1, 1).await;
    let events = fixture.all_events().await;
    let relay = fixture.relay(DeliveryMode::ExactlyOnce).await;
    drop(relay); // provisions the topics
    let publisher = || fixture.exactly_once_publisher("fencing-test");
    let mut zombie = publisher();
    zombie.start().await.unwrap();
    let mut successor = publisher();
    successor.start().await.unwrap();

    let error = zombie.publish_batch(&events).await.unwrap_err();
    assert!(matches!(error, PublishError::Fenced(_)), "{error:?}");
    successor.publish_batch(&events).await.unwrap();
    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
}

/// Settings under which only the commit signal can wake a following relay soon: it polls once
/// a minute, and renews its lease (a write to the store, which an SQLite file watch would see
/// as a commit) every 200 s.
fn settings_without_other_wake_ups() -> RelaySettings {
    RelaySettings {
        poll_interval_ms: 60_000,
        lease_ttl_ms: 600_000,
        ..RelaySettings::default()
    }
}

/// How long a commit may take to reach a reader through the commit signal: far below the
/// minute of polling and the lease renewals of [`settings_without_other_wake_ups`].
const PROMPTLY: Duration = Duration::from_secs(5);

/// A `read_committed` reader subscribed before what it measures, so that joining its group is
/// not part of the measurement.
struct Reader(rdkafka::consumer::StreamConsumer);

impl Reader {
    fn subscribe(kafka: &KafkaConfig, topics: &[&str]) -> Self {
        use rdkafka::consumer::Consumer;
        let consumer = kafka.consumer(&common::unique("prompt-reader")).unwrap();
        consumer.subscribe(topics).unwrap();
        Self(consumer)
    }

    /// The next `count` records, within `timeout`.
    async fn next(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let mut received = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while received.len() < count {
            let message = tokio::time::timeout_at(deadline, self.0.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {count} records within {timeout:?}",
                        received.len()
                    )
                })
                .expect("consumer error");
            received.push(Received::of(&message));
        }
        received
    }
}

#[tokio::test]
async fn a_following_relay_publishes_a_new_commit_promptly_without_polling() {
    let fixture = Fixture::new().await;
    let relay = kafka_relay(
        fixture.store(),
        &fixture.kafka,
        &settings_without_other_wake_ups(),
    )
    .await
    .unwrap();
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
    let topics = fixture.kafka.topics();
    let reader = Reader::subscribe(&fixture.kafka, &[&topics.book]);
    // A first book shows the relay and the reader are live (the relay's first read, made at
    // its start, may have caught it); the second can only come through the commit signal.
    fixture.add_book("First", "1.00").await;
    reader.next(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    fixture.add_book("Fresh", "1.00").await;
    reader.next(1, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < PROMPTLY,
        "took {:?} with a 60 s poll interval",
        started.elapsed()
    );
    stop.trigger();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_following_at_least_once_relay_confirms_everything_once_caught_up() {
    following_relay_confirms_everything_once_caught_up(DeliveryMode::AtLeastOnce).await;
}

#[tokio::test]
async fn a_following_exactly_once_relay_confirms_everything_once_caught_up() {
    following_relay_confirms_everything_once_caught_up(DeliveryMode::ExactlyOnce).await;
}

async fn following_relay_confirms_everything_once_caught_up(delivery: DeliveryMode) {
    let fixture = Fixture::new().await;
    fixture.write_books(10, 2).await; // 60 events
    let relay = fixture.relay_in_batches_of(delivery, 8).await;
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
    let events = fixture.all_events().await;
    let last = events.last().unwrap().position;
    let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
    let store = fixture.store();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // The last batch is only confirmed by settling once the relay has caught up: without
    // that, the store's position would stay one batch behind while the relay waits (during a
    // backlog a batch's acknowledgements, or its commit, are awaited with the next one's).
    while store.published_position(&relay_id).await.unwrap() < last {
        assert!(
            std::time::Instant::now() < deadline,
            "published position stuck at {}",
            store.published_position(&relay_id).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.trigger();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.published_events, 60);
    assert_eq!(report.batches, 8, "{report:?}"); // 60 events in batches of up to 8
    assert_eq!(report.last_position, last);
    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
}

#[tokio::test]
async fn an_exactly_once_batch_commits_while_the_next_is_sent_and_the_next_confirms_it() {
    let fixture = Fixture::new().await;
    fixture.write_books(3, 1).await; // 12 events
    let events = fixture.all_events().await;
    let (first, second) = events.split_at(6);
    drop(fixture.relay(DeliveryMode::ExactlyOnce).await); // provisions the topics
    let publisher = || fixture.exactly_once_publisher("commit-in-flight-test");
    let mut relay = publisher();
    assert_eq!(relay.start().await.unwrap(), None);

    relay.begin_batch().unwrap();
    relay.send(first).await.unwrap();
    // Its records are stored, its commit is under way: nothing is confirmed yet...
    assert_eq!(relay.commit_batch().await.unwrap(), None);
    // ...and the commit completes without anyone awaiting it.
    let records = fixture.read_topics(first.len()).await;
    assert_exactly_the_events_in_order(first, &records);

    relay.begin_batch().unwrap();
    relay.send(second).await.unwrap();
    let first_last = first.last().unwrap().position;
    let second_last = second.last().unwrap().position;
    assert_eq!(relay.commit_batch().await.unwrap(), Some(first_last));
    assert_eq!(relay.settle().await.unwrap(), Some(second_last));
    assert_eq!(relay.settle().await.unwrap(), None);

    let records = fixture.read_topics(events.len()).await;
    assert_exactly_the_events_in_order(&events, &records);
    assert_eq!(publisher().start().await.unwrap(), Some(second_last));
}

#[tokio::test]
async fn retention_deletes_only_published_events_older_than_the_age() {
    let fixture = Fixture::new().await;
    fixture.write_books(3, 1).await;
    fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    fixture.write_books(2, 0).await;
    let store = fixture.store();
    let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);

    assert_eq!(
        store
            .prune_published(&relay_id, Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "nothing is an hour old"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let deleted = store
        .prune_published(&relay_id, Duration::from_millis(10))
        .await
        .unwrap();

    assert_eq!(deleted, 3 * 2 * 2, "only the published events go");
    let left = fixture.all_events().await;
    assert_eq!(left.len(), 2 * 2);
    assert_eq!(left[0].position, 3 * 2 * 2 + 1);
}

#[tokio::test]
async fn relay_once_with_a_schema_registry_uses_confluent_framing_that_decodes_back() {
    let mut fixture = Fixture::new().await;
    fixture.kafka.schema_registry_url = Some(registry_url());
    fixture.write_books(3, 1).await;
    fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    let events = fixture.all_events().await;

    let records = fixture.read_topics(events.len()).await;
    let wire = bookstore::relay::wire_format(&fixture.kafka).await.unwrap();
    let bookstore::codec::WireFormat::Confluent { schemas } = wire else {
        panic!("expected Confluent framing with a registry");
    };
    let decoder = FramedDecoder::with_registered(AvroCodec::new(), &schemas);
    for record in &records {
        let value = record.value.as_deref().unwrap();
        assert_eq!(value[0], 0x00, "Confluent magic byte");
        decoder.decode(value).unwrap();
    }
    assert_exactly_the_events_in_order(&events, &records);
}

/// With a schema registry, an event saved by another version of this program (its datum
/// written with that version's schema) goes out under the id the registry has for that schema,
/// which that version's relay registered when it started: every reader decodes it with its own
/// schema. Before, the relay stopped at it. An event whose schema the registry does not have
/// still stops the relay, after what precedes it is published.
#[tokio::test]
async fn with_a_registry_an_event_of_another_schema_version_goes_out_under_that_versions_id() {
    let mut fixture = Fixture::new().await;
    fixture.kafka.schema_registry_url = Some(registry_url());
    fixture.write_books(3, 0).await;
    let topics = fixture.kafka.topics();
    let registry = fixture.kafka.schema_registry_client().unwrap().unwrap();
    let subject = subject_for("BookAdded", &topics.book, &topics.book_fact);
    let older = common::book_added_without_description();
    let older_id = registry.register(&subject, &older).unwrap();

    // Position 3, the second book's BookAdded, as the version without `description` saved it;
    // position 6, the third book's fact, under a schema no registry has.
    let events = fixture.all_events().await;
    assert_eq!(events[2].metadata.event_type, "BookAdded");
    let older_datum = common::without_description(&events[2].payload);
    let unknown: u64 = 0x0123_4567_89ab_cdef;
    for (position, payload, fingerprint) in [
        (3, older_datum.clone(), schema_fingerprint(&older).unwrap()),
        (6, events[5].payload.clone(), unknown),
    ] {
        sqlx::query("UPDATE events SET payload = ?1, schema_fingerprint = ?2 WHERE position = ?3")
            .bind(payload)
            .bind(fingerprint as i64)
            .bind(position)
            .execute(fixture.store().pool())
            .await
            .unwrap();
    }

    match fixture
        .relay_once_until_it_fails(DeliveryMode::ExactlyOnce, 50)
        .await
    {
        RelayError::Publish(PublishError::Poison {
            position: 6,
            source: PoisonCause::Codec(CodecError::WrittenWithAnotherSchema { written, .. }),
        }) => assert_eq!(written, unknown),
        other => panic!("expected the refusal of position 6, got {other}"),
    }
    let records = fixture.read_topics(5).await;
    let saved = fixture.all_events().await;
    assert_exactly_the_events_in_order(&saved[..5], &records);

    let older_record = records
        .iter()
        .find(|record| record.headers[h::POSITION] == "3")
        .unwrap();
    let value = older_record.value.as_deref().unwrap();
    assert_eq!(
        value[..5],
        frame_confluent(older_id, &[])[..],
        "framed with the older id"
    );
    assert_eq!(value[5..], older_datum[..]);
    let mut decoder = FramedDecoder::new(AvroCodec::new());
    decoder.add_writer_schema(older_id, &older).unwrap();
    assert_eq!(
        decoder.decode(value).unwrap(),
        AvroCodec::new()
            .decode("BookAdded", &events[2].payload)
            .unwrap(),
        "read with this version's schema, it is the book as it was added"
    );
}

fn registry_url() -> String {
    std::env::var("SCHEMA_REGISTRY_URL").unwrap_or_else(|_| {
        panic!(
            "SCHEMA_REGISTRY_URL is not set: start a registry with \
             `deploy/schema-registry/registry.sh start` and export \
             SCHEMA_REGISTRY_URL=http://127.0.0.1:8081/apis/ccompat/v7"
        )
    })
}

#[tokio::test]
async fn a_python_subscriber_decodes_every_record_using_only_the_schema_files() {
    let fixture = Fixture::new().await;
    let book_id = fixture.add_book("Interop – Ünïcode", "12.99").await;
    fixture.reprice(book_id, 1599).await;
    fixture.remove(book_id).await;
    fixture.write_books(2, 1).await;
    fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    let events = fixture.all_events().await;
    let topics = fixture.kafka.topics();

    let output = tokio::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/read_topics.py"
        ))
        .args(["--bootstrap-servers", &fixture.kafka.bootstrap_servers])
        .args(["--topic", &topics.book, "--topic", &topics.book_fact])
        .args(["--group", &common::unique("python")])
        .args(["--schemas", concat!(env!("CARGO_MANIFEST_DIR"), "/schemas")])
        .args(["--expect", &(events.len() + 1).to_string()])
        .output()
        .await
        .expect("python3 with confluent-kafka and fastavro (./dev test installs them)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "python consumer failed: {stderr}");

    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        events.len() + 1,
        "every event plus one tombstone"
    );
    let book = book_id.to_string();
    let mine: Vec<&serde_json::Value> = lines.iter().filter(|line| line["key"] == book).collect();
    let types: Vec<&str> = mine
        .iter()
        .filter(|line| line["topic"] == topics.book)
        .map(|line| line["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "bookstore.events.BookAdded",
            "bookstore.events.BookPriceUpdated",
            "bookstore.events.BookRemoved"
        ]
    );
    let facts: Vec<&&serde_json::Value> = mine
        .iter()
        .filter(|line| line["topic"] == topics.book_fact)
        .collect();
    assert_eq!(facts.len(), 4, "three facts and a tombstone: {facts:?}");
    assert_eq!(facts[0]["data"]["title"], "Interop – Ünïcode");
    assert_eq!(facts[0]["data"]["price"], "12.99");
    assert_eq!(facts[1]["data"]["price"], "15.99");
    assert_eq!(facts[1]["data"]["version"], 2);
    assert_eq!(facts[2]["data"]["removed"], true);
    assert!(facts[3]["data"].is_null() && facts[3]["type"].is_null());
    assert_eq!(
        facts[0]["headers"]["ce_type"],
        "bookstore.events.BookFactEvent"
    );
}

#[tokio::test]
async fn relay_follows_a_postgres_outbox_promptly_through_listen_notify() {
    let store = common::postgres_store().await;
    let service = BookService::new(store.clone(), AvroCodec::new());
    let kafka = common::kafka_config();
    let relay = kafka_relay(store.clone(), &kafka, &settings_without_other_wake_ups())
        .await
        .unwrap();
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
    let topics = kafka.topics();
    let reader = Reader::subscribe(&kafka, &[&topics.book, &topics.book_fact]);
    // A first book shows the relay and the reader are live (its first read may have caught it).
    let first = BookCommand::Add(AddBook {
        book_id: BookId::generate(),
        title: "Listened first".into(),
        author: "PG".into(),
        isbn: None,
        price: Price::ZERO,
        description: None,
    });
    service
        .execute(first, CommandContext::default())
        .await
        .unwrap();
    reader.next(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    for index in 0..5 {
        let command = BookCommand::Add(AddBook {
            book_id: BookId::generate(),
            title: format!("Listened {index}"),
            author: "PG".into(),
            isbn: None,
            price: Price::ZERO,
            description: None,
        });
        service
            .execute(command, CommandContext::default())
            .await
            .unwrap();
    }
    reader.next(10, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < PROMPTLY,
        "took {:?} with a 60 s poll interval",
        started.elapsed()
    );
    // No more than those: nothing is published twice.
    let records = read_event_topics(&kafka, 12).await;
    let events = store.read_after(0, 1000).await.unwrap();
    assert_exactly_the_events_in_order(&events, &records);
    stop.trigger();
    running.await.unwrap().unwrap();
}

/// A relay whose database connections die without a word (a failover that moved the server's
/// address, a NAT gateway that forgot them) gives up the query waiting on one after its store
/// timeout, not when TCP gives up (about 15 minutes), and publishes what is committed after,
/// in order, through new ones. Through a proxy that stops passing bytes on the connections it
/// has, and a pool that does not ping a connection before lending it. The lease is renewed
/// only every 200 s here, so its loss cannot be what ends the wait.
#[tokio::test]
async fn a_relay_whose_database_connections_died_without_a_word_goes_on() {
    use sqlx::postgres::PgConnectOptions;
    use std::str::FromStr;

    let (store, url) = common::postgres_store_with_url().await;
    let service = BookService::new(store.clone(), AvroCodec::new());
    let direct = PgConnectOptions::from_str(&url).unwrap();
    let (proxy, through_proxy) =
        common::freezing_proxy::FreezingProxy::before_postgres(direct).await;
    let relayed = bookstore::store::PostgresStore::with_pool(through_proxy)
        .await
        .unwrap();
    let kafka = common::kafka_config();
    let settings = RelaySettings {
        lease_ttl_ms: 600_000,
        ..RelaySettings::default()
    };
    let relay = kafka_relay(relayed, &kafka, &settings)
        .await
        .unwrap()
        .tuned(|config| config.store_timeout = Duration::from_secs(2));
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
    let topics = kafka.topics();
    let reader = Reader::subscribe(&kafka, &[&topics.book, &topics.book_fact]);
    let add = |title: String| {
        BookCommand::Add(AddBook {
            book_id: BookId::generate(),
            title,
            author: "PG".into(),
            isbn: None,
            price: Price::ZERO,
            description: None,
        })
    };
    service
        .execute(add("Before".into()), CommandContext::default())
        .await
        .unwrap();
    reader.next(2, Duration::from_secs(30)).await;

    proxy.freeze();
    for index in 0..3 {
        service
            .execute(add(format!("After {index}")), CommandContext::default())
            .await
            .unwrap();
    }
    reader.next(6, Duration::from_secs(90)).await;
    let records = read_event_topics(&kafka, 8).await;
    let events = store.read_after(0, 1000).await.unwrap();
    assert_exactly_the_events_in_order(&events, &records);
    stop.trigger();
    let stopped = running.await.unwrap();
    drop(proxy);
    stopped.unwrap();
}

/// PostgreSQL reads each next page while the previous one is sent, and a backlog batch's first
/// page while the batch before commits (see `Outbox::reads_ahead`): still every event, once,
/// in order, in full batches.
#[tokio::test]
async fn a_postgres_backlog_read_ahead_is_published_complete_and_in_order() {
    for delivery in [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce] {
        let store = common::postgres_store().await;
        assert!(store.reads_ahead());
        let service = BookService::new(store.clone(), AvroCodec::new());
        for index in 0..100 {
            let book_id = BookId::generate();
            let add = BookCommand::Add(AddBook {
                book_id,
                title: format!("Read ahead {index}"),
                author: "PG".into(),
                isbn: None,
                price: Price::ZERO,
                description: None,
            });
            let reprice = BookCommand::UpdatePrice {
                book_id,
                price: Price::from_cents(100 + index).unwrap(),
            };
            for command in [add, reprice] {
                service
                    .execute(command, CommandContext::default())
                    .await
                    .unwrap();
            }
        }
        let kafka = common::kafka_config();
        let settings = RelaySettings {
            delivery,
            batch_size: 50,
            ..RelaySettings::default()
        };
        let relay = kafka_relay(store.clone(), &kafka, &settings)
            .await
            .unwrap()
            .tuned(|config| {
                config.page_size = 7;
                config.max_batch_time = Duration::from_secs(60);
            });
        let report = relay.run(RunMode::Once, Shutdown::never()).await.unwrap();
        let events = store.read_after(0, 1000).await.unwrap();
        assert_eq!(events.len(), 400);
        assert_eq!(report.published_events, 400, "{delivery:?}");
        assert_eq!(
            report.batches, 8,
            "{delivery:?}: batches of 50 events, each 8 pages"
        );
        let records = read_event_topics(&kafka, events.len()).await;
        assert_exactly_the_events_in_order(&events, &records);
    }
}

#[tokio::test]
async fn two_stores_relaying_to_the_same_topics_never_take_each_others_checkpoint() {
    let first = Fixture::new().await;
    let mut second = Fixture::new().await;
    second.kafka = first.kafka.clone();
    first.write_books(4, 1).await;
    first.relay_once(DeliveryMode::ExactlyOnce).await;

    // The second store's positions start at 1 again; a checkpoint keyed by relay id alone
    // would make its relay skip them as "already published".
    second.write_books(2, 0).await;
    let report = second.relay_once(DeliveryMode::ExactlyOnce).await;

    assert_eq!(report.published_events, 2 * 2);
    let expected = first.all_events().await.len() + second.all_events().await.len();
    let records = first.read_topics(expected).await;
    assert_eq!(records.len(), expected);
}

/// A database restored to an older copy (or failed over to a replica that lost commits) holds
/// less than Kafka's checkpoint records as published. Events saved afterwards reuse those
/// positions, so a relay resuming after the checkpoint would never publish them: it must stop.
#[tokio::test]
async fn a_relay_stops_when_kafka_records_more_as_published_than_the_store_holds() {
    let fixture = Fixture::new().await;
    let kept = fixture.write_books(2, 0).await;
    fixture.relay_once(DeliveryMode::ExactlyOnce).await;
    let restored_head = fixture.all_events().await.last().unwrap().position;
    fixture.write_books(2, 0).await;
    fixture.relay_once(DeliveryMode::ExactlyOnce).await;

    // The "restore": the store goes back to how it was after the first relay run.
    let pool = fixture.store().pool().clone();
    let kept: Vec<String> = kept.iter().map(ToString::to_string).collect();
    for statement in [
        format!("DELETE FROM events WHERE position > {restored_head}"),
        format!(
            "DELETE FROM books WHERE book_id NOT IN ('{}')",
            kept.join("', '")
        ),
        format!("UPDATE outbox_head SET last_position = {restored_head}"),
        format!("UPDATE relay_checkpoint SET position = {restored_head}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    fixture.add_book("Saved after the restore", "2.00").await;

    let error = fixture
        .relay(DeliveryMode::ExactlyOnce)
        .await
        .run(RunMode::Once, Shutdown::never())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            RelayError::AheadOfStore { published, head }
                if published == restored_head + 4 && head == restored_head + 2
        ),
        "{error}"
    );
    assert!(error.to_string().contains("restored"), "{error}");
}

/// Positions are gapless, so a missing one was deleted before this relay published it (by the
/// pruning of another relay id of the same store, say): the relay stops instead of skipping it.
#[tokio::test]
async fn a_relay_stops_at_a_hole_in_the_outbox_instead_of_skipping_it() {
    for delivery in [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce] {
        let fixture = Fixture::new().await;
        fixture.write_books(4, 0).await;
        sqlx::query("DELETE FROM events WHERE position IN (4, 5)")
            .execute(fixture.store().pool())
            .await
            .unwrap();

        let error = fixture.relay_once_until_it_fails(delivery, 3).await;
        assert!(
            matches!(error, RelayError::Gap { first: 4, last: 5 }),
            "{delivery:?}: {error}"
        );
        let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
        assert_eq!(
            fixture.store().published_position(&relay_id).await.unwrap(),
            3,
            "{delivery:?}: what came before the hole is published"
        );
    }
}

/// After a schema change with events of the old schema still unpublished, the relay would
/// label their datums with the new schema. It refuses the first such event, with everything
/// before it published (in the same batch too), and stops without skipping it.
#[tokio::test]
async fn a_relay_stops_at_an_event_written_with_another_schema_after_publishing_what_precedes_it() {
    for delivery in [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce] {
        let fixture = Fixture::new().await;
        fixture.write_books(4, 0).await;
        // Position 5 saved by a version whose BookAdded schema had another fingerprint.
        let older_schema: u64 = 0x0123_4567_89ab_cdef;
        sqlx::query("UPDATE events SET schema_fingerprint = ?1 WHERE position = 5")
            .bind(older_schema as i64)
            .execute(fixture.store().pool())
            .await
            .unwrap();
        let events = fixture.all_events().await;
        assert_eq!(events[4].metadata.event_type, "BookAdded");

        let error = fixture.relay_once_until_it_fails(delivery, 50).await;
        match &error {
            RelayError::Publish(PublishError::Poison {
                position: 5,
                source:
                    PoisonCause::Codec(CodecError::WrittenWithAnotherSchema {
                        event_type,
                        written,
                        ..
                    }),
            }) => {
                assert_eq!(event_type, "BookAdded");
                assert_eq!(*written, older_schema);
            }
            other => panic!("{delivery:?}: expected the refusal of position 5, got {other}"),
        }
        assert!(error.to_string().contains("docs/contracts.md"), "{error}");
        let relay_id = format!("{}.relay", fixture.kafka.topic_prefix);
        assert_eq!(
            fixture.store().published_position(&relay_id).await.unwrap(),
            4,
            "{delivery:?}: what came before it is published"
        );
        assert_exactly_the_events_in_order(&events[..4], &fixture.read_topics(4).await);

        // Run again, it stops at the same event and sends nothing twice.
        let again = fixture.relay_once_until_it_fails(delivery, 50).await;
        assert!(
            matches!(
                again,
                RelayError::Publish(PublishError::Poison { position: 5, .. })
            ),
            "{delivery:?}: {again}"
        );
        assert_exactly_the_events_in_order(&events[..4], &fixture.read_topics(4).await);
    }
}

/// An event whose record is larger than the producer may send (`message.max.bytes`, lowered
/// here to librdkafka's least) can never be published: the relay publishes what precedes it
/// and stops there, naming it, instead of trying the same batch again for ever.
#[tokio::test]
async fn a_relay_stops_at_an_event_too_large_to_send_after_publishing_what_precedes_it() {
    for delivery in [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce] {
        let mut fixture = Fixture::new().await;
        fixture
            .kafka
            .client_options
            .push(bookstore::config::ClientOptions(vec![(
                "message.max.bytes".into(),
                "1000".into(),
            )]));
        fixture.write_books(2, 0).await;
        let long = BookCommand::Add(AddBook {
            book_id: BookId::generate(),
            title: "Long".into(),
            author: "Writer".into(),
            isbn: None,
            price: "1.00".parse().unwrap(),
            description: Some("d".repeat(2_000)),
        });
        fixture
            .service
            .execute(long, CommandContext::default())
            .await
            .unwrap();
        fixture.write_books(1, 0).await;
        let events = fixture.all_events().await;
        let too_large = events
            .iter()
            .find(|event| event.metadata.event_type == "BookAdded" && event.payload.len() > 1_000)
            .unwrap()
            .position;

        let error = tokio::time::timeout(
            Duration::from_secs(60),
            fixture.relay_once_until_it_fails(delivery, 50),
        )
        .await
        .expect("the relay kept trying to send the event for 60 s");
        match &error {
            RelayError::Publish(PublishError::Poison {
                position,
                source: PoisonCause::TooLarge(_),
            }) => assert_eq!(*position, too_large, "{delivery:?}"),
            other => panic!("{delivery:?}: expected the refusal of {too_large}, got {other}"),
        }
        assert!(error.to_string().contains("message.max.bytes"), "{error}");
        let before = usize::try_from(too_large - 1).unwrap();
        assert_exactly_the_events_in_order(&events[..before], &fixture.read_topics(before).await);
    }
}

/// A following relay applies retention by itself (on a task of its own, beside the publishing):
/// once published and older than the retention, events leave the outbox.
#[tokio::test]
async fn a_following_relay_prunes_what_it_published_past_retention() {
    let fixture = Fixture::new().await;
    let relay = fixture
        .relay(DeliveryMode::ExactlyOnce)
        .await
        .tuned(|config| {
            config.retention = Duration::from_millis(1);
            config.prune_interval = Duration::from_millis(100);
        });
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Follow, shutdown));
    fixture.write_books(3, 1).await;
    let written = 3 * 2 * 2;
    let records = fixture.read_topics(written).await;
    assert_eq!(records.len(), written);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !fixture.all_events().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "published events were never pruned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.trigger();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.published_events, written as u64);
}
