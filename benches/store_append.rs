//! Append throughput of the stores, and what the `outbox_head` row costs under concurrency.
//!
//! Every book is added and then repriced `BENCH_UPDATES` times; each save writes one delta
//! event and one fact, so the default 1,000 books × (1 + 4) saves append 10,000 events. Variants,
//! each on a fresh database:
//!
//! * `save ×1`: `EventStore::save` of changes built and Avro-encoded before the clock starts.
//! * `save ×N`: the same split over `BENCH_CONCURRENCY` tasks (by book), so saves contend for
//!   the head row (PostgreSQL) or the write lock (SQLite).
//! * `service ×1`: `BookService::execute`, i.e. load, decide, encode and save per command.
//!
//! SQLite runs in a temporary file; PostgreSQL in a fresh schema of `BOOKSTORE_TEST_DATABASE_URL`
//! (start one with `deploy/postgres/postgres.sh start`), dropped afterwards.
//!
//! ```text
//! cargo bench --bench store_append
//! BENCH_BOOKS=200 BENCH_UPDATES=4 BENCH_CONCURRENCY=8 cargo bench --bench store_append
//! ```

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bookstore::bench::workload::Workload;
use bookstore::codec::AvroCodec;
use bookstore::service::{BookService, CommandContext};
use bookstore::store::{BookChange, EventStore, PostgresStore, SqliteStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use uuid::Uuid;

struct Sizes {
    books: usize,
    updates: usize,
    concurrency: usize,
}

impl Sizes {
    fn from_env() -> Result<Self> {
        Ok(Self {
            books: env_or("BENCH_BOOKS", 1_000)?,
            updates: env_or("BENCH_UPDATES", 4)?,
            concurrency: env_or("BENCH_CONCURRENCY", 8)?.max(1),
        })
    }
}

fn env_or(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(value) => value.parse().with_context(|| format!("{name}={value:?}")),
        Err(_) => Ok(default),
    }
}

/// One measured run.
struct Row {
    store: &'static str,
    variant: String,
    events: usize,
    saves: usize,
    elapsed: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let sizes = Sizes::from_env()?;
    let codec = AvroCodec::new();
    let mut rows = vec![];

    let dir = tempfile::tempdir()?;
    let sqlite = |name: &str| {
        SqliteStore::connect_with(SqliteConnectOptions::new().filename(dir.path().join(name)))
    };
    rows.push(bench_saves("sqlite", sqlite("serial.db").await?, &sizes, 1).await?);
    let store = sqlite("concurrent.db").await?;
    rows.push(bench_saves("sqlite", store, &sizes, sizes.concurrency).await?);
    rows.push(bench_service("sqlite", sqlite("service.db").await?, &sizes, codec).await?);

    match std::env::var("BOOKSTORE_TEST_DATABASE_URL") {
        Ok(url) => {
            let mut postgres = Postgres::connect(&url).await?;
            let store = postgres.fresh_store(sizes.concurrency).await?;
            rows.push(bench_saves("postgres", store, &sizes, 1).await?);
            let store = postgres.fresh_store(sizes.concurrency).await?;
            rows.push(bench_saves("postgres", store, &sizes, sizes.concurrency).await?);
            let store = postgres.fresh_store(sizes.concurrency).await?;
            rows.push(bench_service("postgres", store, &sizes, codec).await?);
            postgres.drop_schemas().await?;
        }
        Err(_) => eprintln!(
            "BOOKSTORE_TEST_DATABASE_URL is not set: PostgreSQL not measured \
             (start it with `deploy/postgres/postgres.sh start`)"
        ),
    }

    print_table(&rows);
    Ok(())
}

/// Saves pre-built changes from `tasks` tasks; task `t` owns the books `t, t + tasks, …` and
/// saves each book's changes in order.
async fn bench_saves<S>(
    store_name: &'static str,
    store: S,
    sizes: &Sizes,
    tasks: usize,
) -> Result<Row>
where
    S: EventStore + Clone + 'static,
{
    let plans = Workload::new(sizes.updates).histories(sizes.books)?;
    let saves = plans.iter().map(Vec::len).sum();
    let mut per_task: Vec<Vec<Vec<BookChange>>> = (0..tasks).map(|_| vec![]).collect();
    for (n, book_changes) in plans.into_iter().enumerate() {
        per_task[n % tasks].push(book_changes);
    }

    let started = Instant::now();
    let handles: Vec<_> = per_task
        .into_iter()
        .map(|books| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut events = 0;
                for change in books.into_iter().flatten() {
                    events += store.save(change).await?.len();
                }
                anyhow::Ok(events)
            })
        })
        .collect();
    let mut events = 0;
    for handle in handles {
        events += handle.await??;
    }
    Ok(Row {
        store: store_name,
        variant: format!("save ×{tasks}"),
        events,
        saves,
        elapsed: started.elapsed(),
    })
}

/// Runs the commands through the service: what a request costs end to end, minus the network.
async fn bench_service<S: EventStore>(
    store_name: &'static str,
    store: S,
    sizes: &Sizes,
    codec: AvroCodec,
) -> Result<Row> {
    let service = BookService::new(store, codec);
    let workload = Workload::new(sizes.updates);
    let mut plans = Vec::with_capacity(sizes.books);
    for n in 0..sizes.books {
        plans.push(workload.commands(n)?);
    }
    let started = Instant::now();
    let mut events = 0;
    let mut saves = 0;
    // Every book's addition first, then the first price change of every book, and so on.
    for step in 0..=sizes.updates {
        for commands in &plans {
            events += service
                .execute(commands[step].clone(), CommandContext::default())
                .await?
                .events
                .len();
            saves += 1;
        }
    }
    Ok(Row {
        store: store_name,
        variant: "service ×1".to_owned(),
        events,
        saves,
        elapsed: started.elapsed(),
    })
}

/// Fresh schemas in the PostgreSQL test database, one per run.
struct Postgres {
    url: String,
    admin: sqlx::PgPool,
    schemas: Vec<String>,
}

impl Postgres {
    async fn connect(url: &str) -> Result<Self> {
        let admin = PgPoolOptions::new().max_connections(1).connect(url).await?;
        Ok(Self {
            url: url.to_owned(),
            admin,
            schemas: vec![],
        })
    }

    async fn fresh_store(&mut self, pool_size: usize) -> Result<PostgresStore> {
        let schema = format!("bench_{}", Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&self.admin)
            .await?;
        self.schemas.push(schema.clone());
        let options = PgConnectOptions::from_str(&self.url)?.options([("search_path", schema)]);
        let pool = PgPoolOptions::new()
            .max_connections(u32::try_from(pool_size)? + 1)
            .connect_with(options)
            .await?;
        Ok(PostgresStore::with_pool(pool).await?)
    }

    async fn drop_schemas(self) -> Result<()> {
        for schema in &self.schemas {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&self.admin)
                .await?;
        }
        Ok(())
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<9} {:<11} {:>7} {:>8} {:>9} {:>8}",
        "store", "variant", "events", "seconds", "events/s", "saves/s"
    );
    for row in rows {
        let seconds = row.elapsed.as_secs_f64();
        println!(
            "{:<9} {:<11} {:>7} {:>8.2} {:>9.0} {:>8.0}",
            row.store,
            row.variant,
            row.events,
            seconds,
            row.events as f64 / seconds,
            row.saves as f64 / seconds,
        );
    }
}
