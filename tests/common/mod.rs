//! Shared test harness: where the real broker and database come from, and fresh names per test.
//!
//! The broker is taken from `KAFKA_BOOTSTRAP_SERVERS`; when that is unset and a Docker engine is
//! reachable, one is started with testcontainers (official `apache/kafka` image). With neither,
//! the test FAILS and names the command that starts a local broker: never a silent skip. The
//! same holds for PostgreSQL and `BOOKSTORE_TEST_DATABASE_URL`.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod broker;
pub mod freezing_proxy;

use std::sync::OnceLock;
use std::time::Duration;

use bookstore::config::KafkaConfig;
use testcontainers::core::{ContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};
use uuid::Uuid;

const KAFKA_IMAGE: (&str, &str) = ("apache/kafka", "4.1.1");
const POSTGRES_IMAGE: (&str, &str) = ("postgres", "17");

/// A name no other test uses: `<prefix>-<random>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

/// Bootstrap servers of the test broker (see the module doc for where it comes from).
pub fn bootstrap_servers() -> String {
    static SERVERS: OnceLock<String> = OnceLock::new();
    SERVERS
        .get_or_init(|| {
            if let Ok(servers) = std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
                return servers;
            }
            if docker_reachable() {
                return start_kafka_container();
            }
            panic!(
                "no Kafka broker for the tests: set KAFKA_BOOTSTRAP_SERVERS \
                 (start a local broker with `deploy/kafka/kafka.sh start`, which serves \
                 127.0.0.1:9092) or make a Docker engine reachable for testcontainers"
            )
        })
        .clone()
}

/// A Kafka configuration on the test broker with topics of its own (a random prefix).
pub fn kafka_config() -> KafkaConfig {
    let mut config = KafkaConfig::new(bootstrap_servers());
    config.topic_prefix = unique("t");
    config.request_timeout_ms = 20_000;
    config
}

/// URL of the test PostgreSQL database (see the module doc for where it comes from).
pub fn postgres_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("BOOKSTORE_TEST_DATABASE_URL") {
            return url;
        }
        if docker_reachable() {
            return start_postgres_container();
        }
        panic!(
            "no PostgreSQL for the tests: set BOOKSTORE_TEST_DATABASE_URL (start a local one \
             with `deploy/postgres/postgres.sh start`, then use \
             postgres://bookstore:bookstore@127.0.0.1:5432/bookstore_test) or make a Docker \
             engine reachable for testcontainers"
        )
    })
    .clone()
}

fn docker_reachable() -> bool {
    let socket = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|host| host.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".to_owned());
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// Runs `start` on a runtime of its own that outlives the test that asked first, so the
/// container serves every test of the binary; it is removed when the test process ends.
fn on_container_runtime<F>(start: F) -> String
where
    F: std::future::Future<Output = String> + Send + 'static,
{
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime for containers");
        runtime.block_on(async move {
            sender.send(start.await).expect("test harness gone");
            std::future::pending::<()>().await;
        });
    });
    receiver
        .recv_timeout(Duration::from_secs(300))
        .expect("container did not start within 5 minutes")
}

pub fn free_local_port() -> u16 {
    let [port] = free_local_ports();
    port
}

/// `N` free local ports, all different: each is held until all are chosen, since the system
/// may hand out a port just released again (two calls of [`free_local_port`] once gave a
/// broker the same port for its two listeners).
pub fn free_local_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("no free local port"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    })
}

fn start_kafka_container() -> String {
    // Kafka advertises the address clients must use, so the host port is chosen up front.
    let port = free_local_port();
    on_container_runtime(async move {
        let container = GenericImage::new(KAFKA_IMAGE.0, KAFKA_IMAGE.1)
            .with_wait_for(WaitFor::message_on_stdout("Kafka Server started"))
            .with_mapped_port(port, ContainerPort::Tcp(9092))
            .with_env_var("KAFKA_NODE_ID", "1")
            .with_env_var("KAFKA_PROCESS_ROLES", "broker,controller")
            .with_env_var("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
            .with_env_var(
                "KAFKA_ADVERTISED_LISTENERS",
                format!("PLAINTEXT://127.0.0.1:{port}"),
            )
            .with_env_var("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
            .with_env_var(
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            )
            .with_env_var("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
            .with_env_var("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
            .with_env_var("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env_var("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
            .with_env_var("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
            .start()
            .await
            .expect("could not start the apache/kafka container");
        // Kept alive for the whole test process.
        std::mem::forget(container);
        format!("127.0.0.1:{port}")
    })
}

fn start_postgres_container() -> String {
    on_container_runtime(async move {
        let container = GenericImage::new(POSTGRES_IMAGE.0, POSTGRES_IMAGE.1)
            .with_wait_for(WaitFor::message_on_stderr(
                "database system is ready to accept connections",
            ))
            .with_exposed_port(ContainerPort::Tcp(5432))
            .with_env_var("POSTGRES_USER", "bookstore")
            .with_env_var("POSTGRES_PASSWORD", "bookstore")
            .with_env_var("POSTGRES_DB", "bookstore_test")
            .start()
            .await
            .expect("could not start the postgres container");
        let port = container
            .get_host_port_ipv4(ContainerPort::Tcp(5432))
            .await
            .expect("postgres port");
        std::mem::forget(container);
        format!("postgres://bookstore:bookstore@127.0.0.1:{port}/bookstore_test")
    })
}

/// A record as a test reads it back.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: std::collections::HashMap<String, String>,
}

impl Received {
    /// A copy of `message`: header values as (lossy) UTF-8 text, the key as text.
    pub fn of(message: &impl rdkafka::Message) -> Self {
        use rdkafka::message::Headers;

        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        let value = header
                            .value
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default();
                        (header.key.to_owned(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        Received {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("record without header {name}: {self:?}"))
    }

    pub fn position(&self) -> u64 {
        self.header("bookstore_position").parse().unwrap()
    }

    pub fn version(&self) -> u64 {
        self.header("bookstore_aggregate_version").parse().unwrap()
    }
}

/// Reads `topics` from the start as a fresh `read_committed` group until `expected` records
/// arrived and then `quiet` passed without another one (so extra records, e.g. duplicates, are
/// seen too). Fails if `expected` records do not arrive within `timeout`.
pub async fn consume_committed(
    config: &KafkaConfig,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
    quiet: Duration,
) -> Vec<Received> {
    use rdkafka::consumer::Consumer;

    let consumer = config.consumer(&unique("reader")).unwrap();
    consumer.subscribe(topics).unwrap();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = Vec::new();
    loop {
        let wait = if received.len() >= expected {
            quiet
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        let message = match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(message) => message.expect("consumer error"),
            Err(_) if received.len() >= expected => return received,
            Err(_) => panic!(
                "only {} of {expected} records arrived within {timeout:?}",
                received.len()
            ),
        };
        received.push(Received::of(&message));
    }
}

/// A PostgreSQL store in a schema of its own (`t_<random>`), so tests never share positions.
/// The schema is left behind for inspection; test databases are disposable.
pub async fn postgres_store() -> bookstore::store::PostgresStore {
    postgres_store_with_url().await.0
}

/// [`postgres_store`], plus a URL of its schema for processes that only take a URL.
pub async fn postgres_store_with_url() -> (bookstore::store::PostgresStore, String) {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    use std::str::FromStr;

    let url = postgres_url();
    let schema = format!("t_{}", Uuid::new_v4().simple());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect to BOOKSTORE_TEST_DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create test schema");
    admin.close().await;
    let options = PgConnectOptions::from_str(&url)
        .expect("BOOKSTORE_TEST_DATABASE_URL is a postgres:// URL")
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect_with(options)
        .await
        .expect("connect to the test schema");
    let store = bookstore::store::PostgresStore::with_pool(pool)
        .await
        .expect("migrate the test schema");
    let separator = if url.contains('?') { '&' } else { '?' };
    let schema_url = format!("{url}{separator}options=-c%20search_path%3D{schema}");
    (store, schema_url)
}

/// Sends SIGTERM to `child`, still running.
pub fn send_sigterm(child: &tokio::process::Child, name: &str) {
    let pid = child
        .id()
        .expect("the process is still running")
        .to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success(), "could not signal {name}");
}

/// Sends SIGTERM to `child` (a `bookstore` service) and asserts it exits successfully within
/// 30 s: the graceful shutdown every service promises.
pub async fn terminate_gracefully(child: &mut tokio::process::Child, name: &str) {
    send_sigterm(child, name);
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} did not stop within 30 s of SIGTERM"))
        .unwrap();
    assert!(exit.success(), "{name} exited with {exit:?} after SIGTERM");
}

/// A relay's transactional producer for `transactional_id` on `kafka`, initialised.
#[allow(dead_code)] // Used by some of the test crates that include this module.
pub async fn transactional_producer(
    kafka: &KafkaConfig,
    transactional_id: &str,
) -> rdkafka::producer::FutureProducer {
    use rdkafka::producer::Producer as _;
    let producer: rdkafka::producer::FutureProducer = kafka
        .relay_producer_config(Some(transactional_id))
        .create()
        .unwrap();
    let (initialiser, timeout) = (producer.clone(), kafka.request_timeout());
    tokio::task::spawn_blocking(move || initialiser.init_transactions(timeout))
        .await
        .unwrap()
        .unwrap();
    producer
}

/// `BookAdded`'s schema as a version of the contract without the optional `description` would
/// have it: the schema another version wrote an event with, for tests of such events.
#[allow(dead_code)] // Used by some of the test crates that include this module.
pub fn book_added_without_description() -> String {
    let contract = bookstore::codec::contract::contract("BookAdded").unwrap();
    let mut schema: serde_json::Value = serde_json::from_str(contract.schema_json()).unwrap();
    let fields = schema["fields"].as_array_mut().unwrap();
    let before = fields.len();
    fields.retain(|field| field["name"] != "description");
    assert_eq!(
        fields.len(),
        before - 1,
        "BookAdded has a description field"
    );
    schema.to_string()
}

/// A `BookAdded` datum of this version, without a description, as
/// [`book_added_without_description`] writes it: `description` is its last field, and its
/// null is the one byte of the union's first branch.
#[allow(dead_code)]
pub fn without_description(datum: &[u8]) -> Vec<u8> {
    let (last, rest) = datum.split_last().unwrap();
    assert_eq!(
        *last, 0,
        "a BookAdded without description ends with the null branch"
    );
    rest.to_vec()
}
