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
//! This build speaks plain HTTP only (ureq without TLS features).

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use super::avro::AvroCodec;
use super::contract::NAMESPACE;
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
}

impl RegistryError {
    /// Whether trying again later may help (the registry is down or overloaded), as opposed to
    /// a request it will always refuse (an incompatible schema, a wrong URL).
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
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

/// A blocking client of a Confluent-compatible schema registry. Cheap to clone (the connection
/// pool is shared).
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base_url: String,
    agent: ureq::Agent,
}

#[derive(Deserialize)]
struct RegisterResponse {
    id: u32,
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
        let base_url = base_url.trim().trim_end_matches('/');
        let invalid = |reason: &str| RegistryError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        if base_url.starts_with("https://") {
            return Err(invalid(
                "https needs ureq's TLS support, which this build does not enable",
            ));
        }
        if !base_url.starts_with("http://") || base_url.len() <= "http://".len() {
            return Err(invalid("expected http://host[:port][/path]"));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .new_agent();
        Ok(Self {
            base_url: base_url.to_owned(),
            agent,
        })
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
            .agent
            .post(&url)
            .header("Content-Type", CONTENT_TYPE)
            .header("Accept", CONTENT_TYPE)
            .send(&body);
        let response: RegisterResponse = read_json("POST", &url, response)?;
        Ok(response.id)
    }

    /// The schema text the registry has under `id`.
    pub fn fetch_schema(&self, id: u32) -> Result<String, RegistryError> {
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let response = self.agent.get(&url).header("Accept", CONTENT_TYPE).call();
        let response: SchemaResponse = read_json("GET", &url, response)?;
        match response.schema_type.as_deref() {
            None | Some("AVRO") => Ok(response.schema),
            Some(other) => Err(RegistryError::BadResponse {
                method: "GET",
                url,
                reason: format!("schema {id} is of type {other}, not AVRO"),
            }),
        }
    }

    /// Sets the compatibility level the registry enforces on `subject`'s new versions.
    ///
    /// Our contracts promise BACKWARD (see `docs/contracts.md`). Confluent's registry enforces
    /// it by default; Apicurio's default is NONE, so whoever provisions the registry sets it —
    /// globally, or per subject with this call.
    pub fn set_compatibility(
        &self,
        subject: &str,
        level: Compatibility,
    ) -> Result<(), RegistryError> {
        let url = format!("{}/config/{}", self.base_url, path_segment(subject));
        let body = serde_json::json!({ "compatibility": level.as_str() }).to_string();
        let response = self
            .agent
            .put(&url)
            .header("Content-Type", CONTENT_TYPE)
            .header("Accept", CONTENT_TYPE)
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
    use super::*;

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
        assert!(matches!(
            RegistryClient::new("https://r"),
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
