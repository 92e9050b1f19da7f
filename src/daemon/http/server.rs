//! The HTTP server under the routes (`mod.rs`): the listener, the accept
//! loop, each connection's hyper HTTP/1 with its timers, the idle
//! connections' queue and the cap on requests in flight, with the limits
//! that keep `/healthz` answered (the module map, `mod.rs`, lists them).
//! It knows no route but [`UNCAPPED`]'s paths.

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

/// A request is answered within this long or gets a 408: a stalled request
/// can't hold a task. Generous, since the first grid of a version runs the
/// model on a CPU that is also training (a few seconds when busy).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection sends its whole request head within this long of being
/// accepted, or is closed: a client on loopback or a LAN sends it in
/// milliseconds, a slow link and a busy host in well under a second; a
/// silent or trickling (slowloris) socket holds a task and a descriptor
/// only this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to write an answer once it is made (the PNG grid to a slow
/// reader), on top of the head's and the handler's time.
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, whatever it is doing: the head,
/// the handler and the answer's writing, each at its longest.
const CONNECTION_DEADLINE: Duration =
    Duration::from_secs(HEADER_READ_TIMEOUT.as_secs() + REQUEST_TIMEOUT.as_secs() + ANSWER_WRITE_TIMEOUT.as_secs());
/// Idle connections (no whole request head yet) kept at most; the next
/// closes the oldest. A scraper, a probe and a few browsers (which open a
/// few sockets ahead of need) hold a handful; 256 is far above that and
/// far below a process's usual 1,024 descriptors, so a flood of silent
/// sockets can neither lock out a probe nor exhaust the daemon's files.
const MAX_IDLE: usize = 256;
/// The kernel's queue of connections not yet accepted (capped by
/// `net.core.somaxconn`): deep enough that a burst of connections doesn't
/// drop a probe's SYN (a retry costs it a second) while the loop catches up.
const LISTEN_BACKLOG: u32 = 1024;
/// Pause after a failed accept (out of descriptors, most likely) before
/// the next, so the loop doesn't spin; short, as a probe may be waiting.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Answered whatever the number of requests in flight: a liveness probe
/// must never be refused (its orchestrator would restart a healthy
/// daemon), nor a scrape (a gap in every graph). Both read in-memory
/// counters, a file size or one registry key, in microseconds, and wait
/// on nothing: exempting them costs no more than answering them.
const UNCAPPED: [&str; 2] = ["/healthz", "/metrics"];

/// The server's limits: the module's constants and `[http] max_connections`
/// (tests shorten them).
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Requests served at once, but [`UNCAPPED`]'s: `[http] max_connections`.
    requests: usize,
    /// [`MAX_IDLE`].
    idle: usize,
    /// [`HEADER_READ_TIMEOUT`].
    header_read: Duration,
    /// [`REQUEST_TIMEOUT`].
    request: Duration,
    /// [`CONNECTION_DEADLINE`].
    connection: Duration,
}

impl Limits {
    fn new(max_connections: usize) -> Limits {
        Limits {
            requests: max_connections,
            idle: MAX_IDLE,
            header_read: HEADER_READ_TIMEOUT,
            request: REQUEST_TIMEOUT,
            connection: CONNECTION_DEADLINE,
        }
    }
}

/// Binds the listener (at start-up, so a taken port fails the daemon at once).
pub async fn bind(addr: &str) -> Result<TcpListener> {
    let context = || format!("binding HTTP on {addr} ([http] addr)");
    let mut failed = anyhow::anyhow!("the address resolves to nothing");
    for at in tokio::net::lookup_host(addr).await.with_context(context)? {
        match listen(at) {
            Ok(listener) => {
                tracing::info!(addr = %listener.local_addr()?, "HTTP: /metrics /healthz /");
                return Ok(listener);
            }
            Err(e) => failed = e.into(),
        }
    }
    Err(failed).with_context(context)
}

/// A listener on `at` with a [`LISTEN_BACKLOG`] queue (std's is 128).
fn listen(at: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match at {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(at)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `app` with the per-request limits: the cap on requests in flight, the
/// request timeout, and the headers every answer carries (503s included).
fn limited(app: Router, limits: &Limits) -> Router {
    let permits = Arc::new(Semaphore::new(limits.requests));
    app.layer(axum::middleware::from_fn_with_state(permits, within_cap))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request,
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::CONNECTION,
            HeaderValue::from_static("close"),
        ))
}

/// Runs `request` if a permit is free or it is [`UNCAPPED`]; else 503 at
/// once (a waiting request would hold its connection, unbounded).
async fn within_cap(State(permits): State<Arc<Semaphore>>, request: Request, next: Next) -> Response {
    if UNCAPPED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    match permits.try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "busy: [http] max_connections requests are being served\n",
        )
            .into_response(),
    }
}

/// Serves `app` within the limits (`[http] max_connections` requests at
/// once) until `shutdown`, then until every connection is closed.
pub(super) async fn serve(listener: TcpListener, app: Router, max_connections: usize, shutdown: CancellationToken) {
    let limits = Limits::new(max_connections);
    let (max_requests, max_idle, header_read_timeout) = (limits.requests, limits.idle, limits.header_read);
    tracing::info!(max_requests, max_idle, ?header_read_timeout, "HTTP limits");
    accept_loop(listener, limited(app, &limits), limits, shutdown).await;
}

/// Accepts connections as fast as they come, each served by its own task,
/// until `shutdown`; then waits for those tasks.
async fn accept_loop(listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) {
    let idle = Arc::new(Idle::new(limits.idle));
    // Each connection holds a sender; `recv` gives None once all are gone.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("HTTP: accepting a connection: {e}; closing the oldest idle one");
                    idle.evict_oldest();
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        let slot = Arc::new(idle.admit());
        tokio::spawn(connection(
            stream,
            app.clone(),
            slot,
            limits,
            shutdown.clone(),
            open.clone(),
        ));
    }
    drop(listener);
    drop(open);
    let _ = all_closed.recv().await;
}

/// One connection, one request: hyper reads the head (within
/// `header_read`) and runs `app`; the connection is dropped (closed) when
/// it is evicted as the oldest idle one, at its deadline, or at shutdown
/// if no request head has come.
async fn connection(
    stream: TcpStream,
    app: Router,
    slot: Arc<IdleSlot>,
    limits: Limits,
    shutdown: CancellationToken,
    _open: mpsc::Sender<()>,
) {
    let app = TowerToHyperService::new(app);
    let service = hyper::service::service_fn({
        let slot = slot.clone();
        move |request| {
            slot.busy();
            hyper::service::Service::call(&app, request)
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(false);
    let served = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let deadline = tokio::time::sleep(limits.connection);
    tokio::pin!(deadline);
    let mut draining = false;
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("HTTP connection: {e}");
                }
                return;
            }
            () = slot.evicted.cancelled() => {
                tracing::debug!("HTTP: closed the oldest idle connection for a new one");
                return;
            }
            () = &mut deadline => {
                tracing::debug!("HTTP: closed a connection open for {:?}", limits.connection);
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                if slot.is_idle() {
                    return;
                }
                served.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// The idle connections (accepted, no whole request head yet), oldest
/// first, at most `cap`.
struct Idle {
    cap: usize,
    waiting: Mutex<IdleQueue>,
}

#[derive(Default)]
struct IdleQueue {
    next: u64,
    /// By order of acceptance: each connection's eviction notice.
    waiting: BTreeMap<u64, CancellationToken>,
}

/// A connection's place among the idle ones, until its request head comes
/// (`busy`) or it ends (drop).
struct IdleSlot {
    idle: Arc<Idle>,
    id: u64,
    /// Cancelled when the connection is evicted.
    evicted: CancellationToken,
}

impl Idle {
    fn new(cap: usize) -> Idle {
        Idle {
            cap: cap.max(1),
            waiting: Mutex::default(),
        }
    }

    /// Nothing panics while the lock is held, so a poisoned one is sound.
    fn lock(&self) -> MutexGuard<'_, IdleQueue> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new connection's slot, evicting the oldest idle ones past the cap.
    fn admit(self: &Arc<Self>) -> IdleSlot {
        let evicted = CancellationToken::new();
        let mut queue = self.lock();
        while queue.waiting.len() >= self.cap {
            match queue.waiting.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        let id = queue.next;
        queue.next += 1;
        queue.waiting.insert(id, evicted.clone());
        IdleSlot {
            idle: self.clone(),
            id,
            evicted,
        }
    }

    fn evict_oldest(&self) {
        if let Some((_, oldest)) = self.lock().waiting.pop_first() {
            oldest.cancel();
        }
    }
}

impl IdleSlot {
    /// Its request head has come: no longer idle, never evicted.
    fn busy(&self) {
        self.idle.lock().waiting.remove(&self.id);
    }

    fn is_idle(&self) -> bool {
        self.idle.lock().waiting.contains_key(&self.id)
    }
}

impl Drop for IdleSlot {
    fn drop(&mut self) {
        self.busy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    /// Bounds every wait below, so a broken server fails the test instead
    /// of hanging it; wide of every limit the tests set.
    const PATIENCE: Duration = Duration::from_secs(20);
    /// Far past any test's length: a limit this long never acts.
    const NEVER: Duration = Duration::from_secs(3600);

    fn limits() -> Limits {
        Limits {
            requests: 1,
            idle: 2,
            header_read: NEVER,
            request: NEVER,
            connection: NEVER,
        }
    }

    /// `/healthz` and `/metrics` answer at once; `/slow` says it started
    /// (`started`) and answers when `release` is notified; `/hang` never does.
    fn app(started: Arc<Notify>, release: Arc<Notify>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(|| async { "# EOF\n" }))
            .route(
                "/slow",
                get(move || async move {
                    started.notify_one();
                    release.notified().await;
                    "done\n"
                }),
            )
            .route("/hang", get(std::future::pending::<&'static str>))
    }

    struct Server {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        started: Arc<Notify>,
        release: Arc<Notify>,
    }

    async fn start(limits: Limits) -> Server {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let shutdown = CancellationToken::new();
        let app = limited(app(started.clone(), release.clone()), &limits);
        let task = tokio::spawn(accept_loop(listener, app, limits, shutdown.clone()));
        Server {
            addr,
            shutdown,
            task,
            started,
            release,
        }
    }

    /// Sends a GET for `path` on `stream`.
    async fn ask(stream: &mut TcpStream, path: &str) {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
    }

    /// What the server sends on `stream` until it closes it; None if it
    /// is still open after [`PATIENCE`].
    async fn until_closed(stream: &mut TcpStream) -> Option<String> {
        let mut sent = Vec::new();
        match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut sent)).await {
            Ok(Ok(_)) => Some(String::from_utf8_lossy(&sent).to_string()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(String::new()),
            Ok(Err(e)) => panic!("reading: {e}"),
            Err(_) => None,
        }
    }

    /// The status code of a GET for `path` on a fresh connection.
    async fn status(addr: SocketAddr, path: &str) -> u16 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        ask(&mut stream, path).await;
        let answer = until_closed(&mut stream)
            .await
            .expect("an answer, then the connection closed");
        answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
    }

    #[tokio::test]
    async fn a_new_connection_evicts_the_oldest_idle_one() {
        let server = start(limits()).await;
        let mut oldest = TcpStream::connect(server.addr).await.unwrap();
        let _second = TcpStream::connect(server.addr).await.unwrap();
        let _third = TcpStream::connect(server.addr).await.unwrap();
        assert_eq!(
            until_closed(&mut oldest).await,
            Some(String::new()),
            "the oldest of 3 idle connections, 2 allowed, closed unanswered"
        );
        // The probe evicts the second, sends its head and is no longer idle.
        assert_eq!(status(server.addr, "/healthz").await, 200);
    }

    #[tokio::test]
    async fn silent_and_trickling_heads_are_closed() {
        let server = start(Limits {
            idle: 16,
            header_read: Duration::from_millis(200),
            ..limits()
        })
        .await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut partial = TcpStream::connect(server.addr).await.unwrap();
        partial.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc").await.unwrap();
        let silent_closed = until_closed(&mut silent).await;
        assert!(silent_closed.is_some(), "a silent connection stays open");
        let partial_closed = until_closed(&mut partial).await;
        assert!(
            partial_closed.as_deref().is_some_and(|sent| !sent.contains(" 200 ")),
            "a partial head: {partial_closed:?}"
        );
        assert_eq!(
            status(server.addr, "/healthz").await,
            200,
            "a prompt request is answered"
        );
    }

    #[tokio::test]
    async fn the_cap_refuses_work_but_not_health_or_metrics() {
        let server = start(limits()).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        ask(&mut slow, "/slow").await;
        server.started.notified().await;
        assert_eq!(status(server.addr, "/slow").await, 503, "past the cap of 1");
        assert_eq!(status(server.addr, "/nope").await, 503, "past the cap of 1");
        assert_eq!(status(server.addr, "/healthz").await, 200);
        assert_eq!(status(server.addr, "/metrics").await, 200);
        server.release.notify_one();
        let answer = until_closed(&mut slow).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("cache-control: no-store") && answer.contains("connection: close"),
            "{answer}"
        );
        assert_eq!(status(server.addr, "/nope").await, 404, "the permit is back");
    }

    #[tokio::test]
    async fn a_connection_is_closed_at_its_deadline() {
        let server = start(Limits {
            connection: Duration::from_millis(200),
            ..limits()
        })
        .await;
        let mut hung = TcpStream::connect(server.addr).await.unwrap();
        ask(&mut hung, "/hang").await;
        assert_eq!(until_closed(&mut hung).await, Some(String::new()), "closed unanswered");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_finishes_requests() {
        let server = start(limits()).await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        ask(&mut slow, "/slow").await;
        server.started.notified().await;
        server.shutdown.cancel();
        assert_eq!(
            until_closed(&mut idle).await,
            Some(String::new()),
            "the idle connection is closed at once"
        );
        assert!(!server.task.is_finished(), "the loop waits for the request in flight");
        server.release.notify_one();
        let answer = until_closed(&mut slow).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        tokio::time::timeout(PATIENCE, server.task)
            .await
            .expect("the loop ends once every connection is closed")
            .unwrap();
        assert!(TcpStream::connect(server.addr).await.is_err(), "the listener is closed");
    }
}
