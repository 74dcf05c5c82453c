//! The JSON API: report rows out, commands in.
//!
//! Bodies are read as a JSON object and then field by field, so that every wrong field is
//! answered with 422 and its name (`{"error": "title must not be empty", "field": "title"}`),
//! and only a body that is not JSON at all gets 400. Unknown fields are refused rather than
//! ignored, so a typo (`"prize"`) never silently leaves a value unchanged.
//!
//! `GET /api/books` answers a page of the report, a JSON array of rows ordered by title then
//! id: `?limit=` rows (default [`DEFAULT_PAGE_ROWS`], at most [`MAX_PAGE_ROWS`]) after the
//! opaque cursor `?after=`. When more rows follow, the `Link` header names the next page
//! (`Link: </api/books?limit=100&after=…>; rel="next"`); the last page has none. Pages are
//! keyset pages on the index of that order, so the thousandth page costs what the first does.
//!
//! `GET /api/books/{id}` and every command answer the book's version as a strong `ETag`
//! (`"3"`). A client that decides a change on what it read sends that tag back as `If-Match`:
//! if the book has changed since, the command is refused with 412 instead of overwriting a
//! change the client has not seen. Without `If-Match` the last command wins, as before. The
//! report lags the store by the time the pipeline takes, so a tag read from it can be stale
//! for a moment: a 412 then means "read again", and so does one after a concurrent change.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{CONTENT_TYPE, ETAG, IF_MATCH, LINK, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::error::ApiError;
use super::state::{HttpState, HttpStore};
use crate::domain::{AddBook, BookCommand, BookId, Price, UpdateDetails, ValidationError};
use crate::projection::{BookReport, ReportKey};
use crate::service::{CommandContext, CommandOutcome, Expected};

/// One row of the report, as the API shows it. The price is a string (`"12.99"`) so no client
/// ever reads money as a binary float.
#[derive(Debug, Serialize)]
pub(super) struct BookRow {
    book_id: BookId,
    title: String,
    author: String,
    price: String,
    isbn: Option<String>,
    version: u64,
    updated_at: DateTime<Utc>,
}

impl From<BookReport> for BookRow {
    fn from(report: BookReport) -> Self {
        Self {
            book_id: report.book_id,
            title: report.title,
            author: report.author,
            price: report.price.to_string(),
            isbn: report.isbn,
            version: report.version,
            updated_at: report.updated_at,
        }
    }
}

/// What a command did: the book's version after it, and whether it changed anything (a
/// command that changes nothing writes no event).
#[derive(Debug, Serialize)]
pub(super) struct CommandReply {
    book_id: BookId,
    version: u64,
    changed: bool,
}

impl From<CommandOutcome> for CommandReply {
    fn from(outcome: CommandOutcome) -> Self {
        Self {
            book_id: outcome.book_id,
            version: outcome.state.map(|book| book.version).unwrap_or_default(),
            changed: !outcome.events.is_empty(),
        }
    }
}

/// Rows of a page of `GET /api/books` when the request names no `limit`.
pub(super) const DEFAULT_PAGE_ROWS: u32 = 100;

/// The most rows a page of `GET /api/books` may ask for.
pub(super) const MAX_PAGE_ROWS: u32 = 1000;

pub(super) async fn list_books<S: HttpStore>(
    State(state): State<HttpState<S>>,
    RawQuery(query): RawQuery,
) -> Result<(HeaderMap, Json<Vec<BookRow>>), ApiError> {
    let page = PageRequest::parse(query.as_deref().unwrap_or_default())?;
    // One row more than asked tells whether a next page exists, without a request that
    // would answer an empty last page.
    let mut reports = state
        .store()
        .list_reports_page(page.after.as_ref(), page.limit + 1)
        .await?;
    let mut headers = HeaderMap::new();
    if reports.len() > page.limit as usize {
        reports.truncate(page.limit as usize);
        if let Some(last) = reports.last() {
            headers.insert(LINK, next_link(page.limit, &ReportKey::of(last))?);
        }
    }
    Ok((
        headers,
        Json(reports.into_iter().map(BookRow::from).collect()),
    ))
}

/// The `Link` header that leads to the page after `last`.
fn next_link(limit: u32, last: &ReportKey) -> Result<HeaderValue, ApiError> {
    let link = format!(
        "</api/books?limit={limit}&after={}>; rel=\"next\"",
        encode_cursor(last)
    );
    // The cursor is URL-safe base64, so this cannot fail; answered rather than unwrapped.
    HeaderValue::try_from(link).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the next page link is no header value: {error}"),
        )
    })
}

/// The query of `GET /api/books`: `limit` and `after`, each at most once, nothing else.
#[derive(Debug, PartialEq, Eq)]
struct PageRequest {
    limit: u32,
    after: Option<ReportKey>,
}

impl PageRequest {
    fn parse(query: &str) -> Result<Self, ApiError> {
        let (mut limit, mut after) = (None, None);
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let (field, slot) = match name.as_ref() {
                "limit" => ("limit", &mut limit),
                "after" => ("after", &mut after),
                unknown => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("unknown query parameter {unknown:?}; known: limit, after"),
                    ));
                }
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(ValidationError::new(field, "is given twice").into());
            }
        }
        let limit = match limit {
            None => DEFAULT_PAGE_ROWS,
            Some(text) => text
                .parse()
                .ok()
                .filter(|limit| (1..=MAX_PAGE_ROWS).contains(limit))
                .ok_or_else(|| {
                    ValidationError::new(
                        "limit",
                        format!("must be a whole number from 1 to {MAX_PAGE_ROWS}"),
                    )
                })?,
        };
        let after = after.as_deref().map(decode_cursor).transpose()?;
        Ok(Self { limit, after })
    }
}

/// Version byte that opens every cursor, so that a later format can tell its own apart.
const CURSOR_VERSION: u8 = 1;

/// The longest cursor accepted: a title of a few KB (titles have at most 200 characters).
const CURSOR_MAX_CHARS: usize = 8192;

/// The cursor of the page after `key`, opaque to clients: URL-safe base64 (no padding) of
/// [`CURSOR_VERSION`], the 16 bytes of the book id and the UTF-8 title.
fn encode_cursor(key: &ReportKey) -> String {
    let mut bytes = Vec::with_capacity(17 + key.title.len());
    bytes.push(CURSOR_VERSION);
    bytes.extend_from_slice(key.book_id.as_uuid().as_bytes());
    bytes.extend_from_slice(key.title.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The position an [`encode_cursor`] cursor stands for; anything else is refused as `after`.
fn decode_cursor(text: &str) -> Result<ReportKey, ValidationError> {
    let refused = || {
        ValidationError::new(
            "after",
            "must be a cursor as given in the Link header of the previous page",
        )
    };
    if text.is_empty() || text.len() > CURSOR_MAX_CHARS {
        return Err(refused());
    }
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| refused())?;
    let [CURSOR_VERSION, rest @ ..] = bytes.as_slice() else {
        return Err(refused());
    };
    let (id, title) = rest.split_at_checked(16).ok_or_else(refused)?;
    let book_id = BookId::new(Uuid::from_slice(id).map_err(|_| refused())?);
    let title = std::str::from_utf8(title).map_err(|_| refused())?;
    // No title holds a NUL (PostgreSQL text cannot), so no row is at such a position.
    if title.contains('\0') {
        return Err(refused());
    }
    Ok(ReportKey {
        title: title.to_owned(),
        book_id,
    })
}

pub(super) async fn show_book<S: HttpStore>(
    State(state): State<HttpState<S>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<([(HeaderName, String); 1], Json<BookRow>), ApiError> {
    let Path(id) = path?;
    let book_id = book_id_in_path(&id)?;
    match state.store().report(book_id).await? {
        Some(report) => Ok((etag(report.version), Json(report.into()))),
        None => Err(ApiError::not_found(format!(
            "book {book_id} is not in the report"
        ))),
    }
}

pub(super) async fn add_book<S: HttpStore>(
    State(state): State<HttpState<S>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, [(HeaderName, String); 2], Json<CommandReply>), ApiError> {
    let context = command_context(&headers)?;
    let body = JsonObject::parse(&headers, &body?)?;
    body.refuse_unknown(&["book_id", "title", "author", "isbn", "price", "description"])?;
    // A client may name the new book itself, so that it can retry a request whose answer it
    // lost (a timeout, or a 503 after a commit that did happen): the retry is refused with 409
    // instead of adding the book twice.
    let book_id = match body.text("book_id")? {
        Some(text) => text.parse()?,
        None => BookId::generate(),
    };
    let command = BookCommand::Add(AddBook {
        book_id,
        title: body.required_text("title")?,
        author: body.required_text("author")?,
        isbn: body.text("isbn")?,
        price: body.price("price")?.unwrap_or_default(),
        description: body.text("description")?,
    });
    let reply = CommandReply::from(state.service().execute(command, context).await?);
    let location = format!("/api/books/{}", reply.book_id);
    let [etag] = etag(reply.version);
    Ok((
        StatusCode::CREATED,
        [(LOCATION, location), etag],
        Json(reply),
    ))
}

/// A command's answer: its [`CommandReply`], and the book's version after it as the `ETag`
/// to send as `If-Match` with the next command.
fn replied(outcome: CommandOutcome) -> ([(HeaderName, String); 1], Json<CommandReply>) {
    let reply = CommandReply::from(outcome);
    (etag(reply.version), Json(reply))
}

pub(super) async fn update_price<S: HttpStore>(
    State(state): State<HttpState<S>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<([(HeaderName, String); 1], Json<CommandReply>), ApiError> {
    let Path(id) = path?;
    let book_id = book_id_in_path(&id)?;
    let context = command_context(&headers)?;
    let body = JsonObject::parse(&headers, &body?)?;
    body.refuse_unknown(&["price"])?;
    let price = body
        .price("price")?
        .ok_or_else(|| ValidationError::new("price", "is required"))?;
    let command = BookCommand::UpdatePrice { book_id, price };
    Ok(replied(state.service().execute(command, context).await?))
}

pub(super) async fn update_details<S: HttpStore>(
    State(state): State<HttpState<S>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<([(HeaderName, String); 1], Json<CommandReply>), ApiError> {
    let Path(id) = path?;
    let book_id = book_id_in_path(&id)?;
    let context = command_context(&headers)?;
    let body = JsonObject::parse(&headers, &body?)?;
    body.refuse_unknown(&["title", "author", "isbn", "description"])?;
    let mut update = UpdateDetails::new(book_id);
    update.title = body.replacing_text("title")?;
    update.author = body.replacing_text("author")?;
    update.isbn = body.clearable_text("isbn")?;
    update.description = body.clearable_text("description")?;
    let command = BookCommand::UpdateDetails(update);
    Ok(replied(state.service().execute(command, context).await?))
}

pub(super) async fn remove_book<S: HttpStore>(
    State(state): State<HttpState<S>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<([(HeaderName, String); 1], Json<CommandReply>), ApiError> {
    let Path(id) = path?;
    let book_id = book_id_in_path(&id)?;
    let context = command_context(&headers)?;
    let command = BookCommand::Remove { book_id };
    Ok(replied(state.service().execute(command, context).await?))
}

/// A path segment that is not a UUID cannot name a book.
fn book_id_in_path(text: &str) -> Result<BookId, ApiError> {
    text.parse()
        .map_err(|error: ValidationError| ApiError::not_found(format!("no book {text:?}: {error}")))
}

/// The correlation trail of the request: `X-Correlation-Id` (a UUID) and W3C `traceparent`.
fn command_context(headers: &HeaderMap) -> Result<CommandContext, ApiError> {
    let correlation_id = match headers.get("x-correlation-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| Uuid::parse_str(text.trim()).ok())
                .ok_or_else(|| ApiError::bad_request("X-Correlation-Id must be a UUID"))?,
        ),
    };
    // W3C: a `traceparent` that does not parse is ignored (the request starts no trail), not
    // refused, and certainly not passed on to every consumer of the events.
    let traceparent = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| is_traceparent(text))
        .map(str::to_owned);
    Ok(CommandContext {
        correlation_id,
        command_id: None,
        traceparent,
        expected: expected(headers)?,
    })
}

/// What `If-Match` asks of the book (RFC 9110, 13.1.1): `*`, that it exists; a list of entity
/// tags, that its `ETag` is one of them, compared strongly: a weak tag (`W/"3"`), or one this
/// API would not give out (`"03"`, `"x"`), matches no version. `None` without the header. A
/// header that is no list of entity tags is refused with 400.
fn expected(headers: &HeaderMap) -> Result<Option<Expected>, ApiError> {
    let values: Vec<&HeaderValue> = headers.get_all(IF_MATCH).iter().collect();
    if values.is_empty() {
        return Ok(None);
    }
    let refused = || {
        ApiError::bad_request(
            "If-Match must be * or a list of entity tags, as this API gives them in ETag \
             (e.g. \"3\")",
        )
    };
    let mut versions = Vec::new();
    for value in values {
        let text = value.to_str().map_err(|_| refused())?;
        if text.trim() == "*" {
            return Ok(Some(Expected::Exists));
        }
        for (weak, opaque) in entity_tags(text).ok_or_else(refused)? {
            if let Some(version) = version_of_tag(weak, opaque) {
                versions.push(version);
            }
        }
    }
    Ok(Some(Expected::OneOf(versions)))
}

/// The entity tags of a list (`W/"a", "b,c"`): whether each is weak, and its opaque part.
/// Commas inside quotes belong to the tag. `None` if `text` is no such list.
fn entity_tags(text: &str) -> Option<Vec<(bool, &str)>> {
    let mut tags = Vec::new();
    let mut rest = text.trim_start_matches([' ', '\t', ',']);
    while !rest.is_empty() {
        let (weak, quoted) = match rest.strip_prefix("W/") {
            Some(quoted) => (true, quoted),
            None => (false, rest),
        };
        let inside = quoted.strip_prefix('"')?;
        let end = inside.find('"')?;
        tags.push((weak, &inside[..end]));
        let after = inside[end + 1..].trim_start_matches([' ', '\t']);
        if !(after.is_empty() || after.starts_with(',')) {
            return None;
        }
        rest = after.trim_start_matches([' ', '\t', ',']);
    }
    if tags.is_empty() { None } else { Some(tags) }
}

/// The version a strong tag names, spelled exactly as [`etag`] spells it; `None` otherwise.
fn version_of_tag(weak: bool, opaque: &str) -> Option<u64> {
    if weak {
        return None;
    }
    let version: u64 = opaque.parse().ok()?;
    (version.to_string() == opaque).then_some(version)
}

/// The `ETag` of a book at `version`: the version as a strong entity tag.
fn etag(version: u64) -> [(HeaderName, String); 1] {
    [(ETAG, format!("\"{version}\""))]
}

/// Whether `text` is a W3C trace context `traceparent`: `version-trace_id-parent_id-flags` in
/// lower-case hex (2-32-16-2 digits), neither id all zeros, version `ff` never; a later version
/// may add fields after the flags (version 00 may not).
fn is_traceparent(text: &str) -> bool {
    let hex = |part: &str, digits: usize| {
        part.len() == digits && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let not_zero = |part: &str| part.bytes().any(|b| b != b'0');
    let mut parts = text.split('-');
    let (Some(version), Some(trace_id), Some(parent_id), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let later_fields = parts.next().is_some();
    hex(version, 2)
        && version != "ff"
        && !(version == "00" && later_fields)
        && hex(trace_id, 32)
        && not_zero(trace_id)
        && hex(parent_id, 16)
        && not_zero(parent_id)
        && hex(flags, 2)
        && text.len() <= 512
}

/// A request body that is a JSON object, read field by field from each field's JSON text.
///
/// Why the text and not a parsed `Value`: serde_json (without its `arbitrary_precision`
/// feature) reads every non-integer number as an `f64`, so a price of `12.990000000000000001`
/// arrived as 12.99 and `1e-400` as 0, silently accepted instead of refused, and `1e400` failed
/// the whole body. Each field is parsed only when it is read, and a price's number as written.
/// A field given twice is refused: which of the two counts would be a guess.
struct JsonObject(BTreeMap<String, Box<RawValue>>);

/// The fields of a JSON object, each name once (serde's map would keep the last silently).
struct UniqueFields(BTreeMap<String, Box<RawValue>>);

impl<'de> serde::Deserialize<'de> for UniqueFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = UniqueFields;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueFields, A::Error> {
                let mut fields = BTreeMap::new();
                while let Some(name) = map.next_key::<String>()? {
                    if fields.contains_key(&name) {
                        return Err(serde::de::Error::custom(format!(
                            "field {name:?} is given twice"
                        )));
                    }
                    let value: Box<RawValue> = map.next_value()?;
                    fields.insert(name, value);
                }
                Ok(UniqueFields(fields))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

impl JsonObject {
    /// Requires `Content-Type: application/json` (which also keeps plain HTML forms of other
    /// sites from posting here) and a body that is a JSON object.
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Self, ApiError> {
        if !is_json(headers) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        let invalid = |error: serde_json::Error| {
            ApiError::bad_request(format!("the body is not valid JSON: {error}"))
        };
        let value: Box<RawValue> = serde_json::from_slice(body).map_err(invalid)?;
        if !value.get().starts_with('{') {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        serde_json::from_str(value.get())
            .map(|UniqueFields(fields)| Self(fields))
            .map_err(invalid)
    }

    /// The JSON text of `field`, if the body has it.
    fn raw(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(|value| value.get())
    }

    fn refuse_unknown(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|name| !known.contains(&name.as_str())) {
            None => Ok(()),
            Some(unknown) => Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "unknown field {unknown:?}; known fields: {}",
                    known.join(", ")
                ),
            )),
        }
    }

    /// A text field; absent or `null` is `None`.
    fn text(&self, field: &'static str) -> Result<Option<String>, ValidationError> {
        Ok(self.clearable_text(field)?.flatten())
    }

    /// A text field that a change may replace but not clear: absent is `None`, and `null` is
    /// refused rather than read as "unchanged", which a client clearing it would take for
    /// success.
    fn replacing_text(&self, field: &'static str) -> Result<Option<String>, ValidationError> {
        match self.clearable_text(field)? {
            Some(None) => Err(ValidationError::new(
                field,
                "must not be null: a book always has one",
            )),
            kept_or_new => Ok(kept_or_new.flatten()),
        }
    }

    fn required_text(&self, field: &'static str) -> Result<String, ValidationError> {
        self.text(field)?
            .ok_or_else(|| ValidationError::new(field, "is required"))
    }

    /// A text field that `null` clears: absent is `None`, `null` is `Some(None)`.
    fn clearable_text(
        &self,
        field: &'static str,
    ) -> Result<Option<Option<String>>, ValidationError> {
        match self.raw(field) {
            None => Ok(None),
            Some("null") => Ok(Some(None)),
            Some(raw) => match serde_json::from_str(raw) {
                Ok(Value::String(text)) => Ok(Some(Some(text))),
                _ => Err(ValidationError::new(field, "must be a string")),
            },
        }
    }

    /// A price, given as a string (`"12.99"`) or a JSON number (`12.99`, read as written,
    /// never through a float); absent or `null` is `None`.
    fn price(&self, field: &'static str) -> Result<Option<Price>, ValidationError> {
        let not_a_price = || ValidationError::new(field, "must be a decimal number like \"12.99\"");
        let text = match self.raw(field) {
            None | Some("null") => return Ok(None),
            Some(raw) if raw.starts_with('"') => {
                serde_json::from_str::<String>(raw).map_err(|_| not_a_price())?
            }
            Some(raw) if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
                raw.to_owned()
            }
            Some(_) => return Err(not_a_price()),
        };
        // `Price` names its own field; the request may call it otherwise.
        text.parse()
            .map(Some)
            .map_err(|error: ValidationError| ValidationError::new(field, error.rule))
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers
    }

    fn body(text: &str) -> JsonObject {
        JsonObject::parse(&json_headers(), text.as_bytes()).unwrap()
    }

    #[test]
    fn if_match_is_read_as_rfc_9110_says() {
        let read = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(IF_MATCH, value.parse().unwrap());
            expected(&headers)
        };
        assert_eq!(read("*").unwrap(), Some(Expected::Exists));
        assert_eq!(read("\"3\"").unwrap(), Some(Expected::OneOf(vec![3])));
        assert_eq!(
            read(" \"3\" ,\"12\",, W/\"4\", \"03\", \"a,b\"").unwrap(),
            Some(Expected::OneOf(vec![3, 12])),
            "weak and unknown tags match nothing; commas inside quotes belong to the tag"
        );
        assert_eq!(
            read("W/\"3\"").unwrap(),
            Some(Expected::OneOf(vec![])),
            "a weak tag never matches"
        );
        for garbage in ["3", "\"3", "\"3\" \"4\"", "", ",", "W/3", "\"3\"x"] {
            let refused = read(garbage);
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|error| error.status == StatusCode::BAD_REQUEST),
                "{garbage:?}: {refused:?}"
            );
        }
        assert_eq!(expected(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn a_field_given_twice_is_refused() {
        let error = JsonObject::parse(&json_headers(), br#"{"title": "A", "title": "B"}"#)
            .err()
            .expect("a field given twice");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(
            error.message.contains("\"title\" is given twice"),
            "{error}"
        );
        // Nested objects are values, read only when a field is.
        assert!(body(r#"{"a": {"x": 1}, "b": {"x": 2}}"#).raw("b").is_some());
    }

    #[test]
    fn only_a_well_formed_traceparent_is_passed_on() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", value.parse().unwrap());
            command_context(&headers).unwrap().traceparent
        };
        assert_eq!(with(valid).as_deref(), Some(valid));
        assert_eq!(with(&format!(" {valid} ")).as_deref(), Some(valid));
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(with(later).as_deref(), Some(later));
        for invalid in [
            "hello",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(with(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn malformed_or_non_object_bodies_are_bad_requests() {
        for text in ["{", "", "[1]", "\"title\"", "{\"title\": }"] {
            let error = JsonObject::parse(&json_headers(), text.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("{text:?} was accepted"));
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{text:?}");
        }
    }

    #[test]
    fn a_body_without_a_json_content_type_is_refused() {
        let error = JsonObject::parse(&HeaderMap::new(), b"{}").err().unwrap();
        assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn wrong_field_types_name_the_field() {
        let body = body(r#"{"title": 5, "price": true, "isbn": null}"#);
        assert_eq!(body.text("title").unwrap_err().field, "title");
        assert_eq!(body.price("price").unwrap_err().field, "price");
        assert_eq!(body.clearable_text("isbn").unwrap(), Some(None));
        assert_eq!(body.clearable_text("description").unwrap(), None);
        assert_eq!(body.required_text("author").unwrap_err().field, "author");
        assert_eq!(body.replacing_text("isbn").unwrap_err().field, "isbn");
        assert_eq!(body.replacing_text("author").unwrap(), None);
    }

    #[test]
    fn prices_are_read_from_their_decimal_text() {
        let body = body(r#"{"a": "15.99", "b": 15.99, "c": 0.1, "d": "-1"}"#);
        assert_eq!(body.price("a").unwrap().unwrap().cents(), 1599);
        assert_eq!(body.price("b").unwrap().unwrap().cents(), 1599);
        assert_eq!(body.price("c").unwrap().unwrap().cents(), 10);
        assert_eq!(body.price("d").unwrap_err().field, "d");
    }

    /// Numbers a float would have rounded into valid prices, or failed the whole body with.
    #[test]
    fn price_numbers_are_read_as_written_not_as_floats() {
        let body = body(
            r#"{"a": 12.990000000000000001, "b": 12.999999999999999999, "c": 1e-400,
                "d": 1e400, "e": 100000000000000000000, "f": 12.50, "g": -0, "h": [1]}"#,
        );
        let rule = |field| body.price(field).unwrap_err().rule;
        assert_eq!(rule("a"), "must have at most 2 decimal places");
        assert_eq!(rule("b"), "must have at most 2 decimal places");
        assert_eq!(rule("c"), "must be a decimal number like 12.99");
        assert_eq!(rule("d"), "must be a decimal number like 12.99");
        assert_eq!(rule("e"), "must be below 10,000,000,000.00");
        assert_eq!(rule("h"), "must be a decimal number like \"12.99\"");
        assert_eq!(body.price("f").unwrap().unwrap().cents(), 1250);
        assert_eq!(body.price("g").unwrap().unwrap(), Price::ZERO);
        // The other fields still parse when read.
        assert_eq!(body.clearable_text("a").unwrap_err().field, "a");
    }

    fn key(title: &str) -> ReportKey {
        ReportKey {
            title: title.to_owned(),
            book_id: BookId::generate(),
        }
    }

    #[test]
    fn cursors_round_trip_any_title_and_are_url_safe() {
        for title in [
            "",
            "Dune",
            "Same",
            "Äpfel & <Birnen>/?+=",
            "日本語",
            &"x".repeat(800),
        ] {
            let key = key(title);
            let cursor = encode_cursor(&key);
            assert!(
                cursor
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{cursor}"
            );
            assert_eq!(decode_cursor(&cursor), Ok(key));
        }
        // The last page's link is a valid header value.
        let link = next_link(100, &key("Dune")).unwrap();
        let link = link.to_str().unwrap();
        assert!(
            link.starts_with("</api/books?limit=100&after=") && link.ends_with(">; rel=\"next\""),
            "{link}"
        );
    }

    #[test]
    fn garbage_cursors_are_refused_as_after() {
        let valid = encode_cursor(&key("Dune"));
        let encode = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut other_version = vec![2u8];
        other_version.extend_from_slice(&[0; 16]);
        let mut not_utf8 = vec![CURSOR_VERSION];
        not_utf8.extend_from_slice(&[0; 16]);
        not_utf8.extend_from_slice(&[0xff, 0xfe]);
        let mut nul = vec![CURSOR_VERSION];
        nul.extend_from_slice(&[0; 16]);
        nul.extend_from_slice(b"a\0b");
        let garbage = [
            String::new(),
            "!!!".to_owned(),
            "not a cursor".to_owned(),
            format!("{valid}="),
            format!("{valid}+"),
            "ab/+cd".to_owned(),
            encode(b""),
            encode(&[CURSOR_VERSION]),
            encode(&[CURSOR_VERSION; 16]),
            encode(&other_version),
            encode(&not_utf8),
            encode(&nul),
            "A".repeat(CURSOR_MAX_CHARS + 4),
        ];
        for text in garbage {
            let error = decode_cursor(&text).expect_err(&text);
            assert_eq!(error.field, "after", "{text}");
        }
    }

    #[test]
    fn page_requests_read_limit_and_after_and_refuse_the_rest() {
        let key = key("Dune");
        let cursor = encode_cursor(&key);
        assert_eq!(
            PageRequest::parse("").unwrap(),
            PageRequest {
                limit: DEFAULT_PAGE_ROWS,
                after: None
            }
        );
        assert_eq!(
            PageRequest::parse(&format!("limit=1000&after={cursor}")).unwrap(),
            PageRequest {
                limit: 1000,
                after: Some(key)
            }
        );
        assert_eq!(PageRequest::parse("limit=1").unwrap().limit, 1);
        for (query, field) in [
            ("limit=0", Some("limit")),
            ("limit=1001", Some("limit")),
            ("limit=-1", Some("limit")),
            ("limit=ten", Some("limit")),
            ("limit=", Some("limit")),
            ("limit=99999999999999999999", Some("limit")),
            ("limit=1&limit=2", Some("limit")),
            ("after=", Some("after")),
            ("after=%FF", Some("after")),
            ("limt=10", None),
        ] {
            let error = PageRequest::parse(query).expect_err(query);
            assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
            assert_eq!(error.field, field, "{query}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = body(r#"{"prize": "1"}"#)
            .refuse_unknown(&["price"])
            .unwrap_err();
        assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(error.message.contains("prize"));
    }
}
