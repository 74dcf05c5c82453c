//! Store append throughput (`EventStore::save`), one writer and N, against raw SQL doing the
//! same work in the same kind of transaction: the book row written, both events inserted in one
//! statement, on the same tables with the same indexes and durability settings, but positions
//! taken from an in-process counter instead of the `outbox_head` row (and no NOTIFY). The ratio
//! is thus the price of gapless commit-ordered positions plus the store's own code. Like
//! `benches/store_append.rs`: every book is added, then repriced; changes are built and encoded
//! before the clock starts. Each variant runs on a fresh store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sqlx::{Postgres, QueryBuilder, Sqlite};
use tokio::task::JoinSet;

use super::stores::StoreFactory;
use super::workload::{Appended, Workload, join_writers, save_all, split_among};
use super::{BenchConfig, BenchError, BenchReport, Figure, StoreKind, Unit};
use crate::store::{AnyStore, BookChange, PostgresStore, SqliteStore};

pub async fn measure(
    config: &BenchConfig,
    factory: &mut StoreFactory,
    kind: StoreKind,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let workload = Workload::new(config.updates_per_book);
    let books = workload.books_for(config.append_events);
    let mut concurrency = vec![1, config.writers];
    concurrency.dedup();
    for writers in concurrency {
        let store = factory.fresh(kind).await?;
        let saved = save_all(&store.store, workload.histories(books)?, writers).await?;
        let raw_store = factory.fresh(kind).await?;
        let raw = raw_save_all(&raw_store.store, workload.histories(books)?, writers).await?;
        report.push(
            Figure::new(
                format!("{kind}_append_x{writers}"),
                format!("store append, save ×{writers}"),
                saved.events_per_second(),
                Unit::EventsPerSecond,
            )
            .store(kind)
            .detail(format!("{:.0} saves/s", saved.saves_per_second()))
            .against(
                "raw SQL, same rows, no outbox_head",
                raw.events_per_second(),
                Some(format!("{:.0} saves/s", raw.saves_per_second())),
            ),
        );
    }
    Ok(())
}

/// [`save_all`] with raw SQL instead of the store.
async fn raw_save_all(
    store: &AnyStore,
    histories: Vec<Vec<BookChange>>,
    tasks: usize,
) -> Result<Appended, BenchError> {
    let per_task = split_among(histories, tasks);
    let positions = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for changes in per_task {
        let store = store.clone();
        let positions = positions.clone();
        writers.spawn(async move {
            let mut done = Appended::default();
            for change in changes {
                let count = change.events.len() as u64;
                let first = positions.fetch_add(count, Ordering::Relaxed) + 1;
                match &store {
                    AnyStore::Sqlite(store) => raw_save_sqlite(store, &change, first).await?,
                    AnyStore::Postgres(store) => raw_save_postgres(store, &change, first).await?,
                }
                done.count(count);
            }
            Ok::<_, BenchError>(done)
        });
    }
    join_writers(writers, started).await
}

const SQLITE_INSERT_BOOK: &str =
    "INSERT INTO books (book_id, title, author, isbn, price, description, version, removed)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (book_id) DO NOTHING";
const SQLITE_UPDATE_BOOK: &str = "UPDATE books
     SET title = ?2, author = ?3, isbn = ?4, price = ?5, description = ?6, version = ?7,
         removed = ?8, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
     WHERE book_id = ?1 AND version = ?9";
const INSERT_EVENTS: &str =
    "INSERT INTO events (position, event_id, event_type, stream, stream_version, aggregate_id,
                         occurred_at, correlation_id, causation_id, traceparent, payload,
                         schema_fingerprint) ";

async fn raw_save_sqlite(
    store: &SqliteStore,
    change: &BookChange,
    first: u64,
) -> Result<(), BenchError> {
    let book = &change.state;
    let mut tx = store.pool().begin_with("BEGIN IMMEDIATE").await?;
    let sql = match change.expected_version {
        None => SQLITE_INSERT_BOOK,
        Some(_) => SQLITE_UPDATE_BOOK,
    };
    let mut query = sqlx::query(sql)
        .bind(book.book_id.as_uuid().hyphenated())
        .bind(book.title.as_str())
        .bind(book.author.as_str())
        .bind(book.isbn.as_deref())
        .bind(book.price.to_string())
        .bind(book.description.as_deref())
        .bind(book.version as i64)
        .bind(book.removed);
    if let Some(expected) = change.expected_version {
        query = query.bind(expected as i64);
    }
    query.execute(&mut *tx).await?;
    let mut insert = QueryBuilder::<Sqlite>::new(INSERT_EVENTS);
    insert.push_values(
        change.events.iter().zip(first..),
        |mut row, (event, position)| {
            let meta = &event.metadata;
            row.push_bind(position as i64)
                .push_bind(meta.event_id.hyphenated())
                .push_bind(meta.event_type.as_str())
                .push_bind(meta.stream.as_str())
                .push_bind(meta.aggregate_version as i64)
                .push_bind(meta.aggregate_id.as_uuid().hyphenated())
                .push_bind(meta.occurred_at)
                .push_bind(meta.correlation_id.hyphenated())
                .push_bind(meta.causation_id.hyphenated())
                .push_bind(meta.traceparent.as_deref())
                .push_bind(event.payload.as_slice())
                .push_bind(event.schema_fingerprint.cast_signed());
        },
    );
    insert.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

const POSTGRES_INSERT_BOOK: &str =
    "INSERT INTO books (book_id, title, author, isbn, price, description, version, removed)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (book_id) DO NOTHING";
const POSTGRES_UPDATE_BOOK: &str = "UPDATE books
     SET title = $2, author = $3, isbn = $4, price = $5, description = $6, version = $7,
         removed = $8, updated_at = now()
     WHERE book_id = $1 AND version = $9";

async fn raw_save_postgres(
    store: &PostgresStore,
    change: &BookChange,
    first: u64,
) -> Result<(), BenchError> {
    let book = &change.state;
    let mut tx = store.pool().begin().await?;
    let sql = match change.expected_version {
        None => POSTGRES_INSERT_BOOK,
        Some(_) => POSTGRES_UPDATE_BOOK,
    };
    let mut query = sqlx::query(sql)
        .bind(book.book_id.as_uuid())
        .bind(book.title.as_str())
        .bind(book.author.as_str())
        .bind(book.isbn.as_deref())
        .bind(book.price.amount())
        .bind(book.description.as_deref())
        .bind(book.version as i64)
        .bind(book.removed);
    if let Some(expected) = change.expected_version {
        query = query.bind(expected as i64);
    }
    query.execute(&mut *tx).await?;
    let mut insert = QueryBuilder::<Postgres>::new(INSERT_EVENTS);
    insert.push_values(
        change.events.iter().zip(first..),
        |mut row, (event, position)| {
            let meta = &event.metadata;
            row.push_bind(position as i64)
                .push_bind(meta.event_id)
                .push_bind(meta.event_type.as_str())
                .push_bind(meta.stream.as_str())
                .push_bind(meta.aggregate_version as i64)
                .push_bind(meta.aggregate_id.as_uuid())
                .push_bind(meta.occurred_at)
                .push_bind(meta.correlation_id)
                .push_bind(meta.causation_id)
                .push_bind(meta.traceparent.as_deref())
                .push_bind(event.payload.as_slice())
                .push_bind(event.schema_fingerprint.cast_signed());
        },
    );
    insert.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}
