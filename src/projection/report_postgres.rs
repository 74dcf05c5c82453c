//! [`ReportStore`] for [`PostgresStore`]: the read model in the store's own schema.
//!
//! A batch runs in one READ COMMITTED transaction. Several projector instances apply batches at
//! the same time, normally for different books (a book's facts live on one partition, and a
//! partition has one owner). The exception is an instance that lost its partitions while
//! paused and wakes up with a stale batch: its version checks could then race with the new
//! owner's writes of the same book (a check reads no uncommitted deletion, then the insert
//! waits for and follows it). So a batch first takes a transaction-scoped advisory lock per
//! book it touches (one per bucket of books, see [`LOCK_BUCKETS`]), all in one statement and in
//! one global order (no deadlock); writes of one book are thereby serialised and every check
//! sees the last committed state. The rows themselves are written set-wise, a statement per
//! kind of change for the whole batch, not a round trip per book.

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    BatchPlan, BookReport, OffsetAdvance, PartitionOffset, ReportChange, ReportKey, ReportOrder,
    ReportStore, ReportTotals, check_positions,
};
use crate::domain::{BookFactEvent, BookId, Price};
use crate::store::{PostgresStore, StoreError, to_i64, to_u64};

/// The batch's locks (`lock_books`) and version guards are written for READ COMMITTED; a
/// database or role whose default is stricter would abort concurrent batches with
/// serialization failures, so the level is stated, as the store's saves state it.
const BEGIN_BATCH: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

impl ReportStore for PostgresStore {
    async fn apply_batch(
        &self,
        group: &str,
        topic: &str,
        changes: &[ReportChange],
        offsets: &[OffsetAdvance],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool().begin_with(BEGIN_BATCH).await?;
        // First, before any row is written: see `lock_offsets`.
        if !offsets.is_empty() {
            let stored = lock_offsets(&mut tx, group, topic, offsets).await?;
            let expected = offsets
                .iter()
                .map(|offset| (offset.partition, offset.stored));
            check_positions(group, topic, expected, &stored)?;
        }
        lock_books(&mut tx, changes).await?;
        let now = Utc::now().trunc_subsecs(6);
        let plan = BatchPlan::new(changes);
        upsert_all(&mut tx, &plan.upserts).await?;
        delete_all_at(&mut tx, &plan.deletes, now).await?;
        for change in plan.in_order {
            match change {
                ReportChange::Upsert { fact, changed_at } => {
                    upsert(&mut tx, fact, *changed_at).await?;
                }
                ReportChange::Delete {
                    book_id,
                    version: Some(version),
                } => delete_at(&mut tx, *book_id, *version, now).await?,
                ReportChange::Delete {
                    book_id,
                    version: None,
                } => delete_any(&mut tx, *book_id, now).await?,
            }
        }
        store_offsets(&mut tx, group, topic, offsets).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn stored_groups(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT DISTINCT consumer_group FROM projection_offsets ORDER BY consumer_group",
        )
        .fetch_all(self.pool())
        .await
        .map_err(read_failed)
    }

    async fn stored_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<PartitionOffset>, StoreError> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, next_offset FROM projection_offsets
             WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
        )
        .bind(group)
        .bind(topic)
        .fetch_all(self.pool())
        .await
        .map_err(read_failed)?;
        Ok(rows.into_iter().map(PartitionOffset::from).collect())
    }

    async fn list_reports(&self) -> Result<Vec<BookReport>, StoreError> {
        let rows: Vec<ReportRow> = sqlx::query_as(
            "SELECT book_id, title, author, price, isbn, version, updated_at
             FROM book_report ORDER BY title, book_id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(read_failed)?;
        rows.into_iter().map(ReportRow::into_report).collect()
    }

    async fn list_reports_page(
        &self,
        after: Option<&ReportKey>,
        limit: u32,
    ) -> Result<Vec<BookReport>, StoreError> {
        // Both read `book_report_listed_by_title` in order and stop after `limit` rows; the
        // row comparison is an index condition on it. Titles compare in the column's
        // collation, as they are ordered.
        let query = match after {
            None => sqlx::query_as(
                "SELECT book_id, title, author, price, isbn, version, updated_at
                 FROM book_report ORDER BY title, book_id LIMIT $1",
            )
            .bind(i64::from(limit)),
            Some(after) => sqlx::query_as(
                "SELECT book_id, title, author, price, isbn, version, updated_at
                 FROM book_report WHERE (title, book_id) > ($2, $3)
                 ORDER BY title, book_id LIMIT $1",
            )
            .bind(i64::from(limit))
            .bind(after.title.as_str())
            .bind(after.book_id.as_uuid()),
        };
        let rows: Vec<ReportRow> = query.fetch_all(self.pool()).await.map_err(read_failed)?;
        rows.into_iter().map(ReportRow::into_report).collect()
    }

    async fn list_reports_sorted(
        &self,
        order: ReportOrder,
        limit: u32,
    ) -> Result<Vec<BookReport>, StoreError> {
        let rows: Vec<ReportRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT book_id, title, author, price, isbn, version, updated_at
             FROM book_report ORDER BY {} LIMIT $1",
            order.sql("price")
        )))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(read_failed)?;
        rows.into_iter().map(ReportRow::into_report).collect()
    }

    async fn report_totals(&self) -> Result<ReportTotals, StoreError> {
        let (books, price_sum, last_change): (i64, Decimal, Option<DateTime<Utc>>) =
            sqlx::query_as(
                "SELECT count(*), coalesce(sum(price), 0), max(updated_at) FROM book_report",
            )
            .fetch_one(self.pool())
            .await
            .map_err(read_failed)?;
        Ok(ReportTotals {
            books: to_u64(books, "count of book_report")?,
            price_sum,
            last_change,
        })
    }

    async fn report(&self, book_id: BookId) -> Result<Option<BookReport>, StoreError> {
        let row: Option<ReportRow> = sqlx::query_as(
            "SELECT book_id, title, author, price, isbn, version, updated_at
             FROM book_report WHERE book_id = $1",
        )
        .bind(book_id.as_uuid())
        .fetch_optional(self.pool())
        .await
        .map_err(read_failed)?;
        row.map(ReportRow::into_report).transpose()
    }

    async fn reset(&self) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool().begin_with(BEGIN_BATCH).await?;
        // Waits for the batches that locked their positions already (a row-share lock on the
        // table) and holds off the others until the reset commits, when they find their
        // positions gone (see `lock_offsets`). Readers are not blocked.
        sqlx::query("LOCK TABLE projection_offsets IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM book_report")
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM book_report_deleted")
            .execute(&mut *tx)
            .await?;
        let mut groups: Vec<String> =
            sqlx::query_scalar("DELETE FROM projection_offsets RETURNING consumer_group")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        groups.sort_unstable();
        groups.dedup();
        Ok(groups)
    }
}

/// How many advisory locks stand for all books: a book's lock is the one of its bucket.
///
/// A lock per book made a batch of 5000 books take 5000 locks, and advisory locks live in the
/// server's shared lock table (`max_locks_per_transaction` × connections: 6400 by default), so
/// two instances applying large batches could exhaust it. With buckets, a batch takes at most
/// this many locks. Two books in one bucket are merely serialised, which is what keeps the
/// guarantee whatever the partitioning: writes of one book still never interleave. The cost is
/// that two instances applying large batches at once mostly wait for each other (as SQLite's
/// single writer makes them anyway); small batches at low load rarely share a bucket.
const LOCK_BUCKETS: u64 = 256;

/// The first key of the projection's advisory locks (the second is the bucket), so they
/// cannot collide with single-key advisory locks of anything else in the database.
const LOCK_NAMESPACE: i32 = 0x626b_7270; // "bkrp"

/// Takes the advisory lock of every book of `changes` (of its bucket), in ascending order, in
/// one round trip. Released at the end of the transaction.
async fn lock_books(conn: &mut PgConnection, changes: &[ReportChange]) -> Result<(), StoreError> {
    let mut buckets: Vec<i32> = changes
        .iter()
        .map(|change| lock_bucket(change.book_id()))
        .collect();
    buckets.sort_unstable();
    buckets.dedup();
    if buckets.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT pg_advisory_xact_lock($1, bucket)
         FROM (SELECT bucket FROM unnest($2::integer[]) WITH ORDINALITY AS b(bucket, n)
               ORDER BY n) AS buckets",
    )
    .bind(LOCK_NAMESPACE)
    .bind(buckets)
    .execute(conn)
    .await?;
    Ok(())
}

/// The advisory lock bucket of a book: its UUID folded to 64 bits, modulo [`LOCK_BUCKETS`].
fn lock_bucket(book_id: BookId) -> i32 {
    let (high, low) = book_id.as_uuid().as_u64_pair();
    // Below LOCK_BUCKETS (256), so it fits.
    ((high ^ low) % LOCK_BUCKETS) as i32
}

/// [`upsert`] for many books at once (each at most once, as `ON CONFLICT DO UPDATE` requires):
/// one statement over arrays instead of one round trip per book. Within one statement, every
/// part sees the same snapshot, exactly as the single-book statement does.
async fn upsert_all(
    conn: &mut PgConnection,
    upserts: &[(&BookFactEvent, DateTime<Utc>)],
) -> Result<(), StoreError> {
    if upserts.is_empty() {
        return Ok(());
    }
    let count = upserts.len();
    let mut book_ids = Vec::with_capacity(count);
    let mut titles = Vec::with_capacity(count);
    let mut authors = Vec::with_capacity(count);
    let mut prices = Vec::with_capacity(count);
    let mut isbns = Vec::with_capacity(count);
    let mut versions = Vec::with_capacity(count);
    let mut updated = Vec::with_capacity(count);
    for (fact, changed_at) in upserts {
        book_ids.push(fact.book_id.as_uuid());
        titles.push(fact.title.as_str());
        authors.push(fact.author.as_str());
        prices.push(fact.price.amount());
        isbns.push(fact.isbn.as_deref());
        versions.push(to_i64(fact.version, "fact version")?);
        updated.push(changed_at.trunc_subsecs(6));
    }
    sqlx::query(
        "WITH written AS (
             INSERT INTO book_report (book_id, title, author, price, isbn, version, updated_at)
             SELECT i.book_id, i.title, i.author, i.price, i.isbn, i.version, i.updated_at
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::numeric[], $5::text[],
                         $6::bigint[], $7::timestamptz[])
                  AS i(book_id, title, author, price, isbn, version, updated_at)
             WHERE NOT EXISTS (
                 SELECT 1 FROM book_report_deleted AS d
                 WHERE d.book_id = i.book_id AND d.version >= i.version)
             ON CONFLICT (book_id) DO UPDATE SET
                 title = excluded.title, author = excluded.author, price = excluded.price,
                 isbn = excluded.isbn, version = excluded.version,
                 updated_at = excluded.updated_at
             WHERE book_report.version < excluded.version
             RETURNING book_id, version)
         DELETE FROM book_report_deleted AS deleted USING written
         WHERE deleted.book_id = written.book_id AND deleted.version < written.version",
    )
    .bind(book_ids)
    .bind(titles)
    .bind(authors)
    .bind(prices)
    .bind(isbns)
    .bind(versions)
    .bind(updated)
    .execute(conn)
    .await?;
    Ok(())
}

/// [`delete_at`] for many books at once (each at most once), in one statement.
async fn delete_all_at(
    conn: &mut PgConnection,
    deletes: &[(BookId, u64)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if deletes.is_empty() {
        return Ok(());
    }
    let book_ids: Vec<Uuid> = deletes.iter().map(|(id, _)| id.as_uuid()).collect();
    let versions = deletes
        .iter()
        .map(|(_, version)| to_i64(*version, "deleted version"))
        .collect::<Result<Vec<i64>, _>>()?;
    sqlx::query(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::bigint[]) AS i(book_id, version)),
         remembered AS (
             INSERT INTO book_report_deleted (book_id, version, deleted_at)
             SELECT i.book_id, i.version, $3 FROM input AS i
             WHERE NOT EXISTS (
                 SELECT 1 FROM book_report AS r
                 WHERE r.book_id = i.book_id AND r.version > i.version)
             ON CONFLICT (book_id) DO UPDATE SET
                 version = excluded.version, deleted_at = excluded.deleted_at
             WHERE book_report_deleted.version < excluded.version)
         DELETE FROM book_report AS r USING input AS i
         WHERE r.book_id = i.book_id AND r.version <= i.version",
    )
    .bind(book_ids)
    .bind(versions)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes the fact's row unless the row or a remembered deletion is as new or newer; writing it
/// forgets an older deletion (the book exists again).
async fn upsert(
    conn: &mut PgConnection,
    fact: &BookFactEvent,
    changed_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH written AS (
             INSERT INTO book_report (book_id, title, author, price, isbn, version, updated_at)
             SELECT $1, $2, $3, $4, $5, $6, $7
             WHERE NOT EXISTS (
                 SELECT 1 FROM book_report_deleted WHERE book_id = $1 AND version >= $6)
             ON CONFLICT (book_id) DO UPDATE SET
                 title = excluded.title, author = excluded.author, price = excluded.price,
                 isbn = excluded.isbn, version = excluded.version,
                 updated_at = excluded.updated_at
             WHERE book_report.version < excluded.version
             RETURNING book_id)
         DELETE FROM book_report_deleted AS deleted USING written
         WHERE deleted.book_id = written.book_id AND deleted.version < $6",
    )
    .bind(fact.book_id.as_uuid())
    .bind(fact.title.as_str())
    .bind(fact.author.as_str())
    .bind(fact.price.amount())
    .bind(fact.isbn.as_deref())
    .bind(to_i64(fact.version, "fact version")?)
    .bind(changed_at.trunc_subsecs(6))
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the row unless it is newer than `version`, and remembers the deletion.
async fn delete_at(
    conn: &mut PgConnection,
    book_id: BookId,
    version: u64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH remembered AS (
             INSERT INTO book_report_deleted (book_id, version, deleted_at)
             SELECT $1, $2, $3
             WHERE NOT EXISTS (SELECT 1 FROM book_report WHERE book_id = $1 AND version > $2)
             ON CONFLICT (book_id) DO UPDATE SET
                 version = excluded.version, deleted_at = excluded.deleted_at
             WHERE book_report_deleted.version < excluded.version)
         DELETE FROM book_report WHERE book_id = $1 AND version <= $2",
    )
    .bind(book_id.as_uuid())
    .bind(to_i64(version, "deleted version")?)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the row whatever its version, remembering that version.
async fn delete_any(
    conn: &mut PgConnection,
    book_id: BookId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH gone AS (DELETE FROM book_report WHERE book_id = $1 RETURNING book_id, version)
         INSERT INTO book_report_deleted (book_id, version, deleted_at)
         SELECT book_id, version, $2 FROM gone
         ON CONFLICT (book_id) DO UPDATE SET
             version = excluded.version, deleted_at = excluded.deleted_at
         WHERE book_report_deleted.version < excluded.version",
    )
    .bind(book_id.as_uuid())
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores every partition's next offset in one statement.
/// The stored positions of `offsets`' partitions, locked until the batch ends.
///
/// The lock makes a batch and a reset run one after the other: `FOR UPDATE` also takes a
/// row-share lock on the table, even where no row matches, which conflicts with the reset's
/// `EXCLUSIVE` lock, so a batch after a reset sees its positions gone. Without it, a reset
/// could delete a row the batch is about to write and then queue for the position row the
/// batch holds: a deadlock, which PostgreSQL breaks by aborting one of them (a test shows it).
/// It comes first in the batch, before any write a reset's deletes could wait for.
async fn lock_offsets(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    offsets: &[OffsetAdvance],
) -> Result<Vec<PartitionOffset>, StoreError> {
    let partitions: Vec<i32> = offsets.iter().map(|offset| offset.partition).collect();
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM projection_offsets
         WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3)
         FOR UPDATE",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(PartitionOffset::from).collect())
}

async fn store_offsets(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    offsets: &[OffsetAdvance],
) -> Result<(), StoreError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = offsets.iter().map(|offset| offset.partition).collect();
    let next_offsets: Vec<i64> = offsets.iter().map(|offset| offset.next_offset).collect();
    sqlx::query(
        "INSERT INTO projection_offsets (consumer_group, topic, partition, next_offset, updated_at)
         SELECT $1, $2, partition, next_offset, now()
         FROM unnest($3::integer[], $4::bigint[]) AS o(partition, next_offset)
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET
             next_offset = excluded.next_offset, updated_at = excluded.updated_at",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .bind(next_offsets)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ReportRow {
    book_id: Uuid,
    title: String,
    author: String,
    price: Decimal,
    isbn: Option<String>,
    version: i64,
    updated_at: DateTime<Utc>,
}

impl ReportRow {
    fn into_report(self) -> Result<BookReport, StoreError> {
        let book_id = BookId::new(self.book_id);
        let price = Price::new(self.price).map_err(|error| {
            StoreError::Corrupt(format!(
                "report of book {book_id} has price {}: {error}",
                self.price
            ))
        })?;
        Ok(BookReport {
            book_id,
            title: self.title,
            author: self.author,
            price,
            isbn: self.isbn,
            version: to_u64(self.version, "book_report.version")?,
            updated_at: self.updated_at,
        })
    }
}

/// A value that does not decode is corrupt data, not an outage.
fn read_failed(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(error.to_string())
        }
        other => StoreError::Database(other),
    }
}
