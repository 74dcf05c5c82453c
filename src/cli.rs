//! The `bookstore` command line: every subcommand and flag, with `--help` on each.
//!
//! Only the shape of the command line lives here (so tests can parse it too); the binary in
//! `src/bin/bookstore/` runs the commands and prints their output.

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::bench::{Measurement, StoreKind, defaults};
use crate::config::{KafkaConfig, RelaySettings, StoreConfig};
use crate::projection::ProjectionConfig;
use crate::relay::DeliveryMode;

#[derive(Debug, Parser)]
#[command(
    name = "bookstore",
    version,
    about = "Book changes to Kafka through a transactional outbox, with Avro contracts",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub store: StoreConfig,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add, change, remove and look at books (each change is one transaction with its events).
    #[command(subcommand)]
    Books(BooksCommand),

    /// Print the events of one stream, e.g. `bookstore::book-fact-<id>`.
    Events(EventsArgs),

    /// Check the Kafka cluster and provision the topics.
    #[command(subcommand)]
    Kafka(KafkaCommand),

    /// Publish committed events from the outbox to Kafka, in commit order.
    Relay(RelayArgs),

    /// Keep the BookReport read model up to date from the fact topic (consumer group
    /// `<topic prefix>.book-report`), until Ctrl-C/SIGTERM or `--until-caught-up`.
    Project(ProjectArgs),

    /// Print the BookReport read model.
    Report(ReportArgs),

    /// Look at or replay the fact records the projection could not apply.
    #[command(subcommand)]
    Dlq(DlqCommand),

    /// Measure the relay, projection, stores and latencies against raw-client baselines
    /// (needs the broker and, for PostgreSQL, a server; uses fresh stores and topics).
    Bench(BenchArgs),

    /// Serve the dashboard, the JSON API, /healthz, /readyz and /metrics over HTTP.
    Serve(ServeArgs),

    /// Run relay, projector and dashboard together in one process (Ctrl-C to stop).
    Up(UpArgs),

    /// Run the seed scenario end to end against the configured store and broker, checking
    /// every stage; exits 0 only if every check passed.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "BOOKSTORE_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,

    /// The relay whose backlog /metrics reports; default `<topic prefix>.relay`, the relay's
    /// own default.
    #[arg(long = "relay-id", env = "BOOKSTORE_RELAY_ID")]
    pub relay_id: Option<String>,

    /// Report ready on /readyz only while the Kafka cluster answers too (not only the
    /// database).
    #[arg(
        long = "ready-requires-kafka",
        env = "BOOKSTORE_HTTP_READY_REQUIRES_KAFKA"
    )]
    pub ready_requires_kafka: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// The stores to measure, comma separated; the first gives the headline figures.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [StoreKind::Sqlite, StoreKind::Postgres])]
    pub stores: Vec<StoreKind>,

    /// Run only these measurements, comma separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Measurement>,

    /// PostgreSQL server; each run gets fresh schemas in it, dropped at the end.
    #[arg(long = "postgres-url", env = "BOOKSTORE_TEST_DATABASE_URL", default_value = defaults::POSTGRES_URL)]
    pub postgres_url: String,

    /// Folder for the SQLite files (a fresh subfolder is made and removed); default: the
    /// system's temporary folder.
    #[arg(long = "work-dir")]
    pub work_dir: Option<std::path::PathBuf>,

    /// Events in the backlog drained by the relay and by the raw producer.
    #[arg(long = "relay-events", default_value_t = defaults::RELAY_EVENTS)]
    pub relay_events: u64,

    /// Relay batch size (one Kafka transaction in exactly-once mode), also the baseline's.
    #[arg(long = "batch-size", default_value_t = defaults::BATCH_SIZE)]
    pub batch_size: usize,

    /// The exactly-once relay's pause after catching up, in ms (the relay's `--batch-linger-ms`).
    #[arg(long = "batch-linger-ms", default_value_t = defaults::BATCH_LINGER_MS)]
    pub batch_linger_ms: u64,

    /// Repetitions of each drain and projection read, each beside its baseline; the medians are
    /// reported, and as ratio the median of the rounds' ratios.
    #[arg(long, default_value_t = defaults::ROUNDS)]
    pub rounds: usize,

    /// Events the raw producers send on throwaway topics to warm the broker up before
    /// anything is measured; 0 skips the warm-up.
    #[arg(long = "broker-warm-up-events", default_value_t = defaults::BROKER_WARM_UP_EVENTS)]
    pub broker_warm_up_events: u64,

    /// Concurrent writers (backlogs, writer impact, append ×N).
    #[arg(long, default_value_t = defaults::WRITERS)]
    pub writers: usize,

    /// Price updates after each book's addition in the written histories.
    #[arg(long = "updates-per-book", default_value_t = defaults::UPDATES_PER_BOOK)]
    pub updates_per_book: usize,

    /// How long the writers run, with the relay and without it.
    #[arg(long = "writer-seconds", default_value_t = defaults::WRITER_SECONDS)]
    pub writer_seconds: f64,

    /// Events appended per store-append variant.
    #[arg(long = "append-events", default_value_t = defaults::APPEND_EVENTS)]
    pub append_events: u64,

    /// Offered load of the latency runs in events per second (two events per save; even).
    #[arg(long = "latency-rate", default_value_t = defaults::LATENCY_EVENTS_PER_SECOND)]
    pub latency_rate: u32,

    /// How long the offered load lasts.
    #[arg(long = "latency-seconds", default_value_t = defaults::LATENCY_SECONDS)]
    pub latency_seconds: f64,

    /// Events in the backlog whose drain's peak RSS is measured (bulk-inserted); 0 skips it.
    #[arg(long = "backlog-events", default_value_t = defaults::BACKLOG_EVENTS)]
    pub backlog_events: u64,

    /// The store holding that backlog.
    #[arg(long = "backlog-store", value_enum, default_value_t = StoreKind::Sqlite)]
    pub backlog_store: StoreKind,

    /// How the relay draining that backlog delivers; at-least-once is for profiling that mode
    /// alone (with --relay-wrapper), the memory target is about exactly-once.
    #[arg(long = "backlog-delivery", value_enum, default_value_t = DeliveryMode::ExactlyOnce)]
    pub backlog_delivery: DeliveryMode,

    /// Run the backlog's child relay under this command, e.g.
    /// "perf record -e cpu-clock -g -o relay.perf --" (split at spaces).
    #[arg(long = "relay-wrapper")]
    pub relay_wrapper: Option<String>,
}

#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// The consumer group; its offsets are stored with the read model. Default:
    /// `<topic prefix>.book-report`. Instances of one group share the partitions.
    #[arg(long = "group", env = "BOOKSTORE_PROJECTION_GROUP")]
    pub group: Option<String>,

    /// Empty the read model and forget the stored offsets of every group projecting into this
    /// database (the rows are shared) first, then read the compacted fact topic from the
    /// beginning. Refused while a projector of any of those groups runs.
    #[arg(long)]
    pub rebuild: bool,

    /// Exit once everything on the topic at start is applied (progress goes to stderr).
    #[arg(long = "until-caught-up")]
    pub until_caught_up: bool,

    /// Most records per batch (one database transaction).
    #[arg(
        long = "batch-size",
        env = "BOOKSTORE_PROJECTION_BATCH_SIZE",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..=100_000)
    )]
    pub batch_size: u64,

    /// Longest wait for the first record of a batch, in milliseconds; a batch is applied as
    /// soon as nothing more is buffered.
    #[arg(
        long = "batch-wait-ms",
        env = "BOOKSTORE_PROJECTION_BATCH_WAIT_MS",
        default_value_t = 100
    )]
    pub batch_wait_ms: u64,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9465).
    #[arg(long = "metrics-addr", env = "BOOKSTORE_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl ProjectArgs {
    /// The projector's configuration for `group`, with these batch settings.
    pub fn projection_config(&self, group: String) -> ProjectionConfig {
        projection_config(group, self.batch_size, self.batch_wait_ms)
    }
}

fn projection_config(group: String, batch_size: u64, batch_wait_ms: u64) -> ProjectionConfig {
    let mut config = ProjectionConfig::new(group);
    config.batch_size = usize::try_from(batch_size).unwrap_or(usize::MAX);
    config.batch_wait = std::time::Duration::from_millis(batch_wait_ms);
    config
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Print a JSON array of rows instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters: why each could not be applied, and where it came from.
    List(DlqListArgs),
    /// Send every dead letter not replayed yet back to its original topic (useful once the
    /// cause is fixed); consumer group `<topic prefix>.book-fact.dlq-replay` remembers which.
    Replay,
}

#[derive(Debug, Args)]
pub struct DlqListArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Publish everything committed so far, then exit.
    #[arg(long)]
    pub once: bool,

    #[command(flatten)]
    pub settings: RelaySettings,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long = "metrics-addr", env = "BOOKSTORE_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum BooksCommand {
    /// Add a book and print its new id.
    Add(AddArgs),
    /// Change the price of a book.
    UpdatePrice(UpdatePriceArgs),
    /// Change the title, author, ISBN or description of a book.
    Update(UpdateArgs),
    /// Remove a book.
    Remove(BookIdArg),
    /// Show one book.
    Show(ShowArgs),
    /// List the books that are not removed.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Title, 1 to 200 characters.
    #[arg(long)]
    pub title: String,
    /// Author, 1 to 150 characters.
    #[arg(long)]
    pub author: String,
    /// ISBN, at most 13 characters.
    #[arg(long)]
    pub isbn: Option<String>,
    /// Price with at most two decimal places, e.g. 12.99.
    #[arg(long, default_value = "0", allow_negative_numbers = true)]
    pub price: String,
    /// Free text description.
    #[arg(long)]
    pub description: Option<String>,
    /// Use this id instead of a generated one (a UUID).
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpdatePriceArgs {
    /// The book's id.
    pub id: String,
    /// The new price, e.g. 15.99.
    #[arg(allow_negative_numbers = true)]
    pub price: String,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The book's id.
    pub id: String,
    /// New title.
    #[arg(long)]
    pub title: Option<String>,
    /// New author.
    #[arg(long)]
    pub author: Option<String>,
    /// New ISBN; an empty text clears it.
    #[arg(long)]
    pub isbn: Option<String>,
    /// New description; an empty text clears it.
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(Debug, Args)]
pub struct BookIdArg {
    /// The book's id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The book's id.
    pub id: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// The stream, `bookstore::book-<id>` or `bookstore::book-fact-<id>`.
    pub stream: String,
    /// One JSON object per line: position, type, version, event id, metadata and data.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KafkaCommand {
    /// Ask the cluster for its metadata and print the broker count.
    Check,
    /// Create the topics that are missing; fail if an existing one has other settings.
    Provision,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address of the dashboard and the JSON API.
    #[arg(long, env = "BOOKSTORE_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: std::net::SocketAddr,

    /// Keep adding and repricing demo books, so the dashboard visibly fills.
    #[arg(long)]
    pub demo_data: bool,

    /// Consumer group of the projection; default `<topic prefix>.book-report`.
    #[arg(long = "group", env = "BOOKSTORE_PROJECTION_GROUP")]
    pub group: Option<String>,

    /// Most records per projection batch (one database transaction), as `project
    /// --batch-size` (here `--batch-size` is the relay's).
    #[arg(
        long = "projection-batch-size",
        env = "BOOKSTORE_PROJECTION_BATCH_SIZE",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..=100_000)
    )]
    pub projection_batch_size: u64,

    /// Longest wait for the first record of a projection batch, in milliseconds, as `project
    /// --batch-wait-ms`.
    #[arg(
        long = "projection-batch-wait-ms",
        env = "BOOKSTORE_PROJECTION_BATCH_WAIT_MS",
        default_value_t = 100
    )]
    pub projection_batch_wait_ms: u64,

    /// Also serve Prometheus metrics on this address; the dashboard serves them at `/metrics`
    /// either way.
    #[arg(long = "metrics-addr", env = "BOOKSTORE_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub relay: RelaySettings,
}

impl UpArgs {
    /// The projector's configuration for `group`, with these batch settings.
    pub fn projection_config(&self, group: String) -> ProjectionConfig {
        projection_config(
            group,
            self.projection_batch_size,
            self.projection_batch_wait_ms,
        )
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Consumer group of the projection; default `<topic prefix>.book-report`.
    #[arg(long = "group", env = "BOOKSTORE_PROJECTION_GROUP")]
    pub group: Option<String>,

    /// The relay's settings, as `relay` and `up` take them: with the same relay id as a
    /// running relay, the demo waits for that one instead of publishing the outbox again.
    #[command(flatten)]
    pub relay: RelaySettings,
}

/// The environment variables the command line reads.
pub fn known_environment_variables() -> Vec<String> {
    fn collect(command: &clap::Command, names: &mut Vec<String>) {
        for argument in command.get_arguments() {
            if let Some(env) = argument.get_env() {
                names.push(env.to_string_lossy().into_owned());
            }
        }
        for subcommand in command.get_subcommands() {
            collect(subcommand, names);
        }
    }
    let mut names = vec![];
    collect(&Cli::command(), &mut names);
    names.sort_unstable();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// `up` runs the projector of `project`, so it takes the same batch settings (under names
    /// of their own: `--batch-size` is the relay's there).
    #[test]
    fn up_and_project_give_the_projector_the_same_batch_settings() {
        let projector_of = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            match cli.command {
                Command::Up(up) => up.projection_config("g".into()),
                Command::Project(project) => project.projection_config("g".into()),
                other => panic!("{other:?}"),
            }
        };
        let up = projector_of(&[
            "bookstore",
            "up",
            "--projection-batch-size",
            "7",
            "--projection-batch-wait-ms",
            "3",
            "--batch-size",
            "11",
        ]);
        let project = projector_of(&[
            "bookstore",
            "project",
            "--batch-size",
            "7",
            "--batch-wait-ms",
            "3",
        ]);
        for config in [up, project] {
            assert_eq!(config.batch_size, 7);
            assert_eq!(config.batch_wait, std::time::Duration::from_millis(3));
        }
        let defaults = ProjectionConfig::new("g");
        let up = projector_of(&["bookstore", "up"]);
        assert_eq!(up.batch_size, defaults.batch_size);
        assert_eq!(up.batch_wait, defaults.batch_wait);
    }

    #[test]
    fn environment_variables_include_the_store_and_the_broker() {
        let names = known_environment_variables();
        assert!(names.contains(&"BOOKSTORE_DATABASE_URL".to_owned()));
        assert!(names.contains(&"KAFKA_BOOTSTRAP_SERVERS".to_owned()));
    }
}
