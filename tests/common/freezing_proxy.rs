//! A TCP proxy that can make its connections die without a word, or slow, for the code that
//! must notice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A TCP proxy whose connections can be frozen: from then on they pass no byte either way,
/// yet stay open, as a connection that a NAT gateway forgot looks to both ends. Connections
/// made after the freeze pass bytes as usual. Dropping it closes every connection.
pub struct FreezingProxy {
    pub port: u16,
    frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    /// While set, every connection holds what it reads (a slow network), and passes it on
    /// once cleared.
    held: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl FreezingProxy {
    pub async fn start(target: (String, u16)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(Mutex::new(Vec::<Arc<AtomicBool>>::new()));
        let connections = frozen.clone();
        let held = Arc::new(AtomicBool::new(false));
        let holding = held.clone();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut pumps = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect((target.0.as_str(), target.1))
                    .await
                    .unwrap();
                let flag = Arc::new(AtomicBool::new(false));
                connections.lock().unwrap().push(flag.clone());
                let (client_reads, client_writes) = client.into_split();
                let (server_reads, server_writes) = server.into_split();
                pumps.spawn(pump(
                    client_reads,
                    server_writes,
                    flag.clone(),
                    holding.clone(),
                ));
                pumps.spawn(pump(server_reads, client_writes, flag, holding.clone()));
            }
        });
        Self {
            port,
            frozen,
            held,
            tasks,
        }
    }

    /// A proxy in front of the PostgreSQL server of `options`, and a pool of up to 8
    /// connections through it into the same database. The pool does not ping a connection
    /// before lending it, so that a frozen one is used, as one that died after its ping would
    /// be.
    pub async fn before_postgres(options: PgConnectOptions) -> (Self, PgPool) {
        let (proxy, through_proxy) = Self::in_front_of(options).await;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect_with(through_proxy)
            .await
            .unwrap();
        (proxy, pool)
    }

    /// A proxy in front of the PostgreSQL server of `options`, and the same options through it.
    pub async fn in_front_of(options: PgConnectOptions) -> (Self, PgConnectOptions) {
        let proxy = Self::start((options.get_host().to_owned(), options.get_port())).await;
        let through_proxy = options.host("127.0.0.1").port(proxy.port);
        (proxy, through_proxy)
    }

    /// Freezes every connection open now.
    pub fn freeze(&self) {
        for flag in self.frozen.lock().unwrap().iter() {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Holds back every byte, either way, until [`release`](Self::release).
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Passes on what was held, and everything after it.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Copies `from` to `to` until either ends; while `held`, waits before passing on what it
/// read; once `frozen`, swallows what it reads and holds both open.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        while held.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
