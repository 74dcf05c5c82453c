//! The world of one projection test: a store that is both the outbox and the read model (a
//! SQLite file of its own, or a PostgreSQL schema of its own), topics of its own, and the moves
//! a test makes: write books, relay once, project, run the `bookstore` binary, compare.
#![allow(dead_code)] // not every test uses every move

/// Turns each behaviour, an async function over a [`World`], into a `sqlite::<behaviour>` and a
/// `postgres::<behaviour>` test (the including crate has `World` at its root).
macro_rules! per_read_model {
    ($($behaviour:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let world = crate::World::sqlite().await;
                    crate::$behaviour(&world).await;
                    world.finish().await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let world = crate::World::postgres().await;
                    crate::$behaviour(&world).await;
                    world.finish().await;
                }
            )*
        }
    };
}

use std::process::{Output, Stdio};
use std::time::Duration;

use bookstore::codec::AvroCodec;
use bookstore::config::{KafkaConfig, RelaySettings};
use bookstore::domain::{AddBook, BookCommand, BookId, EventKind, Price, UpdateDetails};
use bookstore::projection::{
    BookReport, ProjectionConfig, ProjectionMode, ProjectionReport, ReportStore, kafka_projector,
};
use bookstore::relay::{RelayReport, RunMode, kafka_relay};
use bookstore::service::{BookService, CommandContext};
use bookstore::shutdown::Shutdown;
use bookstore::store::{AnyStore, EventStore};
use tempfile::TempDir;

use crate::common;
use crate::fixtures::PgSchema;

/// How long a projector may take to catch up before the test fails.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(90);

pub struct World {
    pub store: AnyStore,
    pub service: BookService<AnyStore, AvroCodec>,
    pub kafka: KafkaConfig,
    /// The database URL of `store`, for the binary.
    pub url: String,
    guard: Guard,
}

/// What keeps the database alive for the test.
enum Guard {
    Sqlite(TempDir),
    Postgres(PgSchema),
}

/// What a written history amounts to on the fact topic.
#[derive(Debug, Clone, Copy, Default)]
pub struct History {
    /// Fact events written (one per change).
    pub facts: u64,
    /// Books removed (each also gets a tombstone on the fact topic).
    pub removals: u64,
}

impl History {
    /// Records the relay puts on the fact topic for this history.
    pub fn fact_records(&self) -> u64 {
        self.facts + self.removals
    }
}

impl World {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite:{}", dir.path().join("bookstore.db").display());
        let store = AnyStore::connect(&url).await.expect("open SQLite store");
        Self::with(store, url, Guard::Sqlite(dir))
    }

    pub async fn postgres() -> Self {
        let schema = PgSchema::create().await;
        let store = AnyStore::Postgres(schema.store().await);
        let url = schema.url();
        Self::with(store, url, Guard::Postgres(schema))
    }

    fn with(store: AnyStore, url: String, guard: Guard) -> Self {
        Self {
            service: BookService::new(store.clone(), AvroCodec::new()),
            store,
            kafka: common::kafka_config(),
            url,
            guard,
        }
    }

    /// Drops the PostgreSQL schema (a failing test keeps it for a look).
    pub async fn finish(self) {
        if let Guard::Postgres(schema) = self.guard {
            if let AnyStore::Postgres(store) = &self.store {
                store.pool().close().await;
            }
            schema.drop().await;
        }
    }

    pub async fn add_book(&self, title: &str, price: &str, isbn: Option<&str>) -> BookId {
        let book_id = BookId::generate();
        self.execute(BookCommand::Add(AddBook {
            book_id,
            title: title.into(),
            author: "Test Author".into(),
            isbn: isbn.map(str::to_owned),
            price: price.parse().expect("test price"),
            description: None,
        }))
        .await;
        book_id
    }

    pub async fn remove(&self, book_id: BookId) {
        self.execute(BookCommand::Remove { book_id }).await;
    }

    async fn execute(&self, command: BookCommand) {
        self.service
            .execute(command, CommandContext::default())
            .await
            .expect("command");
    }

    /// Adds `books` books, then runs `changes` random commands over them (reprice, update
    /// details, remove), the same ones for the same `seed`.
    pub async fn write_random_history(&self, books: usize, changes: usize, seed: u64) -> History {
        let mut rng = Rng::new(seed);
        let mut live = Vec::with_capacity(books);
        let mut history = History::default();
        for index in 0..books {
            let book_id = BookId::generate();
            self.execute(BookCommand::Add(AddBook {
                book_id,
                title: format!("{} {index}", rng.pick(TITLES)),
                author: rng.pick(AUTHORS).into(),
                isbn: rng.chance(2).then(|| rng.isbn()),
                price: rng.price(),
                description: None,
            }))
            .await;
            live.push(book_id);
            history.facts += 1;
        }
        for _ in 0..changes {
            if live.is_empty() {
                break;
            }
            let slot = rng.below(live.len() as u64) as usize;
            let book_id = live[slot];
            let command = match rng.below(10) {
                0..=4 => BookCommand::UpdatePrice {
                    book_id,
                    price: rng.price(),
                },
                5..=8 => {
                    let mut update = UpdateDetails::new(book_id);
                    update.title = Some(format!("{} {}", rng.pick(TITLES), rng.below(1000)));
                    if rng.chance(2) {
                        update.author = Some(rng.pick(AUTHORS).into());
                    }
                    if rng.chance(3) {
                        update.isbn = Some(rng.chance(2).then(|| rng.isbn()));
                    }
                    BookCommand::UpdateDetails(update)
                }
                // The last live book stays: a history with no book left has nothing to
                // compare (a small one ran into that now and then).
                _ if live.len() == 1 => BookCommand::UpdatePrice {
                    book_id,
                    price: rng.price(),
                },
                _ => {
                    live.swap_remove(slot);
                    history.removals += 1;
                    BookCommand::Remove { book_id }
                }
            };
            let outcome = self
                .service
                .execute(command, CommandContext::default())
                .await
                .expect("command");
            if !outcome.events.is_empty() {
                history.facts += 1;
            }
        }
        history
    }

    /// Facts in the store, counted from the outbox (a cross-check of [`History`]).
    pub async fn stored_facts(&self) -> u64 {
        let events = self.store.read_after(0, 1_000_000).await.expect("events");
        events
            .iter()
            .filter(|event| event.metadata.kind() == EventKind::Fact)
            .count() as u64
    }

    /// Publishes everything committed so far.
    pub async fn relay_once(&self) -> RelayReport {
        self.relay_once_with(&self.kafka).await
    }

    pub async fn relay_once_with(&self, kafka: &KafkaConfig) -> RelayReport {
        kafka_relay(self.store.clone(), kafka, &RelaySettings::default())
            .await
            .expect("relay setup")
            .run(RunMode::Once, Shutdown::never())
            .await
            .expect("relay run")
    }

    pub fn projection_config(group: &str) -> ProjectionConfig {
        let mut config = ProjectionConfig::new(group);
        config.batch_size = 50;
        config
    }

    /// Runs a projector of `group` until it caught up.
    pub async fn project(&self, group: &str) -> ProjectionReport {
        self.project_with(&self.kafka, group).await
    }

    pub async fn project_with(&self, kafka: &KafkaConfig, group: &str) -> ProjectionReport {
        self.project_configured(kafka, Self::projection_config(group))
            .await
    }

    /// Runs a projector of `config` until it has caught up.
    pub async fn project_configured(
        &self,
        kafka: &KafkaConfig,
        config: ProjectionConfig,
    ) -> ProjectionReport {
        let projector = kafka_projector(self.store.clone(), kafka, config)
            .await
            .expect("projector setup");
        tokio::time::timeout(
            CATCH_UP_TIMEOUT,
            projector.run(ProjectionMode::UntilCaughtUp, Shutdown::never()),
        )
        .await
        .expect("the projector did not catch up in time")
        .expect("projector run")
    }

    pub async fn reports(&self) -> Vec<BookReport> {
        self.store.list_reports().await.expect("list reports")
    }

    /// The read model's rows and the store's live books, as the dashboard sees them.
    pub async fn report_and_store(&self) -> (Vec<Row>, Vec<Row>) {
        let reports = self
            .reports()
            .await
            .into_iter()
            .map(Row::of_report)
            .collect();
        let books = self
            .store
            .list_books()
            .await
            .expect("list books")
            .into_iter()
            .map(|book| Row {
                book_id: book.book_id,
                title: book.title,
                author: book.author,
                price: book.price,
                isbn: book.isbn,
                version: book.version,
            })
            .collect();
        (reports, books)
    }

    pub async fn assert_report_equals_store(&self) {
        let (reports, books) = self.report_and_store().await;
        assert!(!books.is_empty(), "the store has no books to compare");
        assert_eq!(reports, books, "the read model differs from the store");
    }

    /// Waits until the read model equals the store (projectors running elsewhere).
    pub async fn wait_until_report_equals_store(&self) {
        let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let (reports, books) = self.report_and_store().await;
            if reports == books {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the read model never equalled the store: {} rows, {} books",
                reports.len(),
                books.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deletes `count` rows of the read model behind the projection's back.
    pub async fn delete_report_rows_by_hand(&self, count: i64) {
        let deleted = match &self.store {
            AnyStore::Sqlite(store) => sqlx::query(
                "DELETE FROM book_report WHERE book_id IN
                 (SELECT book_id FROM book_report ORDER BY book_id LIMIT ?)",
            )
            .bind(count)
            .execute(store.pool())
            .await
            .map(|done| done.rows_affected()),
            AnyStore::Postgres(store) => sqlx::query(
                "DELETE FROM book_report WHERE book_id IN
                 (SELECT book_id FROM book_report ORDER BY book_id LIMIT $1)",
            )
            .bind(count)
            .execute(store.pool())
            .await
            .map(|done| done.rows_affected()),
        };
        assert_eq!(deleted.expect("delete rows"), count as u64);
    }

    /// The `bookstore` binary on this world's database and topics.
    pub fn bookstore(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_bookstore"));
        command
            .args(args)
            .env("BOOKSTORE_DATABASE_URL", &self.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.kafka.bootstrap_servers)
            .env("BOOKSTORE_TOPIC_PREFIX", &self.kafka.topic_prefix)
            .env_remove("SCHEMA_REGISTRY_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs the binary to its end; fails the test unless it succeeded.
    pub async fn run_bookstore(&self, args: &[&str]) -> Output {
        let output = tokio::time::timeout(CATCH_UP_TIMEOUT, self.bookstore(args).output())
            .await
            .unwrap_or_else(|_| panic!("bookstore {args:?} did not finish in time"))
            .expect("run bookstore");
        assert!(
            output.status.success(),
            "bookstore {args:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

/// A book as both the store and the read model know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub book_id: BookId,
    pub title: String,
    pub author: String,
    pub price: Price,
    pub isbn: Option<String>,
    pub version: u64,
}

impl Row {
    pub fn of_report(report: BookReport) -> Self {
        Self {
            book_id: report.book_id,
            title: report.title,
            author: report.author,
            price: report.price,
            isbn: report.isbn,
            version: report.version,
        }
    }
}

const TITLES: &[&str] = &[
    "Dune",
    "Emma",
    "Ulysses",
    "Beloved",
    "Middlemarch",
    "Kindred",
];
const AUTHORS: &[&str] = &["Herbert", "Austen", "Joyce", "Morrison", "Eliot", "Butler"];

/// A small deterministic generator (xorshift64*), so a failing seed can be run again.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A seed from the clock, printed so a failure can be reproduced.
    pub fn seed() -> u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1);
        eprintln!("random history seed: {seed}");
        seed
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// True once in `n` times.
    pub fn chance(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn price(&mut self) -> Price {
        Price::from_cents(self.below(10_000) as i64).expect("price")
    }

    pub fn isbn(&mut self) -> String {
        format!("978{:010}", self.below(10_000_000_000))
    }
}
