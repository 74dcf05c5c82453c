//! [`ReportStore`] for [`SqliteStore`]: the read model in the store's own SQLite file.
//!
//! A batch runs in one `BEGIN IMMEDIATE` transaction, like the store's saves: SQLite has one
//! writer at a time, so batches of several projector instances simply queue, and the version
//! checks of one change can never interleave with another batch's writes. Values are stored as
//! the store stores them: hyphenated UUID text, canonical price text, RFC 3339 UTC timestamps.

use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use sqlx::SqliteConnection;
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use super::{
    BatchPlan, BookReport, OffsetAdvance, PartitionOffset, ReportChange, ReportKey, ReportOrder,
    ReportStore, ReportTotals, check_positions,
};
use crate::domain::{BookFactEvent, BookId, Price};
use crate::store::{SqliteStore, StoreError, to_i64, to_u64};

impl ReportStore for SqliteStore {
    async fn apply_batch(
        &self,
        group: &str,
        topic: &str,
        changes: &[ReportChange],
        offsets: &[OffsetAdvance],
    ) -> Result<(), StoreError> {
        // IMMEDIATE: the write lock from the start, so the positions checked first cannot
        // change (a reset takes the same lock) before the batch commits.
        let mut tx = self.begin_write().await?;
        if !offsets.is_empty() {
            let stored = select_offsets(&mut tx, group, topic).await?;
            let expected = offsets
                .iter()
                .map(|offset| (offset.partition, offset.stored));
            check_positions(group, topic, expected, &stored)?;
        }
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
        let mut conn = self.pool().acquire().await.map_err(read_failed)?;
        select_offsets(&mut conn, group, topic).await
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
        // row value comparison is a range on that index (SQLite 3.15+).
        let query = match after {
            None => sqlx::query_as(
                "SELECT book_id, title, author, price, isbn, version, updated_at
                 FROM book_report ORDER BY title, book_id LIMIT ?1",
            )
            .bind(i64::from(limit)),
            Some(after) => sqlx::query_as(
                "SELECT book_id, title, author, price, isbn, version, updated_at
                 FROM book_report WHERE (title, book_id) > (?2, ?3)
                 ORDER BY title, book_id LIMIT ?1",
            )
            .bind(i64::from(limit))
            .bind(after.title.as_str())
            .bind(after.book_id.as_uuid().hyphenated()),
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
             FROM book_report ORDER BY {} LIMIT ?1",
            // Prices are ordered as numbers, not as their text.
            order.sql("CAST(price AS REAL)")
        )))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(read_failed)?;
        rows.into_iter().map(ReportRow::into_report).collect()
    }

    async fn report_totals(&self) -> Result<ReportTotals, StoreError> {
        // Prices are canonical decimal text: summed as integer cents, exactly (a REAL sum
        // would round). `updated_at` is RFC 3339 UTC text as sqlx writes it (`+00:00`, the
        // fraction only when there is one), whose text order is its time order.
        let (books, cents, last_change): (i64, i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*),
                    coalesce(sum(CAST(round(CAST(price AS REAL) * 100) AS INTEGER)), 0),
                    max(updated_at)
             FROM book_report",
        )
        .fetch_one(self.pool())
        .await
        .map_err(read_failed)?;
        Ok(ReportTotals {
            books: to_u64(books, "count of book_report")?,
            price_sum: Decimal::new(cents, 2),
            last_change,
        })
    }

    async fn report(&self, book_id: BookId) -> Result<Option<BookReport>, StoreError> {
        let row: Option<ReportRow> = sqlx::query_as(
            "SELECT book_id, title, author, price, isbn, version, updated_at
             FROM book_report WHERE book_id = ?",
        )
        .bind(book_id.as_uuid().hyphenated())
        .fetch_optional(self.pool())
        .await
        .map_err(read_failed)?;
        row.map(ReportRow::into_report).transpose()
    }

    async fn reset(&self) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin_write().await?;
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

/// Rows per multi-row upsert statement: 7 parameters a row stays far below SQLite's limit of
/// 32,766, and a batch of a few thousand facts takes a handful of statements. Full chunks share
/// one cached prepared statement.
const UPSERT_CHUNK: usize = 256;

/// [`upsert`] for many books at once (each at most once): one multi-row statement per
/// [`UPSERT_CHUNK`] books instead of one or two per book. SQLite has one writer and sqlx runs
/// every statement through its worker thread, so the statements per batch, not the rows, are
/// what costs. (A JSON array unpacked with `json_each` does the same in one statement, but
/// SQLite parses each row's JSON again for every column it extracts: a quarter of the apply.)
async fn upsert_all(
    conn: &mut SqliteConnection,
    upserts: &[(&BookFactEvent, DateTime<Utc>)],
) -> Result<(), StoreError> {
    for chunk in upserts.chunks(UPSERT_CHUNK) {
        upsert_chunk(conn, chunk).await?;
    }
    Ok(())
}

async fn upsert_chunk(
    conn: &mut SqliteConnection,
    upserts: &[(&BookFactEvent, DateTime<Utc>)],
) -> Result<(), StoreError> {
    let rows = vec!["(?, ?, ?, ?, ?, ?, ?)"; upserts.len()].join(", ");
    let mut insert = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO book_report (book_id, title, author, price, isbn, version, updated_at)
         SELECT v.column1, v.column2, v.column3, v.column4, v.column5, v.column6, v.column7
         FROM (VALUES {rows}) AS v
         WHERE NOT EXISTS (
             SELECT 1 FROM book_report_deleted AS d
             WHERE d.book_id = v.column1 AND d.version >= v.column6)
         ON CONFLICT (book_id) DO UPDATE SET
             title = excluded.title, author = excluded.author, price = excluded.price,
             isbn = excluded.isbn, version = excluded.version, updated_at = excluded.updated_at
         WHERE book_report.version < excluded.version"
    )))
    .persistent(upserts.len() == UPSERT_CHUNK);
    for (fact, changed_at) in upserts {
        insert = insert
            .bind(fact.book_id.as_uuid().hyphenated())
            .bind(fact.title.as_str())
            .bind(fact.author.as_str())
            .bind(fact.price.to_string())
            .bind(fact.isbn.as_deref())
            .bind(to_i64(fact.version, "fact version")?)
            .bind(changed_at.trunc_subsecs(6));
    }
    insert.execute(&mut *conn).await?;
    // A newer fact than a remembered deletion: the book exists again. A row and a deletion of
    // one book never outlive a batch together (writing either removes the older other), so a
    // deletion older than the book's row now is exactly one the insert just overtook. The
    // remembered deletions are few, so they are what is scanned.
    let ids = vec!["?"; upserts.len()].join(", ");
    let mut forget = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM book_report_deleted
         WHERE book_id IN ({ids})
           AND version < (SELECT r.version FROM book_report AS r
                          WHERE r.book_id = book_report_deleted.book_id)"
    )))
    .persistent(upserts.len() == UPSERT_CHUNK);
    for (fact, _) in upserts {
        forget = forget.bind(fact.book_id.as_uuid().hyphenated());
    }
    forget.execute(&mut *conn).await?;
    Ok(())
}

/// [`delete_at`] for many books at once (each at most once), in two statements.
async fn delete_all_at(
    conn: &mut SqliteConnection,
    deletes: &[(BookId, u64)],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if deletes.is_empty() {
        return Ok(());
    }
    let rows = deletes
        .iter()
        .map(|(book_id, version)| Ok((book_id.as_uuid(), to_i64(*version, "deleted version")?)))
        .collect::<Result<Vec<(Uuid, i64)>, StoreError>>()?;
    let rows =
        serde_json::to_string(&rows).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    sqlx::query(
        "INSERT INTO book_report_deleted (book_id, version, deleted_at)
         SELECT j.value ->> 0, j.value ->> 1, ?2
         FROM json_each(?1) AS j
         WHERE NOT EXISTS (
             SELECT 1 FROM book_report AS r
             WHERE r.book_id = (j.value ->> 0) AND r.version > (j.value ->> 1))
         ON CONFLICT (book_id) DO UPDATE SET
             version = excluded.version, deleted_at = excluded.deleted_at
         WHERE book_report_deleted.version < excluded.version",
    )
    .bind(rows.as_str())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM book_report
         WHERE rowid IN (
             SELECT r.rowid FROM json_each(?1) AS j
             JOIN book_report AS r ON r.book_id = (j.value ->> 0)
             WHERE r.version <= (j.value ->> 1))",
    )
    .bind(rows.as_str())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes the fact's row unless the row or a remembered deletion is as new or newer.
async fn upsert(
    conn: &mut SqliteConnection,
    fact: &BookFactEvent,
    changed_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let version = to_i64(fact.version, "fact version")?;
    let written = sqlx::query(
        "INSERT INTO book_report (book_id, title, author, price, isbn, version, updated_at)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
         WHERE NOT EXISTS (
             SELECT 1 FROM book_report_deleted WHERE book_id = ?1 AND version >= ?6)
         ON CONFLICT (book_id) DO UPDATE SET
             title = excluded.title, author = excluded.author, price = excluded.price,
             isbn = excluded.isbn, version = excluded.version, updated_at = excluded.updated_at
         WHERE book_report.version < excluded.version",
    )
    .bind(fact.book_id.as_uuid().hyphenated())
    .bind(fact.title.as_str())
    .bind(fact.author.as_str())
    .bind(fact.price.to_string())
    .bind(fact.isbn.as_deref())
    .bind(version)
    .bind(changed_at.trunc_subsecs(6))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if written > 0 {
        // A newer fact than a remembered deletion: the book exists again.
        sqlx::query("DELETE FROM book_report_deleted WHERE book_id = ? AND version < ?")
            .bind(fact.book_id.as_uuid().hyphenated())
            .bind(version)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Deletes the row unless it is newer than `version`, and remembers the deletion.
async fn delete_at(
    conn: &mut SqliteConnection,
    book_id: BookId,
    version: u64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let version = to_i64(version, "deleted version")?;
    let id = book_id.as_uuid().hyphenated();
    sqlx::query(
        "INSERT INTO book_report_deleted (book_id, version, deleted_at)
         SELECT ?1, ?2, ?3
         WHERE NOT EXISTS (SELECT 1 FROM book_report WHERE book_id = ?1 AND version > ?2)
         ON CONFLICT (book_id) DO UPDATE SET
             version = excluded.version, deleted_at = excluded.deleted_at
         WHERE book_report_deleted.version < excluded.version",
    )
    .bind(id)
    .bind(version)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM book_report WHERE book_id = ? AND version <= ?")
        .bind(id)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Deletes the row whatever its version, remembering that version.
async fn delete_any(
    conn: &mut SqliteConnection,
    book_id: BookId,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let id = book_id.as_uuid().hyphenated();
    sqlx::query(
        "INSERT INTO book_report_deleted (book_id, version, deleted_at)
         SELECT book_id, version, ?2 FROM book_report WHERE book_id = ?1
         ON CONFLICT (book_id) DO UPDATE SET
             version = excluded.version, deleted_at = excluded.deleted_at
         WHERE book_report_deleted.version < excluded.version",
    )
    .bind(id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM book_report WHERE book_id = ?")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Stores every partition's next offset in one statement.
/// The stored positions of `group` on `topic`, in partition order.
async fn select_offsets(
    conn: &mut SqliteConnection,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionOffset>, StoreError> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM projection_offsets
         WHERE consumer_group = ? AND topic = ? ORDER BY partition",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(conn)
    .await
    .map_err(read_failed)?;
    Ok(rows.into_iter().map(PartitionOffset::from).collect())
}

async fn store_offsets(
    conn: &mut SqliteConnection,
    group: &str,
    topic: &str,
    offsets: &[OffsetAdvance],
) -> Result<(), StoreError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let rows: Vec<(i32, i64)> = offsets
        .iter()
        .map(|offset| (offset.partition, offset.next_offset))
        .collect();
    let rows =
        serde_json::to_string(&rows).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    // `WHERE true`: without a WHERE, SQLite would parse the upsert's ON as a join constraint.
    sqlx::query(
        "INSERT INTO projection_offsets (consumer_group, topic, partition, next_offset, updated_at)
         SELECT ?1, ?2, j.value ->> 0, j.value ->> 1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         FROM json_each(?3) AS j
         WHERE true
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE SET
             next_offset = excluded.next_offset, updated_at = excluded.updated_at",
    )
    .bind(group)
    .bind(topic)
    .bind(rows)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct ReportRow {
    book_id: Hyphenated,
    title: String,
    author: String,
    price: String,
    isbn: Option<String>,
    version: i64,
    updated_at: DateTime<Utc>,
}

impl ReportRow {
    fn into_report(self) -> Result<BookReport, StoreError> {
        let book_id = BookId::new(self.book_id.into_uuid());
        let price = Price::from_str(&self.price).map_err(|error| {
            StoreError::Corrupt(format!(
                "report of book {book_id} has price {:?}: {error}",
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
