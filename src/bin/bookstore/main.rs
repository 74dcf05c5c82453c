//! The `bookstore` binary: parses the command line, sets up logging, runs one subcommand.
//! Errors end as one line on stderr and a non-zero exit code.

use std::process::ExitCode;
use std::time::Duration;

use bookstore::cli::{Cli, Command};
use bookstore::shutdown::{Shutdown, ShutdownTrigger};
use bookstore::store::AnyStore;
use clap::Parser;

mod bench;
mod books;
mod demo;
mod dlq;
mod events;
mod kafka;
mod project;
mod relay;
mod report;
mod serve;
mod up;

/// How long the runtime waits, once a command has returned, for blocking calls still running.
/// By then every command has finished or safely abandoned its work (see the README on Ctrl-C /
/// SIGTERM); what may still run is a librdkafka call that cannot be cancelled, such as a
/// producer's `init_transactions` or a commit waiting on an unreachable broker for up to its
/// request timeout, or a producer being flushed as it is dropped. Waiting for those would hold
/// the exit past the stop an orchestrator allows before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    bookstore::telemetry::init();
    warn_about_unknown_variables();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    runtime.shutdown_timeout(EXIT_GRACE);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (store, kafka) = (&cli.store, &cli.kafka);
    match cli.command {
        // These stop on Ctrl-C / SIGTERM themselves, finishing or safely abandoning their work.
        // The signals are taken before anything else, the store's connection included: a
        // SIGTERM that comes before the handler is installed is discarded when the process is
        // a container's PID 1, and lost with it the stop.
        Command::Relay(args) => relay::run(store, kafka, args, stop_on_signals()).await,
        Command::Project(args) => project::run(store, kafka, args, stop_on_signals()).await,
        Command::Serve(args) => serve::run(store, kafka, args, stop_on_signals()).await,
        Command::Up(args) => up::run(store, kafka, args, stop_on_signals()).await,
        Command::Demo(args) => demo::run(store, kafka, args, stop_on_signals()).await,
        Command::Bench(args) => bench::run(kafka, args).await,
        // Jobs with nothing to finish: a signal stops them where they are.
        Command::Books(command) => interruptible(books::run(store, command)).await,
        Command::Events(args) => interruptible(events::run(store, args)).await,
        Command::Kafka(command) => interruptible(kafka::run(kafka, command)).await,
        Command::Report(args) => interruptible(report::run(store, args)).await,
        // A replay settles what it sent back before it stops (see `dlq::run`).
        Command::Dlq(command) => dlq::run(kafka, command, stop_on_signals()).await,
    }
}

/// Runs a job until it returns or Ctrl-C / SIGTERM arrives, and then drops it where it stands,
/// as the signal's default action would: every await of these jobs is a safe place to stop (an
/// unfinished database transaction rolls back; they change nothing in Kafka, except `kafka
/// provision`, whose topics are made once and checked the next time). A commit already on its
/// way may still succeed after `interrupted` is printed, as with a killed process: a `books
/// add` to be retried should name its book (`--id`). Handling the signal is still needed: the
/// kernel applies no default action to the first process of a container (PID 1), so a SIGTERM
/// from an orchestrator would be ignored until its SIGKILL.
async fn interruptible(job: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::select! {
        outcome = job => outcome,
        () = bookstore::shutdown::wait_for_signal() => anyhow::bail!("interrupted"),
    }
}

/// A shutdown fired by Ctrl-C or SIGTERM (a second one ends the process at once).
fn stop_on_signals() -> (ShutdownTrigger, Shutdown) {
    let (trigger, shutdown) = ShutdownTrigger::new();
    trigger.on_signals();
    (trigger, shutdown)
}

/// Runs a service's set-up (opening the store, provisioning topics, registering schemas: each
/// can take up to its timeout against a server that does not answer) until it is ready, or
/// until a stop is asked for, which gives `None`. Nothing has started by then that would need
/// finishing, so the set-up is dropped where it stands.
async fn unless_stopped<T, E>(
    shutdown: &Shutdown,
    set_up: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<Option<T>>
where
    anyhow::Error: From<E>,
{
    let mut stop = shutdown.clone();
    tokio::select! {
        ready = set_up => Ok(Some(ready?)),
        () = stop.wait() => {
            tracing::info!("stopped while setting up");
            Ok(None)
        }
    }
}

/// What a command stopped by [`unless_stopped`] returns: a service has done what was asked,
/// a job has not (`nothing_done` says what it did not do).
fn stopped_while_setting_up(is_job: bool, nothing_done: &str) -> anyhow::Result<()> {
    if is_job {
        anyhow::bail!("interrupted while setting up; {nothing_done}");
    }
    Ok(())
}

/// Opens the configured store; an error names it without its password.
async fn open_store(config: &bookstore::config::StoreConfig) -> anyhow::Result<AnyStore> {
    use anyhow::Context as _;
    AnyStore::connect(&config.database_url)
        .await
        .with_context(|| format!("opening the store {}", config.redacted_url()))
}

/// A `BOOKSTORE_*` variable nobody reads is most likely a typo of one that matters.
fn warn_about_unknown_variables() {
    let known = bookstore::cli::known_environment_variables();
    // Read by the test suite and the scripts (`dev`, `.ci/run`, `deploy/`). The binary reads
    // only BOOKSTORE_TEST_DATABASE_URL, as `bench --postgres-url` through clap's `env`.
    let tooling = [
        "BOOKSTORE_TEST_DATABASE_URL",
        "BOOKSTORE_STATE_DIR",
        "BOOKSTORE_CACHE_DIR",
    ];
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    let known = known.iter().map(String::as_str).chain(tooling);
    if let Err(error) = bookstore::config::reject_unknown_variables(names, known) {
        tracing::warn!("{error}; ignored");
    }
}

/// The error and its causes on one line, each said once: many errors repeat their source in
/// their own message, and printing the chain as is would say the same thing twice.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
