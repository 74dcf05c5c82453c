//! The `EventStore` and `Outbox` contracts, proved once per adapter.
//!
//! Each behaviour is one async function over any store; `store_suite!` turns it into a
//! `sqlite::<behaviour>` and a `postgres::<behaviour>` test, each on a fresh database (see
//! `store_suite/fixtures.rs`). PostgreSQL comes from `BOOKSTORE_TEST_DATABASE_URL`.

mod common;
#[path = "store_suite/fixtures.rs"]
mod fixtures;

use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bookstore::codec::{AvroCodec, CodecError};
use bookstore::domain::{
    AddBook, BookAdded, BookCommand, BookEvent, BookFactEvent, BookId, BookPriceUpdated,
    EventPayload, Price, StoredEvent, delta_stream, fact_stream,
};
use bookstore::service::{BookService, CommandContext, ReadEvent};
use bookstore::store::{
    AnyStore, EventStore, ListenerCheck, OUTBOX_CHANNEL, Outbox, PostgresStore, SqliteStore,
    StoreError,
};
use sqlx::postgres::PgListener;

use fixtures::{PgDatabase, PgSchema, added, event, new_book, removed, repriced, sqlite_store};

/// What a behaviour needs beyond the ports: the adapters' own settings, and ways to change
/// data behind the store's back.
trait Backdoor: Outbox {
    /// Makes the stored price of `book_id` something no `Price` can be.
    fn corrupt_price(&self, book_id: BookId) -> impl Future<Output = ()>;

    /// The store, deleting at most `events` per retention transaction.
    fn pruning_in_chunks_of(self, events: usize) -> Self;

    /// Makes the events at `positions` look committed in 2020.
    fn backdate_events(&self, positions: RangeInclusive<u64>) -> impl Future<Output = ()>;

    /// Makes every event look written with the schema of `fingerprint`, or, with `None`, saved
    /// by a version that did not record fingerprints.
    fn set_schema_fingerprints(&self, fingerprint: Option<u64>) -> impl Future<Output = ()>;
}

impl Backdoor for SqliteStore {
    async fn corrupt_price(&self, book_id: BookId) {
        sqlx::query("UPDATE books SET price = 'twelve' WHERE book_id = ?")
            .bind(book_id.to_string())
            .execute(self.pool())
            .await
            .expect("corrupt the price");
    }

    fn pruning_in_chunks_of(self, events: usize) -> Self {
        self.with_prune_chunk(events)
    }

    async fn backdate_events(&self, positions: RangeInclusive<u64>) {
        sqlx::query(
            "UPDATE events SET committed_at = '2020-01-01T00:00:00.000Z' \
             WHERE position BETWEEN ?1 AND ?2",
        )
        .bind(*positions.start() as i64)
        .bind(*positions.end() as i64)
        .execute(self.pool())
        .await
        .expect("backdate events");
    }

    async fn set_schema_fingerprints(&self, fingerprint: Option<u64>) {
        sqlx::query("UPDATE events SET schema_fingerprint = ?1")
            .bind(fingerprint.map(u64::cast_signed))
            .execute(self.pool())
            .await
            .expect("set the fingerprints");
    }
}

impl Backdoor for PostgresStore {
    async fn corrupt_price(&self, book_id: BookId) {
        // NUMERIC holds nothing unparsable; a negative price is what the schema forbids.
        sqlx::query("ALTER TABLE books DROP CONSTRAINT books_price_not_negative")
            .execute(self.pool())
            .await
            .expect("drop the price check");
        sqlx::query("UPDATE books SET price = -1 WHERE book_id = $1")
            .bind(book_id.as_uuid())
            .execute(self.pool())
            .await
            .expect("corrupt the price");
    }

    fn pruning_in_chunks_of(self, events: usize) -> Self {
        self.with_prune_chunk(events)
    }

    async fn backdate_events(&self, positions: RangeInclusive<u64>) {
        sqlx::query(
            "UPDATE events SET committed_at = '2020-01-01T00:00:00Z' \
             WHERE position BETWEEN $1 AND $2",
        )
        .bind(*positions.start() as i64)
        .bind(*positions.end() as i64)
        .execute(self.pool())
        .await
        .expect("backdate events");
    }

    async fn set_schema_fingerprints(&self, fingerprint: Option<u64>) {
        sqlx::query("UPDATE events SET schema_fingerprint = $1")
            .bind(fingerprint.map(u64::cast_signed))
            .execute(self.pool())
            .await
            .expect("set the fingerprints");
    }
}

macro_rules! store_suite {
    ($($behaviour:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let (store, _dir) = crate::fixtures::sqlite_store().await;
                    crate::$behaviour(store).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    crate::fixtures::with_postgres_store(crate::$behaviour).await;
                }
            )*
        }
    };
}

store_suite!(
    saved_book_loads_back_unchanged,
    read_stream_returns_the_streams_events_in_order_with_positions,
    list_books_excludes_removed_books_and_orders_by_title,
    stale_save_fails_with_conflict_and_writes_nothing,
    second_insert_of_the_same_new_book_conflicts,
    save_against_a_missing_book_conflicts,
    positions_are_gapless_and_increase_across_saves,
    read_after_pages_through_all_events_in_order,
    events_keep_the_fingerprint_of_the_schema_that_wrote_them,
    the_service_reads_no_event_written_with_another_schema,
    failed_save_rolls_back_completely_and_gives_its_positions_back,
    change_the_database_refuses_is_rejected_and_writes_nothing,
    corrupt_row_is_reported_as_corrupt,
    seed_book_through_the_service_writes_its_fact_and_delta_streams,
    command_that_changes_nothing_writes_no_events,
    published_position_starts_at_zero_and_never_moves_backwards,
    prune_deletes_only_published_events_past_retention,
    prune_keeps_what_a_lagging_relay_has_not_published,
    prune_in_chunks_deletes_exactly_what_retention_allows,
    prune_stops_at_the_first_event_inside_retention,
    lease_is_held_by_one_holder_until_released_or_expired,
    commit_signal_fires_after_a_save,
);

/// Everything the store holds that a failed save must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    head: u64,
    events: Vec<StoredEvent>,
    books: Vec<bookstore::domain::Book>,
}

async fn snapshot(store: &impl EventStore) -> Snapshot {
    Snapshot {
        head: store.head_position().await.unwrap(),
        events: store.read_after(0, usize::MAX).await.unwrap(),
        books: store.list_books().await.unwrap(),
    }
}

async fn saved_book_loads_back_unchanged<S: Backdoor>(store: S) {
    let mut book = new_book("Dune", "15.99");
    book.isbn = Some("9780441013593".to_owned());
    book.description = Some("Spice.\nSand worms.".to_owned());

    let events = store.save(added(&book)).await.unwrap();

    assert_eq!(
        store.load_book(book.book_id).await.unwrap(),
        Some(book.clone())
    );
    assert_eq!(store.load_book(BookId::generate()).await.unwrap(), None);
    assert_eq!(
        events.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(
        store
            .read_stream(&delta_stream(book.book_id))
            .await
            .unwrap(),
        events[..1]
    );
    assert_eq!(
        store.read_stream(&fact_stream(book.book_id)).await.unwrap(),
        events[1..]
    );
}

async fn read_stream_returns_the_streams_events_in_order_with_positions<S: Backdoor>(store: S) {
    let mut other = new_book("Other", "1.00");
    store.save(added(&other)).await.unwrap();
    let mut book = new_book("Emma", "5.00");
    let mut deltas = vec![store.save(added(&book)).await.unwrap().remove(0)];
    for price in ["6.00", "7.00", "8.00"] {
        let (next, change) = repriced(&book, price);
        deltas.push(store.save(change).await.unwrap().remove(0));
        book = next;
        // Another stream in between, so a stream's positions are not consecutive.
        let (next, change) = repriced(&other, price);
        store.save(change).await.unwrap();
        other = next;
    }

    let stream = store
        .read_stream(&delta_stream(book.book_id))
        .await
        .unwrap();

    assert_eq!(stream, deltas);
    assert_eq!(
        stream
            .iter()
            .map(|e| e.metadata.aggregate_version)
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(stream.windows(2).all(|w| w[0].position < w[1].position));
    assert!(
        store
            .read_stream("bookstore::book-none")
            .await
            .unwrap()
            .is_empty()
    );
}

async fn list_books_excludes_removed_books_and_orders_by_title<S: Backdoor>(store: S) {
    let b = new_book("B", "1.00");
    let a = new_book("A", "2.00");
    let c = new_book("C", "3.00");
    for book in [&b, &a, &c] {
        store.save(added(book)).await.unwrap();
    }
    let (c_removed, change) = removed(&c);
    store.save(change).await.unwrap();

    assert_eq!(store.list_books().await.unwrap(), [a, b]);
    // A removed book can still be loaded, marked removed.
    assert_eq!(store.load_book(c.book_id).await.unwrap(), Some(c_removed));
}

async fn stale_save_fails_with_conflict_and_writes_nothing<S: Backdoor>(store: S) {
    let book = new_book("Ulysses", "10.00");
    store.save(added(&book)).await.unwrap();
    let (_, first) = repriced(&book, "11.00");
    let (_, stale) = repriced(&book, "12.00");
    store.save(first).await.unwrap();
    let before = snapshot(&store).await;

    let error = store.save(stale).await.unwrap_err();

    assert!(
        matches!(
            error,
            StoreError::Conflict { book_id, expected: Some(1), actual: Some(2) }
                if book_id == book.book_id
        ),
        "{error:?}"
    );
    assert_eq!(snapshot(&store).await, before);
}

async fn second_insert_of_the_same_new_book_conflicts<S: Backdoor>(store: S) {
    let book = new_book("Beloved", "9.99");
    store.save(added(&book)).await.unwrap();
    let before = snapshot(&store).await;

    let error = store.save(added(&book)).await.unwrap_err();

    assert!(
        matches!(
            error,
            StoreError::Conflict {
                expected: None,
                actual: Some(1),
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(snapshot(&store).await, before);
}

async fn save_against_a_missing_book_conflicts<S: Backdoor>(store: S) {
    let (_, change) = repriced(&new_book("Nowhere", "1.00"), "2.00");

    let error = store.save(change).await.unwrap_err();

    assert!(
        matches!(
            error,
            StoreError::Conflict {
                expected: Some(1),
                actual: None,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 0);
}

/// The positions of the events the outbox still holds, in order.
async fn positions_in_outbox<S: Backdoor>(store: &S) -> Vec<u64> {
    let events = store.read_after(0, 100).await.unwrap();
    events.iter().map(|e| e.position).collect()
}

async fn positions_are_gapless_and_increase_across_saves<S: Backdoor>(store: S) {
    assert_eq!(store.head_position().await.unwrap(), 0);
    let mut positions = vec![];
    for n in 0..10 {
        let mut book = new_book(&format!("Book {n}"), "1.00");
        positions.extend(
            store
                .save(added(&book))
                .await
                .unwrap()
                .iter()
                .map(|e| e.position),
        );
        for price in ["2.00", "3.00"] {
            let (next, change) = repriced(&book, price);
            positions.extend(store.save(change).await.unwrap().iter().map(|e| e.position));
            book = next;
        }
    }

    assert_eq!(positions, (1..=60).collect::<Vec<u64>>());
    assert_eq!(store.head_position().await.unwrap(), 60);
}

async fn read_after_pages_through_all_events_in_order<S: Backdoor>(store: S) {
    let mut saved = vec![];
    for n in 0..8 {
        let book = new_book(&format!("Book {n}"), "1.00");
        saved.extend(store.save(added(&book)).await.unwrap());
        let (_, change) = repriced(&book, "2.00");
        saved.extend(store.save(change).await.unwrap());
    }

    let mut read = vec![];
    let mut last = 0;
    loop {
        let page = store.read_after(last, 7).await.unwrap();
        assert!(page.len() <= 7);
        let Some(tail) = page.last() else { break };
        last = tail.position;
        read.extend(page);
    }

    assert_eq!(read, saved);
    assert_eq!(last, store.head_position().await.unwrap());
    assert!(store.read_after(0, 0).await.unwrap().is_empty());
    assert!(store.read_after(u64::MAX, 10).await.unwrap().is_empty());
}

async fn events_keep_the_fingerprint_of_the_schema_that_wrote_them<S: Backdoor>(store: S) {
    let book = new_book("Dune", "15.99");
    let (_, change) = repriced(&book, "16.99");
    let mut saved = store.save(added(&book)).await.unwrap();
    saved.extend(store.save(change).await.unwrap());
    let fingerprints = |events: &[StoredEvent]| {
        events
            .iter()
            .map(|event| event.schema_fingerprint)
            .collect::<Vec<_>>()
    };
    // The fixture's fingerprints have the high bit set, which a signed column must keep.
    let expected = [1, 1, 2, 2].map(|version| Some(0xF00D_0000_0000_0000 | version));
    assert_eq!(fingerprints(&saved), expected);
    assert_eq!(store.read_after(0, 10).await.unwrap(), saved);
    assert_eq!(
        store.read_stream(&fact_stream(book.book_id)).await.unwrap(),
        [saved[1].clone(), saved[3].clone()]
    );

    // Saved by a version that did not record them: read back as unknown, all else unchanged.
    store.set_schema_fingerprints(None).await;
    let without: Vec<StoredEvent> = saved
        .into_iter()
        .map(|event| StoredEvent {
            schema_fingerprint: None,
            ..event
        })
        .collect();
    assert_eq!(store.read_after(0, 10).await.unwrap(), without);
    assert_eq!(
        store
            .read_stream(&delta_stream(book.book_id))
            .await
            .unwrap(),
        [without[0].clone(), without[2].clone()]
    );
}

async fn the_service_reads_no_event_written_with_another_schema<S: Backdoor>(store: S) {
    let (service, book_id) = service_with_gatsby(store).await;
    let stream = delta_stream(book_id);
    let read = service.read_stream(&stream).await.unwrap();
    let payload = read[0].payload.as_ref().unwrap().clone();

    // Saved before fingerprints were recorded: written with this version's schemas.
    service.store().set_schema_fingerprints(None).await;
    let legacy = service.read_stream(&stream).await.unwrap();
    assert_eq!(legacy[0].payload.as_ref().unwrap(), &payload);

    let older: u64 = 0x0123_4567_89ab_cdef;
    service.store().set_schema_fingerprints(Some(older)).await;
    let refused = service.read_stream(&stream).await.unwrap();
    assert_eq!(refused.len(), read.len(), "every event is still listed");
    assert_eq!(refused[0].event.position, read[0].event.position);
    match &refused[0].payload {
        Err(CodecError::WrittenWithAnotherSchema {
            event_type,
            written,
            ..
        }) => {
            assert_eq!(event_type, "BookAdded");
            assert_eq!(*written, older);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn failed_save_rolls_back_completely_and_gives_its_positions_back<S: Backdoor>(store: S) {
    store
        .save(added(&new_book("Before", "1.00")))
        .await
        .unwrap();
    let before = snapshot(&store).await;
    // Its second event repeats the first one's stream version: the insert of the events, the
    // last step of the transaction, fails after the book row and the head were written.
    let broken = new_book("Broken", "1.00");
    let mut change = added(&broken);
    let stream = delta_stream(broken.book_id);
    change.events[1] = event(stream, "BookAdded", broken.book_id, 1);

    let error = store.save(change).await.unwrap_err();

    assert!(matches!(error, StoreError::Conflict { .. }), "{error:?}");
    assert_eq!(snapshot(&store).await, before);
    assert_eq!(store.load_book(broken.book_id).await.unwrap(), None);
    let next = store.save(added(&new_book("After", "1.00"))).await.unwrap();
    assert_eq!(next.iter().map(|e| e.position).collect::<Vec<_>>(), [3, 4]);
}

/// A change that breaks a constraint (two events with one id) is the change's fault: `Rejected`,
/// which the API answers with 422, not an outage of the database.
async fn change_the_database_refuses_is_rejected_and_writes_nothing<S: Backdoor>(store: S) {
    store
        .save(added(&new_book("Before", "1.00")))
        .await
        .unwrap();
    let before = snapshot(&store).await;
    let twice = new_book("Twice", "1.00");
    let mut change = added(&twice);
    change.events[1].metadata.event_id = change.events[0].metadata.event_id;

    let error = store.save(change).await.unwrap_err();

    assert!(matches!(error, StoreError::Rejected(_)), "{error:?}");
    assert_eq!(snapshot(&store).await, before);
}

async fn corrupt_row_is_reported_as_corrupt<S: Backdoor>(store: S) {
    let book = new_book("Damaged", "1.00");
    store.save(added(&book)).await.unwrap();
    store.corrupt_price(book.book_id).await;

    let loaded = store.load_book(book.book_id).await;
    let listed = store.list_books().await;

    assert!(matches!(loaded, Err(StoreError::Corrupt(_))), "{loaded:?}");
    assert!(matches!(listed, Err(StoreError::Corrupt(_))), "{listed:?}");
}

fn price(text: &str) -> Price {
    text.parse().unwrap()
}

/// A service over `store` in which the book it returns was just added (`add_gatsby`).
async fn service_with_gatsby<S: EventStore>(store: S) -> (BookService<S, AvroCodec>, BookId) {
    let service = BookService::new(store, AvroCodec::new());
    let book_id = BookId::generate();
    service
        .execute(add_gatsby(book_id), CommandContext::default())
        .await
        .unwrap();
    (service, book_id)
}

fn add_gatsby(book_id: BookId) -> BookCommand {
    BookCommand::Add(AddBook {
        book_id,
        title: "The Great Gatsby".to_owned(),
        author: "F. Scott Fitzgerald".to_owned(),
        isbn: None,
        price: price("12.99"),
        description: None,
    })
}

async fn seed_book_through_the_service_writes_its_fact_and_delta_streams<S: Backdoor>(store: S) {
    let (service, book_id) = service_with_gatsby(store).await;
    let context = CommandContext::default;
    let update = BookCommand::UpdatePrice {
        book_id,
        price: price("15.99"),
    };
    service.execute(update, context()).await.unwrap();

    let facts = service.read_stream(&fact_stream(book_id)).await.unwrap();
    let deltas = service.read_stream(&delta_stream(book_id)).await.unwrap();

    assert_eq!(facts.len(), 2);
    let (last_fact, decoded) = (&facts[1].event, facts[1].payload.as_ref().unwrap());
    assert_eq!(last_fact.metadata.event_type, "BookFactEvent");
    assert_eq!(
        *decoded,
        EventPayload::Fact(BookFactEvent {
            book_id,
            title: "The Great Gatsby".to_owned(),
            author: "F. Scott Fitzgerald".to_owned(),
            isbn: None,
            price: price("15.99"),
            description: None,
            version: 2,
            removed: false,
        })
    );
    let delta_payloads: Vec<_> = deltas
        .iter()
        .map(|read| read.payload.as_ref().unwrap().clone())
        .collect();
    assert!(
        matches!(
            delta_payloads.as_slice(),
            [
                EventPayload::Delta(BookEvent::Added(BookAdded { price: added, .. })),
                EventPayload::Delta(BookEvent::PriceUpdated(BookPriceUpdated {
                    old_price,
                    new_price,
                    ..
                })),
            ] if *added == price("12.99") && *old_price == price("12.99")
                && *new_price == price("15.99")
        ),
        "{delta_payloads:?}"
    );
    // Each change wrote its delta, then its fact, at the next positions.
    let positions = |events: &[ReadEvent]| -> Vec<u64> {
        events.iter().map(|read| read.event.position).collect()
    };
    assert_eq!(positions(&deltas), [1, 3]);
    assert_eq!(positions(&facts), [2, 4]);
    // Each keeps the fingerprint of the schema that wrote it.
    for ReadEvent { event, .. } in deltas.iter().chain(&facts) {
        let contract = bookstore::codec::contract::contract(&event.metadata.event_type).unwrap();
        assert_eq!(event.schema_fingerprint, Some(contract.fingerprint()));
    }
}

async fn command_that_changes_nothing_writes_no_events<S: Backdoor>(store: S) {
    let (service, book_id) = service_with_gatsby(store).await;
    let same_price = BookCommand::UpdatePrice {
        book_id,
        price: price("12.99"),
    };

    let outcome = service
        .execute(same_price, CommandContext::default())
        .await
        .unwrap();

    assert!(outcome.events.is_empty());
    assert_eq!(outcome.state.map(|book| book.version), Some(1));
    assert_eq!(service.store().head_position().await.unwrap(), 2);
}

async fn published_position_starts_at_zero_and_never_moves_backwards<S: Backdoor>(store: S) {
    assert_eq!(store.published_position("relay").await.unwrap(), 0);

    store.record_published("relay", 5).await.unwrap();
    store.record_published("relay", 3).await.unwrap();
    assert_eq!(store.published_position("relay").await.unwrap(), 5);
    store.record_published("relay", 7).await.unwrap();

    assert_eq!(store.published_position("relay").await.unwrap(), 7);
    assert_eq!(store.published_position("other").await.unwrap(), 0);
}

async fn prune_deletes_only_published_events_past_retention<S: Backdoor>(store: S) {
    for n in 0..3 {
        store
            .save(added(&new_book(&format!("Book {n}"), "1.00")))
            .await
            .unwrap();
    }
    store.record_published("relay", 4).await.unwrap();
    // Past the timestamps' millisecond resolution, so "older than 0 s" holds for all six.
    tokio::time::sleep(Duration::from_millis(20)).await;

    let hour = Duration::from_secs(3600);
    assert_eq!(store.prune_published("relay", hour).await.unwrap(), 0);
    assert_eq!(
        store
            .prune_published("unknown", Duration::ZERO)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .prune_published("relay", Duration::ZERO)
            .await
            .unwrap(),
        4
    );

    let left = positions_in_outbox(&store).await;
    assert_eq!(left, [5, 6]);
    // Pruning frees no positions: the next save still continues after the head.
    assert_eq!(store.head_position().await.unwrap(), 6);
    let next = store.save(added(&new_book("After", "1.00"))).await.unwrap();
    assert_eq!(next[0].position, 7);
}

/// Two relays on one store (two topic prefixes, or `--relay-id`): the one ahead must not prune
/// what the other has still to publish, or that one would silently skip it.
async fn prune_keeps_what_a_lagging_relay_has_not_published<S: Backdoor>(store: S) {
    for n in 0..3 {
        store
            .save(added(&new_book(&format!("Book {n}"), "1.00")))
            .await
            .unwrap();
    }
    store.record_published("ahead", 6).await.unwrap();
    store.record_published("behind", 2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let left = || async {
        let events = store.read_after(0, 100).await.unwrap();
        events.iter().map(|e| e.position).collect::<Vec<u64>>()
    };

    assert_eq!(
        store
            .prune_published("ahead", Duration::ZERO)
            .await
            .unwrap(),
        2
    );
    assert_eq!(left().await, [3, 4, 5, 6]);
    assert_eq!(
        store
            .prune_published("behind", Duration::ZERO)
            .await
            .unwrap(),
        0
    );
    store.record_published("behind", 5).await.unwrap();
    assert_eq!(
        store
            .prune_published("behind", Duration::ZERO)
            .await
            .unwrap(),
        3
    );
    assert_eq!(left().await, [6]);
}

/// Retention deletes in chunks, each its own transaction (a run over millions of events would
/// otherwise be one). Together the chunks must delete exactly the old events before the first
/// one that has to stay, and never one past the lowest checkpoint.
async fn prune_in_chunks_deletes_exactly_what_retention_allows<S: Backdoor>(store: S) {
    let store = store.pruning_in_chunks_of(3);
    for n in 0..8 {
        store
            .save(added(&new_book(&format!("Book {n}"), "1.00")))
            .await
            .unwrap();
    }
    store.record_published("ahead", 16).await.unwrap();
    store.record_published("behind", 13).await.unwrap();
    // Commit times need not follow positions (on PostgreSQL a save's is when its transaction
    // began), so a young event can lie among old ones: 10 here. The run stops there. 14 is
    // old but above the lowest checkpoint; 15 and 16 are neither.
    store.backdate_events(1..=9).await;
    store.backdate_events(11..=14).await;
    let day = Duration::from_secs(24 * 3600);

    // 9 events: three full chunks, then one that starts with 10.
    assert_eq!(store.prune_published("ahead", day).await.unwrap(), 9);
    assert_eq!(
        positions_in_outbox(&store).await,
        [10, 11, 12, 13, 14, 15, 16]
    );
    assert_eq!(store.prune_published("ahead", day).await.unwrap(), 0);

    // Once 10 is old too, the run goes up to the lowest checkpoint: a full chunk, then one
    // that ends at 13.
    store.backdate_events(10..=10).await;
    assert_eq!(store.prune_published("ahead", day).await.unwrap(), 4);
    assert_eq!(positions_in_outbox(&store).await, [14, 15, 16]);

    // One event: a chunk that is not full ends the run.
    store.record_published("behind", 16).await.unwrap();
    assert_eq!(store.prune_published("behind", day).await.unwrap(), 1);
    assert_eq!(positions_in_outbox(&store).await, [15, 16]);
}

/// Retention stops at the first event inside retention instead of looking past it for old
/// ones: `committed_at` has no index, so looking past it would read every event inside
/// retention on every run (and on SQLite hold the write lock meanwhile). An old event after a
/// younger one, as clocks or a save whose transaction began earlier can leave, therefore
/// stays until the younger one is old too: retention errs on keeping.
async fn prune_stops_at_the_first_event_inside_retention<S: Backdoor>(store: S) {
    for n in 0..4 {
        store
            .save(added(&new_book(&format!("Book {n}"), "1.00")))
            .await
            .unwrap();
    }
    store.record_published("relay", 8).await.unwrap();
    store.backdate_events(1..=2).await;
    store.backdate_events(4..=8).await;
    let day = Duration::from_secs(24 * 3600);

    assert_eq!(store.prune_published("relay", day).await.unwrap(), 2);
    assert_eq!(positions_in_outbox(&store).await, [3, 4, 5, 6, 7, 8]);
    assert_eq!(store.prune_published("relay", day).await.unwrap(), 0);
    assert_eq!(positions_in_outbox(&store).await, [3, 4, 5, 6, 7, 8]);

    store.backdate_events(3..=3).await;
    assert_eq!(store.prune_published("relay", day).await.unwrap(), 6);
    assert!(positions_in_outbox(&store).await.is_empty());
}

async fn lease_is_held_by_one_holder_until_released_or_expired<S: Backdoor>(store: S) {
    let long = Duration::from_secs(30);
    assert!(store.try_acquire_lease("relay", "a", long).await.unwrap());
    assert!(!store.try_acquire_lease("relay", "b", long).await.unwrap());
    assert!(
        store.try_acquire_lease("relay", "a", long).await.unwrap(),
        "renewal"
    );
    store.release_lease("relay", "b").await.unwrap();
    assert!(
        !store.try_acquire_lease("relay", "b", long).await.unwrap(),
        "not b's to release"
    );
    store.release_lease("relay", "a").await.unwrap();
    assert!(store.try_acquire_lease("relay", "b", long).await.unwrap());

    // Long enough that the second call comes before it expires on a loaded machine.
    let short = Duration::from_secs(2);
    assert!(store.try_acquire_lease("other", "a", short).await.unwrap());
    assert!(!store.try_acquire_lease("other", "b", long).await.unwrap());
    tokio::time::sleep(short + Duration::from_millis(500)).await;
    assert!(
        store.try_acquire_lease("other", "b", long).await.unwrap(),
        "expired"
    );
}

async fn commit_signal_fires_after_a_save<S: Backdoor>(store: S) {
    let mut signal = store.commit_signal().await.unwrap();

    store
        .save(added(&new_book("Signal", "1.00")))
        .await
        .unwrap();

    tokio::time::timeout(Duration::from_secs(5), signal.committed())
        .await
        .expect("no commit signal within 5 s");
}

#[tokio::test]
async fn any_store_opens_a_file_path_as_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("any.db");
    let store = AnyStore::connect(path.to_str().unwrap()).await.unwrap();
    assert!(matches!(store, AnyStore::Sqlite(_)));
    let book = new_book("Any", "1.00");
    store.save(added(&book)).await.unwrap();
    // The file exists and a second store on it sees the book.
    let reopened = AnyStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(
        reopened.load_book(book.book_id).await.unwrap(),
        Some(book.clone())
    );
    // The scheme in any case names the same file (sqlx knows only "sqlite:", and took the
    // whole text for a file name).
    let reopened = AnyStore::connect(&format!("SQLite:{}", path.display()))
        .await
        .unwrap();
    assert_eq!(reopened.load_book(book.book_id).await.unwrap(), Some(book));
}

#[tokio::test]
async fn any_store_opens_a_postgres_url_as_postgres() {
    let schema = PgSchema::create().await;
    let store = AnyStore::connect(&schema.url()).await.unwrap();
    assert!(matches!(store, AnyStore::Postgres(_)));
    let book = new_book("Any", "1.00");
    store.save(added(&book)).await.unwrap();
    assert_eq!(store.load_book(book.book_id).await.unwrap(), Some(book));
    assert_eq!(store.head_position().await.unwrap(), 2);
    if let AnyStore::Postgres(store) = store {
        store.pool().close().await;
    }
    schema.drop().await;
}

#[tokio::test]
async fn any_store_rejects_other_urls() {
    let error = AnyStore::connect("mysql://localhost/bookstore")
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::UnsupportedUrl(_)), "{error:?}");
}

#[tokio::test]
async fn sqlite_store_runs_in_wal_mode_with_full_sync() {
    let (store, _dir) = sqlite_store().await;
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    assert_eq!(synchronous, 2, "FULL");
}

/// The relay sleeps on this channel: a commit must wake it with the new head, and a rolled
/// back save must not.
#[tokio::test]
async fn postgres_save_notifies_its_last_position_on_commit_only() {
    let schema = PgSchema::create().await;
    // One connection, so every notification from its backend is one of this store's saves.
    let store = schema.store_with_pool(1).await;
    let saver: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let mut listener = PgListener::connect_with(&schema.pool(1).await)
        .await
        .unwrap();
    listener.listen(OUTBOX_CHANNEL).await.unwrap();

    store.save(added(&new_book("First", "1.00"))).await.unwrap();
    let broken = new_book("Broken", "1.00");
    let mut change = added(&broken);
    change.events[1] = event(delta_stream(broken.book_id), "BookAdded", broken.book_id, 1);
    store.save(change).await.unwrap_err();
    store
        .save(added(&new_book("Second", "1.00")))
        .await
        .unwrap();

    let mut payloads = vec![];
    while payloads.len() < 2 {
        let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("no notification within 5 s")
            .unwrap();
        if notification.process_id() == saver as u32 {
            payloads.push(notification.payload().to_owned());
        }
    }
    assert_eq!(payloads, ["2", "4"]);
    store.pool().close().await;
    schema.drop().await;
}

/// The relay may not wait for commits for a long while (it retries a Kafka outage, say). The
/// listening session must still hand every notification over at once; otherwise it stalls
/// writing them to its client, and PostgreSQL's notification queue grows with every save until
/// commits fail. In a database of its own, so the burst wakes no other test's listener.
#[tokio::test]
async fn postgres_commit_signal_takes_notifications_while_nobody_waits_for_it() {
    let database = PgDatabase::create("").await;
    let application = common::unique("listener");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(database.options().application_name(&application))
        .await
        .unwrap();
    let store = PostgresStore::with_pool(pool).await.unwrap();
    let signal = store.commit_signal().await.unwrap();
    let session = |query: &'static str| {
        let application = application.clone();
        let admin = database.admin().clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>)>(query)
                .bind(application)
                .fetch_one(&admin)
                .await
                .unwrap()
        }
    };
    let (listening, _) = session(
        "SELECT query, wait_event FROM pg_stat_activity
         WHERE application_name = $1 AND query LIKE 'LISTEN%'",
    )
    .await;
    assert_eq!(listening, format!("LISTEN \"{OUTBOX_CHANNEL}\""));
    let listener_state = "SELECT query, wait_event FROM pg_stat_activity
                          WHERE application_name = $1 AND query LIKE '%LISTEN%'";

    // About 40 MB, far more than the socket buffers between the session and its client hold.
    sqlx::query(
        "SELECT count(pg_notify($1, i::text || repeat('x', 7000)))
         FROM generate_series(1, 6000) AS i",
    )
    .bind(OUTBOX_CHANNEL)
    .execute(store.pool())
    .await
    .unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, wait_event) = session(listener_state).await;
        if wait_event.as_deref() == Some("ClientRead") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the listening session is stuck in {wait_event:?}, not idle waiting for its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Dropping the signal ends the listening: its session stops listening.
    drop(signal);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while session(listener_state).await.0 != "UNLISTEN *" {
        assert!(
            std::time::Instant::now() < deadline,
            "still listening after the signal was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.pool().close().await;
    database.drop().await;
}

/// The backend pid of the session of `application` whose last query was a LISTEN, if any.
async fn listening_session(pool: &sqlx::PgPool, application: &str) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
    )
    .bind(application)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// Waits (10 s at most) until a session of `application` other than `first` listens.
async fn wait_until_another_session_listens(pool: &sqlx::PgPool, application: &str, first: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while listening_session(pool, application)
        .await
        .is_none_or(|pid| pid == first)
    {
        assert!(std::time::Instant::now() < deadline, "nobody listens again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A listening session that dies (a restart, a network cut, here terminated by hand) is
/// replaced: the signal wakes the relay at once, so it polls over the gap, and commits after the
/// new session listens wake it again.
#[tokio::test]
async fn postgres_commit_signal_listens_again_after_its_session_died() {
    let schema = PgSchema::create().await;
    let application = common::unique("listener");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(schema.options().application_name(&application))
        .await
        .unwrap();
    let store = PostgresStore::with_pool(pool).await.unwrap();
    let mut signal = store.commit_signal().await.unwrap();
    let first = listening_session(store.pool(), &application)
        .await
        .expect("a listening session");

    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(terminated);
    // The relay is woken so that it polls over the gap: as the session breaks, or once a new
    // one listens (when the break shows only as a closed connection, sqlx listens again on
    // its own before saying so).
    tokio::time::timeout(Duration::from_secs(5), signal.committed())
        .await
        .expect("the broken listener wakes the relay, so that it polls");
    wait_until_another_session_listens(store.pool(), &application, first).await;
    // Any wake-up for listening again, then quiet: a wake-up left pending would pass the last
    // check by itself.
    let quiet = std::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::timeout(Duration::from_millis(500), signal.committed())
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < quiet,
            "wake-ups without commits"
        );
    }
    store.save(added(&new_book("After", "1.00"))).await.unwrap();

    tokio::time::timeout(Duration::from_secs(5), signal.committed())
        .await
        .expect("a commit after listening again wakes the relay");
    drop(signal);
    store.pool().close().await;
    schema.drop().await;
}

/// A save given up while its `BEGIN` is on its way (a client that went away, a timeout) leaves
/// no transaction open on the connection it gives back: the next statements on that connection
/// commit as usual. (sqlx 0.9.0 returned it inside the transaction, so they never did.)
#[tokio::test]
async fn a_postgres_save_given_up_during_its_begin_leaves_no_transaction_behind() {
    let database = PgDatabase::create("").await;
    let direct = database.options();
    let (proxy, proxied) = common::freezing_proxy::FreezingProxy::in_front_of(direct.clone()).await;
    // One connection, lent without a ping: the save's BEGIN is the first thing it sends.
    let through_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(proxied)
        .await
        .unwrap();
    let store = PostgresStore::with_pool(through_proxy.clone())
        .await
        .unwrap();
    // Back in the pool (the migrations' connection is checked on its way back), so that the
    // save is not held waiting for it.
    while through_proxy.num_idle() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    proxy.hold();
    let save = store.save(added(&new_book("Given up", "1.00")));
    let given_up = tokio::time::timeout(Duration::from_millis(300), save).await;
    assert!(
        given_up.is_err(),
        "the save finished while held: {given_up:?}"
    );
    proxy.release();

    assert!(
        store
            .try_acquire_lease("given-up", "relay-a", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let observer = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(direct)
        .await
        .unwrap();
    let holders: Vec<String> =
        sqlx::query_scalar("SELECT holder FROM relay_lease WHERE name = 'given-up'")
            .fetch_all(&observer)
            .await
            .unwrap();
    assert_eq!(holders, ["relay-a"], "the lease was not committed");
    assert_eq!(
        store.head_position().await.unwrap(),
        0,
        "the save was given up"
    );
    observer.close().await;
    drop(store);
    database.drop().await;
}

/// A listening session whose connection dies without a word (a NAT gateway that forgot it, a
/// failover that moved the address) is not listened to for good: once silent for the check's
/// time it must answer a query, and when it does not, the relay is woken and a new session
/// listens. Through a proxy that stops passing bytes on the connections it has while keeping
/// them open, which is what such a death looks like to the client. In a database of its own, so
/// that no other test's saves notify it.
#[tokio::test]
async fn postgres_commit_signal_replaces_a_session_that_stopped_answering() {
    let database = PgDatabase::create("").await;
    let direct = database.options();
    let (proxy, proxied) = common::freezing_proxy::FreezingProxy::in_front_of(direct.clone()).await;
    let application = common::unique("listener");
    let through_proxy = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect_with(proxied.application_name(&application))
        .await
        .unwrap();
    let check = ListenerCheck {
        silent_for: Duration::from_secs(1),
        answer_within: Duration::from_secs(1),
    };
    let listening_store = PostgresStore::with_pool(through_proxy)
        .await
        .unwrap()
        .with_listener_check(check);
    let mut signal = listening_store.commit_signal().await.unwrap();
    let saving_store = PostgresStore::with_pool(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(direct)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    // The check's query, answered, leaves the session as it was.
    tokio::time::sleep(check.silent_for * 3).await;
    saving_store
        .save(added(&new_book("Before", "1.00")))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), signal.committed())
        .await
        .expect("a commit wakes the relay");
    let first = listening_session(saving_store.pool(), &application)
        .await
        .expect("a listening session");

    proxy.freeze();
    saving_store
        .save(added(&new_book("Unheard", "1.00")))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), signal.committed())
        .await
        .expect("a session that stopped answering wakes the relay, so that it polls");
    wait_until_another_session_listens(saving_store.pool(), &application, first).await;
    // Any wake-up for listening again first, so that the last one is the commit's.
    while tokio::time::timeout(Duration::from_millis(500), signal.committed())
        .await
        .is_ok()
    {}
    saving_store
        .save(added(&new_book("After", "1.00")))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), signal.committed())
        .await
        .expect("a commit after listening again wakes the relay");

    drop(signal);
    drop(proxy);
    listening_store.pool().close().await;
    saving_store.pool().close().await;
    database.drop().await;
}

/// A database in LATIN1 cannot hold every character a title may have. Saving one fails with
/// PostgreSQL's 22P05, which is the request's fault: `Rejected`, answered with 422 and what the
/// database said, not 503 "the database does not answer".
#[tokio::test]
async fn postgres_a_character_the_database_encoding_lacks_is_refused_as_the_clients_fault() {
    let database =
        PgDatabase::create("ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
            .await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(database.options())
        .await
        .unwrap();
    let store = PostgresStore::with_pool(pool).await.unwrap();
    let mut greek = new_book("Ἰλιάς", "1.00");

    let error = store.save(added(&greek)).await.unwrap_err();

    assert!(
        matches!(&error, StoreError::Rejected(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("22P05")),
        "{error:?}"
    );
    assert!(error.to_string().contains("LATIN1"), "{error}");
    assert_eq!(store.head_position().await.unwrap(), 0);
    greek.title = "Iliad, épopée".to_owned();
    store.save(added(&greek)).await.unwrap();

    let (status, body) = post_book(
        store.clone(),
        serde_json::json!({"title": "Ἰλιάς", "author": "Homer", "price": "9.99"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("LATIN1"), "{body}");
    store.pool().close().await;
    database.drop().await;
}

/// POSTs `book` to `/api/books` of `bookstore serve`'s router over `store`; the status and body.
async fn post_book(store: PostgresStore, book: serde_json::Value) -> (u16, String) {
    use bookstore::http::{self, HttpState};
    let metrics = bookstore::telemetry::prometheus_handle().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/books", listener.local_addr().unwrap());
    let (trigger, shutdown) = bookstore::shutdown::ShutdownTrigger::new();
    let router = http::router(HttpState::new(store, metrics));
    let server = tokio::spawn(http::serve(listener, router, shutdown));
    let reply = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut response = agent
            .post(&url)
            .header("content-type", "application/json")
            .send(book.to_string())
            .unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap())
    })
    .await
    .unwrap();
    trigger.trigger();
    server.await.unwrap().unwrap();
    reply
}

/// A session that stops inside a transaction (a client frozen after taking the head row's lock)
/// must not hold up every save for good: the store's sessions end such a transaction after
/// 60 s, unless the URL, the role or the database chose a timeout of their own.
#[tokio::test]
async fn postgres_store_sessions_end_a_transaction_left_idle() {
    let schema = PgSchema::create().await;
    let timeout = |pool: sqlx::PgPool| async move {
        let value: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        value
    };

    let AnyStore::Postgres(store) = AnyStore::connect(&schema.url()).await.unwrap() else {
        panic!("a postgres:// URL opens PostgreSQL");
    };
    assert_eq!(timeout(store.pool().clone()).await, "1min");
    let chosen = schema
        .options()
        .options([("idle_in_transaction_session_timeout", "5s")]);
    let store = PostgresStore::connect_with_options(chosen).await.unwrap();
    assert_eq!(timeout(store.pool().clone()).await, "5s");
    schema.drop().await;
}

/// SQLite's outbox read has a path of its own (`sqlite_reader`); a row it cannot read is
/// corrupt data, reported as such, and the rows before it still read.
#[tokio::test]
async fn sqlite_outbox_read_reports_a_corrupt_event_row_as_corrupt() {
    let (store, _dir) = sqlite_store().await;
    store.save(added(&new_book("First", "1.00"))).await.unwrap();
    store
        .save(added(&new_book("Second", "2.00")))
        .await
        .unwrap();
    sqlx::query("UPDATE events SET occurred_at = 'last Tuesday' WHERE position = 3")
        .execute(store.pool())
        .await
        .unwrap();

    let everything = store.read_after(0, 10).await;
    let before = store.read_after(0, 2).await.unwrap();

    assert!(
        matches!(&everything, Err(StoreError::Corrupt(reason)) if reason.contains("occurred_at")),
        "{everything:?}"
    );
    assert_eq!(
        before.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2]
    );
}

/// On PostgreSQL a retention run must not be one transaction either: each chunk is a DELETE
/// of its own, committed on its own, as a trigger logging every DELETE statement's
/// transaction and row count shows.
#[tokio::test]
async fn postgres_prune_deletes_each_chunk_in_a_transaction_of_its_own() {
    let schema = PgSchema::create().await;
    let store = schema.store().await.with_prune_chunk(3);
    for n in 0..4 {
        store
            .save(added(&new_book(&format!("Book {n}"), "1.00")))
            .await
            .unwrap();
    }
    store.record_published("relay", 8).await.unwrap();
    for statement in [
        "CREATE TABLE delete_log (id BIGSERIAL PRIMARY KEY, xact BIGINT, deleted BIGINT)",
        "CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             INSERT INTO delete_log (xact, deleted) SELECT txid_current(), count(*) FROM gone; \
             RETURN NULL; END $$",
        "CREATE TRIGGER events_deleted AFTER DELETE ON events REFERENCING OLD TABLE AS gone \
             FOR EACH STATEMENT EXECUTE FUNCTION log_delete()",
    ] {
        sqlx::query(statement).execute(store.pool()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;

    assert_eq!(
        store
            .prune_published("relay", Duration::ZERO)
            .await
            .unwrap(),
        8
    );

    let log: Vec<(i64, i64)> = sqlx::query_as("SELECT xact, deleted FROM delete_log ORDER BY id")
        .fetch_all(store.pool())
        .await
        .unwrap();
    let deleted: Vec<i64> = log.iter().map(|(_, deleted)| *deleted).collect();
    assert_eq!(deleted, [3, 3, 2]);
    let transactions: std::collections::HashSet<i64> = log.iter().map(|(xact, _)| *xact).collect();
    assert_eq!(transactions.len(), 3, "{log:?}");
    store.pool().close().await;
    schema.drop().await;
}

/// SQLite has one writer: a retention run over a large backlog must not hold the write lock
/// from start to end, or every save waits for it (and fails after the 10 s busy timeout). A
/// save from another connection, as from another process, commits while the run goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_save_commits_while_a_large_prune_runs() {
    const EVENTS: i64 = 100_000;
    let (store, dir) = sqlite_store().await;
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO events (position, event_id, event_type, stream, stream_version,
                             aggregate_id, occurred_at, correlation_id, causation_id, payload,
                             committed_at)
         SELECT i, printf('00000000-0000-4000-8000-%012d', i), 'BookAdded',
                printf('bookstore::book-%d', i), 1, '00000000-0000-4000-8000-000000000000',
                '2020-01-01T00:00:00.000Z', '00000000-0000-4000-8000-000000000000',
                '00000000-0000-4000-8000-000000000000', x'00', '2020-01-01T00:00:00.000Z'
         FROM n",
    )
    .bind(EVENTS)
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query("UPDATE outbox_head SET last_position = ?1")
        .bind(EVENTS)
        .execute(store.pool())
        .await
        .unwrap();
    store
        .record_published("relay", EVENTS as u64)
        .await
        .unwrap();
    let other_process = SqliteStore::connect(dir.path().join("bookstore.db").to_str().unwrap())
        .await
        .unwrap();

    let prune = tokio::spawn({
        let store = store.clone().with_prune_chunk(5_000);
        async move { store.prune_published("relay", Duration::ZERO).await }
    });
    let events_left = || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE position <= ?1")
            .bind(EVENTS)
            .fetch_one(other_process.pool())
            .await
            .unwrap();
        left
    };
    // The run has begun: its first chunk is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events_left().await == EVENTS {
        assert!(
            std::time::Instant::now() < deadline,
            "the prune never began"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let saved = other_process
        .save(added(&new_book("Meanwhile", "1.00")))
        .await
        .unwrap();

    assert!(
        events_left().await > 0,
        "the save waited for the whole retention run"
    );
    assert_eq!(prune.await.unwrap().unwrap(), EVENTS as u64);
    let positions: Vec<u64> = saved.iter().map(|e| e.position).collect();
    assert_eq!(positions, [EVENTS as u64 + 1, EVENTS as u64 + 2]);
    assert_eq!(store.read_after(0, 10).await.unwrap(), saved);
}

/// SQLite keeps no queue for its write lock: a writer that finds it taken sleeps in its busy
/// handler (1, 2, 5, … up to 100 ms a try) and tries again. Against a writer that takes the
/// lock back to back, as a projection catching up does, it kept waking into the next
/// transaction (saves waited up to a second behind 20 ms batches, and here until the busy
/// timeout). Writers of one store take turns in arrival order, so a save waits for the
/// transaction in progress and nothing after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_save_is_not_overtaken_by_a_writer_taking_the_lock_back_to_back() {
    let (store, _dir) = sqlite_store().await;
    let committed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let busy = tokio::spawn({
        let (store, committed, stop) = (store.clone(), committed.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                // `BEGIN IMMEDIATE`: the write lock is held from here to the commit.
                let transaction = store.begin_write().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                transaction.commit().await.unwrap();
                committed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    while committed.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    for title in ["One", "Two", "Three", "Four", "Five"] {
        let before = committed.load(Ordering::Relaxed);
        let saved = tokio::time::timeout(
            Duration::from_secs(5),
            store.save(added(&new_book(title, "1.00"))),
        )
        .await
        .expect("the save waited more than 5 s");
        saved.unwrap();
        let waited = committed.load(Ordering::Relaxed) - before;
        // The transaction in progress, and one more if the save arrived just as it committed.
        assert!(
            waited <= 2,
            "the save of {title} waited for {waited} transactions of the busy writer"
        );
    }
    stop.store(true, Ordering::Relaxed);
    busy.await.unwrap();
}

/// Saves queued behind a long write must not take every connection of the pool while they
/// wait, or reads, which WAL never makes wait for the writer, have nothing to run on. Waiting
/// for their turn, saves hold no connection; waiting in SQLite's busy handler, each held one,
/// and ten of them (the pool's size) held a read off until the write ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reads_go_on_while_saves_queue_behind_a_long_write() {
    let (store, _dir) = sqlite_store().await;
    let book = new_book("Read meanwhile", "1.00");
    store.save(added(&book)).await.unwrap();
    let long_write = store.begin_write().await.unwrap();
    let queued: Vec<_> = (0..20)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .save(added(&new_book(&format!("Queued {n}"), "1.00")))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let read = tokio::time::timeout(Duration::from_secs(2), store.load_book(book.book_id))
        .await
        .expect("the read waited for a connection behind the queued saves");
    assert_eq!(read.unwrap(), Some(book));
    assert!(queued.iter().all(|save| !save.is_finished()));
    long_write.commit().await.unwrap();
    for save in queued {
        save.await.unwrap().unwrap();
    }
}

/// `bookstore serve` and `bookstore relay` may run as separate processes on one SQLite file.
/// A save through another store on the file (as from another process: its own connections and
/// its own in-process signal) wakes the relay's signal too, which only the watch of the file's
/// data version can do.
#[tokio::test]
async fn sqlite_commit_signal_fires_after_another_process_saves() {
    let (store, dir) = sqlite_store().await;
    let other_process = SqliteStore::connect(dir.path().join("bookstore.db").to_str().unwrap())
        .await
        .unwrap();
    let mut signal = store.commit_signal().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), signal.committed())
            .await
            .is_err(),
        "signalled with nothing committed"
    );

    other_process
        .save(added(&new_book("Elsewhere", "1.00")))
        .await
        .unwrap();

    tokio::time::timeout(Duration::from_secs(5), signal.committed())
        .await
        .expect("no commit signal within 5 s of another process's save");
}

/// A database that is not a file is read through the pool instead of the reader of its own.
#[tokio::test]
async fn an_in_memory_sqlite_store_reads_its_outbox_too() {
    let store = SqliteStore::connect("sqlite::memory:").await.unwrap();
    let saved = store.save(added(&new_book("Kept", "1.00"))).await.unwrap();

    let read = store.read_after(0, 10).await.unwrap();

    assert_eq!(read, saved);
}
