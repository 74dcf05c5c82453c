//! A client of the Confluent schema registry REST API (also served by Apicurio Registry under
//! `/apis/ccompat/v7`), and the subject names our schemas are registered under.
//!
//! Subjects: each delta event type has its own subject on the delta topic
//! (`TopicRecordNameStrategy`: `bookstore.book-bookstore.events.BookAdded`), so each record
//! evolves under its own compatibility rules and adding an event type never touches the others;
//! the fact topic carries one record type and uses `TopicNameStrategy`
//! (`bookstore.book-fact-value`). `docs/contracts.md` explains the choice.
//!
//! The client is blocking (ureq) and meant for startup: register the schemas once, then frame
//! every event with the ids. From async code call it inside `tokio::task::spawn_blocking`.
//!
//! Access ([`RegistryAccess`]): HTTP basic auth (a Confluent Cloud API key and secret, say),
//! never taken from the URL, which appears in logs and errors; `https://` in builds with the
//! `tls` feature (the system's OpenSSL, its root certificates or a CA file of your own).

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use thiserror::Error;
use tracing::warn;

use super::avro::AvroCodec;
use super::contract::NAMESPACE;
use super::fingerprint::schema_fingerprint;
use crate::domain::EventKind;

/// Environment variable with the registry's base URL, e.g.
/// `http://127.0.0.1:8081/apis/ccompat/v7` for Apicurio's Confluent-compatible API.
pub const SCHEMA_REGISTRY_URL_ENV: &str = "SCHEMA_REGISTRY_URL";

/// Content type of the Confluent REST API.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of an error body goes into an error message.
const MAX_ERROR_BODY_CHARS: usize = 2_000;

/// The subject of a record on a topic that carries several record types
/// (`TopicRecordNameStrategy`): `<topic>-bookstore.events.<EventType>`.
pub fn record_subject(topic: &str, event_type: &str) -> String {
    format!("{topic}-{NAMESPACE}.{event_type}")
}

/// The subject of the values of a topic that carries one record type (`TopicNameStrategy`):
/// `<topic>-value`.
pub fn topic_value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// The subject `event_type` is registered under: delta events per record on `delta_topic`,
/// the fact event per topic on `fact_topic`.
pub fn subject_for(event_type: &str, delta_topic: &str, fact_topic: &str) -> String {
    match EventKind::of_type(event_type) {
        EventKind::Delta => record_subject(delta_topic, event_type),
        EventKind::Fact => topic_value_subject(fact_topic),
    }
}

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("{SCHEMA_REGISTRY_URL_ENV} is not set")]
    NotConfigured,
    /// Not the value itself: it is a secret.
    #[error("invalid schema registry credentials (SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO): {reason}")]
    InvalidCredentials { reason: String },
    #[error("invalid schema registry URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("schema registry unreachable ({method} {url}): {source}")]
    Unreachable {
        method: &'static str,
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("schema registry answered {status} to {method} {url}: {body}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    #[error("schema registry sent a response to {method} {url} that makes no sense: {reason}")]
    BadResponse {
        method: &'static str,
        url: String,
        reason: String,
    },
    /// Schema `id` is not an Avro schema: a record framed with it is not one of ours.
    #[error("schema {id} is of type {schema_type}, not AVRO")]
    NotAvro { id: u32, schema_type: String },
    /// The registry does not know schema `id`, which a record is framed with: asked again later,
    /// since a registry replica can answer before it has caught up with the one the producer
    /// registered the schema with.
    #[error(
        "schema id {id} is not in the registry yet (asked for {waited:?}; a replica may lag \
         behind the one it was registered with)"
    )]
    NotYetKnown { id: u32, waited: Duration },
}

impl RegistryError {
    /// Whether the registry answered that what was asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::Status { status: 404, .. })
    }

    /// Whether trying again later may help (the registry is down or overloaded), as opposed to
    /// a request it will always refuse (an incompatible schema, a wrong URL).
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } | RegistryError::NotYetKnown { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            _ => false,
        }
    }
}

/// A compatibility level of the Confluent API: which schema changes a subject accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compatibility {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Compatibility {
    pub fn as_str(&self) -> &'static str {
        match self {
            Compatibility::None => "NONE",
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
        }
    }
}

/// The compatibility the contract keeps (`docs/contracts.md`, "Evolution rules"): any version
/// of a schema reads data of any other, since consumers upgrade on their own schedule.
pub const CONTRACT_COMPATIBILITY: Compatibility = Compatibility::FullTransitive;

/// Which registry id each of our event types has, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegisteredSchemas {
    ids: HashMap<&'static str, u32>,
    event_types: HashMap<u32, &'static str>,
}

impl RegisteredSchemas {
    pub fn insert(&mut self, event_type: &'static str, id: u32) {
        if let Some(old) = self.ids.insert(event_type, id) {
            self.event_types.remove(&old);
        }
        self.event_types.insert(id, event_type);
    }

    /// The id `event_type`'s schema is registered with.
    pub fn id(&self, event_type: &str) -> Option<u32> {
        self.ids.get(event_type).copied()
    }

    /// The event type registered with `id`.
    pub fn event_type(&self, id: u32) -> Option<&'static str> {
        self.event_types.get(&id).copied()
    }

    /// Every (event type, id) pair.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.ids.iter().map(|(event_type, id)| (*event_type, *id))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// HTTP basic auth for the registry, from `user:password` (Confluent's `basic.auth.user.info`;
/// the password may hold colons). Its `Debug` shows neither part.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    header: String,
}

impl FromStr for BasicAuth {
    type Err = String;

    fn from_str(user_info: &str) -> Result<Self, Self::Err> {
        match user_info.split_once(':') {
            Some((user, _)) if !user.is_empty() => Ok(Self {
                header: format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(user_info)
                ),
            }),
            _ => Err("expected user:password".to_owned()),
        }
    }
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasicAuth(<redacted>)")
    }
}

/// How to reach the registry beyond its URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryAccess {
    pub basic_auth: Option<BasicAuth>,
    /// PEM file of the certificates to trust for an `https://` registry instead of the
    /// system's roots (a private CA).
    pub ca_location: Option<PathBuf>,
}

/// A blocking client of a Confluent-compatible schema registry. Cheap to clone (the connection
/// pool is shared).
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base_url: String,
    agent: ureq::Agent,
    basic_auth: Option<BasicAuth>,
}

#[derive(Deserialize)]
struct RegisterResponse {
    id: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VersionResponse {
    id: u32,
    schema: String,
    schema_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaResponse {
    schema: String,
    schema_type: Option<String>,
}

impl RegistryClient {
    /// A client of the registry at `base_url` (the URL the Confluent API paths hang off).
    pub fn new(base_url: &str) -> Result<Self, RegistryError> {
        Self::with_access(base_url, &RegistryAccess::default())
    }

    /// A client of the registry at `base_url`, authenticating and trusting as `access` says.
    pub fn with_access(base_url: &str, access: &RegistryAccess) -> Result<Self, RegistryError> {
        let base_url = base_url.trim().trim_end_matches('/');
        let invalid = |reason: &str| RegistryError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let (https, rest) = match (
            base_url.strip_prefix("https://"),
            base_url.strip_prefix("http://"),
        ) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(invalid("expected http[s]://host[:port][/path]")),
        };
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            // The URL goes into logs and error messages; credentials must not.
            return Err(RegistryError::InvalidUrl {
                url: "(not shown: it holds credentials)".to_owned(),
                reason: "put the credentials in SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO \
                         (--schema-registry-basic-auth), not in the URL"
                    .to_owned(),
            });
        }
        if authority.is_empty() {
            return Err(invalid("expected http[s]://host[:port][/path]"));
        }
        if access.ca_location.is_some() && !https {
            return Err(invalid("a CA file applies to an https:// registry only"));
        }
        if access.basic_auth.is_some() && !https {
            warn!(
                url = base_url,
                "sending the schema registry's credentials over plain http"
            );
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT));
        let config = if https {
            tls::configure(config, access).map_err(|reason| invalid(&reason))?
        } else {
            config
        };
        Ok(Self {
            base_url: base_url.to_owned(),
            agent: config.build().new_agent(),
            basic_auth: access.basic_auth.clone(),
        })
    }

    /// A request with the headers every call carries.
    fn request<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        let request = request.header("Accept", CONTENT_TYPE);
        match &self.basic_auth {
            Some(auth) => request.header("Authorization", &auth.header),
            None => request,
        }
    }

    /// A client of the registry named by `SCHEMA_REGISTRY_URL`.
    pub fn from_env() -> Result<Self, RegistryError> {
        match std::env::var(SCHEMA_REGISTRY_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => Self::new(&url),
            _ => Err(RegistryError::NotConfigured),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Registers `schema_json` under `subject` and returns its id. Registering a schema the
    /// subject already has returns the id it got the first time.
    pub fn register(&self, subject: &str, schema_json: &str) -> Result<u32, RegistryError> {
        let url = format!(
            "{}/subjects/{}/versions",
            self.base_url,
            path_segment(subject)
        );
        let body = serde_json::json!({ "schema": schema_json }).to_string();
        let response = self
            .request(self.agent.post(&url))
            .header("Content-Type", CONTENT_TYPE)
            .send(&body);
        let response: RegisterResponse = read_json("POST", &url, response)?;
        Ok(response.id)
    }

    /// The schema text the registry has under `id`.
    pub fn fetch_schema(&self, id: u32) -> Result<String, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let response = self.request(self.agent.get(&url)).call();
        let response: SchemaResponse = read_json("GET", &url, response)?;
        match response.schema_type.as_deref() {
            None | Some("AVRO") => Ok(response.schema),
            Some(other) => Err(RegistryError::NotAvro {
                id,
                schema_type: other.to_owned(),
            }),
        }
    }

    /// The id of the version of `subject` whose schema has the CRC-64-AVRO `fingerprint`;
    /// `None` when the subject has no such version (or no versions). This is how the relay finds
    /// the id of another version's schema that wrote an event still in the outbox: that version
    /// registered it under the same subject when its relay started. Newest versions are asked
    /// first, one request each.
    pub fn find_by_fingerprint(
        &self,
        subject: &str,
        fingerprint: u64,
    ) -> Result<Option<u32>, RegistryError> {
        let subject_url = format!(
            "{}/subjects/{}/versions",
            self.base_url,
            path_segment(subject)
        );
        let response = self.request(self.agent.get(&subject_url)).call();
        let versions: Vec<u32> = match read_json("GET", &subject_url, response) {
            Ok(versions) => versions,
            Err(RegistryError::Status { status: 404, .. }) => return Ok(None),
            Err(error) => return Err(error),
        };
        for version in versions.into_iter().rev() {
            let url = format!("{subject_url}/{version}");
            let response = self.request(self.agent.get(&url)).call();
            let response: VersionResponse = read_json("GET", &url, response)?;
            let avro = matches!(response.schema_type.as_deref(), None | Some("AVRO"));
            // A schema that does not parse is no version of ours; keep looking.
            if avro && schema_fingerprint(&response.schema).ok() == Some(fingerprint) {
                return Ok(Some(response.id));
            }
        }
        Ok(None)
    }

    /// Sets the compatibility level the registry enforces on `subject`'s new versions.
    ///
    /// Our contracts promise [`CONTRACT_COMPATIBILITY`] (FULL_TRANSITIVE, see
    /// `docs/contracts.md`), which no registry enforces by default (Confluent's default is
    /// BACKWARD, Apicurio's NONE), so whoever provisions the registry sets it — globally, or per
    /// subject with this call.
    pub fn set_compatibility(
        &self,
        subject: &str,
        level: Compatibility,
    ) -> Result<(), RegistryError> {
        let url = format!("{}/config/{}", self.base_url, path_segment(subject));
        let body = serde_json::json!({ "compatibility": level.as_str() }).to_string();
        let response = self
            .request(self.agent.put(&url))
            .header("Content-Type", CONTENT_TYPE)
            .send(&body);
        let _: serde_json::Value = read_json("PUT", &url, response)?;
        Ok(())
    }

    /// Registers every contract of `codec` under its subject (see [`subject_for`]) and returns
    /// the ids.
    pub fn register_all(
        &self,
        codec: &AvroCodec,
        delta_topic: &str,
        fact_topic: &str,
    ) -> Result<RegisteredSchemas, RegistryError> {
        let mut registered = RegisteredSchemas::default();
        for contract in codec.contracts() {
            let subject = subject_for(contract.event_type(), delta_topic, fact_topic);
            let id = self.register(&subject, contract.schema_json())?;
            registered.insert(contract.event_type(), id);
        }
        Ok(registered)
    }
}

/// `https://` registries: ureq over the system's OpenSSL (native-tls), in builds with the `tls`
/// feature, which links OpenSSL for Kafka's TLS already.
#[cfg(feature = "tls")]
mod tls {
    use ureq::config::ConfigBuilder;
    use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
    use ureq::typestate::AgentScope;

    use super::RegistryAccess;

    pub(super) fn configure(
        config: ConfigBuilder<AgentScope>,
        access: &RegistryAccess,
    ) -> Result<ConfigBuilder<AgentScope>, String> {
        let roots = match &access.ca_location {
            None => RootCerts::PlatformVerifier,
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|error| format!("reading the CA file {}: {error}", path.display()))?;
                let certificates = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(certificate)) => {
                            Some(Ok(certificate.to_owned()))
                        }
                        Ok(_) => None,
                        Err(error) => Some(Err(error)),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| format!("the CA file {}: {error}", path.display()))?;
                if certificates.is_empty() {
                    return Err(format!(
                        "the CA file {} holds no certificate",
                        path.display()
                    ));
                }
                RootCerts::new_with_certs(&certificates)
            }
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::NativeTls)
            .root_certs(roots)
            .build();
        Ok(config.tls_config(tls))
    }
}

#[cfg(not(feature = "tls"))]
mod tls {
    use ureq::config::ConfigBuilder;
    use ureq::typestate::AgentScope;

    use super::RegistryAccess;

    pub(super) fn configure(
        _config: ConfigBuilder<AgentScope>,
        _access: &RegistryAccess,
    ) -> Result<ConfigBuilder<AgentScope>, String> {
        Err("https needs a build with TLS: cargo build --release --features tls".to_owned())
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(
    method: &'static str,
    url: &str,
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<T, RegistryError> {
    let mut response = response.map_err(|source| RegistryError::Unreachable {
        method,
        url: url.to_owned(),
        source: Box::new(source),
    })?;
    let status = response.status().as_u16();
    let body =
        response
            .body_mut()
            .read_to_string()
            .map_err(|source| RegistryError::Unreachable {
                method,
                url: url.to_owned(),
                source: Box::new(source),
            })?;
    if !(200..300).contains(&status) {
        return Err(RegistryError::Status {
            method,
            url: url.to_owned(),
            status,
            body: body.chars().take(MAX_ERROR_BODY_CHARS).collect(),
        });
    }
    serde_json::from_str(&body).map_err(|error| RegistryError::BadResponse {
        method,
        url: url.to_owned(),
        reason: format!(
            "{error}: {}",
            body.chars().take(MAX_ERROR_BODY_CHARS).collect::<String>()
        ),
    })
}

/// `text` percent-encoded for one URL path segment (everything but RFC 3986 unreserved
/// characters).
fn path_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};

    use super::*;

    fn access(user_info: &str) -> RegistryAccess {
        RegistryAccess {
            basic_auth: Some(user_info.parse().unwrap()),
            ca_location: None,
        }
    }

    #[test]
    fn basic_auth_is_user_and_password_in_base64_and_never_printed() {
        // The password may hold colons; only the first one separates.
        let auth: BasicAuth = "key:s3cr:et".parse().unwrap();
        assert_eq!(auth.header, "Basic a2V5OnMzY3I6ZXQ=");
        assert_eq!(format!("{auth:?}"), "BasicAuth(<redacted>)");
        for malformed in ["", "key", ":secret"] {
            assert_eq!(
                malformed.parse::<BasicAuth>(),
                Err("expected user:password".to_owned()),
                "{malformed:?}"
            );
        }
    }

    /// Reads one HTTP request from `stream` (head and `Content-Length` body), answers it with
    /// `{"id":7}`, and returns the head.
    fn answer_one_request(listener: std::net::TcpListener) -> String {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        reader.read_exact(&mut vec![0; length]).unwrap();
        let body = r#"{"id":7}"#;
        write!(
            reader.get_mut(),
            "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        head
    }

    #[test]
    fn every_request_carries_the_basic_auth_header() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/apis/ccompat/v7", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || answer_one_request(listener));
        let client = RegistryClient::with_access(&url, &access("key:s3cr:et")).unwrap();

        assert_eq!(client.register("subject", "\"string\"").unwrap(), 7);

        let head = server.join().unwrap();
        assert!(
            head.starts_with("POST /apis/ccompat/v7/subjects/subject/versions "),
            "{head}"
        );
        let authorization = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim())
        });
        assert_eq!(authorization, Some("Basic a2V5OnMzY3I6ZXQ="), "{head}");
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_showing_them() {
        for url in [
            "http://key:hunter2@registry:8081",
            "https://key:hunter2@registry:8081/apis/ccompat/v7",
        ] {
            let error = RegistryClient::new(url).unwrap_err();
            let message = error.to_string();
            assert!(!message.contains("hunter2"), "{message}");
            assert!(
                message.contains("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
                "{message}"
            );
        }
        // An @ in the path is not a credential.
        RegistryClient::new("http://registry:8081/a@b").unwrap();
    }

    #[test]
    fn a_ca_file_is_for_https_only_and_other_schemes_are_refused() {
        let with_ca = RegistryAccess {
            basic_auth: None,
            ca_location: Some(PathBuf::from("/etc/ssl/ca.pem")),
        };
        let error = RegistryClient::with_access("http://registry:8081", &with_ca).unwrap_err();
        assert!(
            error.to_string().contains("https:// registry only"),
            "{error}"
        );
        for url in [
            "ftp://registry",
            "registry:8081",
            "http://",
            "https:///path",
        ] {
            assert!(
                matches!(
                    RegistryClient::new(url),
                    Err(RegistryError::InvalidUrl { .. })
                ),
                "{url}"
            );
        }
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn https_needs_the_tls_feature() {
        let error = RegistryClient::new("https://registry:8081").unwrap_err();
        assert!(error.to_string().contains("--features tls"), "{error}");
    }

    #[cfg(feature = "tls")]
    #[test]
    fn https_trusts_the_system_roots_or_a_ca_file_that_must_hold_certificates() {
        RegistryClient::new("https://registry:8081").unwrap();
        let missing = RegistryAccess {
            basic_auth: None,
            ca_location: Some(PathBuf::from("/nonexistent/ca.pem")),
        };
        let error = RegistryClient::with_access("https://registry:8081", &missing).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let without = RegistryAccess {
            basic_auth: None,
            ca_location: Some(empty),
        };
        let error = RegistryClient::with_access("https://registry:8081", &without).unwrap_err();
        assert!(
            error.to_string().contains("holds no certificate"),
            "{error}"
        );
    }

    /// Runs the `openssl` command line in `dir`; panics with its output if it fails.
    #[cfg(feature = "tls")]
    fn openssl(dir: &std::path::Path, arguments: &[&str]) {
        let output = std::process::Command::new("openssl")
            .args(arguments)
            .current_dir(dir)
            .output()
            .expect("the openssl command line (Debian package openssl) is needed");
        assert!(output.status.success(), "openssl {arguments:?}: {output:?}");
    }

    /// Against a real TLS server, OpenSSL's `s_server`, with a certificate of a private CA,
    /// serving a registry answer from a file.
    #[cfg(feature = "tls")]
    #[test]
    fn an_https_registry_is_reached_through_a_private_ca_only_when_told_to_trust_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let subject = |name: &str| format!("/CN={name}");
        openssl(
            path,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                &subject("test CA"),
            ],
        );
        openssl(
            path,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                &subject("localhost"),
            ],
        );
        std::fs::write(
            path.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            path,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                "san.ext",
                "-out",
                "server.pem",
            ],
        );
        std::fs::create_dir_all(path.join("schemas/ids")).unwrap();
        std::fs::write(path.join("schemas/ids/1"), r#"{"schema":"\"string\""}"#).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = std::process::Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-WWW",
                "-cert",
                "server.pem",
                "-key",
                "server.key",
            ])
            .args(["-accept", &format!("127.0.0.1:{port}")])
            .current_dir(path)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "s_server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let url = format!("https://localhost:{port}");

        let trusting = RegistryAccess {
            basic_auth: None,
            ca_location: Some(path.join("ca.pem")),
        };
        let fetched = RegistryClient::with_access(&url, &trusting)
            .unwrap()
            .fetch_schema(1);
        let refused = RegistryClient::new(&url).unwrap().fetch_schema(1);
        server.kill().unwrap();
        server.wait().unwrap();

        assert_eq!(fetched.unwrap(), "\"string\"");
        // The system's roots do not know the private CA.
        assert!(
            matches!(refused, Err(RegistryError::Unreachable { .. })),
            "{refused:?}"
        );
    }

    #[test]
    fn subjects_follow_the_confluent_strategies() {
        assert_eq!(
            subject_for("BookAdded", "bookstore.book", "bookstore.book-fact"),
            "bookstore.book-bookstore.events.BookAdded"
        );
        assert_eq!(
            subject_for("BookFactEvent", "bookstore.book", "bookstore.book-fact"),
            "bookstore.book-fact-value"
        );
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("bookstore.book-value"), "bookstore.book-value");
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn urls_are_checked_before_any_request() {
        assert!(matches!(
            RegistryClient::new("localhost:8081"),
            Err(RegistryError::InvalidUrl { .. })
        ));
        let client = RegistryClient::new("http://127.0.0.1:8081/apis/ccompat/v7/").unwrap();
        assert_eq!(client.base_url(), "http://127.0.0.1:8081/apis/ccompat/v7");
    }

    #[test]
    fn registered_schemas_map_both_ways() {
        let mut schemas = RegisteredSchemas::default();
        schemas.insert("BookAdded", 7);
        schemas.insert("BookAdded", 8);
        assert_eq!(schemas.id("BookAdded"), Some(8));
        assert_eq!(schemas.event_type(8), Some("BookAdded"));
        assert_eq!(schemas.event_type(7), None);
    }
}
