//! The seed scenario end to end, and demo data for `bookstore up --demo-data`.
//!
//! [`run_scenario`] adds "The Great Gatsby" at 12.99, raises the price to 15.99, lets the relay
//! publish and the projection apply, and then checks every stage: the fact stream in the store,
//! the records on both topics, and the report row. It uses a fresh book id each time, so it can
//! run again and again against the same store and topics, also while `bookstore up` is running
//! (then that process's relay and projector do the work, and the scenario only waits for them).

use std::time::Duration;

use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use tracing::{info, warn};

use crate::codec::{AvroCodec, EventCodec, FramedDecoder};
use crate::config::{KafkaConfig, RelaySettings};
use crate::domain::{
    AddBook, BookCommand, BookEvent, BookId, DomainError, EventPayload, Price, fact_stream,
};
use crate::projection::{ProjectionConfig, ProjectionMode, ReportStore, kafka_projector};
use crate::relay::{RunMode, kafka_relay};
use crate::service::{BookService, CommandContext, ServiceError};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::store::{Outbox, StoreError};

/// One verified claim of the scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub claim: String,
    pub passed: bool,
    /// What was actually found.
    pub found: String,
}

/// The outcome of the scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioReport {
    pub book_id: BookId,
    pub checks: Vec<Check>,
}

impl ScenarioReport {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|check| check.passed)
    }

    fn check(&mut self, claim: impl Into<String>, passed: bool, found: impl Into<String>) {
        self.checks.push(Check {
            claim: claim.into(),
            passed,
            found: found.into(),
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("relay: {0}")]
    Relay(String),
    #[error("projection: {0}")]
    Projection(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("interrupted (Ctrl-C or SIGTERM) while {0}")]
    Interrupted(&'static str),
}

/// How long each stage may take before the scenario gives up on it.
const STAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes the two commands of the scenario and returns the new book's id.
pub async fn write_gatsby<S: Outbox>(
    service: &BookService<S, AvroCodec>,
) -> Result<BookId, DemoError> {
    let book_id = BookId::generate();
    let add = BookCommand::Add(AddBook {
        book_id,
        title: "The Great Gatsby".into(),
        author: "F. Scott Fitzgerald".into(),
        isbn: Some("9780743273565".into()),
        price: price("12.99"),
        description: Some("A novel of the Jazz Age.".into()),
    });
    service.execute(add, CommandContext::default()).await?;
    let reprice = BookCommand::UpdatePrice {
        book_id,
        price: price("15.99"),
    };
    service.execute(reprice, CommandContext::default()).await?;
    Ok(book_id)
}

fn price(text: &str) -> Price {
    text.parse().expect("demo prices are valid")
}

/// Publishes everything committed so far: runs a relay once, or, when another relay holds the
/// lease (a running `bookstore up`), waits until that one has published past `position`.
pub async fn publish_through<S: Outbox + Clone + 'static>(
    store: &S,
    kafka: &KafkaConfig,
    settings: &RelaySettings,
    position: u64,
    interrupt: &Shutdown,
) -> Result<(), DemoError> {
    let relay_id = settings
        .relay_id
        .clone()
        .unwrap_or_else(|| format!("{}.relay", kafka.topic_prefix));
    let relay = kafka_relay(store.clone(), kafka, settings)
        .await
        .map_err(|error| DemoError::Relay(error.to_string()))?;
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(relay.run(RunMode::Once, shutdown));
    let deadline = tokio::time::Instant::now() + STAGE_TIMEOUT;
    let outcome = loop {
        if store.published_position(&relay_id).await? >= position {
            break Ok(());
        }
        if interrupt.is_triggered() {
            break Err(DemoError::Interrupted("publishing"));
        }
        if running.is_finished() || tokio::time::Instant::now() > deadline {
            break Err(DemoError::Relay(format!(
                "events up to position {position} were not published within {STAGE_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.trigger();
    match running.await {
        // Published through `position` by the time it ended, though the store's copy of the
        // position (written after each Kafka commit) had not shown it when last read.
        Ok(Ok(report))
            if report.last_position >= position
                && !matches!(outcome, Err(DemoError::Interrupted(_))) =>
        {
            Ok(())
        }
        Ok(Ok(_)) => outcome,
        Ok(Err(error)) => Err(DemoError::Relay(error.to_string())),
        Err(join) => Err(DemoError::Relay(join.to_string())),
    }
}

/// Makes the report show `book_id` at `version` or later: runs the projection in group `group`
/// until the row is there (another running projector of the group may do the work instead).
pub async fn project_through<S: Outbox + ReportStore + Clone + 'static>(
    store: &S,
    kafka: &KafkaConfig,
    group: &str,
    book_id: BookId,
    version: u64,
    interrupt: &Shutdown,
) -> Result<(), DemoError> {
    let projector = kafka_projector(store.clone(), kafka, ProjectionConfig::new(group))
        .await
        .map_err(|error| DemoError::Projection(error.to_string()))?;
    let (stop, shutdown) = ShutdownTrigger::new();
    let running = tokio::spawn(projector.run(ProjectionMode::Follow, shutdown));
    let deadline = tokio::time::Instant::now() + STAGE_TIMEOUT;
    let outcome = loop {
        let row = store.report(book_id).await?;
        if row.is_some_and(|row| row.version >= version) {
            break Ok(());
        }
        if interrupt.is_triggered() {
            break Err(DemoError::Interrupted("projecting"));
        }
        if running.is_finished() || tokio::time::Instant::now() > deadline {
            break Err(DemoError::Projection(format!(
                "the report did not show {book_id} at version {version} within {STAGE_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.trigger();
    match running.await {
        Ok(Ok(_)) => outcome,
        Ok(Err(error)) => Err(DemoError::Projection(error.to_string())),
        Err(join) => Err(DemoError::Projection(join.to_string())),
    }
}

/// Checks the report row of `book_id`.
pub async fn check_report<S: ReportStore>(
    store: &S,
    book_id: BookId,
    report: &mut ScenarioReport,
) -> Result<(), DemoError> {
    let row = store.report(book_id).await?;
    let found = row
        .as_ref()
        .map(|row| format!("{} at {} (v{})", row.title, row.price, row.version))
        .unwrap_or_else(|| "no row".into());
    report.check(
        "the BookReport row says 15.99",
        row.is_some_and(|row| row.price.to_string() == "15.99"),
        found,
    );
    Ok(())
}

/// Runs the whole seed scenario against `store` and the cluster of `kafka`, calling
/// `progress` before each stage, and returns every check. When `interrupt` fires, the stage
/// running stops its relay or projector gracefully and the scenario fails as interrupted.
pub async fn run_scenario<S: Outbox + ReportStore + Clone + 'static>(
    store: S,
    kafka: &KafkaConfig,
    relay: &RelaySettings,
    group: &str,
    interrupt: &Shutdown,
    mut progress: impl FnMut(&str),
) -> Result<ScenarioReport, DemoError> {
    let service = BookService::new(store.clone(), AvroCodec::new());
    progress("adding \"The Great Gatsby\" at 12.99, then raising the price to 15.99");
    let book_id = write_gatsby(&service).await?;
    let mut report = ScenarioReport {
        book_id,
        checks: vec![],
    };
    check_store(&service, book_id, &mut report).await?;
    progress("publishing the outbox to Kafka");
    let head = store.head_position().await?;
    publish_through(&store, kafka, relay, head, interrupt).await?;
    check_topics(kafka, book_id, &mut report).await?;
    progress("projecting the facts into the BookReport");
    project_through(&store, kafka, group, book_id, 2, interrupt).await?;
    check_report(&store, book_id, &mut report).await?;
    Ok(report)
}

/// The records of `key` on `topic`, read from the beginning as `read_committed`, until `count`
/// were found, or for at most the stage timeout (60 s) when fewer are there.
pub async fn records_of(
    kafka: &KafkaConfig,
    topic: &str,
    key: &str,
    count: usize,
) -> Result<Vec<Option<EventPayload>>, DemoError> {
    let group = format!(
        "{}.demo-reader-{}",
        kafka.topic_prefix,
        uuid::Uuid::new_v4().simple()
    );
    let consumer = kafka
        .consumer(&group)
        .map_err(|error| DemoError::Kafka(error.to_string()))?;
    consumer
        .subscribe(&[topic])
        .map_err(|error| DemoError::Kafka(error.to_string()))?;
    let decoder = decoder_for(kafka).await?;
    let mut found = Vec::new();
    let mut stream = consumer.stream();
    let deadline = tokio::time::Instant::now() + STAGE_TIMEOUT;
    while found.len() < count {
        let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
            break;
        };
        let Some(Ok(message)) = next else {
            continue;
        };
        if message.key() != Some(key.as_bytes()) {
            continue;
        }
        found.push(
            message
                .payload()
                .and_then(|value| decoder.decode(value).ok()),
        );
    }
    Ok(found)
}

/// A decoder for what the relay writes with this configuration: single-object frames, and
/// Confluent frames with the ids of our schemas when a registry is configured.
async fn decoder_for(kafka: &KafkaConfig) -> Result<FramedDecoder, DemoError> {
    match crate::relay::wire_format(kafka)
        .await
        .map_err(|error| DemoError::Kafka(error.to_string()))?
    {
        crate::codec::WireFormat::Confluent { schemas } => {
            Ok(FramedDecoder::with_registered(AvroCodec::new(), &schemas))
        }
        crate::codec::WireFormat::SingleObject => Ok(FramedDecoder::new(AvroCodec::new())),
    }
}

/// Checks the store's fact stream of `book_id` (first check of the scenario).
pub async fn check_store<S: Outbox>(
    service: &BookService<S, AvroCodec>,
    book_id: BookId,
    report: &mut ScenarioReport,
) -> Result<(), DemoError> {
    let stream = fact_stream(book_id);
    let facts = service.store().read_stream(&stream).await?;
    let last_price = facts.last().and_then(|event| {
        match service
            .codec()
            .decode(&event.metadata.event_type, &event.payload)
        {
            Ok(EventPayload::Fact(fact)) => Some(fact.price.to_string()),
            _ => None,
        }
    });
    report.check(
        format!("the fact stream {stream} has 2 events"),
        facts.len() == 2,
        format!("{} events", facts.len()),
    );
    report.check(
        "the last fact says 15.99",
        last_price.as_deref() == Some("15.99"),
        format!("{last_price:?}"),
    );
    Ok(())
}

/// Checks both topics for the book's records.
pub async fn check_topics(
    kafka: &KafkaConfig,
    book_id: BookId,
    report: &mut ScenarioReport,
) -> Result<(), DemoError> {
    let topics = kafka.topics();
    let key = book_id.to_string();
    let facts = records_of(kafka, &topics.book_fact, &key, 2).await?;
    let prices: Vec<String> = facts
        .iter()
        .map(|fact| match fact {
            Some(EventPayload::Fact(fact)) => format!("{}@v{}", fact.price, fact.version),
            other => format!("{other:?}"),
        })
        .collect();
    report.check(
        format!("both facts are on {} in order", topics.book_fact),
        prices == ["12.99@v1", "15.99@v2"],
        prices.join(", "),
    );
    let deltas = records_of(kafka, &topics.book, &key, 2).await?;
    let types: Vec<&str> = deltas
        .iter()
        .map(|delta| match delta {
            Some(EventPayload::Delta(event)) => event.event_type(),
            _ => "undecodable",
        })
        .collect();
    let price_change = deltas.iter().find_map(|delta| match delta {
        Some(EventPayload::Delta(BookEvent::PriceUpdated(update))) => {
            Some(format!("{} -> {}", update.old_price, update.new_price))
        }
        _ => None,
    });
    report.check(
        format!("the delta events are on {}", topics.book),
        types == ["BookAdded", "BookPriceUpdated"]
            && price_change.as_deref() == Some("12.99 -> 15.99"),
        format!(
            "{} ({})",
            types.join(", "),
            price_change.unwrap_or_default()
        ),
    );
    info!(book_id = %book_id, "topics checked");
    Ok(())
}

/// Classic books for `bookstore up --demo-data`: title, author, price.
const DEMO_BOOKS: &[(&str, &str, &str)] = &[
    ("Pride and Prejudice", "Jane Austen", "9.99"),
    ("Moby-Dick", "Herman Melville", "14.50"),
    ("Nineteen Eighty-Four", "George Orwell", "11.25"),
    ("To the Lighthouse", "Virginia Woolf", "12.00"),
    ("The Trial", "Franz Kafka", "10.40"),
    (
        "One Hundred Years of Solitude",
        "Gabriel García Márquez",
        "16.90",
    ),
    ("Beloved", "Toni Morrison", "13.75"),
    ("Things Fall Apart", "Chinua Achebe", "9.50"),
    ("The Master and Margarita", "Mikhail Bulgakov", "15.20"),
    ("Middlemarch", "George Eliot", "17.80"),
    ("Invisible Man", "Ralph Ellison", "12.60"),
    ("The Left Hand of Darkness", "Ursula K. Le Guin", "10.99"),
];

/// How fast [`feed_demo_data`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoPace {
    /// Between two added books.
    pub add_every: Duration,
    /// Between two price changes, once every book is added.
    pub change_every: Duration,
}

impl Default for DemoPace {
    /// A book every half second, then a price change every 3 s: a dashboard visibly fills and
    /// moves without flooding anything.
    fn default() -> Self {
        Self {
            add_every: Duration::from_millis(500),
            change_every: Duration::from_secs(3),
        }
    }
}

/// Feeds the demo: adds the classic books one by one, then keeps changing a price now and then,
/// so a dashboard visibly fills and moves. Runs until shutdown, whatever the store says:
/// `bookstore up` stops every part when one ends, and demo data is no reason to stop a relay or
/// a projector. A command that fails for the system (a database that does not answer) is logged
/// and tried again at the next step; an add is retried under the same book id, so one whose
/// commit did happen is not added twice. A book removed meanwhile (through the API, say) is no
/// longer changed.
pub async fn feed_demo_data<S: Outbox>(
    service: &BookService<S, AvroCodec>,
    pace: DemoPace,
    mut shutdown: Shutdown,
) {
    let mut to_add = DEMO_BOOKS
        .iter()
        .map(|&(title, author, list_price)| (BookId::generate(), title, author, price(list_price)));
    let mut next_add = to_add.next();
    // The books the demo added and still changes, with their list price.
    let mut books: Vec<(BookId, Price)> = Vec::new();
    loop {
        let pause = if next_add.is_some() {
            pace.add_every
        } else {
            pace.change_every
        };
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        if let Some((book_id, title, author, list_price)) = next_add {
            let add = BookCommand::Add(AddBook {
                book_id,
                title: title.into(),
                author: author.into(),
                isbn: None,
                price: list_price,
                description: None,
            });
            // Raced with shutdown, as every wait of the parts of `bookstore up` is bounded: a
            // database that stopped answering would otherwise hold the exit for as long as TCP
            // takes to give up. A save dropped here rolls back, like any other.
            let added = tokio::select! {
                _ = shutdown.wait() => return,
                added = service.execute(add, CommandContext::default()) => added,
            };
            match added {
                // "Already exists": an earlier attempt committed after all.
                Ok(_) | Err(ServiceError::Domain(DomainError::AlreadyExists(_))) => {
                    books.push((book_id, list_price));
                    next_add = to_add.next();
                }
                Err(error) => {
                    warn!(%error, %book_id, "demo data: could not add a book; trying again")
                }
            }
            continue;
        }
        if books.is_empty() {
            continue;
        }
        let random = uuid::Uuid::new_v4().as_u128();
        let (book_id, list_price) = books[(random % books.len() as u128) as usize];
        // Between 80 % and 120 % of the list price, in whole cents.
        let percent = 80 + ((random >> 64) % 41) as i64;
        let cents = list_price.cents() * percent / 100;
        let command = BookCommand::UpdatePrice {
            book_id,
            price: Price::from_cents(cents).expect("a positive price"),
        };
        let changed = tokio::select! {
            _ = shutdown.wait() => return,
            changed = service.execute(command, CommandContext::default()) => changed,
        };
        match changed {
            Ok(_) => {}
            Err(ServiceError::Domain(DomainError::Removed(_) | DomainError::NotFound(_))) => {
                info!(%book_id, "demo data: the book was removed; no longer changing its price");
                books.retain(|&(id, _)| id != book_id);
            }
            Err(error) => warn!(%error, %book_id, "demo data: could not change a price; going on"),
        }
    }
}
