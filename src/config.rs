//! One typed configuration, mapped from command-line flags and environment variables.
//!
//! Every setting has a flag and an environment variable, and a default that works on a laptop
//! with the local broker (`deploy/kafka/kafka.sh start`). Environment variables starting with
//! `BOOKSTORE_` that no setting knows are reported as likely typos (every one of them, at
//! start), so a typo does not silently fall back to a default unnoticed.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::codec::registry::{RegistryAccess, RegistryClient, RegistryError};
use crate::relay::DeliveryMode;
use thiserror::Error;

/// Where the local store lives.
#[derive(Debug, Clone, Args)]
pub struct StoreConfig {
    /// Database URL: `sqlite:PATH` (or a plain file path) for the embedded store,
    /// `postgres://user:password@host:port/db` for PostgreSQL.
    #[arg(
        long = "database-url",
        env = "BOOKSTORE_DATABASE_URL",
        default_value = "sqlite:bookstore.db",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,
}

impl StoreConfig {
    /// The database URL as it may be shown in errors and logs: a password in it replaced by
    /// `***`. A value that is no URL (a plain SQLite file path) holds no password.
    pub fn redacted_url(&self) -> String {
        match url::Url::parse(&self.database_url) {
            Ok(mut parsed) if parsed.password().is_some() => {
                // Only fails for URLs that cannot have a password, and this one has one.
                let _ = parsed.set_password(Some("***"));
                parsed.to_string()
            }
            _ => self.database_url.clone(),
        }
    }
}

/// How to reach Kafka and how the topics are laid out.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers, comma separated.
    #[arg(
        long = "bootstrap-servers",
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092",
        global = true
    )]
    pub bootstrap_servers: String,

    /// Extra librdkafka client properties, `key=value`, comma separated or repeated
    /// (e.g. `security.protocol=SASL_SSL,sasl.mechanism=PLAIN`). Applied to every client last,
    /// so they can override any default this program sets, except the `partitioner`, which is
    /// part of the topics' contract. A value may hold commas: text after
    /// a comma without a `=` continues the value (`debug=broker,eos`), and `\,` is always a
    /// comma of the value. White space around keys and values is dropped (`a=1, b=2`), so a
    /// value cannot begin or end with a space, a password included.
    #[arg(
        long = "kafka-option",
        env = "BOOKSTORE_KAFKA_OPTIONS",
        value_parser = ClientOptionsParser,
        hide_env_values = true,
        global = true
    )]
    pub client_options: Vec<ClientOptions>,

    /// Prefix of the topic names: `<prefix>.book`, `<prefix>.book-fact`, `<prefix>.book-fact.dlq`
    /// and the relay's internal `<prefix>.relay-checkpoint`. The default gives the public topic
    /// names; change it only for tests or side-by-side runs.
    #[arg(
        long = "topic-prefix",
        env = "BOOKSTORE_TOPIC_PREFIX",
        default_value = "bookstore",
        global = true
    )]
    pub topic_prefix: String,

    /// Partitions of `<prefix>.book` and `<prefix>.book-fact` when this program creates them;
    /// the dead-letter and checkpoint topics always get 1. An existing topic with another count
    /// is refused at startup: a book's key would map to another partition than before.
    #[arg(
        long = "topic-partitions",
        env = "BOOKSTORE_TOPIC_PARTITIONS",
        default_value_t = 3,
        value_parser = clap::value_parser!(i32).range(1..),
        global = true
    )]
    pub partitions: i32,

    /// Replication factor of the topics when this program creates them; -1 takes the broker's
    /// `default.replication.factor`. An existing topic with fewer replicas is refused at
    /// startup (more are fine); -1 accepts any.
    #[arg(
        long = "topic-replication-factor",
        env = "BOOKSTORE_TOPIC_REPLICATION_FACTOR",
        default_value_t = -1,
        allow_negative_numbers = true,
        value_parser = replication_factor,
        global = true
    )]
    pub replication_factor: i32,

    /// How long a request to the cluster (metadata, topic creation) may take, in milliseconds
    /// (1 s to 7.5 min). Sends that must fail in bounded time get twice this, and so do
    /// exactly-once transactions, which brokers allow up to 15 min by default
    /// (`transaction.max.timeout.ms`).
    #[arg(
        long = "kafka-timeout-ms",
        env = "BOOKSTORE_KAFKA_TIMEOUT_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1_000..=450_000),
        global = true
    )]
    pub request_timeout_ms: u64,

    /// A Confluent-compatible schema registry (e.g. Apicurio's `…/apis/ccompat/v7`). When set,
    /// the relay registers the schemas and frames values the Confluent way (`0x00` + id);
    /// without it, values use Avro single-object encoding (`0xC3 0x01` + fingerprint).
    #[arg(
        long = "schema-registry-url",
        env = "SCHEMA_REGISTRY_URL",
        global = true
    )]
    pub schema_registry_url: Option<String>,

    /// `user:password` for the schema registry's HTTP basic auth (a Confluent Cloud API key and
    /// secret; Confluent's `basic.auth.user.info`). Never shown in help, logs or errors.
    #[arg(
        long = "schema-registry-basic-auth",
        env = "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO",
        hide_env_values = true,
        global = true
    )]
    pub schema_registry_basic_auth: Option<Secret>,

    /// PEM file of the certificates to trust for an `https://` schema registry instead of the
    /// system's (a private CA). `https://` needs a build with the `tls` feature.
    #[arg(
        long = "schema-registry-ca-location",
        env = "SCHEMA_REGISTRY_SSL_CA_LOCATION",
        global = true
    )]
    pub schema_registry_ca_location: Option<PathBuf>,
}

/// A value that must not be printed: its `Debug` is redacted, and it is read without checks,
/// so that a malformed one is refused later without the value in the message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl KafkaConfig {
    /// A configuration for `bootstrap_servers` with every other setting at its default.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            client_options: vec![],
            topic_prefix: "bookstore".into(),
            partitions: 3,
            replication_factor: -1,
            request_timeout_ms: 30_000,
            schema_registry_url: None,
            schema_registry_basic_auth: None,
            schema_registry_ca_location: None,
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The schema registry's URL, if one is configured. An empty value (`SCHEMA_REGISTRY_URL=`,
    /// as deployment templates often leave it) means none, as it does for the test suite.
    pub fn schema_registry(&self) -> Option<&str> {
        self.schema_registry_url
            .as_deref()
            .map(str::trim)
            .filter(|url| !url.is_empty())
    }

    /// A client of the configured schema registry, with its credentials and trusted CA; `None`
    /// without a registry. An empty credential (`SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=`) means
    /// none, as an empty URL does.
    pub fn schema_registry_client(&self) -> Result<Option<RegistryClient>, RegistryError> {
        let Some(url) = self.schema_registry() else {
            return Ok(None);
        };
        let basic_auth = self
            .schema_registry_basic_auth
            .as_ref()
            .map(Secret::expose)
            .filter(|user_info| !user_info.is_empty())
            .map(|user_info| {
                user_info
                    .parse()
                    .map_err(|reason| RegistryError::InvalidCredentials { reason })
            })
            .transpose()?;
        let access = RegistryAccess {
            basic_auth,
            ca_location: self.schema_registry_ca_location.clone(),
        };
        RegistryClient::with_access(url, &access).map(Some)
    }
}

/// How the relay runs (`bookstore relay`).
#[derive(Debug, Clone, Args)]
pub struct RelaySettings {
    /// Delivery guarantee towards Kafka.
    #[arg(
        long = "delivery",
        env = "BOOKSTORE_RELAY_DELIVERY",
        value_enum,
        default_value_t = DeliveryMode::ExactlyOnce
    )]
    pub delivery: DeliveryMode,

    /// Most events per batch (one Kafka transaction in exactly-once mode). Batches fill up
    /// only while there is a backlog; at low load each is committed as soon as it is read.
    #[arg(
        long = "batch-size",
        env = "BOOKSTORE_RELAY_BATCH_SIZE",
        default_value_t = 5_000
    )]
    pub batch_size: usize,

    /// Exactly-once only: after catching up, how long (ms) new events may gather before the
    /// next transaction: fewer, larger transactions at low load, for that much latency. None
    /// by default: the two transactional producers take turns, so a transaction never begins
    /// while the coordinator still completes the previous one of its id (docs/benchmarks.md,
    /// items 7 and 29).
    #[arg(
        long = "batch-linger-ms",
        env = "BOOKSTORE_RELAY_BATCH_LINGER_MS",
        default_value_t = 0
    )]
    pub batch_linger_ms: u64,

    /// Names the relay's lease and checkpoint; default `<topic prefix>.relay`. Relays of the
    /// same store must share it. Exactly-once uses the Kafka transactional ids
    /// `<relay id>.<store id>` and `<relay id>.<store id>.1` (batches take turns between two
    /// producers), so Kafka ACLs must allow both.
    #[arg(long = "relay-id", env = "BOOKSTORE_RELAY_ID")]
    pub relay_id: Option<String>,

    /// Fallback polling interval in milliseconds (commits normally wake the relay at once).
    #[arg(
        long = "poll-interval-ms",
        env = "BOOKSTORE_RELAY_POLL_MS",
        default_value_t = 250
    )]
    pub poll_interval_ms: u64,

    /// Published events older than this many hours are deleted from the outbox.
    #[arg(
        long = "retention-hours",
        env = "BOOKSTORE_OUTBOX_RETENTION_HOURS",
        default_value_t = 168
    )]
    pub retention_hours: u64,

    /// How long the relay lease lasts without renewal, in milliseconds; renewed every third of
    /// it. A relay that dies without releasing it (a crash, SIGKILL) keeps its standbys waiting
    /// this long, so a shorter lease means faster failover, but the database must answer a
    /// renewal within a third of it or the relay stands down.
    #[arg(
        long = "lease-ttl-ms",
        env = "BOOKSTORE_RELAY_LEASE_TTL_MS",
        default_value_t = 15_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub lease_ttl_ms: u64,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            delivery: DeliveryMode::ExactlyOnce,
            batch_size: 5_000,
            batch_linger_ms: 0,
            relay_id: None,
            poll_interval_ms: 250,
            retention_hours: 168,
            lease_ttl_ms: 15_000,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Which piece, not its text: a piece of librdkafka options may be (part of) a password.
    #[error(
        "expected key=value, comma separated, but piece {piece} has no key (the value is not \
         shown: it may hold a secret)"
    )]
    NotKeyValue { piece: usize },
    #[error("unknown environment variable(s) {0} (known: {1})")]
    UnknownVariables(String, String),
}

/// The librdkafka properties of one `--kafka-option` (or of `BOOKSTORE_KAFKA_OPTIONS`), in
/// the order given. Its `Debug` hides the values of secret properties: passwords, client
/// secrets, private keys and the OAUTHBEARER configuration.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientOptions(pub Vec<(String, String)>);

/// Whether a librdkafka property holds a secret: passwords, client secrets, private keys and
/// the OAUTHBEARER configuration (which may carry credentials).
fn is_secret(key: &str) -> bool {
    key.contains("password")
        || key.contains("passphrase")
        || key.contains("secret")
        || key.ends_with(".pem")
        || key == "sasl.oauthbearer.config"
}

/// librdkafka's refusal of one option, worded without its value when the value may be secret:
/// rdkafka's own error text ends with the value, whatever the property, and an unknown
/// property is often a misspelt secret one (`sasl.pasword`).
pub(crate) fn option_refusal(description: &str, key: &str, value: &str) -> String {
    let unknown = description.starts_with("No such configuration property");
    if (is_secret(key) || unknown) && !value.is_empty() {
        format!(
            "{key}: {} (the value is not shown: it may hold a secret)",
            description.replace(value, "<value>")
        )
    } else {
        format!("{key}: {description}")
    }
}

/// Sets every option on a librdkafka configuration, as each client will, so that an unknown
/// property or an invalid value fails when the options are read instead of at the first
/// client, possibly minutes later, in a message that would quote the value.
fn check_with_librdkafka(options: &ClientOptions) -> Result<(), String> {
    // A plugin adds properties of its own once loaded, which a configuration without it does
    // not know: such options are left to the client, as before.
    if options
        .0
        .iter()
        .any(|(key, _)| key == "plugin.library.paths")
    {
        return Ok(());
    }
    for (key, value) in &options.0 {
        let mut config = rdkafka::ClientConfig::new();
        config.set(key, value);
        if let Err(error) = config.create_native_config() {
            return Err(match error {
                rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => {
                    option_refusal(&description, key, value)
                }
                other => format!("{key}: {other}"),
            });
        }
    }
    Ok(())
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.0.iter().map(|(key, value)| {
            let value = if is_secret(key) { "<redacted>" } else { value };
            (key, value)
        });
        f.debug_tuple("ClientOptions")
            .field(&shown.collect::<Vec<_>>())
            .finish()
    }
}

impl ClientOptions {
    /// The options as one `--kafka-option` value that parses back to them.
    pub fn to_argument(&self) -> String {
        self.0
            .iter()
            .map(|(key, value)| format!("{key}={}", value.replace(',', "\\,")))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Parses `key=value` pairs separated by commas. clap's `value_delimiter` cannot do this: it
/// would split values that hold commas (`debug=broker,eos`, a list of bootstrap servers or
/// cipher suites) into pieces that are not `key=value`. So a piece without `=` continues the
/// value before it, and `\,` is a comma that never separates. Empty text (an empty
/// `BOOKSTORE_KAFKA_OPTIONS`) is no options.
fn parse_client_options(text: &str) -> Result<ClientOptions, ConfigError> {
    let mut pieces = Vec::new();
    let mut piece = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&',') => {
                chars.next();
                piece.push(',');
            }
            ',' => pieces.push(std::mem::take(&mut piece)),
            c => piece.push(c),
        }
    }
    pieces.push(piece);
    let mut options: Vec<(String, String)> = Vec::new();
    let pieces = pieces.into_iter().filter(|piece| !piece.trim().is_empty());
    for (number, piece) in (1..).zip(pieces) {
        match (piece.split_once('='), options.last_mut()) {
            (Some((key, value)), _) if !key.trim().is_empty() => {
                options.push((key.trim().to_owned(), value.trim().to_owned()));
            }
            (None, Some((_, value))) => {
                value.push(',');
                value.push_str(piece.trim());
            }
            _ => return Err(ConfigError::NotKeyValue { piece: number }),
        }
    }
    Ok(ClientOptions(options))
}

/// clap's parser for `--kafka-option`: [`parse_client_options`], with an error that does not
/// quote the value. A plain function as value parser would have clap print the whole raw value
/// beside the error, and librdkafka options carry `sasl.password` and the like.
#[derive(Clone, Copy)]
struct ClientOptionsParser;

impl clap::builder::TypedValueParser for ClientOptionsParser {
    type Value = ClientOptions;

    fn parse_ref(
        &self,
        command: &clap::Command,
        argument: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<ClientOptions, clap::Error> {
        let refuse = |reason: String| {
            let name = argument.map_or_else(|| "--kafka-option".to_owned(), ToString::to_string);
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {reason}\n"),
            )
            .with_cmd(command)
        };
        let text = value
            .to_str()
            .ok_or_else(|| refuse("the value is not UTF-8".to_owned()))?;
        let options = parse_client_options(text).map_err(|error| refuse(error.to_string()))?;
        refuse_contract_options(&options).map_err(refuse)?;
        check_with_librdkafka(&options).map_err(refuse)?;
        Ok(options)
    }
}

/// librdkafka properties an option must not set, with why: they would break the public
/// contract of the topics (docs/contracts.md), which other options cannot.
const CONTRACT_PROPERTIES: [(&str, &str); 1] = [(
    "partitioner",
    "a book's partition is murmur2 over its key, as with the Java client's default \
     partitioner, so that producers in any language agree on it (docs/contracts.md)",
)];

fn refuse_contract_options(options: &ClientOptions) -> Result<(), String> {
    for (key, _) in &options.0 {
        if let Some((_, why)) = CONTRACT_PROPERTIES.iter().find(|(name, _)| name == key) {
            return Err(format!("{key} cannot be set: {why}"));
        }
    }
    Ok(())
}

/// clap's parser for `--topic-replication-factor`: -1 or at least 1. Zero and other negative
/// numbers would pass the startup check of existing topics as "any" and fail only at topic
/// creation.
fn replication_factor(text: &str) -> Result<i32, String> {
    match text.trim().parse::<i32>() {
        Ok(factor) if factor == -1 || factor >= 1 => Ok(factor),
        Ok(factor) => Err(format!(
            "{factor} replicas: give at least 1, or -1 for the broker's default"
        )),
        Err(error) => Err(error.to_string()),
    }
}

/// Fails on the `BOOKSTORE_*` variables in `environment` that are not in `known`, naming
/// every one.
pub fn reject_unknown_variables<'a>(
    environment: impl IntoIterator<Item = String>,
    known: impl IntoIterator<Item = &'a str> + Clone,
) -> Result<(), ConfigError> {
    let mut unknown: Vec<String> = environment
        .into_iter()
        .filter(|name| name.starts_with("BOOKSTORE_"))
        .filter(|name| !known.clone().into_iter().any(|known| known == name))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    let mut listed: Vec<&str> = known.into_iter().collect();
    listed.sort_unstable();
    Err(ConfigError::UnknownVariables(
        unknown.join(", "),
        listed.join(", "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(text: &str) -> Vec<(String, String)> {
        parse_client_options(text).unwrap().0
    }

    fn pairs(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    /// As `--help` and the README say: `a=1, b=2` reads as two options, so the white space
    /// around a value goes, a password's too.
    #[test]
    fn white_space_around_keys_and_values_is_dropped() {
        assert_eq!(
            options(" security.protocol = SASL_SSL , sasl.password= s3cret "),
            pairs(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.password", "s3cret")
            ])
        );
    }

    #[test]
    fn key_values_are_split_on_the_first_equals_sign() {
        assert_eq!(
            options("sasl.password=a=b"),
            pairs(&[("sasl.password", "a=b")])
        );
        assert!(parse_client_options("no-equals").is_err());
        assert!(parse_client_options("=value").is_err());
        assert!(parse_client_options("a=1,=value").is_err());
    }

    #[test]
    fn commas_separate_pairs_but_values_may_hold_commas() {
        assert_eq!(
            options("security.protocol=SASL_SSL, sasl.mechanism=PLAIN"),
            pairs(&[
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanism", "PLAIN")
            ])
        );
        assert_eq!(
            options("debug=broker,eos,client.id=x"),
            pairs(&[("debug", "broker,eos"), ("client.id", "x")])
        );
        assert_eq!(
            options(r"sasl.oauthbearer.config=scope=a\,b=c,linger.ms=1"),
            pairs(&[
                ("sasl.oauthbearer.config", "scope=a,b=c"),
                ("linger.ms", "1")
            ])
        );
        assert_eq!(options(""), pairs(&[]));
        assert_eq!(options("linger.ms=1,"), pairs(&[("linger.ms", "1")]));
    }

    #[test]
    fn a_database_password_is_redacted_for_display() {
        let shown = |url: &str| {
            StoreConfig {
                database_url: url.to_owned(),
            }
            .redacted_url()
        };
        assert_eq!(
            shown("postgres://bookstore:hunter2@db:5432/bookstore"),
            "postgres://bookstore:***@db:5432/bookstore"
        );
        assert_eq!(
            shown("postgres://bookstore@db/bookstore"),
            "postgres://bookstore@db/bookstore"
        );
        assert_eq!(shown("sqlite:bookstore.db"), "sqlite:bookstore.db");
        assert_eq!(shown("data/bookstore.db"), "data/bookstore.db");
    }

    #[derive(Debug, clap::Parser)]
    struct KafkaCommand {
        #[command(flatten)]
        kafka: KafkaConfig,
    }

    #[test]
    fn a_malformed_kafka_option_is_refused_without_its_value() {
        use clap::Parser;
        let refused =
            KafkaCommand::try_parse_from(["kafka", "--kafka-option", "sasl.username=me,=hunter2"])
                .unwrap_err();
        let message = refused.to_string();
        assert_eq!(
            refused.kind(),
            clap::error::ErrorKind::ValueValidation,
            "{message}"
        );
        assert!(message.contains("--kafka-option"), "{message}");
        assert!(message.contains("piece 2 has no key"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        assert!(!message.contains("sasl.username"), "{message}");

        let parsed = KafkaCommand::try_parse_from(["kafka", "--kafka-option", "linger.ms=1"]);
        assert_eq!(
            parsed.unwrap().kafka.client_options,
            vec![ClientOptions(pairs(&[("linger.ms", "1")]))]
        );
    }

    #[test]
    fn options_written_as_an_argument_parse_back_to_themselves() {
        let written = ClientOptions(pairs(&[
            ("sasl.oauthbearer.config", "scope=a,b=c"),
            ("debug", "broker,eos"),
            ("linger.ms", "1"),
        ]));
        assert_eq!(
            parse_client_options(&written.to_argument()).unwrap(),
            written
        );
    }

    #[derive(Debug, clap::Parser)]
    struct RelayCommand {
        #[command(flatten)]
        settings: RelaySettings,
    }

    fn relay_settings(args: &[&str]) -> Result<RelaySettings, clap::Error> {
        use clap::Parser;
        let args = std::iter::once("relay").chain(args.iter().copied());
        RelayCommand::try_parse_from(args).map(|command| command.settings)
    }

    #[test]
    fn the_lease_ttl_defaults_to_15_s_and_must_be_positive() {
        use clap::CommandFactory;
        assert_eq!(relay_settings(&[]).unwrap().lease_ttl_ms, 15_000);
        assert_eq!(RelaySettings::default().lease_ttl_ms, 15_000);
        assert_eq!(
            relay_settings(&["--lease-ttl-ms", "2500"])
                .unwrap()
                .lease_ttl_ms,
            2_500
        );
        assert!(relay_settings(&["--lease-ttl-ms", "0"]).is_err());
        assert!(relay_settings(&["--lease-ttl-ms", "-1"]).is_err());
        let command = RelayCommand::command();
        let argument = command
            .get_arguments()
            .find(|argument| argument.get_long() == Some("lease-ttl-ms"))
            .unwrap();
        assert_eq!(
            argument.get_env(),
            Some(std::ffi::OsStr::new("BOOKSTORE_RELAY_LEASE_TTL_MS"))
        );
    }

    #[test]
    fn an_empty_schema_registry_url_means_none() {
        let mut kafka = KafkaConfig::new("localhost:9092");
        for (url, expected) in [
            (None, None),
            (Some(""), None),
            (Some("  "), None),
            (Some(" http://registry:8081 "), Some("http://registry:8081")),
        ] {
            kafka.schema_registry_url = url.map(str::to_owned);
            assert_eq!(kafka.schema_registry(), expected, "{url:?}");
        }
    }

    #[test]
    fn registry_credentials_are_never_shown_and_an_empty_one_means_none() {
        let mut kafka = KafkaConfig::new("localhost:9092");
        assert!(kafka.schema_registry_client().unwrap().is_none());
        kafka.schema_registry_url = Some("http://registry:8081".to_owned());
        kafka.schema_registry_basic_auth = Some(Secret::new(""));
        assert!(kafka.schema_registry_client().unwrap().is_some());

        kafka.schema_registry_basic_auth = Some(Secret::new("hunter2"));
        assert!(!format!("{kafka:?}").contains("hunter2"));
        let error = kafka.schema_registry_client().unwrap_err();
        assert!(
            matches!(error, RegistryError::InvalidCredentials { .. }),
            "{error}"
        );
        assert!(!error.to_string().contains("hunter2"), "{error}");

        kafka.schema_registry_basic_auth = Some(Secret::new("key:hunter2"));
        assert!(kafka.schema_registry_client().unwrap().is_some());
        assert!(!format!("{kafka:?}").contains("hunter2"));
    }

    #[test]
    fn secret_client_options_are_hidden_from_debug_output() {
        let mut kafka = KafkaConfig::new("localhost:9092");
        kafka.client_options = vec![
            parse_client_options(
                "security.protocol=SASL_SSL,sasl.username=bookstore,sasl.password=hunter2",
            )
            .unwrap(),
            parse_client_options(
                "ssl.key.password=hunter3,sasl.oauthbearer.client.secret=hunter4,\
                 sasl.oauthbearer.config=scope=a clientSecret=hunter5,ssl.key.pem=hunter6",
            )
            .unwrap(),
        ];
        let shown = format!("{kafka:?}");
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5", "hunter6"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("\"sasl.username\", \"bookstore\""),
            "{shown}"
        );
        assert!(
            shown.contains("\"security.protocol\", \"SASL_SSL\""),
            "{shown}"
        );
    }

    /// What `--kafka-option` and the other Kafka flags accept, parsed as the binary does.
    fn parse_kafka_flags(args: &[&str]) -> Result<KafkaConfig, String> {
        let args = std::iter::once("bookstore").chain(args.iter().copied());
        <KafkaCommand as clap::Parser>::try_parse_from(args)
            .map(|flags| flags.kafka)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn options_librdkafka_refuses_fail_when_read_without_showing_secrets() {
        // A misspelt secret property: rdkafka's own error would end with the password.
        let error = parse_kafka_flags(&["--kafka-option", "sasl.pasword=hunter2"]).unwrap_err();
        assert!(error.contains("sasl.pasword"), "{error}");
        assert!(error.contains("No such configuration property"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        // A comma in an unescaped password splits it into an unknown property.
        let error = parse_kafka_flags(&["--kafka-option", "sasl.password=hun,ter=2a"]).unwrap_err();
        assert!(error.contains("ter:"), "{error}");
        assert!(!error.contains("2a"), "{error}");
        // An invalid value of an ordinary property.
        let error = parse_kafka_flags(&["--kafka-option", "acks=banana"]).unwrap_err();
        assert!(error.contains("acks: Invalid value"), "{error}");
        // A valid value, but the partitioner is part of the topics' contract.
        let error = parse_kafka_flags(&["--kafka-option", "partitioner=consistent"]).unwrap_err();
        assert!(error.contains("partitioner cannot be set"), "{error}");

        let kafka = parse_kafka_flags(&[
            "--kafka-option",
            "sasl.mechanism=PLAIN,linger.ms=5,debug=broker,eos",
        ])
        .unwrap();
        assert_eq!(kafka.client_options[0].0.len(), 3);

        // A plugin's own properties are unknown until it is loaded: left to the client.
        let kafka = parse_kafka_flags(&[
            "--kafka-option",
            "plugin.library.paths=monitoring-interceptor,confluent.monitoring.interceptor.topic=m",
        ])
        .unwrap();
        assert_eq!(kafka.client_options[0].0.len(), 2);
    }

    #[test]
    fn a_client_error_names_the_option_but_not_a_secret_value() {
        // Options set programmatically are not checked when read.
        let refused = rdkafka::ClientConfig::new()
            .set("sasl.pasword", "hunter2")
            .create_native_config()
            .err()
            .expect("an unknown property");
        assert!(
            refused.to_string().contains("hunter2"),
            "rdkafka's own text"
        );
        let error = crate::kafka::KafkaSetupError::Client {
            bootstrap_servers: "localhost:9092".into(),
            source: refused,
        }
        .to_string();
        assert!(error.contains("sasl.pasword"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }

    #[test]
    fn kafka_timeouts_partition_counts_and_replication_factors_that_mean_nothing_are_refused() {
        for partitions in ["0", "-1", "three"] {
            let refused = parse_kafka_flags(&["--topic-partitions", partitions]);
            assert!(refused.is_err(), "partition count {partitions} accepted");
        }
        let kafka = parse_kafka_flags(&["--topic-partitions", "12"]).unwrap();
        assert_eq!(kafka.partitions, 12);
        for timeout in ["0", "999", "450001", "3600000"] {
            let refused = parse_kafka_flags(&["--kafka-timeout-ms", timeout]);
            assert!(refused.is_err(), "timeout {timeout} accepted");
        }
        for timeout in ["1000", "30000", "450000"] {
            let kafka = parse_kafka_flags(&["--kafka-timeout-ms", timeout]).unwrap();
            assert_eq!(kafka.request_timeout_ms.to_string(), timeout);
        }
        for factor in ["0", "-2", "-5", "three"] {
            let refused = parse_kafka_flags(&["--topic-replication-factor", factor]);
            assert!(refused.is_err(), "replication factor {factor} accepted");
        }
        for factor in ["-1", "1", "3"] {
            let kafka = parse_kafka_flags(&["--topic-replication-factor", factor]).unwrap();
            assert_eq!(kafka.replication_factor.to_string(), factor);
        }
    }

    #[test]
    fn unknown_bookstore_variables_are_rejected_and_others_ignored() {
        let known = ["BOOKSTORE_DATABASE_URL"];
        let env = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(reject_unknown_variables(env(&["BOOKSTORE_DATABASE_URL", "PATH"]), known).is_ok());
        let error = reject_unknown_variables(
            env(&["BOOKSTORE_DATABSE_URL", "PATH", "BOOKSTORE_RELAY_BACH_SIZE"]),
            known,
        )
        .unwrap_err();
        assert_eq!(
            error,
            ConfigError::UnknownVariables(
                "BOOKSTORE_DATABSE_URL, BOOKSTORE_RELAY_BACH_SIZE".into(),
                "BOOKSTORE_DATABASE_URL".into()
            )
        );
    }
}
