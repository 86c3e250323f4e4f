//! The admin HTTP listener (hyper, HTTP/1.1): metrics, health, and IDs for
//! callers that cannot speak UDP. Off unless `--admin` is given; meant for
//! loopback. It draws IDs from its own generator handle, never from a
//! worker's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

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
pub(crate) async fn spawn(addr: SocketAddr, observer: Arc<Observer>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            // Bounded concurrency: beyond the limit, new connections wait.
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
            let observer = Arc::clone(&observer);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let observer = Arc::clone(&observer);
                    async move { Ok::<_, Infallible>(route(&req, &observer).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(permit);
            });
        }
    });
    Ok(bound)
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

/// Concurrent admin connections.
const MAX_CONNECTIONS: usize = 64;

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
