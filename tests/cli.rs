//! The `bookstore` command line as a user runs it: `books …`, `events`, `kafka …`, against
//! both stores, including what bad input looks like.

mod common;

use std::process::Output;

use serde_json::Value;

struct Cli {
    database_url: String,
    topic_prefix: String,
    _dir: Option<tempfile::TempDir>,
}

impl Cli {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            database_url: format!("sqlite:{}", dir.path().join("cli.db").display()),
            topic_prefix: common::unique("cli"),
            _dir: Some(dir),
        }
    }

    async fn postgres() -> Self {
        let (_, database_url) = common::postgres_store_with_url().await;
        Self {
            database_url,
            topic_prefix: common::unique("cli"),
            _dir: None,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
            .args(args)
            .env("BOOKSTORE_DATABASE_URL", &self.database_url)
            .env("KAFKA_BOOTSTRAP_SERVERS", common::bootstrap_servers())
            .env("BOOKSTORE_TOPIC_PREFIX", &self.topic_prefix)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "bookstore {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs a command that must fail and returns its one error line.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "bookstore {args:?} succeeded");
        let stderr = String::from_utf8(output.stderr).unwrap();
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
        lines[0].to_owned()
    }
}

fn book_lifecycle_through_the_command_line(cli: &Cli) {
    let id = cli.ok(&[
        "books",
        "add",
        "--title",
        "The Great Gatsby",
        "--author",
        "F. Scott Fitzgerald",
        "--price",
        "12.99",
        "--isbn",
        "9780743273565",
    ]);
    let id = id.trim();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().to_string(), id);

    assert!(
        cli.ok(&["books", "update-price", id, "15.99"])
            .contains("version 2")
    );
    assert!(
        cli.ok(&["books", "update-price", id, "15.99"])
            .contains("unchanged")
    );
    cli.ok(&[
        "books",
        "update",
        id,
        "--description",
        "Jazz Age",
        "--isbn",
        "",
    ]);

    let shown: Value = serde_json::from_str(&cli.ok(&["books", "show", id, "--json"])).unwrap();
    assert_eq!(shown["price"], "15.99");
    assert_eq!(shown["version"], 3);
    assert_eq!(shown["isbn"], Value::Null);
    assert_eq!(shown["description"], "Jazz Age");

    let listed = cli.ok(&["books", "list", "--json"]);
    assert_eq!(listed.lines().count(), 1);

    let stream = format!("bookstore::book-fact-{id}");
    let facts: Vec<Value> = cli
        .ok(&["events", &stream, "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(facts.len(), 3);
    for (index, fact) in facts.iter().enumerate() {
        assert_eq!(fact["type"], "BookFactEvent");
        assert_eq!(fact["version"], index as u64 + 1);
        assert!(fact["position"].as_u64().unwrap() > 0);
        assert!(uuid::Uuid::parse_str(fact["event_id"].as_str().unwrap()).is_ok());
        let fingerprint = bookstore::codec::contract::contract("BookFactEvent")
            .unwrap()
            .fingerprint();
        assert_eq!(fact["schema_fingerprint"], format!("{fingerprint:016x}"));
    }
    assert_eq!(facts[0]["data"]["price"], "12.99");
    assert_eq!(facts[1]["data"]["price"], "15.99");
    // The id may be spelled in upper case; a bare id names no stream, and says so.
    let shouted = format!("bookstore::book-fact-{}", id.to_uppercase());
    assert_eq!(cli.ok(&["events", &shouted]).lines().count(), 3);
    let refused = cli.fails(&["events", id]);
    assert!(refused.contains("names no stream"), "{refused}");
    let deltas = cli.ok(&["events", &format!("bookstore::book-{id}"), "--json"]);
    let types: Vec<String> = deltas
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["type"].to_string())
        .collect();
    assert_eq!(
        types,
        [
            "\"BookAdded\"",
            "\"BookPriceUpdated\"",
            "\"BookDetailsUpdated\""
        ]
    );

    assert!(cli.ok(&["books", "remove", id]).contains("version 4"));
    assert_eq!(cli.ok(&["books", "list", "--json"]).lines().count(), 0);
    let refused = cli.fails(&["books", "update-price", id, "1.00"]);
    assert!(refused.contains("has been removed"), "{refused}");
}

#[test]
fn book_lifecycle_on_sqlite() {
    book_lifecycle_through_the_command_line(&Cli::sqlite());
}

#[tokio::test]
async fn book_lifecycle_on_postgres() {
    let cli = Cli::postgres().await;
    tokio::task::spawn_blocking(move || book_lifecycle_through_the_command_line(&cli))
        .await
        .unwrap();
}

#[test]
fn bad_input_is_one_clear_line_and_a_failing_exit_code_and_writes_nothing() {
    let cli = Cli::sqlite();
    let cases: &[(&[&str], &str)] = &[
        (
            &["books", "add", "--title", " ", "--author", "A"],
            "title must not be empty",
        ),
        (
            &["books", "add", "--title", &"x".repeat(201), "--author", "A"],
            "title must be at most 200 characters",
        ),
        (
            &["books", "add", "--title", "T", "--author", ""],
            "author must not be empty",
        ),
        (
            &[
                "books",
                "add",
                "--title",
                "T",
                "--author",
                "A",
                "--isbn",
                "12345678901234",
            ],
            "isbn must be at most 13 characters",
        ),
        (
            &[
                "books", "add", "--title", "T", "--author", "A", "--price", "-1",
            ],
            "price must not be negative",
        ),
        (
            &[
                "books", "add", "--title", "T", "--author", "A", "--price", "1.999",
            ],
            "at most 2 decimal places",
        ),
        (
            &[
                "books", "add", "--title", "T", "--author", "A", "--price", "abc",
            ],
            "price must be a decimal",
        ),
        (
            &["books", "update-price", "not-a-uuid", "1.00"],
            "book_id must be a UUID",
        ),
        (
            &[
                "books",
                "update-price",
                "00000000-0000-0000-0000-000000000001",
                "1.00",
            ],
            "does not exist",
        ),
    ];
    for (args, expected) in cases {
        let line = cli.fails(args);
        assert!(line.starts_with("error: "), "{line}");
        assert!(line.contains(expected), "{args:?}: {line}");
    }
    assert_eq!(cli.ok(&["books", "list", "--json"]), "");
    let bad_store = Cli {
        database_url: "mysql://nope".into(),
        topic_prefix: "x".into(),
        _dir: None,
    };
    assert!(
        bad_store
            .fails(&["books", "list"])
            .contains("unsupported database URL")
    );
}

/// An event written with another schema (here: a fingerprint no version of ours has) is
/// listed with the reason instead of its data, the events around it are still shown, and the
/// command fails saying how many could not be decoded.
#[tokio::test]
async fn events_lists_every_event_and_fails_on_those_it_cannot_decode() {
    let cli = Cli::sqlite();
    let id = cli.ok(&[
        "books",
        "add",
        "--title",
        "Dune",
        "--author",
        "Frank Herbert",
        "--price",
        "9.99",
    ]);
    let id = id.trim();
    cli.ok(&["books", "update-price", id, "10.99"]);
    let stream = format!("bookstore::book-{id}");
    let first = cli.ok(&["events", &stream, "--json"]);
    let first: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();

    let store = bookstore::store::SqliteStore::connect(&cli.database_url)
        .await
        .unwrap();
    sqlx::query("UPDATE events SET schema_fingerprint = 81985529216486895 WHERE position = ?")
        .bind(first["position"].as_i64().unwrap())
        .execute(store.pool())
        .await
        .unwrap();

    let output = cli.run(&["events", &stream, "--json"]);
    assert!(!output.status.success());
    let listed: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["schema_fingerprint"], "0123456789abcdef");
    assert!(listed[0].get("data").is_none(), "{:?}", listed[0]);
    assert!(
        listed[0]["error"].as_str().unwrap().contains("schema"),
        "{:?}",
        listed[0]
    );
    assert_eq!(listed[1]["data"]["new_price"], "10.99");
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.contains("1 of 2 events"), "{error}");
}

#[test]
fn kafka_check_and_provision_talk_to_the_broker() {
    let cli = Cli::sqlite();
    assert!(cli.ok(&["kafka", "check"]).contains("broker"));
    let provisioned = cli.ok(&["kafka", "provision"]);
    assert!(provisioned.contains(&format!("{}.book-fact: Created", cli.topic_prefix)));
    let again = cli.ok(&["kafka", "provision"]);
    assert!(again.contains("AlreadyPresent"));

    let unreachable = std::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .args([
            "kafka",
            "check",
            "--bootstrap-servers",
            "127.0.0.1:1",
            "--kafka-timeout-ms",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("deploy/kafka/kafka.sh start"));
}

/// A job is stopped by SIGTERM where it stands, with an error line and exit code 1: as the
/// first process of a container (PID 1) it would otherwise ignore the signal, which the kernel
/// does not act on by default there. Here `kafka check` waits for a broker that never answers.
#[test]
fn sigterm_stops_a_job_with_an_error_line() {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .args(["kafka", "check", "--bootstrap-servers", "127.0.0.1:1"])
        .args(["--kafka-timeout-ms", "120000"])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "stopped {:?} after SIGTERM",
        started.elapsed()
    );
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim(), "error: interrupted");
}

/// The jobs among the services (`relay --once`, `project --until-caught-up`, `project
/// --rebuild`) provision the topics before anything else, which against a broker that does not
/// answer takes up to the Kafka timeout (120 s here). A SIGTERM meanwhile stops them at once,
/// with an error, and before a rebuild empties anything.
#[test]
fn sigterm_stops_a_job_still_setting_up() {
    for job in [
        &["relay", "--once"][..],
        &["project", "--until-caught-up"],
        &["project", "--rebuild"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
            .args(job)
            .args(["--bootstrap-servers", "127.0.0.1:1"])
            .args(["--kafka-timeout-ms", "120000"])
            .env(
                "BOOKSTORE_DATABASE_URL",
                format!("sqlite:{}", dir.path().join("jobs.db").display()),
            )
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let started = std::time::Instant::now();
        signal(&child, "TERM");
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{job:?} stopped {:?} after SIGTERM: {stderr}",
            started.elapsed()
        );
        assert_eq!(output.status.code(), Some(1), "{job:?}: {stderr}");
        assert!(
            stderr.contains("error: interrupted while setting up"),
            "{job:?}: {stderr}"
        );
    }
}

/// A second SIGTERM ends a service at once, without waiting out the first one's grace (here
/// the HTTP server's, for a request whose body never completes).
#[test]
fn a_second_sigterm_ends_a_service_at_once() {
    use std::io::Write;

    let dir = tempfile::tempdir().unwrap();
    let port = common::free_local_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .args(["serve", "--addr", &format!("127.0.0.1:{port}")])
        .env(
            "BOOKSTORE_DATABASE_URL",
            format!("sqlite:{}", dir.path().join("serve.db").display()),
        )
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut client = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(client) => break client,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => panic!("the server did not listen within 30 s: {error}"),
        }
    };
    client
        .write_all(
            b"POST /api/books HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"title\"",
        )
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));

    signal(&child, "TERM");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let first_stop_still_waiting = std::time::Instant::now();
    signal(&child, "TERM");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let took = first_stop_still_waiting.elapsed();
    assert!(
        took < std::time::Duration::from_secs(3),
        "exited {took:?} after the second SIGTERM: {stderr}"
    );
    assert_eq!(
        output.status.code(),
        Some(bookstore::shutdown::FORCED_EXIT_CODE),
        "{stderr}"
    );
    assert!(stderr.contains("second shutdown request"), "{stderr}");
    drop(client);
}

fn signal(child: &std::process::Child, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "could not send SIG{name}");
}

/// librdkafka values may hold commas (a server list, `debug` contexts): such an option must
/// reach the client whole, and an empty `BOOKSTORE_KAFKA_OPTIONS` means no options.
#[test]
fn kafka_options_keep_commas_inside_values() {
    let cli = Cli::sqlite();
    let servers = format!(
        "bootstrap.servers=127.0.0.1:1,{}",
        common::bootstrap_servers()
    );
    let checked = cli.ok(&[
        "kafka",
        "check",
        "--kafka-option",
        &servers,
        "--kafka-option",
        "debug=broker,metadata",
    ]);
    assert!(checked.contains("1 broker"), "{checked}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bookstore"))
        .args(["kafka", "check"])
        .env("KAFKA_BOOTSTRAP_SERVERS", common::bootstrap_servers())
        .env("BOOKSTORE_KAFKA_OPTIONS", "")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let rejected = cli.run(&["kafka", "check", "--kafka-option", "sasl.password"]);
    assert!(!rejected.status.success());
    let error = String::from_utf8_lossy(&rejected.stderr);
    assert!(error.contains("expected key=value"), "{error}");
    assert!(
        !error.contains("sasl.password"),
        "the value is echoed: {error}"
    );
}

/// A database URL holds the password: errors name the store without it, and `--help` does not
/// show the value of the variable.
#[test]
fn the_database_password_is_never_shown() {
    let cli = Cli {
        database_url: "postgres://bookstore:hunter2@127.0.0.1:1/x?sslmode=bogus".into(),
        topic_prefix: common::unique("cli"),
        _dir: None,
    };
    let error = cli.fails(&["books", "list"]);
    assert!(
        error.contains("opening the store postgres://bookstore:***@127.0.0.1:1/x"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "{error}");
    // Nor where the scheme is mistyped, or not a database this program knows.
    for url in [
        "postgress://bookstore:hunter2@db/x",
        "mysql://bookstore:hunter2@db/x",
    ] {
        let cli = Cli {
            database_url: url.into(),
            topic_prefix: common::unique("cli"),
            _dir: None,
        };
        let error = cli.fails(&["books", "list"]);
        assert!(error.contains("unsupported database URL scheme"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
    let help = cli.ok(&["books", "--help"]);
    assert!(help.contains("BOOKSTORE_DATABASE_URL"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

#[test]
fn every_command_has_help() {
    let cli = Cli::sqlite();
    for args in [
        vec!["--help"],
        vec!["books", "--help"],
        vec!["books", "add", "--help"],
        vec!["events", "--help"],
        vec!["relay", "--help"],
        vec!["kafka", "provision", "--help"],
    ] {
        let mut with_help = args.clone();
        with_help.retain(|arg| *arg != "--help");
        with_help.push("--help");
        assert!(cli.ok(&with_help).contains("Usage:"), "{args:?}");
    }
}
