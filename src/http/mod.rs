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

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::middleware;
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

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
    let request_timeout = state.request_timeout;
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
        .layer(middleware::from_fn_with_state(
            request_timeout,
            error::time_limit,
        ))
        .layer(middleware::from_fn(ops::count_requests))
        .with_state(state)
}

/// How long requests in flight get to finish once shutdown fires.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's head (its request line and headers), from
/// the moment the connection is accepted, or on a kept-alive connection from the end of the
/// previous response. A client that takes longer is disconnected: connections that never finish a request would
/// otherwise stay open for as long as the process, each holding a file descriptor that the
/// relay, the projector and the database pool also need.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request may take, from the end of its head to the response, by default (see
/// [`HttpState::with_request_timeout`]): reading the body included (a client trickling it in),
/// and a save waiting on a locked row. The client then gets a 503; a save that committed
/// meanwhile stays committed, and sending the command again writes nothing twice (an add that
/// names its book id gets 409, a command with `If-Match` 412, the others change nothing or
/// set the same again).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Most connections served at once; further clients wait in the listen backlog until one
/// closes. Well below the common limit of 1,024 file descriptors per process.
pub const MAX_CONNECTIONS: usize = 512;

/// How long writing to a client may make no progress before the connection is closed: a
/// client that stops reading (a zero receive window) would otherwise hold its connection, and
/// one of the [`MAX_CONNECTIONS`], for as long as it likes.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The limits [`serve_with`] holds connections to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`WRITE_STALL_TIMEOUT`].
    pub write_stall_timeout: Duration,
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            write_stall_timeout: WRITE_STALL_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting connections and
/// waits for the requests in flight, for [`SHUTDOWN_GRACE`] at most: a client that opened a
/// connection and never finished its request would otherwise keep the process from exiting.
///
/// Written over hyper rather than with `axum::serve`, which sets no timer on hyper's
/// connections (so hyper's header read timeout never applies) and accepts connections without
/// limit; neither can be configured there.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
) -> Result<(), HttpError> {
    serve_with(listener, router, shutdown, ConnectionLimits::default()).await
}

/// [`serve`] with other [`ConnectionLimits`].
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    mut shutdown: Shutdown,
    limits: ConnectionLimits,
) -> Result<(), HttpError> {
    let mut connection = hyper::server::conn::http1::Builder::new();
    connection
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        // Forget the connections that have ended.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = shutdown.wait() => break,
            permit = open.clone().acquire_owned() => {
                permit.expect("the connection limit is never closed")
            }
        };
        let stream = tokio::select! {
            () = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A client that gave up before its connection was accepted: nothing to wait for.
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    // Out of file descriptors, most likely: wait rather than spin or stop.
                    warn!(%error, "could not accept a connection; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "could not set TCP_NODELAY on a connection");
        }
        let served = graceful.watch(connection.serve_connection(
            TokioIo::new(WriteStallLimit::new(stream, limits.write_stall_timeout)),
            TowerToHyperService::new(router.clone()),
        ));
        connections.spawn(async move {
            if let Err(error) = served.await {
                debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
            connections.abort_all();
        }
    }
    Ok(())
}

/// A connection whose writes fail once one has made no progress for `limit`. Written here
/// because hyper has no write timeout and tokio none for a stream; a timeout around the whole
/// response would also cut a slow but steady download.
struct WriteStallLimit {
    stream: tokio::net::TcpStream,
    limit: Duration,
    /// Armed when a write could not proceed; disarmed by any progress.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStallLimit {
    fn new(stream: tokio::net::TcpStream, limit: Duration) -> Self {
        Self {
            stream,
            limit,
            stalled: None,
        }
    }

    /// `poll`'s outcome, or a timeout error once writing has stalled for the limit.
    fn limited<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: impl FnOnce(
            std::pin::Pin<&mut tokio::net::TcpStream>,
            &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        match poll(std::pin::Pin::new(&mut self.stream), cx) {
            Poll::Ready(outcome) => {
                self.stalled = None;
                Poll::Ready(outcome)
            }
            Poll::Pending => {
                let limit = self.limit;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the client read nothing for {limit:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl tokio::io::AsyncRead for WriteStallLimit {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteStallLimit {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.limited(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.limited(cx, |stream, cx| stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.limited(cx, |stream, cx| stream.poll_flush(cx))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.limited(cx, |stream, cx| stream.poll_shutdown(cx))
    }
}

/// Errors of `accept` that concern one client only (it reset or aborted its connection before
/// it was accepted), after which accepting goes on at once.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
