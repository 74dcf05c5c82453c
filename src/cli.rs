//! The `bookstore` command line: every subcommand and flag, with `--help` on each.
//!
//! Only the shape of the command line lives here (so tests can parse it too); the binary in
//! `src/bin/bookstore/` runs the commands and prints their output.

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::{KafkaConfig, RelaySettings, StoreConfig};

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

    #[test]
    fn environment_variables_include_the_store_and_the_broker() {
        let names = known_environment_variables();
        assert!(names.contains(&"BOOKSTORE_DATABASE_URL".to_owned()));
        assert!(names.contains(&"KAFKA_BOOTSTRAP_SERVERS".to_owned()));
    }
}
