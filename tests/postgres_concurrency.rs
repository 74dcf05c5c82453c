//! Concurrent writers on PostgreSQL, and a follower that reads the outbox with nothing but
//! `position > last_seen`: it must see every committed event exactly once, in gapless order.
//!
//! That only holds because positions come from the `outbox_head` row (see `store/mod.rs`). Two
//! tests show the mechanism, and what a plain sequence would get wrong; the next ones show that
//! saves do not depend on the database's default isolation level, and that a save the database
//! aborts to break a deadlock is retried. The last one shows that a reset of the read model
//! waits for a projection batch in flight instead of deadlocking with it.

mod common;
#[path = "store_suite/fixtures.rs"]
mod fixtures;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bookstore::codec::AvroCodec;
use bookstore::domain::{AddBook, BookCommand, BookId, StoredEvent};
use bookstore::service::{BookService, CommandContext};
use bookstore::store::{EventStore, PostgresStore, StoreError};
use chrono::Utc;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use fixtures::{PgSchema, added, new_book, repriced};

const WRITERS: usize = 16;
const SAVES_PER_WRITER: usize = 50;
/// Fewer books than writers, so writers race on the same book and lose with `Conflict`.
const BOOKS: usize = 12;
/// Each writer sleeps up to this long between loading a book and saving it.
const MAX_THINK_TIME_MICROS: u64 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_sees_every_committed_event_exactly_once_in_gapless_order() {
    let started = Instant::now();
    let schema = PgSchema::create().await;
    let store = Arc::new(schema.store_with_pool(WRITERS as u32 + 2).await);
    let mut committed = vec![];
    let mut books = vec![];
    for n in 0..BOOKS {
        let book = new_book(&format!("Book {n}"), "1.00");
        committed.extend(store.save(added(&book)).await.unwrap());
        books.push(book.book_id);
    }
    let books = Arc::new(books);
    let writers_done = Arc::new(AtomicBool::new(false));
    let follower = tokio::spawn(follow(store.clone(), writers_done.clone()));

    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| tokio::spawn(write(store.clone(), books.clone(), writer)))
        .collect();
    let mut conflicts = 0;
    for writer in writers {
        let (events, lost_races) = writer.await.unwrap();
        committed.extend(events);
        conflicts += lost_races;
    }
    writers_done.store(true, Ordering::SeqCst);
    let (seen, polls_with_news) = follower.await.unwrap();

    let positions: Vec<u64> = seen.iter().map(|e| e.position).collect();
    let expected_count = 2 * (BOOKS + WRITERS * SAVES_PER_WRITER);
    assert_eq!(committed.len(), expected_count);
    assert_eq!(positions, (1..=expected_count as u64).collect::<Vec<_>>());
    let seen_ids: HashSet<Uuid> = seen.iter().map(|e| e.metadata.event_id).collect();
    let committed_ids: HashSet<Uuid> = committed.iter().map(|e| e.metadata.event_id).collect();
    assert_eq!(seen_ids.len(), seen.len(), "an event was seen twice");
    assert_eq!(seen_ids, committed_ids);
    assert_stream_versions_consecutive(&seen);
    assert_eq!(store.head_position().await.unwrap(), expected_count as u64);
    assert!(
        conflicts > 0,
        "writers never raced; the test proves less than it claims"
    );
    assert!(polls_with_news > 10, "the follower did not follow along");
    eprintln!(
        "{expected_count} events, {conflicts} conflicts retried, follower saw news in \
         {polls_with_news} polls, {:?}",
        started.elapsed()
    );
    store.pool().close().await;
    schema.drop().await;
}

/// One writer: reprices random books, retrying a lost race against the fresh state as the
/// service does. Returns what it committed and how many races it lost.
async fn write(
    store: Arc<PostgresStore>,
    books: Arc<Vec<BookId>>,
    writer: usize,
) -> (Vec<StoredEvent>, usize) {
    let mut random = SplitMix(writer as u64 + 1);
    let mut committed = vec![];
    let mut conflicts = 0;
    for save in 0..SAVES_PER_WRITER {
        let book_id = books[random.below(BOOKS as u64) as usize];
        let price = format!("{writer}.{save:02}");
        loop {
            let book = store.load_book(book_id).await.unwrap().unwrap();
            let think = random.below(MAX_THINK_TIME_MICROS);
            tokio::time::sleep(Duration::from_micros(think)).await;
            let (_, change) = repriced(&book, &price);
            match store.save(change).await {
                Ok(events) => {
                    committed.extend(events);
                    break;
                }
                Err(StoreError::Conflict { .. }) => conflicts += 1,
                Err(error) => panic!("writer {writer}: {error}"),
            }
        }
    }
    (committed, conflicts)
}

/// Follows the outbox like the relay: `read_after(last, 100)` and advance to the last position
/// seen. Stops once the writers are done and a poll after that finds nothing new. Returns the
/// events in the order seen and how many polls found something.
async fn follow(
    store: Arc<PostgresStore>,
    writers_done: Arc<AtomicBool>,
) -> (Vec<StoredEvent>, usize) {
    let mut seen: Vec<StoredEvent> = vec![];
    let mut last = 0;
    let mut polls_with_news = 0;
    loop {
        // Read the flag before polling, so the final poll starts after the last commit.
        let done = writers_done.load(Ordering::SeqCst);
        let page = store.read_after(last, 100).await.unwrap();
        let Some(tail) = page.last() else {
            if done {
                return (seen, polls_with_news);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        last = tail.position;
        polls_with_news += 1;
        seen.extend(page);
    }
}

fn assert_stream_versions_consecutive(events: &[StoredEvent]) {
    let mut streams: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for event in events {
        let stream = streams.entry(&event.metadata.stream).or_default();
        stream.push(event.metadata.aggregate_version);
    }
    for (stream, versions) in streams {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "{stream} out of order");
    }
}

/// A tiny deterministic generator: varied enough for think times and book choice.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % bound
    }
}

/// Transaction A reserves position 1 by hand and holds it; an ordinary save B must wait on the
/// head row until A commits, so B gets the later positions and a follower can never see B's
/// position while A's lower one is still uncommitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_save_waits_for_an_uncommitted_reservation_so_readers_never_skip_it() {
    let schema = PgSchema::create().await;
    let store = schema.store().await;
    let mut a = store.pool().begin().await.unwrap();
    let a_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *a)
        .await
        .unwrap();
    let a_position: i64 = sqlx::query_scalar(
        "UPDATE outbox_head SET last_position = last_position + 1 WHERE id = 1
         RETURNING last_position",
    )
    .fetch_one(&mut *a)
    .await
    .unwrap();
    let a_event = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (position, event_id, event_type, stream, stream_version,
                             aggregate_id, occurred_at, correlation_id, causation_id, payload)
         VALUES ($1, $2, 'BookAdded', 'bookstore::book-a', 1, $3, $4, $2, $2, 'a')",
    )
    .bind(a_position)
    .bind(a_event)
    .bind(Uuid::now_v7())
    .bind(Utc::now())
    .execute(&mut *a)
    .await
    .unwrap();

    let b = tokio::spawn({
        let store = store.clone();
        async move { store.save(added(&new_book("B", "1.00"))).await }
    });
    wait_until_blocked_by(store.pool(), a_pid).await;

    assert!(!b.is_finished(), "B committed while A held the head row");
    assert!(
        store.read_after(0, 10).await.unwrap().is_empty(),
        "a follower sees nothing while position 1 is uncommitted"
    );
    a.commit().await.unwrap();
    let b_events = b.await.unwrap().unwrap();

    assert_eq!(a_position, 1);
    assert_eq!(
        b_events.iter().map(|e| e.position).collect::<Vec<_>>(),
        [2, 3]
    );
    let all = store.read_after(0, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(all[0].metadata.event_id, a_event);
    store.pool().close().await;
    schema.drop().await;
}

/// Waits until some session is waiting for a lock held by the backend `pid`.
async fn wait_until_blocked_by(pool: &PgPool, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap();
        if blocked > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "B never queued behind A");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The design the head row replaces: positions from a sequence are handed out at INSERT, not
/// at COMMIT. A transaction that draws 1 and commits after one that drew 2 is skipped for good
/// by a follower that already moved past 2.
#[tokio::test]
async fn with_a_sequence_instead_a_follower_would_skip_a_late_commit() {
    let schema = PgSchema::create().await;
    let pool = schema.pool(3).await;
    sqlx::query("CREATE TABLE naive_events (position BIGSERIAL PRIMARY KEY, label TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let insert = "INSERT INTO naive_events (label) VALUES ($1) RETURNING position";
    let follow = "SELECT position FROM naive_events WHERE position > $1 ORDER BY position";

    let mut slow = pool.begin().await.unwrap();
    let slow_position: i64 = sqlx::query_scalar(insert)
        .bind("slow")
        .fetch_one(&mut *slow)
        .await
        .unwrap();
    let fast_position: i64 = sqlx::query_scalar(insert)
        .bind("fast")
        .fetch_one(&pool)
        .await
        .unwrap();
    let first_poll: Vec<i64> = sqlx::query_scalar(follow)
        .bind(0_i64)
        .fetch_all(&pool)
        .await
        .unwrap();
    slow.commit().await.unwrap();
    let last_seen = *first_poll.last().unwrap();
    let second_poll: Vec<i64> = sqlx::query_scalar(follow)
        .bind(last_seen)
        .fetch_all(&pool)
        .await
        .unwrap();

    assert_eq!((slow_position, fast_position), (1, 2));
    assert_eq!(first_poll, [2], "the follower saw 2 before 1 was committed");
    assert!(second_poll.is_empty(), "and never sees 1");
    pool.close().await;
    schema.drop().await;
}

/// A database whose default isolation is REPEATABLE READ (`ALTER DATABASE … SET
/// default_transaction_isolation = 'repeatable read'`; here set for the store's sessions) must
/// still take concurrent saves of different books. A save that queued for the head row would
/// otherwise fail with a serialization failure once the save before it committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_saves_of_different_books_succeed_when_the_default_isolation_is_repeatable_read()
{
    const SAVERS: usize = 8;
    const SAVES: usize = 20;
    let schema = PgSchema::create().await;
    let options = schema
        .options()
        .options([("default_transaction_isolation", "repeatable read")]);
    let pool = PgPoolOptions::new()
        .max_connections(SAVERS as u32)
        .connect_with(options)
        .await
        .unwrap();
    let store = PostgresStore::with_pool(pool).await.unwrap();
    let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(isolation, "repeatable read");

    let savers: Vec<_> = (0..SAVERS)
        .map(|saver| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut book = new_book(&format!("Book {saver}"), "1.00");
                store.save(added(&book)).await?;
                for save in 1..SAVES {
                    let (next, change) = repriced(&book, &format!("{saver}.{save:02}"));
                    store.save(change).await?;
                    book = next;
                }
                Ok::<_, StoreError>(())
            })
        })
        .collect();
    for (saver, task) in savers.into_iter().enumerate() {
        if let Err(error) = task.await.unwrap() {
            panic!("saver {saver}: {error}");
        }
    }

    let expected = (2 * SAVERS * SAVES) as u64;
    assert_eq!(store.head_position().await.unwrap(), expected);
    let positions: Vec<u64> = store
        .read_after(0, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(positions, (1..=expected).collect::<Vec<_>>());
    store.pool().close().await;
    schema.drop().await;
}

/// Transaction T holds the head row and then asks for the row of the book a save has locked:
/// a deadlock, which PostgreSQL breaks by aborting the save (it waited first, so its deadlock
/// check runs first). The service decides the command again and saves it once T is gone,
/// instead of failing the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_aborted_to_break_a_deadlock_is_retried_by_the_service() {
    let schema = PgSchema::create().await;
    let store = schema.store().await;
    let service = Arc::new(BookService::new(store.clone(), AvroCodec::new()));
    let book_id = BookId::generate();
    let add = BookCommand::Add(AddBook {
        book_id,
        title: "Deadlocked".to_owned(),
        author: "Test Author".to_owned(),
        isbn: None,
        price: "1.00".parse().unwrap(),
        description: None,
    });
    service
        .execute(add, CommandContext::default())
        .await
        .unwrap();
    let mut t = store.pool().begin().await.unwrap();
    let t_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *t)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox_head SET last_position = last_position WHERE id = 1")
        .execute(&mut *t)
        .await
        .unwrap();

    let update = tokio::spawn({
        let service = service.clone();
        async move {
            let reprice = BookCommand::UpdatePrice {
                book_id,
                price: "2.00".parse().unwrap(),
            };
            service.execute(reprice, CommandContext::default()).await
        }
    });
    // The save has locked the book row and queues for the head row.
    wait_until_blocked_by(store.pool(), t_pid).await;
    sqlx::query("UPDATE books SET title = title WHERE book_id = $1")
        .bind(book_id.as_uuid())
        .execute(&mut *t)
        .await
        .expect("T goes on once the save is aborted");
    t.rollback().await.unwrap();

    let outcome = update
        .await
        .unwrap()
        .expect("the service retries a save aborted by a deadlock");
    let book = outcome.state.unwrap();
    assert_eq!(
        (book.version, book.price.to_string()),
        (2, "2.00".to_owned())
    );
    assert_eq!(
        outcome
            .events
            .iter()
            .map(|e| e.position)
            .collect::<Vec<_>>(),
        [3, 4]
    );
    store.pool().close().await;
    schema.drop().await;
}

/// A read-model reset and a projection batch in flight run one after the other. The batch has
/// locked its position row and waits (here for its books' advisory locks, held by the test);
/// the reset must wait for the whole batch rather than delete the book row the batch is about
/// to write and then queue for the position row the batch holds: that deadlock would abort one
/// of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_reset_waits_for_a_projection_batch_in_flight() {
    use bookstore::domain::{BookFactEvent, Price};
    use bookstore::projection::{OffsetAdvance, ReportChange, ReportStore};

    let schema = PgSchema::create().await;
    let store = schema.store().await;
    let (group, topic) = ("g", "t.book-fact");
    let upsert = |book_id, version| ReportChange::Upsert {
        fact: BookFactEvent {
            book_id,
            title: format!("Version {version}"),
            author: "Ursula K. Le Guin".into(),
            isbn: None,
            price: Price::ZERO,
            description: None,
            version,
            removed: false,
        },
        changed_at: Utc::now(),
    };
    let book = BookId::generate();
    store
        .apply_batch(
            group,
            topic,
            &[upsert(book, 1)],
            &[OffsetAdvance::first(0, 5)],
        )
        .await
        .unwrap();

    // Every bucket of the projection's advisory locks (namespace "bkrp"), so the next batch
    // stops right after it has locked its positions.
    let mut holder = store.pool().begin().await.unwrap();
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(1651208816, b) FROM generate_series(0, 255) AS b")
        .execute(&mut *holder)
        .await
        .unwrap();
    let batch = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .apply_batch(
                    group,
                    topic,
                    &[upsert(book, 2)],
                    &[OffsetAdvance::from(0, 5, 9)],
                )
                .await
        }
    });
    wait_until_blocked_by(store.pool(), holder_pid).await;
    let reset = tokio::spawn({
        let store = store.clone();
        async move { store.reset().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!reset.is_finished(), "the reset ran beside the batch");
    holder.commit().await.unwrap();

    batch.await.unwrap().unwrap();
    assert_eq!(reset.await.unwrap().unwrap(), vec![group.to_owned()]);
    assert_eq!(store.list_reports().await.unwrap(), vec![]);
    assert_eq!(store.stored_offsets(group, topic).await.unwrap(), vec![]);
    store.pool().close().await;
    schema.drop().await;
}
