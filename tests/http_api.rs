//! `bookstore serve`'s router on an ephemeral port over a real store: commands through the JSON
//! API land in the store with their outbox events, errors have their status and shape, the
//! report is served as JSON and as an escaped HTML page, and the operational endpoints tell
//! the truth about the database, the broker and the relay's backlog.
//!
//! Report rows are written here through the `ReportStore` adapter, as the projector would, so
//! these tests need no broker (except the one readiness check that asks it);
//! `tests/dashboard_browser.rs` runs the whole loop through Kafka.

mod common;

use std::time::Duration;

use bookstore::domain::{BookFactEvent, BookId, Price};
use bookstore::http::{self, HttpState, HttpStore};
use bookstore::projection::{BookReport, ReportChange, ReportStore};
use bookstore::shutdown::ShutdownTrigger;
use bookstore::store::{EventStore, Outbox, SqliteStore};
use chrono::Utc;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The router served on 127.0.0.1:0, stopped when dropped.
struct Server<S> {
    base: String,
    store: S,
    trigger: ShutdownTrigger,
    task: Option<JoinHandle<Result<(), http::HttpError>>>,
    _dir: Option<TempDir>,
}

impl<S: HttpStore + Clone> Server<S> {
    async fn start(store: S, configure: impl FnOnce(HttpState<S>) -> HttpState<S>) -> Self {
        let metrics = bookstore::telemetry::prometheus_handle().unwrap();
        let state = configure(HttpState::new(store.clone(), metrics));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (trigger, shutdown) = ShutdownTrigger::new();
        let task = tokio::spawn(http::serve(listener, http::router(state), shutdown));
        Self {
            base,
            store,
            trigger,
            task: Some(task),
            _dir: None,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> Reply {
        send("GET", self.url(path), None).await
    }

    async fn delete(&self, path: &str) -> Reply {
        send("DELETE", self.url(path), None).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        send(
            "POST",
            self.url(path),
            Some(("application/json", body.to_string())),
        )
        .await
    }

    async fn put(&self, path: &str, body: Value) -> Reply {
        send(
            "PUT",
            self.url(path),
            Some(("application/json", body.to_string())),
        )
        .await
    }

    async fn patch(&self, path: &str, body: Value) -> Reply {
        send(
            "PATCH",
            self.url(path),
            Some(("application/json", body.to_string())),
        )
        .await
    }

    /// Adds a book through the API and returns its id.
    async fn add_book(&self, title: &str, price: &str) -> BookId {
        let reply = self
            .post(
                "/api/books",
                json!({"title": title, "author": "Ann Author", "price": price}),
            )
            .await;
        assert_eq!(reply.status, 201, "{reply:?}");
        reply.json()["book_id"].as_str().unwrap().parse().unwrap()
    }

    /// Writes the book's current state to the read model, as the projector would.
    async fn project(&self, book_id: BookId) {
        let book = self.store.load_book(book_id).await.unwrap().unwrap();
        let change = if book.removed {
            ReportChange::Delete {
                book_id,
                version: Some(book.version),
            }
        } else {
            ReportChange::Upsert {
                fact: BookFactEvent::of(&book),
                changed_at: Utc::now(),
            }
        };
        self.store
            .apply_batch("http-test", "http-test.book-fact", &[change], &[])
            .await
            .unwrap();
    }
}

impl Server<SqliteStore> {
    async fn sqlite() -> Self {
        Self::sqlite_with(|state| state).await
    }

    async fn sqlite_with(
        configure: impl FnOnce(HttpState<SqliteStore>) -> HttpState<SqliteStore>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(dir.path().join("bookstore.db").to_str().unwrap())
            .await
            .unwrap();
        let mut server = Self::start(store, configure).await;
        server._dir = Some(dir);
        server
    }
}

impl<S> Drop for Server<S> {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    location: Option<String>,
    allow: Option<String>,
    link: Option<String>,
    etag: Option<String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }

    /// Asserts an error reply: `status`, a JSON body with a message, and `field` if given.
    fn assert_error(&self, status: u16, field: Option<&str>) {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert!(
            body["error"].as_str().is_some_and(|text| !text.is_empty()),
            "{self:?}"
        );
        assert_eq!(body["field"].as_str(), field, "{self:?}");
    }
}

/// One request with ureq (blocking, so on the blocking pool); every status is a reply.
async fn send(method: &'static str, url: String, body: Option<(&'static str, String)>) -> Reply {
    send_with(method, url, body, vec![]).await
}

/// [`send`] with more request headers.
async fn send_with(
    method: &'static str,
    url: String,
    body: Option<(&'static str, String)>,
    headers: Vec<(&'static str, String)>,
) -> Reply {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = match body {
            Some((content_type, body)) => agent.run(
                request
                    .header("content-type", content_type)
                    .body(body)
                    .unwrap(),
            ),
            None => agent.run(request.body(()).unwrap()),
        };
        let mut response = response.unwrap_or_else(|error| panic!("{method} {url}: {error}"));
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let location = header("location");
        let allow = header("allow");
        let link = header("link");
        let etag = header("etag");
        Reply {
            status: response.status().as_u16(),
            content_type,
            location,
            allow,
            link,
            etag,
            body: response.body_mut().read_to_string().unwrap(),
        }
    })
    .await
    .unwrap()
}

/// Add, reprice, change details, read back through the report, remove: each command is one
/// transaction with its delta and fact events in the outbox.
async fn book_round_trip<S: HttpStore + Clone>(server: &Server<S>) {
    let added = server
        .post(
            "/api/books",
            json!({
                "title": "The Outbox Pattern",
                "author": "Ann Author",
                "isbn": "9780000000001",
                "price": "12.50",
                "description": "Reliable events"
            }),
        )
        .await;
    assert_eq!(added.status, 201, "{added:?}");
    let book_id: BookId = added.json()["book_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(added.location, Some(format!("/api/books/{book_id}")));
    let book = server.store.load_book(book_id).await.unwrap().unwrap();
    assert_eq!(
        (book.title.as_str(), book.price.to_string(), book.version),
        ("The Outbox Pattern", "12.50".to_owned(), 1)
    );
    assert_eq!(
        server.store.head_position().await.unwrap(),
        2,
        "delta + fact"
    );

    let path = format!("/api/books/{book_id}");
    let repriced = server
        .put(&format!("{path}/price"), json!({"price": "15.99"}))
        .await;
    assert_eq!(repriced.status, 200, "{repriced:?}");
    assert_eq!(repriced.json()["version"], 2);
    let unchanged = server
        .put(&format!("{path}/price"), json!({"price": 15.99}))
        .await;
    assert_eq!(unchanged.json()["changed"], false, "{unchanged:?}");

    let patched = server
        .patch(
            &path,
            json!({"title": "The Outbox Pattern, 2nd ed.", "isbn": null}),
        )
        .await;
    assert_eq!(patched.status, 200, "{patched:?}");
    let book = server.store.load_book(book_id).await.unwrap().unwrap();
    assert_eq!(book.title, "The Outbox Pattern, 2nd ed.");
    assert_eq!(book.isbn, None);
    assert_eq!(book.description.as_deref(), Some("Reliable events"));
    assert_eq!(book.price.to_string(), "15.99");

    server.project(book_id).await;
    let rows = server.get("/api/books").await;
    assert_eq!(rows.status, 200, "{rows:?}");
    assert!(rows.content_type.starts_with("application/json"));
    assert_eq!(
        rows.json(),
        json!([{
            "book_id": book_id.to_string(),
            "title": "The Outbox Pattern, 2nd ed.",
            "author": "Ann Author",
            "price": "15.99",
            "isbn": null,
            "version": 3,
            "updated_at": rows.json()[0]["updated_at"],
        }])
    );
    let row = server.get(&path).await;
    assert_eq!(row.json()["price"], "15.99", "{row:?}");

    let removed = server.delete(&path).await;
    assert_eq!(removed.status, 200, "{removed:?}");
    assert_eq!(removed.json()["version"], 4);
    assert!(
        server
            .store
            .load_book(book_id)
            .await
            .unwrap()
            .unwrap()
            .removed
    );
    assert_eq!(server.store.head_position().await.unwrap(), 8);
    server.project(book_id).await;
    server.get(&path).await.assert_error(404, None);
}

#[tokio::test]
async fn book_round_trip_through_the_api_on_sqlite() {
    book_round_trip(&Server::sqlite().await).await;
}

#[tokio::test]
async fn book_round_trip_through_the_api_on_postgres() {
    let server = Server::start(common::postgres_store().await, |state| state).await;
    book_round_trip(&server).await;
}

#[tokio::test]
async fn invalid_input_is_refused_with_its_field_and_writes_nothing() {
    let server = Server::sqlite().await;
    let refusals = [
        (json!({"title": "", "author": "A"}), Some("title")),
        (json!({"author": "A"}), Some("title")),
        (json!({"title": 7, "author": "A"}), Some("title")),
        (json!({"title": "T", "author": "  "}), Some("author")),
        (
            json!({"title": "T", "author": "A", "price": "-1"}),
            Some("price"),
        ),
        (
            json!({"title": "T", "author": "A", "price": "1.001"}),
            Some("price"),
        ),
        (
            json!({"title": "T", "author": "A", "price": [1]}),
            Some("price"),
        ),
        (
            json!({"title": "x".repeat(201), "author": "A"}),
            Some("title"),
        ),
        (json!({"title": "T", "author": "A", "prize": "1"}), None),
    ];
    for (body, field) in refusals {
        let reply = server.post("/api/books", body.clone()).await;
        assert_eq!(reply.status, 422, "{body}: {reply:?}");
        reply.assert_error(422, field);
    }

    let url = server.url("/api/books");
    for text in ["{\"title\": ", "not json", "[\"a list\"]", ""] {
        let reply = send("POST", url.clone(), Some(("application/json", text.into()))).await;
        reply.assert_error(400, None);
    }
    let form = send(
        "POST",
        url.clone(),
        Some((
            "application/x-www-form-urlencoded",
            "title=T&author=A".into(),
        )),
    )
    .await;
    form.assert_error(415, None);
    // A price number that a float would round into a valid one; a body over axum's 2 MiB
    // limit. Both answered in the API's JSON shape.
    let rounded = r#"{"title": "T", "author": "A", "price": 12.990000000000000001}"#;
    let reply = send(
        "POST",
        url.clone(),
        Some(("application/json", rounded.into())),
    )
    .await;
    reply.assert_error(422, Some("price"));
    let huge = format!(
        r#"{{"title": "T", "author": "A", "description": "{}"}}"#,
        "x".repeat(2 << 20)
    );
    let reply = send("POST", url.clone(), Some(("application/json", huge))).await;
    reply.assert_error(413, None);
    assert_eq!(server.store.head_position().await.unwrap(), 0);

    let book_id = server.add_book("Priced", "1.00").await;
    let reply = server
        .put(
            &format!("/api/books/{book_id}/price"),
            json!({"price": "cheap"}),
        )
        .await;
    reply.assert_error(422, Some("price"));
    let reply = server
        .put(&format!("/api/books/{book_id}/price"), json!({}))
        .await;
    reply.assert_error(422, Some("price"));
    let reply = server
        .patch(&format!("/api/books/{book_id}"), json!({"title": ""}))
        .await;
    reply.assert_error(422, Some("title"));
    // `null` clears an optional field; a title or an author cannot be cleared, so it is
    // refused, not read as "unchanged".
    for field in ["title", "author"] {
        let reply = server
            .patch(&format!("/api/books/{book_id}"), json!({ field: null }))
            .await;
        reply.assert_error(422, Some(field));
    }
    // A path that is not percent-encoded UTF-8.
    server.get("/api/books/%FF").await.assert_error(400, None);
    server
        .put("/api/books/%FF/price", json!({"price": "1.00"}))
        .await
        .assert_error(400, None);
    assert_eq!(server.store.head_position().await.unwrap(), 2);
}

#[tokio::test]
async fn unknown_books_are_404_and_removed_books_409() {
    let server = Server::sqlite().await;
    let unknown = BookId::generate();
    let path = format!("/api/books/{unknown}");
    server.get(&path).await.assert_error(404, None);
    server
        .put(&format!("{path}/price"), json!({"price": "1.00"}))
        .await
        .assert_error(404, None);
    server
        .patch(&path, json!({"title": "T"}))
        .await
        .assert_error(404, None);
    server.delete(&path).await.assert_error(404, None);
    server
        .get("/api/books/not-a-uuid")
        .await
        .assert_error(404, None);
    server.get("/no/such/page").await.assert_error(404, None);
    // A path that exists, with a method it does not take: the same JSON shape, and what it
    // takes in `Allow`.
    let refused = server.put("/api/books", json!({"price": "1.00"})).await;
    refused.assert_error(405, None);
    let allow = refused.allow.clone().unwrap_or_default();
    assert!(
        allow.contains("GET") && allow.contains("POST"),
        "{refused:?}"
    );

    let book_id = server.add_book("Soon gone", "3.00").await;
    let path = format!("/api/books/{book_id}");
    assert_eq!(server.delete(&path).await.status, 200);
    server
        .put(&format!("{path}/price"), json!({"price": "4.00"}))
        .await
        .assert_error(409, None);
    server
        .patch(&path, json!({"title": "Back"}))
        .await
        .assert_error(409, None);
    let again = server.delete(&path).await;
    assert_eq!(
        (again.status, &again.json()["changed"]),
        (200, &json!(false))
    );
}

/// A client that decided a change on what it read sends the version it read as `If-Match`: a
/// change it has not seen refuses its command with 412 instead of being overwritten.
#[tokio::test]
async fn if_match_refuses_a_change_decided_on_a_stale_version() {
    let server = Server::sqlite().await;
    let price = |path: &str, if_match: &str, price: &str| {
        send_with(
            "PUT",
            server.url(&format!("{path}/price")),
            Some(("application/json", json!({ "price": price }).to_string())),
            vec![("if-match", if_match.to_owned())],
        )
    };
    let book_id = server.add_book("Contested", "10.00").await;
    let path = format!("/api/books/{book_id}");
    server.project(book_id).await;
    let read = server.get(&path).await;
    assert_eq!(read.etag.as_deref(), Some("\"1\""), "{read:?}");

    // A reads version 1, B changes the price first, then A's change arrives.
    let b = price(&path, "\"1\"", "12.00").await;
    assert_eq!((b.status, b.etag.as_deref()), (200, Some("\"2\"")), "{b:?}");
    let a = price(&path, "\"1\"", "11.00").await;
    a.assert_error(412, None);
    assert!(
        a.json()["error"].as_str().unwrap().contains("version 2"),
        "{a:?}"
    );
    let book = server.store.load_book(book_id).await.unwrap().unwrap();
    assert_eq!(
        (book.version, book.price.to_string()),
        (2, "12.00".to_owned())
    );

    // A list matches any of its tags; `*` any version; a weak tag never matches.
    assert_eq!(price(&path, "\"7\", \"2\"", "11.00").await.status, 200);
    assert_eq!(price(&path, "*", "11.50").await.status, 200);
    price(&path, "W/\"4\"", "13.00")
        .await
        .assert_error(412, None);
    price(&path, "\"04\"", "13.00")
        .await
        .assert_error(412, None);
    price(&path, "four", "13.00").await.assert_error(400, None);
    // The other commands take it too.
    let remove = |if_match: &str| {
        send_with(
            "DELETE",
            server.url(&path),
            None,
            vec![("if-match", if_match.to_owned())],
        )
    };
    remove("\"3\"").await.assert_error(412, None);
    let removed = remove("\"4\"").await;
    assert_eq!(
        (removed.status, removed.etag.as_deref()),
        (200, Some("\"5\"")),
        "{removed:?}"
    );
    let add = |if_match: &str| {
        send_with(
            "POST",
            server.url("/api/books"),
            Some((
                "application/json",
                json!({"title": "T", "author": "A"}).to_string(),
            )),
            vec![("if-match", if_match.to_owned())],
        )
    };
    // An add expecting a version of a book that does not exist.
    add("\"1\"").await.assert_error(412, None);
    // `*`: the book must exist, and not be removed.
    add("*").await.assert_error(412, None);
    price(&path, "*", "13.00").await.assert_error(412, None);
}

/// A client that names the new book can retry an add whose answer it lost: the retry is a
/// 409 and the book exists once.
#[tokio::test]
async fn an_add_with_the_clients_book_id_can_be_retried_without_adding_twice() {
    let server = Server::sqlite().await;
    let book_id = BookId::generate();
    let body = json!({"book_id": book_id.to_string(), "title": "Once", "author": "A"});
    let created = server.post("/api/books", body.clone()).await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.json()["book_id"], json!(book_id.to_string()));
    server
        .post("/api/books", body)
        .await
        .assert_error(409, None);
    let stored = server.store.load_book(book_id).await.unwrap().unwrap();
    assert_eq!((stored.version, stored.title.as_str()), (1, "Once"));

    server
        .post(
            "/api/books",
            json!({"book_id": "not-a-uuid", "title": "T", "author": "A"}),
        )
        .await
        .assert_error(422, Some("book_id"));
}

#[tokio::test]
async fn liveness_and_readiness_follow_the_database() {
    let server = Server::sqlite().await;
    let health = server.get("/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(
        ready.json(),
        json!({"status": "ready", "checks": {"database": "ok"}})
    );

    server.store.pool().close().await;
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_ne!(ready.json()["checks"]["database"], "ok", "{ready:?}");
    assert_eq!(server.get("/healthz").await.status, 200);
    server
        .post("/api/books", json!({"title": "T", "author": "A"}))
        .await
        .assert_error(503, None);
    assert_eq!(server.get("/api/books").await.status, 503);
    let page = server.get("/").await;
    assert_eq!(page.status, 503);
    assert!(page.body.contains("cannot be read right now"), "{page:?}");
}

#[tokio::test]
async fn readiness_asks_the_broker_when_given_one() {
    let kafka = common::kafka_config();
    let server = Server::sqlite_with(|state| state.with_kafka_readiness(kafka)).await;
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.json()["checks"]["kafka"], "ok");

    let nowhere =
        bookstore::config::KafkaConfig::new(format!("127.0.0.1:{}", common::free_local_port()));
    let server = Server::sqlite_with(|state| {
        state
            .with_kafka_readiness(nowhere)
            .with_probe_timeout(Duration::from_secs(1))
    })
    .await;
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert_eq!(ready.json()["checks"]["database"], "ok");
    assert_ne!(ready.json()["checks"]["kafka"], "ok", "{ready:?}");
}

fn metric_line<'a>(text: &'a str, name: &str, labels: &[&str]) -> Option<&'a str> {
    text.lines().find(|line| {
        line.split(['{', ' ']).next() == Some(name) && labels.iter().all(|l| line.contains(l))
    })
}

fn metric_value(text: &str, name: &str) -> f64 {
    let line = metric_line(text, name, &[]).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn metrics_show_the_relay_backlog_and_count_requests() {
    let server = Server::sqlite_with(|state| state.with_relay_id("http-test.relay")).await;
    server.add_book("One", "1.00").await;
    server.add_book("Two", "2.00").await;

    let scrape = server.get("/metrics").await;
    assert_eq!(scrape.status, 200, "{scrape:?}");
    assert!(scrape.content_type.starts_with("text/plain"), "{scrape:?}");
    assert_eq!(
        metric_value(&scrape.body, "bookstore_relay_backlog_events"),
        4.0
    );
    assert_eq!(
        metric_value(&scrape.body, "bookstore_relay_last_published_position"),
        0.0
    );
    let added = metric_line(
        &scrape.body,
        "bookstore_http_requests_total",
        &["method=\"POST\"", "route=\"/api/books\"", "status=\"201\""],
    );
    assert!(added.is_some(), "no request counter in:\n{}", scrape.body);

    server
        .store
        .record_published("http-test.relay", 3)
        .await
        .unwrap();
    let scrape = server.get("/metrics").await;
    assert_eq!(
        metric_value(&scrape.body, "bookstore_relay_backlog_events"),
        1.0
    );
    assert_eq!(
        metric_value(&scrape.body, "bookstore_relay_last_published_position"),
        3.0
    );
}

#[tokio::test]
async fn dashboard_escapes_markup_sorts_and_totals() {
    let server = Server::sqlite().await;
    let script = server
        .add_book("<script>alert('pwned')</script>", "20.00")
        .await;
    let plain = server.add_book("Plain & Simple", "5.00").await;
    server.project(script).await;
    server.project(plain).await;

    let page = server.get("/").await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.content_type.starts_with("text/html"), "{page:?}");
    assert!(
        page.body
            .contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"),
        "{}",
        page.body
    );
    assert!(
        !page.body.contains("<script"),
        "unescaped markup:\n{}",
        page.body
    );
    assert!(page.body.contains("Plain &amp; Simple"));
    assert!(
        page.body
            .contains("<meta http-equiv=\"refresh\" content=\"5\">")
    );
    assert!(page.body.contains("<b id=\"total-books\">2</b>"));
    assert!(page.body.contains("<b id=\"total-price\">25.00</b>"));
    assert!(page.body.contains("<b id=\"average-price\">12.50</b>"));

    let position = |body: &str, id: BookId| body.find(&id.to_string()).unwrap();
    let by_price_desc = server.get("/?sort=price&dir=desc").await.body;
    assert!(position(&by_price_desc, script) < position(&by_price_desc, plain));
    let by_price_asc = server.get("/?sort=price&dir=asc").await.body;
    assert!(position(&by_price_asc, plain) < position(&by_price_asc, script));
    assert!(by_price_asc.contains("href=\"?sort=price&amp;dir=desc\""));
    let garbled = server.get("/?sort=%ZZ&dir").await;
    assert_eq!(garbled.status, 200, "{garbled:?}");
}

/// Writes report rows straight into the read model, as the projector would (no commands): one
/// per `(title, price)`, each a new book.
async fn project_books<S: HttpStore>(store: &S, books: &[(String, Price)]) -> Vec<BookId> {
    let changes: Vec<ReportChange> = books
        .iter()
        .map(|(title, price)| ReportChange::Upsert {
            fact: BookFactEvent {
                book_id: BookId::generate(),
                title: title.clone(),
                author: "Ann Author".into(),
                isbn: None,
                price: *price,
                description: None,
                version: 1,
                removed: false,
            },
            changed_at: Utc::now(),
        })
        .collect();
    store
        .apply_batch("http-test", "http-test.book-fact", &changes, &[])
        .await
        .unwrap();
    changes.iter().map(ReportChange::book_id).collect()
}

/// The path of the `Link: <…>; rel="next"` of a page, if it has one.
fn next_page(reply: &Reply) -> Option<String> {
    let link = reply.link.as_deref()?;
    let (target, relation) = link.split_once(">; ")?;
    assert_eq!(relation, "rel=\"next\"", "{reply:?}");
    Some(target.strip_prefix('<')?.to_owned())
}

/// Every page of `GET /api/books` from `first`, following the next links: the ids, per page.
async fn walk_pages<S: HttpStore + Clone>(
    server: &Server<S>,
    first: &str,
) -> Vec<Vec<(String, BookId)>> {
    let mut pages = Vec::new();
    let mut path = Some(first.to_owned());
    while let Some(current) = path {
        let reply = server.get(&current).await;
        assert_eq!(reply.status, 200, "{current}: {reply:?}");
        let rows = reply.json().as_array().unwrap().clone();
        pages.push(
            rows.iter()
                .map(|row| {
                    let title = row["title"].as_str().unwrap().to_owned();
                    (title, row["book_id"].as_str().unwrap().parse().unwrap())
                })
                .collect(),
        );
        path = next_page(&reply);
        assert!(pages.len() <= 1000, "the pages never end");
    }
    pages
}

fn price(text: &str) -> Price {
    text.parse().unwrap()
}

/// Walking the pages yields every book once, in the report's order (title, then id), with
/// titles that tie across page boundaries; only the last page is short and has no next link.
async fn pages_walk_every_book_once_in_order<S: HttpStore + Clone>(server: &Server<S>) {
    let mut books: Vec<(String, Price)> = ["Same Title"; 8]
        .iter()
        .chain(&[
            "A",
            "a",
            "B",
            "b",
            "Äpfel",
            "Zeta",
            "zeta",
            "日本語",
            "Same Title!",
            "Sam",
        ])
        .map(|title| (title.to_string(), price("1.00")))
        .collect();
    books.push(("Same Title".into(), price("2.00")));
    let ids = project_books(&server.store, &books).await;

    let pages = walk_pages(server, "/api/books?limit=3").await;
    assert_eq!(pages.len(), ids.len().div_ceil(3), "{pages:?}");
    for page in &pages[..pages.len() - 1] {
        assert_eq!(page.len(), 3, "{pages:?}");
    }
    let walked: Vec<(String, BookId)> = pages.concat();
    // The order of the database (in PostgreSQL its collation's), exactly as `list_reports`.
    let listed: Vec<(String, BookId)> = server
        .store
        .list_reports()
        .await
        .unwrap()
        .into_iter()
        .map(|report: BookReport| (report.title, report.book_id))
        .collect();
    assert_eq!(walked, listed);
    let mut walked_ids: Vec<BookId> = walked.iter().map(|(_, id)| *id).collect();
    walked_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(walked_ids, expected, "every book exactly once");
    // Nine books share a title: some page boundaries fall between two of them.
    let ties = pages
        .windows(2)
        .filter(|pair| pair[0].last().unwrap().0 == pair[1][0].0)
        .count();
    assert!(ties >= 2, "{pages:?}");

    // A page starts after its cursor's position even when that row has gone meanwhile.
    let first = server.get("/api/books?limit=4").await;
    let last_id: BookId = first.json()[3]["book_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    server
        .store
        .apply_batch(
            "http-test",
            "http-test.book-fact",
            &[ReportChange::Delete {
                book_id: last_id,
                version: Some(2),
            }],
            &[],
        )
        .await
        .unwrap();
    let rest = walk_pages(server, &next_page(&first).unwrap())
        .await
        .concat();
    assert_eq!(rest, listed[4..]);
}

#[tokio::test]
async fn pages_walk_every_book_once_in_order_on_sqlite() {
    let server = Server::sqlite().await;
    pages_walk_every_book_once_in_order(&server).await;
    // SQLite compares text bytewise, as Rust does.
    let listed = server.store.list_reports().await.unwrap();
    assert!(listed.is_sorted_by_key(|report| (report.title.clone(), report.book_id)));
}

#[tokio::test]
async fn pages_walk_every_book_once_in_order_on_postgres() {
    let server = Server::start(common::postgres_store().await, |state| state).await;
    pages_walk_every_book_once_in_order(&server).await;
}

/// Pages are 100 rows unless asked otherwise, 1000 at most; an exactly full last page has no
/// next link; a limit or cursor that is not one is refused with the API's JSON error.
async fn page_limits_and_refusals<S: HttpStore + Clone>(server: &Server<S>) {
    let books: Vec<(String, Price)> = (0..150)
        .map(|n| (format!("Book {n:03}"), price("1.00")))
        .collect();
    project_books(&server.store, &books).await;

    let rows = |reply: &Reply| reply.json().as_array().unwrap().len();
    let default = server.get("/api/books").await;
    assert_eq!(rows(&default), 100, "{default:?}");
    let next = next_page(&default).unwrap();
    assert!(next.starts_with("/api/books?limit=100&after="), "{next}");
    assert_eq!(rows(&server.get(&next).await), 50);
    for (limit, count, more) in [(1000, 150, false), (150, 150, false), (149, 149, true)] {
        let reply = server.get(&format!("/api/books?limit={limit}")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            (rows(&reply), reply.link.is_some()),
            (count, more),
            "{limit}"
        );
    }
    assert_eq!(rows(&server.get("/api/books?limit=1").await), 1);

    for path in [
        "/api/books?limit=0",
        "/api/books?limit=1001",
        "/api/books?limit=-5",
        "/api/books?limit=many",
        "/api/books?limit=",
        "/api/books?limit=5&limit=6",
    ] {
        server.get(path).await.assert_error(422, Some("limit"));
    }
    for path in [
        "/api/books?after=",
        "/api/books?after=not-a-cursor!",
        "/api/books?after=Zm9vYmFy",
        "/api/books?after=%FF%FE",
        &format!("/api/books?after={}", "A".repeat(10_000)),
    ] {
        server.get(path).await.assert_error(422, Some("after"));
    }
    server
        .get("/api/books?limt=5")
        .await
        .assert_error(422, None);
}

#[tokio::test]
async fn page_limits_and_refusals_on_sqlite() {
    page_limits_and_refusals(&Server::sqlite().await).await;
}

#[tokio::test]
async fn page_limits_and_refusals_on_postgres() {
    let server = Server::start(common::postgres_store().await, |state| state).await;
    page_limits_and_refusals(&server).await;
}

/// With more books than the dashboard shows, it shows the first 500 in the chosen order, says
/// so, and still totals every book.
async fn dashboard_shows_a_bounded_page_and_totals_every_book<S: HttpStore + Clone>(
    server: &Server<S>,
) {
    // 520 books at 1.00 … 520.00, titles in the opposite order of their prices.
    let books: Vec<(String, Price)> = (1..=520)
        .map(|n| {
            (
                format!("Book {:03}", 521 - n),
                Price::from_cents(n * 100).unwrap(),
            )
        })
        .collect();
    let ids = project_books(&server.store, &books).await;

    let shown = |body: &str| body.matches("<tr data-book-id=").count();
    let page = server.get("/").await;
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(shown(&page.body), 500, "{}", page.body);
    assert!(page.body.contains("Showing the first 500 of 520 books"));
    assert!(page.body.contains("<b id=\"total-books\">520</b>"));
    // 1 + … + 520 = 520 × 521 / 2
    assert!(page.body.contains("<b id=\"total-price\">135460.00</b>"));
    assert!(page.body.contains("<b id=\"average-price\">260.50</b>"));
    // By title the most expensive books come first (titles "Book 001" …); by price
    // descending too; ascending, the 20 most expensive are cut.
    let position = |body: &str, id: BookId| body.find(&id.to_string());
    let (cheapest, dearest) = (ids[0], ids[519]);
    for path in ["/", "/?sort=price&dir=desc"] {
        let body = server.get(path).await.body;
        assert!(position(&body, dearest).unwrap() < position(&body, ids[518]).unwrap());
        assert_eq!(position(&body, cheapest), None, "{path}");
    }
    let ascending = server.get("/?sort=price&dir=asc").await.body;
    assert!(position(&ascending, cheapest).unwrap() < position(&ascending, ids[1]).unwrap());
    assert_eq!(position(&ascending, dearest), None);
    assert_eq!(shown(&ascending), 500);
}

#[tokio::test]
async fn dashboard_shows_a_bounded_page_and_totals_every_book_on_sqlite() {
    dashboard_shows_a_bounded_page_and_totals_every_book(&Server::sqlite().await).await;
}

#[tokio::test]
async fn dashboard_shows_a_bounded_page_and_totals_every_book_on_postgres() {
    let server = Server::start(common::postgres_store().await, |state| state).await;
    dashboard_shows_a_bounded_page_and_totals_every_book(&server).await;
}

#[tokio::test]
async fn serving_stops_when_shutdown_fires() {
    let mut server = Server::sqlite().await;
    assert_eq!(server.get("/healthz").await.status, 200);
    server.trigger.trigger();
    let task = server.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the server did not stop within 10 s")
        .unwrap()
        .unwrap();
}

/// A client that opened a connection and never finished its request does not keep the server
/// from stopping: requests in flight get `SHUTDOWN_GRACE`, then the connections are closed.
#[tokio::test]
async fn a_stalled_client_does_not_keep_the_server_from_stopping() {
    use tokio::io::AsyncWriteExt;

    let mut server = Server::sqlite().await;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.trigger.trigger();
    let task = server.task.take().unwrap();
    tokio::time::timeout(http::SHUTDOWN_GRACE + Duration::from_secs(10), task)
        .await
        .expect("the server did not stop with a stalled client connected")
        .unwrap()
        .unwrap();
    drop(stalled);
}
