//! The HTTP face of the bookstore: the marketing dashboard, a JSON API, health and metrics.
//!
//! ```text
//!  GET  /                        dashboard: the BookReport as an HTML table (no JavaScript)
//!  GET  /api/books               the BookReport rows, JSON
//!  GET  /api/books/{id}          one row
//!  POST /api/books               AddBook            ─┐
//!  PUT  /api/books/{id}/price    UpdateBookPrice     │ through BookService: one store
//!  PATCH /api/books/{id}         UpdateBookDetails   │ transaction with the outbox events
//!  DELETE /api/books/{id}        RemoveBook         ─┘
//!  GET  /healthz  /readyz  /metrics
//! ```
//!
//! Reads come from the read model ([`crate::projection::ReportStore`]), writes go through
//! [`crate::service::BookService`] into the outbox. The two meet only through Kafka: a change
//! accepted here shows in the report once the relay published its fact and the projector
//! applied it, usually well within a second. The API says so by answering writes with the
//! book's id and new version rather than with a report row.
//!
//! The router is built by [`router`] from an [`HttpState`], so `bookstore serve`, a process
//! that also runs the relay and projector, and the tests all mount the same one; [`serve`]
//! runs it until a [`Shutdown`] fires, letting requests in flight finish.
//!
//! | module | owns |
//! | --- | --- |
//! | [`state`] | what the handlers share: the service, the metrics handle, readiness probes |
//! | `api` | the JSON API: parsing bodies into commands, rows out |
//! | `dashboard` | the HTML page: sorting, totals, escaping |
//! | `ops` | `/healthz`, `/readyz`, `/metrics` and the request counter |
//! | `error` | how failures become status codes and `{"error", "field"}` bodies |

use std::time::Duration;

use axum::Router;
use axum::middleware;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::warn;

use crate::shutdown::Shutdown;

mod api;
mod dashboard;
mod error;
mod ops;
pub mod state;

pub use dashboard::escape_html;
pub use state::{HttpState, HttpStore};

/// Requests served, by `method`, `route` (the matched pattern, `unmatched` for none) and
/// `status`.
pub const HTTP_REQUESTS: &str = "bookstore_http_requests_total";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Every route of the dashboard, the API and the operational endpoints.
pub fn router<S: HttpStore>(state: HttpState<S>) -> Router {
    Router::new()
        .route("/", get(dashboard::page::<S>))
        .route(
            "/api/books",
            get(api::list_books::<S>).post(api::add_book::<S>),
        )
        .route(
            "/api/books/{id}",
            get(api::show_book::<S>)
                .patch(api::update_details::<S>)
                .delete(api::remove_book::<S>),
        )
        .route(
            "/api/books/{id}/price",
            axum::routing::put(api::update_price::<S>),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz::<S>))
        .route("/metrics", get(ops::metrics::<S>))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(middleware::from_fn(ops::count_requests))
        .with_state(state)
}

/// How long requests in flight get to finish once shutdown fires.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting connections and
/// waits for the requests in flight, for [`SHUTDOWN_GRACE`] at most: a client that opened a
/// connection and never finished its request would otherwise keep the process from exiting.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
) -> Result<(), HttpError> {
    let mut graceful = shutdown.clone();
    let serving =
        axum::serve(listener, router).with_graceful_shutdown(async move { graceful.wait().await });
    let mut deadline = shutdown;
    tokio::select! {
        served = serving => served?,
        () = async {
            deadline.wait().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them"),
    }
    Ok(())
}
