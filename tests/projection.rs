//! The reporting projection, proved once per read-model adapter.
//!
//! Each behaviour is one async function over a [`World`] (a store that is outbox and read model
//! at once, plus topics of its own on the real broker); `per_read_model!` turns it into a
//! `sqlite::<behaviour>` and a `postgres::<behaviour>` test. The broker comes from
//! `KAFKA_BOOTSTRAP_SERVERS`, PostgreSQL from `BOOKSTORE_TEST_DATABASE_URL`, the schema registry
//! from `SCHEMA_REGISTRY_URL` (see `tests/common`).

mod common;
#[path = "store_suite/fixtures.rs"]
mod fixtures;
#[path = "projection/world.rs"]
#[macro_use]
mod world;

use std::collections::{BTreeSet, HashSet};
use std::str::FromStr;
use std::time::Duration;

use bookstore::codec::headers as h;
use bookstore::codec::{AvroCodec, EventCodec, frame_single_object};
use bookstore::config::ClientOptions;
use bookstore::domain::{BookFactEvent, BookId, EventPayload, Price};
use bookstore::kafka::provision_topics;
use bookstore::projection::{
    BookReport, OffsetAdvance, PartitionOffset, ProjectionError, ProjectionMode, ProjectionReport,
    ProjectionStatus, ReplayPlan, ReportChange, ReportStore, default_group, dlq, kafka_projector,
    list_dead_letters, replay_dead_letters,
};
use bookstore::shutdown::{Shutdown, ShutdownTrigger};
use bookstore::store::{AnyStore, PostgresStore, StoreError};
use chrono::{DateTime, Utc};
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::PgConnectOptions;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use common::freezing_proxy::FreezingProxy;
use world::{Rng, World};

per_read_model!(
    older_fact_never_overwrites_newer_report,
    older_fact_cannot_bring_back_a_deleted_book,
    versionless_tombstone_deletes_whatever_version_and_remembers_it,
    batch_stores_offsets_with_the_rows_and_reset_forgets_them,
    a_batch_from_a_position_no_longer_stored_writes_nothing,
    a_batch_of_many_books_follows_the_version_rules_for_each,
    projection_equals_store_after_random_commands,
    replaying_the_topic_in_a_fresh_group_changes_nothing,
    tombstone_on_the_topic_deletes_the_report_row,
    killed_projector_resumes_from_stored_offsets_and_matches_store,
    projector_stops_gracefully_on_sigterm_with_offsets_committed_and_metrics,
    two_projectors_split_the_partitions_and_together_match_store,
    catching_up_counts_what_another_member_applied,
    until_caught_up_says_whether_it_caught_up_or_was_stopped,
    a_batch_ends_at_its_byte_limit,
    undecodable_records_go_to_the_dlq_and_projection_goes_on,
    records_the_database_would_refuse_go_to_the_dlq_and_projection_goes_on,
    a_flood_of_garbage_is_dead_lettered_whole_and_in_order,
    dlq_replay_sends_each_dead_letter_back_once,
    dlq_replay_skips_letters_a_later_record_of_their_book_supersedes,
    a_record_too_large_to_carry_is_dead_lettered_by_reference_and_replayed_whole,
    records_with_huge_keys_are_dead_lettered_and_projection_goes_on,
    report_json_has_the_documented_shape,
    rebuild_restores_rows_deleted_by_hand,
    a_projector_reads_its_partitions_again_after_a_reset_under_it,
    confluent_framed_facts_are_decoded_through_the_schema_registry,
);

/// Told to stop while the broker is down, the projector must not wait out the group's session
/// (45 s) to leave it: orchestrators kill a process 30 s after SIGTERM. What it applied is in
/// the database, so it exits within its leave deadline and a restart resumes from there.
#[tokio::test]
async fn projector_stops_promptly_on_sigterm_while_the_broker_is_down() {
    let broker = common::broker::PrivateBroker::start().await;
    let mut world = World::sqlite().await;
    world.kafka.bootstrap_servers = broker.bootstrap_servers();
    world.write_random_history(5, 10, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("stop-broker-down");
    let mut child = world
        .bookstore(&["project", "--group", &group])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    world.wait_until_report_equals_store().await;
    broker.run("stop").await;
    // Long enough for the consumer to notice; much shorter than a session.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let bound = bookstore::projection::consumer::LEAVE_DEADLINE + Duration::from_secs(5);
    assert_stops_within(&mut child, bound, "with the broker down").await;
    world.finish().await;
}

/// Records framed with many schema ids the registry does not know (garbage that starts with
/// the Confluent magic byte, or schemas registered on a replica that lags): all are asked for
/// before the batch is held back, so their patience runs once, together, not once per id.
#[tokio::test]
async fn many_unknown_schema_ids_hold_the_projection_back_once_not_once_each() {
    const IDS: u32 = 10;
    let patience = Duration::from_secs(4);
    let world = World::sqlite().await;
    let mut kafka = world.kafka.clone();
    kafka.schema_registry_url = Some(std::env::var("SCHEMA_REGISTRY_URL").expect(
        "SCHEMA_REGISTRY_URL names the test schema registry (`deploy/schema-registry/registry.sh \
         start`)",
    ));
    world.write_random_history(3, 6, Rng::seed()).await;
    world.relay_once().await;
    let datum = AvroCodec::new()
        .encode(&EventPayload::Fact(fact(BookId::generate(), 1, "Never")))
        .unwrap();
    let garbage: Vec<_> = (0..IDS)
        .map(|i| {
            let id = u32::MAX - 1_000 - i;
            (
                Some(BookId::generate().to_string()),
                bookstore::codec::frame_confluent(id, &datum),
            )
        })
        .collect();
    produce_raw(&world, &garbage).await;

    let mut config = World::projection_config(&common::unique("unknown-ids"));
    config.missing_schema_patience = patience;
    config.max_backoff = Duration::from_secs(1);
    let started = std::time::Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        kafka_projector(world.store.clone(), &kafka, config)
            .await
            .unwrap()
            .run(ProjectionMode::UntilCaughtUp, Shutdown::never()),
    )
    .await
    .expect("did not catch up")
    .unwrap();
    let took = started.elapsed();
    assert_eq!(report.dead_letters, u64::from(IDS), "{report:?}");
    // One id after another would take IDS times the patience (40 s), and more.
    assert!(
        took < patience * 8,
        "took {took:?} for {IDS} unknown ids at {patience:?} each"
    );
    assert!(
        took >= patience,
        "dead-lettered before the patience: {took:?}"
    );
    world.assert_report_equals_store().await;
    world.finish().await;
}

/// Assigned partitions while the database does not answer (here: the offsets table locked by
/// hand), the projector gives up reading the stored offsets after a while instead of holding
/// its polling thread, and a stop with it, for as long as the database stays silent.
#[tokio::test]
async fn a_projector_whose_stored_offsets_cannot_be_read_still_stops_promptly() {
    let world = World::postgres().await;
    world.write_random_history(3, 6, Rng::seed()).await;
    world.relay_once().await;
    let AnyStore::Postgres(store) = &world.store else {
        unreachable!("a PostgreSQL world");
    };
    let mut lock = store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE projection_offsets IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let group = common::unique("locked");
    let mut child = world
        .bookstore(&["project", "--group", &group])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Joined, assigned, and waiting for the stored offsets: its query waits for the lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks \
             WHERE relation = 'projection_offsets'::regclass AND NOT granted",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the projector never waited for its stored offsets"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_stops_within(
        &mut child,
        Duration::from_secs(25),
        "with its offsets locked",
    )
    .await;
    lock.rollback().await.unwrap();
    let report = world.project(&group).await;
    assert!(report.caught_up, "{report:?}");
    world.assert_report_equals_store().await;
    world.finish().await;
}

/// A database connection that dies without a word while the projector follows the topic (a
/// failover that moved the server's address, a host that is gone) holds it up for its store
/// timeout, not until TCP gives up (about 15 minutes): the batch is abandoned and applied again
/// through another connection. Through a proxy that stops passing bytes on the connections it
/// has, and a pool that does not ping a connection before lending it, so that the next batch
/// gets a dead one.
#[tokio::test]
async fn a_projector_whose_database_connection_died_without_a_word_goes_on() {
    let world = World::postgres().await;
    let direct = PgConnectOptions::from_str(&world.url).unwrap();
    let (proxy, through_proxy) = FreezingProxy::before_postgres(direct).await;
    let read_model = AnyStore::Postgres(PostgresStore::with_pool(through_proxy).await.unwrap());
    let mut config = World::projection_config(&common::unique("frozen"));
    config.store_timeout = Duration::from_secs(2);
    let projector = kafka_projector(read_model, &world.kafka, config)
        .await
        .unwrap();
    let (trigger, shutdown) = ShutdownTrigger::new();
    let run = tokio::spawn(projector.run(ProjectionMode::Follow, shutdown));
    world.write_random_history(10, 20, Rng::seed()).await;
    world.relay_once().await;
    world.wait_until_report_equals_store().await;

    proxy.freeze();
    world.write_random_history(10, 20, Rng::seed()).await;
    world.relay_once().await;
    world.wait_until_report_equals_store().await;

    trigger.trigger();
    run.await.unwrap().unwrap();
    drop(proxy);
    world.finish().await;
}

/// Stopped while a dead letter waits for an acknowledgement that does not come (here its
/// queue is gone, which librdkafka waits 30 s to believe; in an outage it would wait up to its
/// message timeout), the projector abandons the batch after its grace rather than wait out the
/// send, and the next run reads the batch again and dead-letters the record.
#[tokio::test]
async fn projector_stopped_while_a_dead_letter_is_unacknowledged_abandons_the_batch() {
    let world = World::sqlite().await;
    world.write_random_history(4, 8, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("stuck-dlq");
    let mut child = world
        .bookstore(&["project", "--group", &group])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = child_log(&mut child);
    world.wait_until_report_equals_store().await;
    delete_topic(&world, &world.kafka.topics().book_fact_dlq).await;
    produce_raw(&world, &bad_records()[..1]).await;
    wait_for_line(&mut log, "sending it to the dead-letter queue").await;
    // Well into the send.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The grace, then a leave the broker answers at once.
    let bound = bookstore::projection::APPLY_GRACE + Duration::from_secs(5);
    assert_stops_within(&mut child, bound, "with a dead letter unacknowledged").await;

    // The setup of the next run makes the queue again.
    let report = world.project(&group).await;
    assert_eq!(report.dead_letters, 1, "{report:?}");
    world.assert_report_equals_store().await;
    assert_eq!(list_dead_letters(&world.kafka).await.unwrap().len(), 1);
    world.finish().await;
}

/// SIGTERMs the projector `child` and requires it to exit within `bound`.
async fn assert_stops_within(child: &mut tokio::process::Child, bound: Duration, when: &str) {
    let signalled = std::time::Instant::now();
    common::terminate_gracefully(child, "the projector").await;
    let took = signalled.elapsed();
    assert!(
        took < bound,
        "the projector took {took:?} to stop {when} (bound {bound:?})"
    );
}

async fn delete_topic(world: &World, topic: &str) {
    let admin = world.kafka.admin_client().unwrap();
    let results = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    for result in results {
        result.unwrap();
    }
    // The deletion is accepted before the brokers drop the partitions; until they have, a
    // producer that knows the topic still gets its records acknowledged there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = world.kafka.fetch_metadata(Some(topic)).await.unwrap();
        let gone = metadata
            .topics()
            .iter()
            .all(|listed| listed.error().is_some() || listed.partitions().is_empty());
        if gone {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{topic} still listed 30 s after its deletion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lines a child writes to stderr, as they come.
fn child_log(child: &mut tokio::process::Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use tokio::io::AsyncBufReadExt;
    let stderr = child.stderr.take().expect("stderr piped");
    let (lines, log) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    log
}

/// Waits (a minute at most) for a line containing `text`.
async fn wait_for_line(log: &mut tokio::sync::mpsc::UnboundedReceiver<String>, text: &str) {
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = log.recv().await {
            if line.contains(text) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no line saying {text:?}");
}

/// An offset stored past a partition's end (the topic deleted and created again, the read
/// model kept) is not where anyone resumes: the consumer starts the partition over, so
/// `--until-caught-up` reads it rather than taking the offset for caught up.
#[tokio::test]
async fn an_offset_stored_past_the_end_of_the_topic_is_not_taken_for_caught_up() {
    let world = World::sqlite().await;
    let history = world.write_random_history(6, 12, Rng::seed()).await;
    world.relay_once().await;
    let config = World::projection_config(&common::unique("stale-offsets"));
    let stale: Vec<OffsetAdvance> = (0..world.kafka.partitions)
        .map(|partition| OffsetAdvance::first(partition, 1_000_000))
        .collect();
    let topic = world.kafka.topics().book_fact;
    world
        .store
        .apply_batch(&config.group_id, &topic, &[], &stale)
        .await
        .unwrap();

    let report = world.project_configured(&world.kafka, config).await;
    assert!(report.caught_up, "{report:?}");
    assert_eq!(report.applied_facts, history.fact_records());
    world.assert_report_equals_store().await;
    world.finish().await;
}

/// `--batch-wait-ms 0`: take what is buffered and wait for nothing. Each round must still
/// poll, or the consumer never even gets its partitions.
#[tokio::test]
async fn a_projector_that_waits_for_nothing_still_polls_and_catches_up() {
    let world = World::sqlite().await;
    let history = world.write_random_history(10, 20, Rng::seed()).await;
    world.relay_once().await;
    let mut config = World::projection_config(&common::unique("no-wait"));
    config.batch_wait = Duration::ZERO;
    let report = world.project_configured(&world.kafka, config).await;
    assert!(report.caught_up, "{report:?}");
    assert_eq!(report.applied_facts, history.fact_records());
    world.assert_report_equals_store().await;
    world.finish().await;
}

/// A queue that takes longer to read than the Kafka timeout is read to its end: the timeout
/// bounds a stall (nothing arriving), not the whole read. Here the reader fetches a few
/// letters at a time and waits a moment before each next fetch (as it waits for every fetch
/// past its 64 MB buffer of a longer queue), so reading takes several times the timeout.
#[tokio::test]
async fn dlq_list_and_replay_read_a_queue_longer_than_the_kafka_timeout_to_its_end() {
    const LETTERS: usize = 400;
    let kafka = common::kafka_config();
    let topics = kafka.topics();
    provision_topics(
        &kafka,
        &topics.specs(kafka.partitions, kafka.replication_factor),
    )
    .await
    .unwrap();
    let producer = kafka.producer().unwrap();
    let book_id = BookId::generate().to_string();
    // One at a time, so each is a record batch of its own: a fetch returns whole batches.
    for n in 0..LETTERS {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: dlq::REASON,
                value: Some("written by the test"),
            })
            .insert(Header {
                key: dlq::ORIGIN_TOPIC,
                value: Some(topics.book_fact.as_str()),
            });
        let value = format!("letter {n}");
        let letter = FutureRecord::<str, str>::to(&topics.book_fact_dlq)
            .key(&book_id)
            .payload(&value)
            .headers(headers);
        producer
            .send(letter, Duration::from_secs(10))
            .await
            .unwrap();
    }

    let mut reading = kafka.clone();
    reading.request_timeout_ms = 1_000;
    reading.client_options = vec![ClientOptions(
        [
            ("max.partition.fetch.bytes", "4096"),
            ("queued.min.messages", "1"),
            ("queued.max.messages.kbytes", "1"),
            ("fetch.queue.backoff.ms", "200"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .to_vec(),
    )];
    // What the test is about: each read outlasts the timeout, here by far (4.5 s and 9 s).
    let longer_than_the_timeout = 2 * reading.request_timeout();
    let started = std::time::Instant::now();
    assert_eq!(list_dead_letters(&reading).await.unwrap().len(), LETTERS);
    let listing = started.elapsed();
    assert!(listing > longer_than_the_timeout, "listed in {listing:?}");
    let started = std::time::Instant::now();
    let report = replay_dead_letters(&reading, &Shutdown::never())
        .await
        .unwrap();
    let replaying = started.elapsed();
    assert!(
        replaying > longer_than_the_timeout,
        "replayed in {replaying:?}"
    );
    assert_eq!(report.total(), LETTERS as u64);
}

// ---------------------------------------------------------------------------------------------
// The ReportStore rules, straight against the adapter.

fn fact(book_id: BookId, version: u64, title: &str) -> BookFactEvent {
    BookFactEvent {
        book_id,
        title: title.into(),
        author: "Ursula K. Le Guin".into(),
        isbn: Some("9780441478125".into()),
        price: Price::from_cents(1099).unwrap(),
        description: None,
        version,
        removed: false,
    }
}

/// The stored position `next_offset` of `partition`.
fn at(partition: i32, next_offset: i64) -> PartitionOffset {
    PartitionOffset {
        partition,
        next_offset,
    }
}

fn upsert(book_id: BookId, version: u64, title: &str) -> ReportChange {
    ReportChange::Upsert {
        fact: fact(book_id, version, title),
        changed_at: DateTime::<Utc>::from_timestamp(1_700_000_000 + version as i64, 0).unwrap(),
    }
}

fn delete(book_id: BookId, version: Option<u64>) -> ReportChange {
    ReportChange::Delete { book_id, version }
}

async fn apply(world: &World, changes: &[ReportChange]) {
    world
        .store
        .apply_batch("g", "t.book-fact", changes, &[])
        .await
        .unwrap();
}

async fn row(world: &World, book_id: BookId) -> Option<(u64, String)> {
    world
        .store
        .report(book_id)
        .await
        .unwrap()
        .map(|report| (report.version, report.title))
}

/// The version of the deletion of `book_id` the read model remembers, straight from its table.
async fn remembered_deletion(world: &World, book_id: BookId) -> Option<i64> {
    match &world.store {
        AnyStore::Sqlite(store) => {
            sqlx::query_scalar("SELECT version FROM book_report_deleted WHERE book_id = ?")
                .bind(book_id.as_uuid().hyphenated())
                .fetch_optional(store.pool())
                .await
        }
        AnyStore::Postgres(store) => {
            sqlx::query_scalar("SELECT version FROM book_report_deleted WHERE book_id = $1")
                .bind(book_id.as_uuid())
                .fetch_optional(store.pool())
                .await
        }
    }
    .unwrap()
}

async fn older_fact_never_overwrites_newer_report(world: &World) {
    let book_id = BookId::generate();
    apply(world, &[upsert(book_id, 3, "v3")]).await;
    apply(world, &[upsert(book_id, 2, "v2")]).await;
    assert_eq!(row(world, book_id).await, Some((3, "v3".into())));

    // The same version again (a replay) changes nothing either.
    apply(world, &[upsert(book_id, 3, "v3 replayed")]).await;
    assert_eq!(row(world, book_id).await, Some((3, "v3".into())));

    // Out of order within one batch: the newest still wins.
    apply(world, &[upsert(book_id, 5, "v5"), upsert(book_id, 4, "v4")]).await;
    let report = world.store.report(book_id).await.unwrap().unwrap();
    assert_eq!((report.version, report.title.as_str()), (5, "v5"));
    assert_eq!(report.price.to_string(), "10.99");
    assert_eq!(report.isbn.as_deref(), Some("9780441478125"));
    assert_eq!(report.updated_at.timestamp(), 1_700_000_005);
}

async fn older_fact_cannot_bring_back_a_deleted_book(world: &World) {
    let book_id = BookId::generate();
    apply(world, &[upsert(book_id, 3, "v3"), delete(book_id, Some(4))]).await;
    assert_eq!(row(world, book_id).await, None);

    apply(world, &[upsert(book_id, 3, "v3 late")]).await;
    assert_eq!(
        row(world, book_id).await,
        None,
        "v3 came back after delete at v4"
    );
    apply(world, &[upsert(book_id, 4, "v4 late")]).await;
    assert_eq!(row(world, book_id).await, None, "a deletion wins a tie");
    apply(world, &[delete(book_id, Some(2))]).await;
    assert_eq!(remembered_deletion(world, book_id).await, Some(4));

    // A deletion older than the row leaves it alone; only a newer fact than the deletion
    // makes the book exist again, and the deletion is forgotten.
    apply(world, &[upsert(book_id, 6, "v6")]).await;
    assert_eq!(remembered_deletion(world, book_id).await, None);
    apply(world, &[delete(book_id, Some(5))]).await;
    assert_eq!(row(world, book_id).await, Some((6, "v6".into())));
    apply(world, &[upsert(book_id, 4, "v4 later still")]).await;
    assert_eq!(row(world, book_id).await, Some((6, "v6".into())));
}

async fn versionless_tombstone_deletes_whatever_version_and_remembers_it(world: &World) {
    let book_id = BookId::generate();
    apply(world, &[upsert(book_id, 7, "v7"), delete(book_id, None)]).await;
    assert_eq!(row(world, book_id).await, None);
    apply(world, &[upsert(book_id, 7, "v7 replayed")]).await;
    assert_eq!(
        row(world, book_id).await,
        None,
        "the deleted version 7 was forgotten"
    );
    apply(world, &[upsert(book_id, 8, "v8")]).await;
    assert_eq!(row(world, book_id).await, Some((8, "v8".into())));
}

/// The adapters write a batch set-wise (a few statements for all its books): each book must
/// still end up exactly as if its changes had been applied one by one. 600 books: more than
/// one multi-row statement's worth, with a partial one at the end.
async fn a_batch_of_many_books_follows_the_version_rules_for_each(world: &World) {
    let books: Vec<BookId> = (0..600).map(|_| BookId::generate()).collect();
    let title = |book: usize, version: u64| format!("book {book} v{version}");
    // Several versions of every book, out of order, in one batch; a third of the books end
    // deleted (at v4), one of them by a versionless tombstone applied in order.
    let mut first = Vec::new();
    for (n, &book_id) in books.iter().enumerate() {
        for version in [2, 3, 1] {
            first.push(upsert(book_id, version, &title(n, version)));
        }
        if n % 3 == 0 {
            first.push(delete(book_id, Some(4)));
        }
    }
    first.push(upsert(books[1], 5, &title(1, 5)));
    first.push(delete(books[2], None));
    apply(world, &first).await;
    for (n, &book_id) in books.iter().enumerate() {
        let expected = match n {
            _ if n % 3 == 0 => None,
            1 => Some((5, title(1, 5))),
            2 => None,
            _ => Some((3, title(n, 3))),
        };
        assert_eq!(
            row(world, book_id).await,
            expected,
            "book {n} after the first batch"
        );
    }

    // Older versions arriving after newer ones change nothing; newer ones win, also over a
    // remembered deletion, and a deletion older than the row leaves it.
    let mut second = Vec::new();
    for (n, &book_id) in books.iter().enumerate() {
        second.push(match n % 4 {
            0 => upsert(book_id, 6, &title(n, 6)),
            1 => delete(book_id, Some(2)),
            _ => upsert(book_id, 3, &format!("late {n}")),
        });
    }
    apply(world, &second).await;
    for (n, &book_id) in books.iter().enumerate() {
        let expected = match n {
            _ if n % 4 == 0 => Some((6, title(n, 6))),
            _ if n % 3 == 0 => None,
            1 => Some((5, title(1, 5))),
            // Deleted without a version at v3: the late v3 does not bring it back.
            2 => None,
            _ => Some((3, title(n, 3))),
        };
        assert_eq!(
            row(world, book_id).await,
            expected,
            "book {n} after the second batch"
        );
    }

    // A book that came back at v6 can be deleted again, and stays deleted against v5.
    apply(
        world,
        &[delete(books[0], Some(7)), upsert(books[0], 5, "v5")],
    )
    .await;
    assert_eq!(row(world, books[0]).await, None);
    let listed = world.store.list_reports().await.unwrap();
    let expected_rows = (0..books.len())
        .filter(|n| (n % 4 == 0 && *n != 0) || (n % 3 != 0 && *n != 2))
        .count();
    assert_eq!(listed.len(), expected_rows);
}

async fn batch_stores_offsets_with_the_rows_and_reset_forgets_them(world: &World) {
    let store = &world.store;
    let topic = "t.book-fact";
    let book_id = BookId::generate();
    store
        .apply_batch(
            "a",
            topic,
            &[upsert(book_id, 1, "v1")],
            &[OffsetAdvance::first(0, 10), OffsetAdvance::first(2, 4)],
        )
        .await
        .unwrap();
    store
        .apply_batch("a", topic, &[], &[OffsetAdvance::from(0, 10, 12)])
        .await
        .unwrap();
    store
        .apply_batch("b", topic, &[], &[OffsetAdvance::first(1, 3)])
        .await
        .unwrap();
    assert_eq!(
        store.stored_offsets("a", topic).await.unwrap(),
        vec![at(0, 12), at(2, 4)]
    );
    assert_eq!(store.stored_offsets("a", "other").await.unwrap(), vec![]);

    assert_eq!(store.reset().await.unwrap(), vec!["a", "b"]);
    assert_eq!(
        store.list_reports().await.unwrap(),
        Vec::<BookReport>::new()
    );
    assert_eq!(store.stored_offsets("a", topic).await.unwrap(), vec![]);
    // Another group's offsets go too: they named rows that are gone.
    assert_eq!(store.stored_offsets("b", topic).await.unwrap(), vec![]);
    // Remembered deletions go too: the rebuild starts from nothing.
    apply(world, &[delete(book_id, Some(9))]).await;
    assert_eq!(store.reset().await.unwrap(), Vec::<String>::new());
    apply(world, &[upsert(book_id, 2, "after reset")]).await;
    assert_eq!(row(world, book_id).await, Some((2, "after reset".into())));
}

/// A batch read from a position that is no longer the stored one writes nothing: not after a
/// reset (its rows before that position are gone), not over another member's position.
async fn a_batch_from_a_position_no_longer_stored_writes_nothing(world: &World) {
    let store = &world.store;
    let topic = "t.book-fact";
    let (first, second) = (BookId::generate(), BookId::generate());
    store
        .apply_batch(
            "a",
            topic,
            &[upsert(first, 1, "applied")],
            &[OffsetAdvance::first(0, 5), OffsetAdvance::first(1, 7)],
        )
        .await
        .unwrap();
    let refused = |partition, expected: Option<i64>, found: Option<i64>| {
        move |error: StoreError| match error {
            StoreError::PositionMoved {
                partition: p,
                expected: e,
                found: f,
                ..
            } => assert_eq!((p, e, f), (partition, expected, found)),
            other => panic!("not PositionMoved: {other:?}"),
        }
    };

    // Another member stored partition 1 at 7; this one believes nothing is stored.
    let error = store
        .apply_batch(
            "a",
            topic,
            &[upsert(second, 1, "stale")],
            &[OffsetAdvance::from(0, 5, 9), OffsetAdvance::first(1, 3)],
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("partition 1"), "{error}");
    refused(1, None, Some(7))(error);
    // This one believes partition 0 is at 4.
    let error = store
        .apply_batch(
            "a",
            topic,
            &[upsert(second, 1, "stale")],
            &[OffsetAdvance::from(0, 4, 9)],
        )
        .await
        .unwrap_err();
    refused(0, Some(4), Some(5))(error);
    assert_eq!(row(world, second).await, None, "a refused batch wrote rows");
    assert_eq!(
        store.stored_offsets("a", topic).await.unwrap(),
        vec![at(0, 5), at(1, 7)]
    );

    // After a reset, a member that stood at 5 must read the partition again from the start.
    store.reset().await.unwrap();
    let error = store
        .apply_batch(
            "a",
            topic,
            &[upsert(second, 1, "after reset")],
            &[OffsetAdvance::from(0, 5, 9)],
        )
        .await
        .unwrap_err();
    refused(0, Some(5), None)(error);
    assert_eq!(store.list_reports().await.unwrap(), vec![]);
    assert_eq!(store.stored_offsets("a", topic).await.unwrap(), vec![]);
    // Read again from the beginning, it is stored.
    store
        .apply_batch(
            "a",
            topic,
            &[upsert(first, 1, "again")],
            &[OffsetAdvance::first(0, 9)],
        )
        .await
        .unwrap();
    assert_eq!(
        store.stored_offsets("a", topic).await.unwrap(),
        vec![at(0, 9)]
    );
}

// ---------------------------------------------------------------------------------------------
// End to end: store → relay → Kafka → projector → read model.

async fn projection_equals_store_after_random_commands(world: &World) {
    let history = world.write_random_history(40, 160, Rng::seed()).await;
    assert_eq!(history.facts, world.stored_facts().await);
    assert!(history.removals > 0, "the history removed no book");
    world.relay_once().await;

    let report = world.project(&common::unique("report")).await;

    assert_eq!(report.applied_facts, history.fact_records());
    assert_eq!(report.dead_letters, 0);
    assert_eq!(report.partitions, BTreeSet::from([0, 1, 2]));
    world.assert_report_equals_store().await;
}

async fn replaying_the_topic_in_a_fresh_group_changes_nothing(world: &World) {
    let history = world.write_random_history(15, 45, Rng::seed()).await;
    world.relay_once().await;
    world.project(&common::unique("first")).await;
    let before = world.reports().await;

    // Every fact again, from the beginning, onto the same rows.
    let replay = world.project(&common::unique("second")).await;
    assert_eq!(replay.applied_facts, history.fact_records());
    assert_eq!(world.reports().await, before, "a replay changed the rows");

    // The same batch applied twice directly changes nothing either.
    let book = &before[0];
    let again = ReportChange::Upsert {
        fact: BookFactEvent {
            book_id: book.book_id,
            title: "replayed".into(),
            author: book.author.clone(),
            isbn: book.isbn.clone(),
            price: book.price,
            description: None,
            version: book.version,
            removed: false,
        },
        changed_at: Utc::now(),
    };
    apply(world, &[again.clone(), again]).await;
    assert_eq!(world.reports().await, before);
    world.assert_report_equals_store().await;
}

async fn tombstone_on_the_topic_deletes_the_report_row(world: &World) {
    let kept = world.add_book("Kept", "5.00", None).await;
    let removed = world.add_book("Removed", "6.00", None).await;
    let tombstoned = world.add_book("Tombstoned", "7.00", None).await;
    world.remove(removed).await;
    world.relay_once().await;
    let group = common::unique("report");
    world.project(&group).await;
    let ids: Vec<BookId> = world.reports().await.iter().map(|r| r.book_id).collect();
    assert!(ids.contains(&kept) && ids.contains(&tombstoned), "{ids:?}");
    assert!(!ids.contains(&removed), "a removed book has a row");

    // A bare tombstone, as another producer or an operator would write it: no headers.
    tombstone(world, tombstoned).await;
    world.project(&group).await;
    let ids: Vec<BookId> = world.reports().await.iter().map(|r| r.book_id).collect();
    assert_eq!(ids, vec![kept]);
}

async fn killed_projector_resumes_from_stored_offsets_and_matches_store(world: &World) {
    let history = world.write_random_history(60, 240, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("killed");

    // A short session, so the broker notices the killed member soon and the restart does not
    // wait the default 45 s for the partitions.
    let mut child = world
        .bookstore(&["project", "--group", &group, "--batch-size", "2"])
        .env(
            "BOOKSTORE_KAFKA_OPTIONS",
            "session.timeout.ms=6000,heartbeat.interval.ms=1000",
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + world::CATCH_UP_TIMEOUT;
    let applied_before_kill = loop {
        let stored: i64 = stored_records(world, &group).await;
        if stored >= 20 {
            break stored;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the projector applied nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    child.start_kill().unwrap(); // SIGKILL: no graceful anything
    child.wait().await.unwrap();
    let stored_at_kill = stored_records(world, &group).await;
    eprintln!(
        "killed after {applied_before_kill}..{stored_at_kill} of {} records",
        history.fact_records()
    );

    let output = world
        .run_bookstore(&["project", "--group", &group, "--until-caught-up"])
        .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let applied_after: u64 = stdout
        .split_whitespace()
        .nth(3)
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {stdout}"));
    assert!(
        applied_after <= history.fact_records() - stored_at_kill as u64,
        "the restart applied {applied_after} records: it did not resume at the stored offsets"
    );
    world.assert_report_equals_store().await;
}

/// Records the database says `group` has applied (the sum of its next offsets, which on a
/// topic of committed transactions counts the commit markers too).
async fn stored_records(world: &World, group: &str) -> i64 {
    world
        .store
        .stored_offsets(group, &world.kafka.topics().book_fact)
        .await
        .unwrap()
        .iter()
        .map(|offset| offset.next_offset)
        .sum()
}

async fn projector_stops_gracefully_on_sigterm_with_offsets_committed_and_metrics(world: &World) {
    world.write_random_history(10, 20, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("graceful");
    let addr = format!("127.0.0.1:{}", common::free_local_port());
    let mut child = world
        .bookstore(&["project", "--group", &group, "--metrics-addr", &addr])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    world.wait_until_report_equals_store().await;
    let metrics = scrape_until(&addr, "bookstore_projection_applied_facts_total").await;
    assert!(metric(&metrics, "bookstore_projection_applied_facts_total") > 0.0);
    assert!(metric(&metrics, "bookstore_projection_batches_total") > 0.0);
    // The lag gauge is measured from the stored offsets every 5 s: it reads what is left
    // first, then 0 once the offsets past the last commit markers are stored too.
    scrape_until_lag_is_zero(&addr).await;

    common::terminate_gracefully(&mut child, "the projector").await;

    // The group offsets in Kafka (for lag tooling) equal the ones stored with the rows.
    let topic = world.kafka.topics().book_fact;
    let stored = world.store.stored_offsets(&group, &topic).await.unwrap();
    let committed = committed_offsets(world, &group).await;
    assert!(!stored.is_empty(), "no offsets stored");
    for offset in stored {
        assert_eq!(
            committed.get(&offset.partition),
            Some(&offset.next_offset),
            "partition {}",
            offset.partition
        );
    }
}

async fn committed_offsets(world: &World, group: &str) -> std::collections::HashMap<i32, i64> {
    let consumer: BaseConsumer = world.kafka.consumer_config(group).create().unwrap();
    let topic = world.kafka.topics().book_fact;
    tokio::task::spawn_blocking(move || {
        let mut wanted = TopicPartitionList::new();
        for partition in 0..3 {
            wanted.add_partition(&topic, partition);
        }
        consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .unwrap()
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(next) => Some((element.partition(), next)),
                _ => None,
            })
            .collect()
    })
    .await
    .unwrap()
}

/// The metrics text once `name` is there (and, for a counter, above zero).
async fn scrape_until(addr: &str, name: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!("http://{addr}/metrics");
        let text = tokio::task::spawn_blocking(move || {
            let mut response = ureq::get(&url).call().ok()?;
            response.body_mut().read_to_string().ok()
        })
        .await
        .unwrap();
        if let Some(text) = text
            && text.lines().any(|line| line.starts_with(name))
            && (name.ends_with("_records") || metric(&text, name) > 0.0)
        {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {name} metric");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the lag gauge is there, for every partition, and reads 0 in all of them.
async fn scrape_until_lag_is_zero(addr: &str) {
    let name = "bookstore_projection_lag_records";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = scrape_until(addr, name).await;
        let partitions = metrics
            .lines()
            .filter(|line| line.starts_with(name))
            .count();
        if partitions == 3 && metric(&metrics, name) == 0.0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lag gauge never read 0 everywhere: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A projector of `group` following the topic until its trigger is pulled.
struct Follower {
    status: watch::Receiver<ProjectionStatus>,
    trigger: ShutdownTrigger,
    run: JoinHandle<Result<ProjectionReport, ProjectionError>>,
}

impl Follower {
    async fn start(world: &World, group: &str) -> Self {
        let projector = kafka_projector(
            world.store.clone(),
            &world.kafka,
            World::projection_config(group),
        )
        .await
        .unwrap();
        let status = projector.status();
        let (trigger, shutdown) = ShutdownTrigger::new();
        let run = tokio::spawn(projector.run(ProjectionMode::Follow, shutdown));
        Self {
            status,
            trigger,
            run,
        }
    }

    /// Waits (a minute at most) until its status satisfies `ready`.
    async fn wait_for(&mut self, what: &str, ready: impl FnMut(&ProjectionStatus) -> bool) {
        tokio::time::timeout(Duration::from_secs(60), self.status.wait_for(ready))
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .unwrap();
    }

    async fn stop(self) -> ProjectionReport {
        self.trigger.trigger();
        self.run.await.unwrap().unwrap()
    }
}

/// Waits (a minute at most) until what each projector owns satisfies `done`.
async fn wait_until_owned(
    statuses: &[watch::Receiver<ProjectionStatus>],
    what: &str,
    done: impl Fn(&[Vec<i32>]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let owned: Vec<Vec<i32>> = statuses.iter().map(|s| s.borrow().owned.clone()).collect();
        if done(&owned) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never true in a minute: {what}; owned {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn two_projectors_split_the_partitions_and_together_match_store(world: &World) {
    let group = common::unique("pair");
    let mut runs = Vec::new();
    let mut statuses = Vec::new();
    let mut triggers = Vec::new();
    for _ in 0..2 {
        let follower = Follower::start(world, &group).await;
        statuses.push(follower.status);
        triggers.push(follower.trigger);
        runs.push(follower.run);
    }
    // Both members own partitions before anything is written.
    wait_until_owned(
        &statuses,
        "the two projectors split the partitions",
        |owned| {
            let all: HashSet<i32> = owned.iter().flatten().copied().collect();
            owned.iter().all(|o| !o.is_empty())
                && all.len() == 3
                && owned.iter().map(Vec::len).sum::<usize>() == 3
        },
    )
    .await;

    let history = world.write_random_history(40, 120, Rng::seed()).await;
    world.relay_once().await;
    world.wait_until_report_equals_store().await;

    for trigger in &triggers {
        trigger.trigger();
    }
    let mut applied = 0;
    let mut partitions = Vec::new();
    for run in runs {
        let report = run.await.unwrap().unwrap();
        assert!(report.applied_facts > 0, "one projector applied nothing");
        applied += report.applied_facts;
        partitions.push(report.partitions);
    }
    assert!(
        applied >= history.fact_records(),
        "together they applied {applied} of {} records",
        history.fact_records()
    );
    let union: BTreeSet<i32> = partitions.iter().flatten().copied().collect();
    assert_eq!(union, BTreeSet::from([0, 1, 2]));
    world.assert_report_equals_store().await;
}

/// A member run until caught up while another member of its group follows the topic: it
/// finishes on the offsets the other member stored for the partitions it does not own (it
/// asks the database only for those), and reads its own ones to their ends.
async fn catching_up_counts_what_another_member_applied(world: &World) {
    let group = common::unique("shared");
    let follower = Follower::start(world, &group).await;
    let statuses = [follower.status];
    wait_until_owned(
        &statuses,
        "the follower owns the three partitions",
        |owned| owned[0].len() == 3,
    )
    .await;
    world.write_random_history(20, 60, Rng::seed()).await;
    world.relay_once().await;
    world.wait_until_report_equals_store().await;

    // Joining makes the group split the partitions; either way every one is applied already.
    let caught_up = world.project(&group).await;
    assert_eq!(caught_up.dead_letters, 0);

    // Written after the catch-up: the follower, still running, applies it.
    world.add_book("After the catch-up", "3.50", None).await;
    world.relay_once().await;
    world.wait_until_report_equals_store().await;
    follower.trigger.trigger();
    follower.run.await.unwrap().unwrap();
    world.assert_report_equals_store().await;
}

// ---------------------------------------------------------------------------------------------
// Records that cannot be applied.

/// Puts raw records onto the fact topic behind the relay's back.
async fn produce_raw(world: &World, records: &[(Option<String>, Vec<u8>)]) {
    let producer = world.kafka.producer().unwrap();
    let topic = world.kafka.topics().book_fact;
    for (key, value) in records {
        let headers = OwnedHeaders::new().insert(Header {
            key: "origin",
            value: Some("test"),
        });
        let mut record = FutureRecord::<str, [u8]>::to(&topic)
            .payload(value.as_slice())
            .headers(headers);
        if let Some(key) = key {
            record = record.key(key.as_str());
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
}

/// A bare tombstone of `book` on the fact topic.
async fn tombstone(world: &World, book: BookId) {
    let producer = world.kafka.producer().unwrap();
    let key = book.to_string();
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&world.kafka.topics().book_fact).key(&key),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// Four records the projector cannot apply: garbage, a truncated fact, a fact framed with a
/// fingerprint no schema has, and a good fact under a key that is no book id.
fn bad_records() -> Vec<(Option<String>, Vec<u8>)> {
    let book_id = BookId::generate();
    let codec = AvroCodec::new();
    let good_fact = EventPayload::Fact(fact(book_id, 1, "Good"));
    let datum = codec.encode(&good_fact).unwrap();
    let fingerprint = codec.fingerprint(BookFactEvent::TYPE).unwrap();
    let framed = frame_single_object(fingerprint, &datum);
    let key = Some(book_id.to_string());
    vec![
        (key.clone(), b"definitely not avro".to_vec()),
        (key.clone(), framed[..framed.len() / 2].to_vec()),
        (key, frame_single_object(0x0bad_f00d_dead_beef, &datum)),
        (Some("not-a-book-id".into()), framed),
    ]
}

/// `--until-caught-up` is a job: a run stopped by shutdown must not look like one that
/// caught up (the command then fails instead of printing "caught up").
async fn until_caught_up_says_whether_it_caught_up_or_was_stopped(world: &World) {
    world.write_random_history(4, 8, Rng::seed()).await;
    world.relay_once().await;
    let (stop, shutdown) = ShutdownTrigger::new();
    stop.trigger();
    let group = common::unique("stopped");
    let projector = kafka_projector(
        world.store.clone(),
        &world.kafka,
        World::projection_config(&group),
    )
    .await
    .unwrap();
    let stopped = projector
        .run(ProjectionMode::UntilCaughtUp, shutdown)
        .await
        .unwrap();
    assert!(!stopped.caught_up, "{stopped:?}");

    let finished = world.project(&group).await;
    assert!(finished.caught_up, "{finished:?}");
    world.assert_report_equals_store().await;
}

/// A batch holds at most `batch_bytes` of keys and values (the record that reaches it is its
/// last): here one byte, so every record is a batch of its own, and the model is still right.
async fn a_batch_ends_at_its_byte_limit(world: &World) {
    let history = world.write_random_history(3, 6, Rng::seed()).await;
    world.relay_once().await;
    let mut config = World::projection_config(&common::unique("bytes"));
    config.batch_bytes = 1;
    let (_never, shutdown) = ShutdownTrigger::new();
    let report = kafka_projector(world.store.clone(), &world.kafka, config)
        .await
        .unwrap()
        .run(ProjectionMode::UntilCaughtUp, shutdown)
        .await
        .unwrap();
    assert!(report.caught_up, "{report:?}");
    assert!(report.applied_facts >= history.fact_records(), "{report:?}");
    assert!(
        report.batches >= report.applied_facts,
        "more than one record in a batch: {report:?}"
    );
    world.assert_report_equals_store().await;
}

async fn undecodable_records_go_to_the_dlq_and_projection_goes_on(world: &World) {
    world.write_random_history(8, 16, Rng::seed()).await;
    world.relay_once().await;
    produce_raw(world, &bad_records()).await;
    // Good facts after the bad ones, on every partition.
    let history = world.write_random_history(8, 16, Rng::seed()).await;
    world.relay_once().await;

    let report = world.project(&common::unique("dlq")).await;
    assert_eq!(report.dead_letters, 4);
    assert!(report.applied_facts >= history.fact_records());
    world.assert_report_equals_store().await;

    let letters = list_dead_letters(&world.kafka).await.unwrap();
    assert_eq!(letters.len(), 4, "{letters:#?}");
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    for expected in [
        "unknown magic",
        "could not decode",
        "fingerprint",
        "not a book id",
    ] {
        assert!(
            reasons.iter().any(|reason| reason.contains(expected)),
            "no dead letter says {expected:?}: {reasons:#?}"
        );
    }
    let fact_topic = world.kafka.topics().book_fact;
    for letter in &letters {
        assert_eq!(letter.topic.as_deref(), Some(fact_topic.as_str()));
        assert!(
            letter.partition.is_some() && letter.offset.is_some(),
            "{letter:?}"
        );
    }

    // What `bookstore dlq list` prints, as JSON and as text.
    let output = world.run_bookstore(&["dlq", "list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let listed = listed.as_array().expect("a JSON array");
    assert_eq!(listed.len(), 4);
    for letter in listed {
        assert!(letter["reason"].as_str().is_some_and(|r| !r.is_empty()));
        assert_eq!(letter["topic"], fact_topic.as_str());
        assert!(letter["offset"].is_i64());
    }
    let output = world.run_bookstore(&["dlq", "list"]).await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.contains("not a book id"), "{text}");
}

/// Thousands of bad records in a row (a producer gone wrong): every one is dead-lettered, in
/// the order it was read although the letters are sent together, and the good facts after them
/// are applied.
async fn a_flood_of_garbage_is_dead_lettered_whole_and_in_order(world: &World) {
    const GARBAGE: usize = 2_500;
    // The relay's first run creates the topics.
    world.write_random_history(4, 8, Rng::seed()).await;
    world.relay_once().await;
    let key = BookId::generate().to_string();
    let producer = world.kafka.producer().unwrap();
    let topic = world.kafka.topics().book_fact;
    let values: Vec<String> = (0..GARBAGE).map(|i| format!("garbage #{i}")).collect();
    let sends = values.iter().map(|value| {
        producer.send(
            FutureRecord::<str, str>::to(&topic)
                .key(&key)
                .payload(value),
            Duration::from_secs(10),
        )
    });
    for sent in futures::future::join_all(sends).await {
        sent.unwrap();
    }
    let history = world.write_random_history(8, 16, Rng::seed()).await;
    world.relay_once().await;

    let report = world.project(&common::unique("flood")).await;
    assert_eq!(report.dead_letters, GARBAGE as u64, "{report:?}");
    assert!(report.applied_facts >= history.fact_records());
    world.assert_report_equals_store().await;

    let mut letters: Vec<_> = list_dead_letters(&world.kafka)
        .await
        .unwrap()
        .into_iter()
        .filter(|letter| letter.key.as_deref() == Some(key.as_str()))
        .collect();
    assert_eq!(letters.len(), GARBAGE);
    letters.sort_by_key(|letter| (letter.dlq_partition, letter.dlq_offset));
    let origin_partitions: HashSet<_> = letters.iter().map(|letter| letter.partition).collect();
    assert_eq!(origin_partitions.len(), 1, "one key, one partition");
    let origin_offsets: Vec<i64> = letters.iter().map(|l| l.offset.unwrap()).collect();
    assert!(
        origin_offsets.windows(2).all(|pair| pair[0] < pair[1]),
        "dead letters out of their records' order: {origin_offsets:?}"
    );
    assert!(letters.iter().all(|letter| !letter.left_out));
    assert!(letters.iter().all(|letter| letter.value_bytes.is_some()));
}

/// Records that decode, but that the database would refuse on every attempt (a version
/// outside 1..=i64::MAX, NUL in text), or that would delete a book whatever its version (a
/// tombstone whose version header is no number): each goes to the dead-letter queue, and the
/// facts after them are applied.
async fn records_the_database_would_refuse_go_to_the_dlq_and_projection_goes_on(world: &World) {
    let target = world.add_book("Target", "3.00", None).await;
    world.relay_once().await;
    let codec = AvroCodec::new();
    let fingerprint = codec.fingerprint(BookFactEvent::TYPE).unwrap();
    let framed = |fact: BookFactEvent| {
        let datum = codec.encode(&EventPayload::Fact(fact)).unwrap();
        Some(frame_single_object(fingerprint, &datum))
    };
    let mut nul_title = fact(target, 99, "Tar\0get");
    nul_title.author = "Someone Else".into();
    let records = [
        (framed(fact(target, 0, "Version zero")), None),
        (framed(nul_title), None),
        (None, Some("0")),
        (None, Some("four")),
        (None, Some("9223372036854775808")),
    ];
    let producer = world.kafka.producer().unwrap();
    let topic = world.kafka.topics().book_fact;
    let key = target.to_string();
    for (value, version) in &records {
        let mut record = FutureRecord::<str, [u8]>::to(&topic).key(&key);
        if let Some(value) = value {
            record = record.payload(value.as_slice());
        }
        if let Some(version) = version {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: h::AGGREGATE_VERSION,
                value: Some(*version),
            }));
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap();
    }
    // Good facts after the bad ones, on every partition.
    let history = world.write_random_history(8, 16, Rng::seed()).await;
    world.relay_once().await;

    let report = world.project(&common::unique("refused")).await;
    assert_eq!(report.dead_letters, 5);
    assert!(report.applied_facts >= history.fact_records());
    world.assert_report_equals_store().await;
    let reports = world.reports().await;
    let row = reports
        .iter()
        .find(|r| r.book_id == target)
        .expect("the target's row");
    assert_eq!((row.title.as_str(), row.version), ("Target", 1));

    let letters = list_dead_letters(&world.kafka).await.unwrap();
    assert_eq!(letters.len(), 5, "{letters:#?}");
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("is not a version from 1 to"))
            .count(),
        4,
        "{reasons:#?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("title contains a NUL character")),
        "{reasons:#?}"
    );
}

/// An unreadable record so close to the producer's size limit (`message.max.bytes`, 1,000,000)
/// that the dead-letter headers would push it over: the dead letter carries only its key,
/// where it is and its size, the projection goes on, and a replay sends the original back
/// whole, read from where it was.
async fn a_record_too_large_to_carry_is_dead_lettered_by_reference_and_replayed_whole(
    world: &World,
) {
    world.add_book("Fine", "1.00", None).await;
    world.relay_once().await;
    let book_id = BookId::generate();
    let huge = vec![b'x'; 999_900];
    produce_raw(world, &[(Some(book_id.to_string()), huge.clone())]).await;
    let history = world.write_random_history(4, 8, Rng::seed()).await;
    world.relay_once().await;

    let group = common::unique("huge");
    let report = world.project(&group).await;
    assert_eq!(report.dead_letters, 1);
    assert!(report.applied_facts >= history.fact_records());
    world.assert_report_equals_store().await;
    let letters = list_dead_letters(&world.kafka).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert!(letter.left_out, "{letter:?}");
    assert_eq!(letter.value_bytes, Some(huge.len()));
    assert_eq!(letter.key, Some(book_id.to_string()));
    assert!(letter.reason.contains("unknown magic"), "{letter:?}");
    assert_eq!(
        letter.topic.as_deref(),
        Some(world.kafka.topics().book_fact.as_str())
    );
    let output = world.run_bookstore(&["dlq", "list"]).await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("999900 bytes left out"), "{text}");

    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("replayed 1 dead letter(s)"), "{stdout}");
    // The original went back whole: the projector dead-letters it again, at its new offset,
    // with the same size.
    assert_eq!(world.project(&group).await.dead_letters, 1);
    let letters = list_dead_letters(&world.kafka).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    assert_eq!(letters[1].value_bytes, Some(huge.len()));
    assert_eq!(letters[1].key, letters[0].key);
    assert_ne!(
        letters[1].offset, letters[0].offset,
        "not re-read from the topic"
    );
}

/// Records whose rejection quotes a huge key: the reason is cut short, so a record that fits
/// the producer's limit fits it as a dead letter too, key and value whole; and a key so large
/// that it leaves no room for the dead-letter headers is left out, like a value, and read back
/// from where it is on replay.
async fn records_with_huge_keys_are_dead_lettered_and_projection_goes_on(world: &World) {
    world.add_book("Fine", "1.00", None).await;
    world.relay_once().await;
    let carried = "k".repeat(900_000);
    let left_out = "l".repeat(999_800);
    produce_raw(
        world,
        &[
            (Some(carried.clone()), b"a value".to_vec()),
            (Some(left_out.clone()), vec![]),
        ],
    )
    .await;
    let history = world.write_random_history(4, 8, Rng::seed()).await;
    world.relay_once().await;

    let group = common::unique("huge-key");
    let report = world.project(&group).await;
    assert_eq!(report.dead_letters, 2);
    assert!(report.applied_facts >= history.fact_records());
    world.assert_report_equals_store().await;
    let letters = list_dead_letters(&world.kafka).await.unwrap();
    assert_eq!(letters.len(), 2, "{} letters", letters.len());
    let (whole, by_reference) = match letters[0].key_left_out {
        None => (&letters[0], &letters[1]),
        Some(_) => (&letters[1], &letters[0]),
    };
    assert_eq!(whole.key.as_deref(), Some(carried.as_str()));
    assert!(!whole.left_out);
    assert_eq!(whole.value_bytes, Some(7));
    assert!(
        whole.reason.starts_with("the key \"kkk"),
        "{:.100}",
        whole.reason
    );
    assert!(whole.reason.len() < 600, "{} bytes", whole.reason.len());
    assert_eq!(by_reference.key, None);
    assert_eq!(by_reference.key_left_out, Some(left_out.len()));
    assert!(by_reference.left_out);
    assert!(by_reference.reason.len() < 600);
    let output = world.run_bookstore(&["dlq", "list"]).await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("key (999800 bytes left out)"),
        "{}",
        &text[..200]
    );

    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("replayed 2 dead letter(s)"), "{stdout}");
    // Both went back whole, the one without its key read back from the topic: the projector
    // dead-letters them again, at their new offsets.
    assert_eq!(world.project(&group).await.dead_letters, 2);
    let letters = list_dead_letters(&world.kafka).await.unwrap();
    assert_eq!(letters.len(), 4);
    let key_sizes = |letters: &[dlq::DeadLetter]| {
        let mut sizes: Vec<usize> = letters
            .iter()
            .map(|l| l.key.as_ref().map_or(0, String::len) + l.key_left_out.unwrap_or(0))
            .collect();
        sizes.sort_unstable();
        sizes
    };
    assert_eq!(key_sizes(&letters[2..]), key_sizes(&letters[..2]));
}

/// A letter whose original is gone, and that names no key to check it by (its key was left
/// out too), is skipped as gone, like the letters checked against the topic, instead of
/// stopping every replay at it for good.
#[tokio::test]
async fn a_letter_whose_original_is_gone_is_skipped_and_the_replay_goes_on() {
    let world = World::sqlite().await;
    world.add_book("Fine", "1.00", None).await;
    world.relay_once().await;
    let topics = world.kafka.topics();
    // As the projector writes a letter for a record too large to carry: key and value left
    // out, to be read back from where it is. The record there (the fact, or none) does not
    // have a 5-byte key.
    let headers = [
        (dlq::REASON, "undecodable value: written by hand"),
        (dlq::ORIGIN_TOPIC, topics.book_fact.as_str()),
        (dlq::ORIGIN_PARTITION, "0"),
        (dlq::ORIGIN_OFFSET, "0"),
        (dlq::LEFT_OUT, "999900"),
        (dlq::KEY_LEFT_OUT, "5"),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |headers, (key, value)| {
        headers.insert(Header {
            key,
            value: Some(value),
        })
    });
    world
        .kafka
        .producer()
        .unwrap()
        .send(
            FutureRecord::<str, [u8]>::to(&topics.book_fact_dlq).headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // Behind it, a letter the replay can send back.
    produce_raw(&world, &bad_records()[..1]).await;
    assert_eq!(world.project(&common::unique("gone")).await.dead_letters, 1);

    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    // Reading an original to the end of its partition is no client error.
    assert!(!stderr.contains("ERROR"), "{stderr}");
    assert!(stdout.contains("replayed 1 dead letter(s)"), "{stdout}");
    assert!(
        stdout.contains("skipped 1 dead letter(s) whose original"),
        "{stdout}"
    );
    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("replayed 0 dead letter(s)"), "{stdout}");
    world.finish().await;
}

async fn dlq_replay_sends_each_dead_letter_back_once(world: &World) {
    world.add_book("Fine", "1.00", None).await;
    world.relay_once().await;
    // The last two bad records: different keys, nothing after either.
    produce_raw(world, &bad_records()[2..]).await;
    let group = common::unique("replay");
    assert_eq!(world.project(&group).await.dead_letters, 2);

    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("replayed 2 dead letter(s)"), "{stdout}");
    assert!(!stdout.contains("skipped"), "{stdout}");
    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("replayed 0 dead letter(s)"), "{stdout}");

    // The replayed records are the originals (key, value, headers), still unreadable: the
    // projector dead-letters them again, with the same reasons.
    assert_eq!(world.project(&group).await.dead_letters, 2);
    let letters = list_dead_letters(&world.kafka).await.unwrap();
    assert_eq!(letters.len(), 4);
    // Different keys, so the letters may sit on different partitions of the queue: each
    // key's two letters, in the order of their partition.
    let keys: BTreeSet<_> = letters.iter().map(|letter| letter.key.clone()).collect();
    assert_eq!(keys.len(), 2);
    for key in keys {
        let pair: Vec<_> = letters.iter().filter(|letter| letter.key == key).collect();
        let [first, again] = pair[..] else {
            panic!("not two letters of {key:?}: {pair:?}");
        };
        assert_eq!(first.reason, again.reason);
        assert_eq!(first.value_bytes, again.value_bytes);
        let origin = |letter: &dlq::DeadLetter| (letter.partition, letter.offset);
        assert_ne!(origin(first), origin(again), "not re-read from the topic");
    }
}

/// The fact topic is compacted: a dead letter sent back after a later record of its book would
/// become the record compaction keeps, and a reader from the beginning would get the book's
/// older state (or a removed book) back. Such letters are skipped; the rest are replayed.
async fn dlq_replay_skips_letters_a_later_record_of_their_book_supersedes(world: &World) {
    let kept = world.add_book("Kept", "1.00", None).await;
    world.relay_once().await;
    let (superseded, removed, alone) = (BookId::generate(), BookId::generate(), BookId::generate());
    let key = |book: BookId| Some(book.to_string());
    produce_raw(
        world,
        &[
            // Unreadable, then a good fact of the same book: the letter is superseded.
            (key(superseded), b"not avro".to_vec()),
            (key(superseded), framed_fact(superseded, 2, "Newer")),
            // Unreadable, then the book's tombstone: replaying would bring it back.
            (key(removed), b"not avro either".to_vec()),
            // Unreadable and the book's last record: replayed.
            (key(alone), b"still not avro".to_vec()),
        ],
    )
    .await;
    tombstone(world, removed).await;
    let group = common::unique("replay-superseded");
    assert_eq!(world.project(&group).await.dead_letters, 3);
    // A second group dead-letters the same originals again (as one projector does after a
    // crash between a letter and its offset): each original goes back once.
    let second = common::unique("replay-superseded-again");
    assert_eq!(world.project(&second).await.dead_letters, 3);

    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("replayed 1 dead letter(s)"), "{stdout}");
    assert!(
        stdout.contains("skipped 5 dead letter(s) whose book has a later record"),
        "{stdout}"
    );
    // Neither replayed nor skipped again.
    let output = world.run_bookstore(&["dlq", "replay"]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("replayed 0 dead letter(s)") && !stdout.contains("skipped"),
        "{stdout}"
    );
    // Only the lone book's record was sent back: it is dead-lettered once more.
    assert_eq!(world.project(&group).await.dead_letters, 1);
    let letters = list_dead_letters(&world.kafka).await.unwrap();
    let alone_key = Some(alone.to_string());
    assert_eq!(letters.len(), 7);
    assert_eq!(
        letters
            .iter()
            .filter(|letter| letter.key == alone_key)
            .count(),
        3
    );
    assert_eq!(row(world, superseded).await, Some((2, "Newer".into())));
    assert_eq!(row(world, removed).await, None);
    assert!(row(world, kept).await.is_some());
}

/// A replay stopped part way (Ctrl-C) stops between two letters, and still puts the newest
/// record of a book it sent a letter of back last: the letter's offset is committed already,
/// so no later replay would look at it again. The next replay goes on with the rest.
#[tokio::test]
async fn a_replay_stopped_part_way_still_puts_the_newest_record_of_a_book_last() {
    let world = World::sqlite().await;
    world.relay_once().await;
    let updated = BookId::generate();
    let group = common::unique("replay-stop");
    // The book's letter first in the queue, then many others.
    produce_raw(&world, &[(Some(updated.to_string()), b"not avro".to_vec())]).await;
    assert_eq!(world.project(&group).await.dead_letters, 1);
    let others: Vec<_> = (0..200)
        .map(|n| {
            (
                Some(BookId::generate().to_string()),
                format!("garbage {n}").into_bytes(),
            )
        })
        .collect();
    produce_raw(&world, &others).await;
    assert_eq!(world.project(&group).await.dead_letters, 200);

    let plan = ReplayPlan::prepare(&world.kafka).await.unwrap();
    let newer = framed_fact(updated, 2, "Written during the replay");
    produce_raw(&world, &[(Some(updated.to_string()), newer.clone())]).await;
    // Stopped once the first letter's offset is committed.
    let (stop, stopping) = ShutdownTrigger::new();
    let replay_group = format!("{}-replay", world.kafka.topics().book_fact_dlq);
    let watcher: BaseConsumer = world.kafka.consumer_config(&replay_group).create().unwrap();
    let queue = world.kafka.topics().book_fact_dlq;
    let watching = tokio::task::spawn_blocking(move || {
        let mut partition = TopicPartitionList::new();
        partition.add_partition(&queue, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let committed = watcher
                .committed_offsets(partition.clone(), Duration::from_secs(5))
                .unwrap();
            if matches!(committed.elements()[0].offset(), Offset::Offset(next) if next >= 1) {
                stop.trigger();
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the replay committed no letter within 60 s");
    });
    let report = plan.carry_out(&world.kafka, &stopping).await.unwrap();
    watching.await.unwrap();
    assert!(report.interrupted, "{report:?}");
    assert!(
        (1..201).contains(&report.total()),
        "stopped between two letters: {report:?}"
    );
    assert_eq!(report.resent_newer, 1, "{report:?}");

    let topic = world.kafka.topics().book_fact;
    let records = common::consume_committed(
        &world.kafka,
        &[&topic],
        // Both runs of garbage, the newer fact, the letters sent back, the newer one again.
        201 + 1 + usize::try_from(report.total()).unwrap() + 1,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    let last_of_book = records
        .iter()
        .rfind(|record| record.key == updated.to_string())
        .unwrap();
    assert_eq!(last_of_book.value.as_deref(), Some(newer.as_slice()));

    let rest = replay_dead_letters(&world.kafka, &Shutdown::never())
        .await
        .unwrap();
    assert!(!rest.interrupted);
    assert_eq!(report.total() + rest.total(), 201, "{report:?} {rest:?}");
}

/// A fact of `book` as the relay frames it.
fn framed_fact(book: BookId, version: u64, title: &str) -> Vec<u8> {
    let codec = AvroCodec::new();
    let datum = codec
        .encode(&EventPayload::Fact(fact(book, version, title)))
        .unwrap();
    frame_single_object(codec.fingerprint(BookFactEvent::TYPE).unwrap(), &datum)
}

/// A record of a letter's book that arrives between a replay's check and its send (the relay
/// publishing meanwhile): the letter goes back after it, so the replay sends the newer record
/// (a fact, or a tombstone) again after the letter, and the newest state stays the one
/// compaction keeps.
#[tokio::test]
async fn a_record_written_during_a_replay_stays_the_last_of_its_book() {
    let world = World::sqlite().await;
    // Nothing to publish yet; it makes the topics.
    world.relay_once().await;
    let (updated, removed) = (BookId::generate(), BookId::generate());
    let key = |book: BookId| Some(book.to_string());
    produce_raw(
        &world,
        &[
            (key(updated), b"not avro".to_vec()),
            (key(removed), b"not avro either".to_vec()),
        ],
    )
    .await;
    let group = common::unique("replay-race");
    assert_eq!(world.project(&group).await.dead_letters, 2);

    let plan = ReplayPlan::prepare(&world.kafka).await.unwrap();
    let newer = framed_fact(updated, 2, "Written during the replay");
    produce_raw(&world, &[(key(updated), newer.clone())]).await;
    tombstone(&world, removed).await;
    let report = plan
        .carry_out(&world.kafka, &Shutdown::never())
        .await
        .unwrap();
    assert_eq!((report.total(), report.resent_newer), (2, 2), "{report:?}");

    let topic = world.kafka.topics().book_fact;
    let records = common::consume_committed(
        &world.kafka,
        &[&topic],
        8,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    let of = |book: BookId| -> Vec<Option<Vec<u8>>> {
        let key = book.to_string();
        records
            .iter()
            .filter(|record| record.key == key)
            .map(|record| record.value.clone())
            .collect()
    };
    // Original, newer record, replayed letter, newer record again.
    let garbage = Some(b"not avro".to_vec());
    let newer = Some(newer);
    assert_eq!(
        of(updated),
        [garbage.clone(), newer.clone(), garbage, newer]
    );
    let garbage = Some(b"not avro either".to_vec());
    assert_eq!(of(removed), [garbage.clone(), None, garbage, None]);
    // The projection took the newer fact, and the replayed letters again to the queue.
    assert_eq!(world.project(&group).await.dead_letters, 2);
    assert_eq!(
        row(&world, updated).await,
        Some((2, "Written during the replay".into()))
    );
    assert_eq!(row(&world, removed).await, None);
    world.finish().await;
}

/// The same, with the newer record in a transaction still open when the letter is sent (as a
/// relay's can be): a `read_committed` reader sees neither until it commits, so the replay waits
/// for its letter to become readable before it looks for records before it.
#[tokio::test]
async fn a_record_in_a_transaction_open_during_a_replay_stays_the_last_of_its_book() {
    use rdkafka::producer::Producer as _;

    let world = World::sqlite().await;
    world.relay_once().await;
    let book = BookId::generate();
    let key = book.to_string();
    produce_raw(&world, &[(Some(key.clone()), b"not avro".to_vec())]).await;
    let group = common::unique("replay-open-transaction");
    assert_eq!(world.project(&group).await.dead_letters, 1);

    let plan = ReplayPlan::prepare(&world.kafka).await.unwrap();
    let producer =
        common::transactional_producer(&world.kafka, &common::unique("open-during-replay")).await;
    producer.begin_transaction().unwrap();
    let topic = world.kafka.topics().book_fact;
    let newer = framed_fact(book, 2, "In a transaction");
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&topic)
                .key(&key)
                .payload(&newer),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let kafka = world.kafka.clone();
    let replay = tokio::spawn(async move { plan.carry_out(&kafka, &Shutdown::never()).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !replay.is_finished(),
        "the replay did not wait for its letter to become readable"
    );
    tokio::task::spawn_blocking(move || producer.commit_transaction(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    let report = replay.await.unwrap().unwrap();
    assert_eq!((report.total(), report.resent_newer), (1, 1), "{report:?}");

    let records = common::consume_committed(
        &world.kafka,
        &[&topic],
        4,
        Duration::from_secs(30),
        Duration::from_millis(500),
    )
    .await;
    let values: Vec<_> = records.into_iter().map(|record| record.value).collect();
    let (garbage, newer) = (Some(b"not avro".to_vec()), Some(newer));
    assert_eq!(values, [garbage.clone(), newer.clone(), garbage, newer]);
    world.finish().await;
}

// ---------------------------------------------------------------------------------------------
// The command line.

async fn report_json_has_the_documented_shape(world: &World) {
    let book_id = world
        .add_book("The Great Gatsby", "15.99", Some("9780743273565"))
        .await;
    world.relay_once().await;
    world.run_bookstore(&["project", "--until-caught-up"]).await;

    let output = world.run_bookstore(&["report", "--json"]).await;
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = rows.as_array().expect("a JSON array");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["book_id"], book_id.to_string());
    assert_eq!(row["title"], "The Great Gatsby");
    assert_eq!(row["author"], "Test Author");
    assert_eq!(row["price"], "15.99");
    assert_eq!(row["isbn"], "9780743273565");
    assert_eq!(row["version"], 1);
    assert!(row["updated_at"].as_str().is_some());

    let output = world.run_bookstore(&["report"]).await;
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("The Great Gatsby") && table.contains("15.99"),
        "{table}"
    );
}

async fn rebuild_restores_rows_deleted_by_hand(world: &World) {
    world.write_random_history(20, 40, Rng::seed()).await;
    world.relay_once().await;
    let output = world.run_bookstore(&["project", "--until-caught-up"]).await;
    let progress = String::from_utf8_lossy(&output.stdout);
    assert!(progress.starts_with("caught up: applied"), "{progress}");
    world.assert_report_equals_store().await;

    world.delete_report_rows_by_hand(5).await;
    // Caught up already: a plain run does not bring them back.
    world.run_bookstore(&["project", "--until-caught-up"]).await;
    let (reports, books) = world.report_and_store().await;
    assert_eq!(reports.len() + 5, books.len());

    // Not while another member of the group is running: the dashboard it feeds would be
    // emptied under it.
    let group = default_group(&world.kafka.topic_prefix);
    let mut running = Follower::start(world, &group).await;
    running
        .wait_for("the running projector never got partitions", |s| {
            !s.owned.is_empty()
        })
        .await;
    let refused = world
        .bookstore(&["project", "--rebuild", "--until-caught-up"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("active member"), "{error}");
    assert_eq!(error.trim().lines().count(), 1, "not one line: {error}");
    assert_eq!(
        world.reports().await.len() + 5,
        books.len(),
        "rows changed anyway"
    );
    running.stop().await;

    // Nor while a projector of another group into the same read model runs: the rows are
    // shared, and its offsets would be forgotten with them.
    let other = common::unique("other-group");
    let mut running = Follower::start(world, &other).await;
    running
        .wait_for("the other group's projector never applied a batch", |s| {
            !s.owned.is_empty() && s.batches > 0
        })
        .await;
    let refused = world
        .bookstore(&["project", "--rebuild", "--until-caught-up"])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(
        error.contains(&other) && error.contains("active member"),
        "{error}"
    );
    // Refused before anything was deleted: the other group's offsets are still stored.
    let topic = world.kafka.topics().book_fact;
    assert!(
        !world
            .store
            .stored_offsets(&other, &topic)
            .await
            .unwrap()
            .is_empty()
    );
    running.stop().await;

    world
        .run_bookstore(&["project", "--rebuild", "--until-caught-up"])
        .await;
    world.assert_report_equals_store().await;
}

/// A reset that races with a running projector (a `--rebuild` whose check for active members
/// came before the member joined, or a member still applying after it left its group): the
/// member finds its positions gone and reads its partitions again from the beginning, so the
/// rows it had applied come back, even with nothing new on the topic.
async fn a_projector_reads_its_partitions_again_after_a_reset_under_it(world: &World) {
    world.write_random_history(20, 40, Rng::seed()).await;
    world.relay_once().await;
    let group = common::unique("reset-under");
    let facts = world.project(&group).await.applied_facts;
    let mut following = Follower::start(world, &group).await;
    following
        .wait_for("the projector never got partitions", |s| {
            !s.owned.is_empty()
        })
        .await;

    assert_eq!(world.store.reset().await.unwrap(), vec![group.clone()]);
    assert!(world.reports().await.is_empty());
    // Nothing new is on the topic: the idle check finds the positions gone.
    world.wait_until_report_equals_store().await;
    following
        .wait_for(
            "the partitions were not read again from the beginning",
            |s| s.applied_facts >= facts,
        )
        .await;
    // And it goes on following.
    world.write_random_history(5, 10, Rng::seed()).await;
    world.relay_once().await;
    world.wait_until_report_equals_store().await;
    following.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Confluent framing.

async fn confluent_framed_facts_are_decoded_through_the_schema_registry(world: &World) {
    let registry = std::env::var("SCHEMA_REGISTRY_URL").expect(
        "SCHEMA_REGISTRY_URL names the test schema registry (start one with \
         `deploy/schema-registry/registry.sh start`, then use \
         http://127.0.0.1:8081/apis/ccompat/v7)",
    );
    let mut kafka = world.kafka.clone();
    kafka.schema_registry_url = Some(registry);
    world.write_random_history(10, 20, Rng::seed()).await;
    world.relay_once_with(&kafka).await;

    let records = common::consume_committed(
        &kafka,
        &[&kafka.topics().book_fact],
        1,
        Duration::from_secs(30),
        Duration::from_millis(200),
    )
    .await;
    let value = records[0].value.as_deref().unwrap();
    assert_eq!(value[0], 0x00, "not Confluent framed");
    assert_eq!(
        records[0].headers.get(h::CONTENT_TYPE).unwrap(),
        "application/avro"
    );

    let report = world
        .project_with(&kafka, &common::unique("confluent"))
        .await;
    assert_eq!(report.dead_letters, 0);
    world.assert_report_equals_store().await;
}
