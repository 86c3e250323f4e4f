//! The admin HTTP listener (hyper, HTTP/1.1): metrics, health, and IDs for
//! callers that cannot speak UDP. Off unless `--admin` is given; meant for
//! loopback. It draws IDs from its own generator handle, never from a
//! worker's. Connections are bounded in number and in time (headers, idle,
//! total), and the idlest is closed to make room, so clients that open
//! connections and send nothing never lock out a health check.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use tradeid::id::ID_LEN;
use tradeid::protocol::ErrorCode;
use tradeid::GenError;

use super::metrics::{Observer, Readiness};

/// Every route, with its summary, as `/openapi.json` describes it.
pub(crate) const ROUTES: [(&str, &str); 6] = [
    ("/metrics", "Prometheus metrics"),
    ("/healthz", "Liveness: the process is up"),
    ("/readyz", "Readiness: serving IDs"),
    ("/id", "One new ID, as text"),
    ("/ids", "count new IDs, one per line"),
    ("/openapi.json", "This description"),
];

/// Binds the listener and serves it in the background; returns the bound
/// address.
pub(crate) async fn spawn(addr: SocketAddr, observer: Arc<Observer>) -> io::Result<SocketAddr> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // A restart can bind while connections of the last run linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // Connections wait in this backlog while every permit is taken.
    let listener = socket.listen(BACKLOG)?;
    let bound = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, observer));
    Ok(bound)
}

/// Accepts connections for as long as the process runs, at most
/// [`MAX_CONNECTIONS`] at a time.
///
/// The permit is taken *before* accepting, so connections beyond the limit
/// wait in the kernel's backlog instead of each costing a task and a file
/// descriptor. At the limit, the connection idle the longest is closed to
/// make room: however many idle connections a client holds open, a health
/// check or a scrape gets in.
async fn accept_loop(listener: TcpListener, observer: Arc<Observer>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let open = Arc::new(OpenConnections::default());
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut last_warned: Option<Instant> = None;
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                open.close_idlest();
                // The semaphore is never closed; should it be, stop serving.
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
                permit
            }
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // One connection that went away before we took it: skip it.
                if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) {
                    continue;
                }
                // Anything else (out of file descriptors or memory) would
                // fail again at once: wait, and close an idle connection if
                // descriptors ran out, rather than spin.
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    open.close_idlest();
                }
                if last_warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                    tracing::warn!(
                        "the admin listener cannot accept connections: {e}; retrying with a backoff (if it says too many open files, raise LimitNOFILE)"
                    );
                    last_warned = Some(Instant::now());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        tokio::spawn(serve_connection(stream, peer, Arc::clone(&observer), Arc::clone(&open), permit));
    }
}

/// Serves one connection until the client closes it or it has been idle,
/// or open, too long, or it is closed to make room for a new one.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    observer: Arc<Observer>,
    open: Arc<OpenConnections>,
    _permit: OwnedSemaphorePermit,
) {
    let (id, close) = open.register();
    let _registered = Registered { open: &open, id };
    tracing::debug!(%peer, "admin connection accepted");
    let service = {
        let open = Arc::clone(&open);
        service_fn(move |req| {
            let observer = Arc::clone(&observer);
            let open = Arc::clone(&open);
            async move {
                open.set_busy(id, true);
                let response = route(&req, &observer).await;
                open.set_busy(id, false);
                Ok::<_, Infallible>(response)
            }
        })
    };
    // hyper restarts the header timeout for every request, so it bounds a
    // kept-alive connection's wait for its next request too; the idle check
    // below does not rely on that.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let lifetime = tokio::time::sleep(MAX_CONNECTION_TIME);
    let mut lifetime = std::pin::pin!(lifetime);
    let mut idle_check = tokio::time::interval(IDLE_CHECK_EVERY);
    let reason: Cow<'static, str> = loop {
        tokio::select! {
            result = connection.as_mut() => break match result {
                Ok(()) => "finished".into(),
                Err(e) => format!("error: {e}").into(),
            },
            () = close.notified() => break "closed to make room: the listener is at its connection limit".into(),
            () = &mut lifetime => {
                // Open too long: finish the request in progress, then close.
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await;
                break "open too long".into();
            }
            _ = idle_check.tick() => {
                if open.idle_for(id).is_some_and(|idle| idle >= IDLE_TIMEOUT) {
                    break "idle too long".into();
                }
            }
        }
    };
    tracing::debug!(%peer, %reason, "admin connection closed");
}

/// The open connections: when each was last active and whether it is
/// handling a request, so that the idlest can be closed to make room.
#[derive(Default)]
struct OpenConnections {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    connections: HashMap<u64, Connection>,
}

struct Connection {
    /// When it was accepted, or last began or finished a request.
    active_at: Instant,
    /// Inside a request (never closed to make room).
    busy: bool,
    /// Tells the connection's task to close it.
    close: Arc<Notify>,
}

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry holds no invariant a panic could break.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a new connection: its id, and what tells it to close.
    fn register(&self) -> (u64, Arc<Notify>) {
        let mut registry = self.lock();
        let id = registry.next_id;
        registry.next_id += 1;
        let close = Arc::new(Notify::new());
        registry
            .connections
            .insert(id, Connection { active_at: Instant::now(), busy: false, close: Arc::clone(&close) });
        (id, close)
    }

    /// Marks the start (`true`) or the end of a request.
    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(connection) = self.lock().connections.get_mut(&id) {
            connection.busy = busy;
            connection.active_at = Instant::now();
        }
    }

    /// How long the connection has been idle; `None` while it handles a
    /// request.
    fn idle_for(&self, id: u64) -> Option<Duration> {
        self.lock().connections.get(&id).filter(|c| !c.busy).map(|c| c.active_at.elapsed())
    }

    /// Tells the connection idle the longest to close; `false` if every
    /// connection is handling a request.
    fn close_idlest(&self) -> bool {
        let mut registry = self.lock();
        let idlest =
            registry.connections.iter().filter(|(_, c)| !c.busy).min_by_key(|(_, c)| c.active_at).map(|(&id, _)| id);
        match idlest.and_then(|id| registry.connections.remove(&id)) {
            Some(connection) => {
                connection.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from [`OpenConnections`] when its task ends.
struct Registered<'a> {
    open: &'a OpenConnections,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.open.lock().connections.remove(&self.id);
    }
}

async fn route(req: &Request<Incoming>, observer: &Observer) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n".into());
    }
    let query = req.uri().query().unwrap_or("");
    match req.uri().path() {
        "/metrics" => no_query(query).unwrap_or_else(|| {
            let mut response = text(StatusCode::OK, observer.render());
            response.headers_mut().insert("content-type", "text/plain; version=0.0.4".parse().expect("static header"));
            response
        }),
        "/healthz" => no_query(query).unwrap_or_else(|| text(StatusCode::OK, "ok\n".into())),
        "/readyz" => no_query(query).unwrap_or_else(|| match observer.readiness() {
            Readiness::Ready(detail) => text(StatusCode::OK, format!("ready: {detail}\n")),
            Readiness::NotReady(detail) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {detail}\n")),
        }),
        "/id" => match no_query(query) {
            Some(bad) => bad,
            None => ids(observer, 1).await,
        },
        "/ids" => match parse_count(query, observer.max_batch) {
            Ok(count) => ids(observer, count).await,
            Err(message) => text(StatusCode::BAD_REQUEST, message + "\n"),
        },
        "/openapi.json" => no_query(query).unwrap_or_else(|| {
            let mut response = text(StatusCode::OK, openapi(observer.max_batch));
            response.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
            response
        }),
        _ => text(StatusCode::NOT_FOUND, "not found; see /openapi.json\n".into()),
    }
}

fn no_query(query: &str) -> Option<Response<Full<Bytes>>> {
    (!query.is_empty())
        .then(|| text(StatusCode::BAD_REQUEST, format!("this path takes no query string, got {query:?}\n")))
}

/// Parses `count=N` (the only parameter of /ids).
pub(crate) fn parse_count(query: &str, max_batch: u16) -> Result<u16, String> {
    let mut count = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("count", value)) if count.is_none() => {
                let n = value.parse::<u32>().map_err(|_| format!("count must be a whole number, got {value:?}"))?;
                if !(1..=u32::from(max_batch)).contains(&n) {
                    return Err(format!("count must be 1..={max_batch} (the server's --max-batch), got {n}"));
                }
                count = Some(n as u16);
            }
            Some(("count", _)) => return Err("count is given twice".into()),
            _ => return Err(format!("unknown query parameter {pair:?}; /ids takes only count=N")),
        }
    }
    count.ok_or_else(|| "missing count; use /ids?count=N".into())
}

async fn ids(observer: &Observer, count: u16) -> Response<Full<Bytes>> {
    let mut raw = vec![0u8; usize::from(count) * ID_LEN];
    let filled = match observer.http_ids.fill(&mut raw, Duration::from_secs(1)).await {
        Ok(n) => n,
        Err(e) => {
            observer.http.error(if matches!(e, GenError::Exhausted) {
                ErrorCode::Exhausted
            } else {
                ErrorCode::Unavailable
            });
            return gen_error(e);
        }
    };
    observer.http.served(filled);
    let mut body = String::with_capacity(filled * (ID_LEN + 1));
    for id in raw[..filled * ID_LEN].chunks_exact(ID_LEN) {
        body.push_str(std::str::from_utf8(id).expect("IDs are ASCII"));
        body.push('\n');
    }
    let mut response = text(StatusCode::OK, body);
    response.headers_mut().insert("cache-control", "no-store".parse().expect("static header"));
    response
}

fn gen_error(e: GenError) -> Response<Full<Bytes>> {
    let status = match e {
        GenError::Exhausted => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(status, format!("{e}\n"))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// The OpenAPI 3 description, built from [`ROUTES`] so the two cannot drift.
pub(crate) fn openapi(max_batch: u16) -> String {
    let mut paths = Vec::new();
    for (path, summary) in ROUTES {
        let params = if path == "/ids" {
            format!(
                r#","parameters":[{{"name":"count","in":"query","required":true,"schema":{{"type":"integer","minimum":1,"maximum":{max_batch}}}}}]"#
            )
        } else {
            String::new()
        };
        let errors = match path {
            "/id" | "/ids" => {
                r#","400":{"description":"bad query string"},"503":{"description":"no block ready"},"507":{"description":"exhausted"}"#
            }
            "/readyz" => r#","503":{"description":"not ready"}"#,
            _ => "",
        };
        paths.push(format!(
            r#""{path}":{{"get":{{"summary":"{summary}"{params},"responses":{{"200":{{"description":"OK"}}{errors}}}}}}}"#
        ));
    }
    format!(
        r#"{{"openapi":"3.0.3","info":{{"title":"tradeid admin","version":"{}"}},"paths":{{{}}}}}"#,
        env!("CARGO_PKG_VERSION"),
        paths.join(",")
    )
}

/// Concurrent admin connections. With the unit's `LimitNOFILE=1024` this
/// leaves room for up to 256 worker sockets, the state files, gRPC and
/// etcd; beyond it, the idlest connection is closed to make room.
const MAX_CONNECTIONS: usize = 256;
/// Connections the kernel queues for us beyond [`MAX_CONNECTIONS`] (capped
/// by `net.core.somaxconn`); tokio's default is 128.
const BACKLOG: u32 = 1024;
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may sit idle (between requests, or before its
/// first) before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a connection checks its idle time.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long one connection may stay open, however busy.
const MAX_CONNECTION_TIME: Duration = Duration::from_secs(60);
/// How long a connection that was open too long may take to finish its
/// request in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The first wait after a failed accept, doubled on each further failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// The longest wait between two accepts that fail.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How often failing accepts are logged.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_parsing() {
        assert_eq!(parse_count("count=5", 175), Ok(5));
        assert!(parse_count("count=176", 175).unwrap_err().contains("1..=175"));
        assert!(parse_count("count=0", 175).is_err());
        assert!(parse_count("count=x", 175).unwrap_err().contains("whole number"));
        assert!(parse_count("", 175).unwrap_err().contains("missing count"));
        assert!(parse_count("n=3", 175).unwrap_err().contains("unknown query parameter"));
        assert!(parse_count("count=1&count=2", 175).unwrap_err().contains("twice"));
    }

    #[test]
    fn openapi_is_json_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&openapi(175)).expect("valid JSON");
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), ROUTES.len());
        for (path, _) in ROUTES {
            assert!(paths.contains_key(path), "{path}");
        }
        assert_eq!(doc["paths"]["/ids"]["get"]["parameters"][0]["schema"]["maximum"], 175);
    }
}
