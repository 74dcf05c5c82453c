//! The writes every measurement makes: books added and then repriced, each change decided by the
//! domain and enveloped and Avro-encoded by the service's own code, saved with `EventStore::save` (one
//! transaction, two events: the delta and the fact).
//!
//! Three ways to drive the writes: a fixed set of changes as fast as possible ([`save_all`]),
//! closed-loop writers for a while ([`save_for`]), and an open-loop schedule at a fixed rate
//! ([`save_at_rate`]), whose saves start on time whether or not earlier ones finished.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use uuid::Uuid;

use super::BenchError;
use crate::codec::AvroCodec;
use crate::domain::{AddBook, Book, BookCommand, BookId, Decision, NewEvent, Price, StoredEvent};
use crate::service::{CommandContext, envelope};
use crate::store::{BookChange, EventStore};

/// Builds the changes: a book's addition, then `updates` price changes.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    codec: AvroCodec,
    updates: usize,
}

/// Events every change writes: one delta event and the fact.
pub const EVENTS_PER_SAVE: u64 = 2;

impl Workload {
    pub fn new(updates: usize) -> Self {
        Self {
            codec: AvroCodec::new(),
            updates,
        }
    }

    /// Saves in one book's history.
    pub fn saves_per_book(&self) -> u64 {
        1 + self.updates as u64
    }

    /// How many books make at least `events` events.
    pub fn books_for(&self, events: u64) -> usize {
        let per_book = self.saves_per_book() * EVENTS_PER_SAVE;
        usize::try_from(events.div_ceil(per_book)).unwrap_or(usize::MAX)
    }

    /// The histories of `books` books.
    pub fn histories(&self, books: usize) -> Result<Vec<Vec<BookChange>>, BenchError> {
        (0..books).map(|n| self.history(n)).collect()
    }

    /// The commands of book number `n` (a new id): its addition, then `updates` price changes.
    pub fn commands(&self, n: usize) -> Result<Vec<BookCommand>, BenchError> {
        let book_id = BookId::generate();
        let mut commands = vec![add_command(book_id, n)];
        for update in 1..=self.updates {
            let cents = i64::try_from(update).unwrap_or(i64::MAX) * 100 + 99;
            let price = Price::from_cents(cents).map_err(crate::domain::DomainError::from)?;
            commands.push(BookCommand::UpdatePrice { book_id, price });
        }
        Ok(commands)
    }

    /// Book number `n`: added, then repriced `updates` times, each change decided and
    /// enveloped before anything is saved.
    pub fn history(&self, n: usize) -> Result<Vec<BookChange>, BenchError> {
        let commands = self.commands(n)?;
        let mut state: Option<Book> = None;
        let mut changes = Vec::with_capacity(commands.len());
        for command in commands {
            let Some(decision) = Book::execute(state.as_ref(), &command)? else {
                return Err(BenchError::Incomplete(format!(
                    "planned command {} changed nothing",
                    command.name()
                )));
            };
            changes.push(BookChange {
                expected_version: state.as_ref().map(|book| book.version),
                state: decision.state.clone(),
                events: self.envelope(&decision)?,
            });
            state = Some(decision.state);
        }
        Ok(changes)
    }

    /// A new book `n`: one save, two events.
    pub fn addition(&self, n: usize) -> Result<BookChange, BenchError> {
        let command = add_command(BookId::generate(), n);
        let decision = Book::execute(None, &command)?
            .ok_or_else(|| BenchError::Incomplete("adding a book changed nothing".into()))?;
        Ok(BookChange {
            expected_version: None,
            state: decision.state.clone(),
            events: self.envelope(&decision)?,
        })
    }

    /// The delta event(s) and the fact of a decision, enveloped by the service's own code.
    fn envelope(&self, decision: &Decision) -> Result<Vec<NewEvent>, BenchError> {
        Ok(envelope(
            &self.codec,
            decision,
            Uuid::now_v7(),
            &CommandContext::default(),
        )?)
    }
}

fn add_command(book_id: BookId, n: usize) -> BookCommand {
    BookCommand::Add(AddBook {
        book_id,
        title: format!("Benchmark book {n}"),
        author: "Bench Author".to_owned(),
        isbn: Some("9780000000000".to_owned()),
        price: Price::ZERO,
        description: Some("A book written only to be appended.".to_owned()),
    })
}

/// What a batch of writers did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Appended {
    pub saves: u64,
    pub events: u64,
    pub elapsed: Duration,
}

impl Appended {
    /// One save of `events` events.
    pub(crate) fn count(&mut self, events: u64) {
        self.saves += 1;
        self.events += events;
    }

    pub fn events_per_second(&self) -> f64 {
        per_second(self.events, self.elapsed)
    }

    pub fn saves_per_second(&self) -> f64 {
        per_second(self.saves, self.elapsed)
    }
}

pub(crate) fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// Splits `histories` among `tasks` writers: writer `t` gets the books `t, t + tasks, …`, each
/// book's changes in order.
pub(crate) fn split_among(histories: Vec<Vec<BookChange>>, tasks: usize) -> Vec<Vec<BookChange>> {
    let tasks = tasks.max(1);
    let mut per_task: Vec<Vec<BookChange>> = (0..tasks).map(|_| vec![]).collect();
    for (n, history) in histories.into_iter().enumerate() {
        per_task[n % tasks].extend(history);
    }
    per_task
}

/// Waits for every writer and adds up what they did, timed from `started`.
pub(crate) async fn join_writers(
    mut writers: JoinSet<Result<Appended, BenchError>>,
    started: Instant,
) -> Result<Appended, BenchError> {
    let mut total = Appended::default();
    while let Some(done) = writers.join_next().await {
        let done = done??;
        total.saves += done.saves;
        total.events += done.events;
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Saves every history from `tasks` concurrent writers; writer `t` owns the books `t, t + tasks,
/// …` and saves each book's changes in order. Timed from the first save to the last commit.
pub async fn save_all<S>(
    store: &S,
    histories: Vec<Vec<BookChange>>,
    tasks: usize,
) -> Result<Appended, BenchError>
where
    S: EventStore + Clone + 'static,
{
    let per_task = split_among(histories, tasks);
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for changes in per_task {
        let store = store.clone();
        writers.spawn(async move {
            let mut done = Appended::default();
            for change in changes {
                done.count(store.save(change).await?.len() as u64);
            }
            Ok::<_, BenchError>(done)
        });
    }
    join_writers(writers, started).await
}

/// `tasks` closed-loop writers saving new books' histories for `duration`; a save in flight
/// when the time is up still counts (the elapsed time includes it).
pub async fn save_for<S>(
    store: &S,
    workload: Workload,
    tasks: usize,
    duration: Duration,
) -> Result<Appended, BenchError>
where
    S: EventStore + Clone + 'static,
{
    let tasks = tasks.max(1);
    let started = Instant::now();
    let deadline = started + duration;
    let mut writers = JoinSet::new();
    for task in 0..tasks {
        let store = store.clone();
        writers.spawn(async move {
            let mut done = Appended::default();
            let mut book = task;
            while Instant::now() < deadline {
                for change in workload.history(book)? {
                    done.count(store.save(change).await?.len() as u64);
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                book += tasks;
            }
            Ok::<_, BenchError>(done)
        });
    }
    join_writers(writers, started).await
}

/// Starts `changes[i]` at `start + i × period` (open loop: a slow save never delays the next
/// one) and calls `on_commit` with each save's events and the instant its commit returned.
pub async fn save_at_rate<S, F>(
    store: &S,
    changes: Vec<BookChange>,
    period: Duration,
    on_commit: F,
) -> Result<Appended, BenchError>
where
    S: EventStore + Clone + 'static,
    F: Fn(&[StoredEvent], Instant) + Send + Sync + 'static,
{
    let on_commit = Arc::new(on_commit);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut total = Appended::default();
    let mut saves = JoinSet::new();
    for change in changes {
        ticks.tick().await;
        let store = store.clone();
        let on_commit = on_commit.clone();
        saves.spawn(async move {
            let events = store.save(change).await?;
            on_commit(&events, Instant::now());
            Ok::<_, BenchError>(events.len() as u64)
        });
        // Reap finished saves as we go so the set stays small.
        while let Some(done) = saves.try_join_next() {
            total.count(done??);
        }
    }
    while let Some(done) = saves.join_next().await {
        total.count(done??);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}
