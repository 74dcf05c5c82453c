//! The HTTP server's limits, over raw TCP: a client that never finishes its request's head is
//! disconnected, one that trickles its body gets a 503, and connections beyond the limit wait
//! in the listen backlog until one closes. Each test sets short limits so it takes seconds.

use std::time::Duration;

use bookstore::http::{self, ConnectionLimits, HttpState};
use bookstore::shutdown::ShutdownTrigger;
use bookstore::store::SqliteStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The router over a fresh SQLite store, served with `limits` and `request_timeout`; stopped
/// when the returned trigger is dropped.
async fn serve(
    limits: ConnectionLimits,
    request_timeout: Duration,
) -> (String, ShutdownTrigger, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("bookstore.db").to_str().unwrap())
        .await
        .unwrap();
    let metrics = bookstore::telemetry::prometheus_handle().unwrap();
    let state = HttpState::new(store, metrics).with_request_timeout(request_timeout);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (trigger, shutdown) = ShutdownTrigger::new();
    tokio::spawn(http::serve_with(
        listener,
        http::router(state),
        shutdown,
        limits,
    ));
    (address, trigger, dir)
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

/// Everything the server sends until it closes the connection, or what came within `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<String, String> {
    let mut received = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut received)).await {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&received).into_owned()),
        // A reset is a close too.
        Ok(Err(_)) => Ok(String::from_utf8_lossy(&received).into_owned()),
        Err(_) => Err(String::from_utf8_lossy(&received).into_owned()),
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    let (address, _trigger, _dir) = serve(limits, http::REQUEST_TIMEOUT).await;

    let mut stalled = TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    assert!(answer.is_ok(), "still connected after 10 s: {answer:?}");
    assert!(
        !answer.unwrap().contains("200 OK"),
        "half a request was answered"
    );

    // A client that sends its head in time is served.
    let mut prompt = TcpStream::connect(&address).await.unwrap();
    prompt.write_all(HEALTHZ).await.unwrap();
    let answer = read_until_closed(&mut prompt, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_request_whose_body_trickles_in_is_answered_503() {
    let (address, _trigger, _dir) =
        serve(ConnectionLimits::default(), Duration::from_secs(1)).await;

    let mut trickling = TcpStream::connect(&address).await.unwrap();
    trickling
        .write_all(
            b"POST /api/books HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"title\": ",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut trickling, Duration::from_secs(10)).await;
    let answer = answer.unwrap_or_else(|partial| partial);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("took longer than"), "{answer}");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let limits = ConnectionLimits {
        max_connections: 2,
        ..ConnectionLimits::default()
    };
    let (address, _trigger, _dir) = serve(limits, http::REQUEST_TIMEOUT).await;

    let first = TcpStream::connect(&address).await.unwrap();
    let _second = TcpStream::connect(&address).await.unwrap();
    // Accepted by the kernel, not yet by the server: its request waits.
    let mut third = TcpStream::connect(&address).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    let waiting = read_until_closed(&mut third, Duration::from_secs(1)).await;
    assert_eq!(waiting, Err(String::new()), "served beyond the limit");

    drop(first);
    let answer = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_connection() {
    let limits = ConnectionLimits {
        write_stall_timeout: Duration::from_secs(1),
        max_connections: 1,
        ..ConnectionLimits::default()
    };
    let (address, _trigger, _dir) = serve(limits, http::REQUEST_TIMEOUT).await;

    // A small receive window, and pipelined requests whose answers fill every buffer between
    // the server and a client that never reads them.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stubborn = socket.connect(address.parse().unwrap()).await.unwrap();
    let (_never_read, mut writer) = stubborn.into_split();
    let flood = tokio::spawn(async move {
        let request = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n";
        let chunk: Vec<u8> = request.repeat(1_000);
        for _ in 0..2_000 {
            if writer.write_all(&chunk).await.is_err() {
                return true;
            }
        }
        false
    });

    // The limit is one connection: the next client is served once the stubborn one is cut off.
    let mut next = TcpStream::connect(&address).await.unwrap();
    next.write_all(HEALTHZ).await.unwrap();
    let answer = read_until_closed(&mut next, Duration::from_secs(20))
        .await
        .expect("not served while a client that stopped reading held the only connection");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let cut_off = tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("the stubborn client's connection stayed open")
        .unwrap();
    assert!(
        cut_off,
        "all requests were answered: the writes never stalled"
    );
}
