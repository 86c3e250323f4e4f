//! The gRPC API (`serve --grpc ADDR`): `tradeid.v1.IdService` from
//! `proto/tradeid/v1/tradeid.proto`, with the standard `grpc.health.v1`
//! health service and server reflection, so `grpcurl` and
//! `grpc_health_probe` work out of the box.
//!
//! It draws from its own generator handle (never a worker's), checks each
//! peer against the same `--allow` list as UDP, and counts requests, IDs
//! and errors under `protocol="grpc"`. It runs on a runtime of its own, so a
//! flood of gRPC requests cannot delay signals, the watchdog or `/metrics`
//! on the control runtime.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tradeid::id::ID_LEN;
use tradeid::policy::SourcePolicy;
use tradeid::protocol::ErrorCode;
use tradeid::GenError;

use super::metrics::Observer;

/// The generated `tradeid.v1` types and service.
#[allow(unreachable_pub, missing_docs, clippy::all)]
mod pb {
    tonic::include_proto!("tradeid.v1");
    /// The descriptors that server reflection serves.
    pub(crate) const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("tradeid_descriptor");
}

use pb::id_service_server::{IdService, IdServiceServer};
use pb::{NextReply, NextRequest};

/// The most IDs one `Next` call hands out.
pub(crate) const NEXT_LIMIT: u32 = 100_000;
/// The most IDs one `Stream` call hands out.
pub(crate) const STREAM_LIMIT: u32 = 100_000_000;
/// IDs per message of a stream.
const STREAM_CHUNK: u32 = 10_000;
/// How long a call waits for a block before answering UNAVAILABLE.
const PATIENCE: Duration = Duration::from_secs(1);
/// The name health checks use for this service.
const SERVICE_NAME: &str = "tradeid.v1.IdService";

/// A running gRPC listener.
pub(crate) struct GrpcServer {
    /// The bound address.
    pub(crate) addr: SocketAddr,
    health: HealthReporter,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcServer {
    /// Binds `addr` and serves on a runtime thread of its own.
    pub(crate) fn start(addr: SocketAddr, observer: Arc<Observer>, policy: SourcePolicy) -> anyhow::Result<GrpcServer> {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot bind the gRPC listener {addr} (--grpc): is the port in use?"))?;
        listener.set_nonblocking(true).context("cannot make the gRPC listener non-blocking")?;
        let bound = listener.local_addr().context("cannot read the gRPC listener's address")?;
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("cannot build the gRPC reflection service")?;
        let (shutdown, mut stopping) = watch::channel(false);
        let service = Ids { observer, policy, stopping: stopping.clone() };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tradeid-grpc")
            .enable_all()
            .build()
            .context("cannot start the gRPC runtime")?;
        let thread = std::thread::Builder::new()
            .name("tradeid-grpc".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("cannot use the gRPC listener: {e}"),
                    };
                    let served = tonic::transport::Server::builder()
                        .http2_keepalive_interval(Some(Duration::from_secs(30)))
                        .tcp_keepalive(Some(Duration::from_secs(60)))
                        .add_service(health_service)
                        .add_service(reflection)
                        .add_service(IdServiceServer::new(service))
                        .serve_with_incoming_shutdown(
                            tokio_stream::wrappers::TcpListenerStream::new(listener),
                            async move {
                                let _ = stopping.wait_for(|stop| *stop).await;
                            },
                        )
                        .await;
                    if let Err(e) = served {
                        tracing::error!("the gRPC listener failed: {e}");
                    }
                });
            })
            .context("cannot spawn the gRPC thread")?;
        Ok(GrpcServer { addr: bound, health, shutdown, thread: Some(thread) })
    }

    /// Reports SERVING or NOT_SERVING to health checks (the whole server
    /// and the IdService alike).
    pub(crate) async fn set_serving(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.health.set_service_status("", status).await;
        self.health.set_service_status(SERVICE_NAME, status).await;
    }

    /// Ends every call in progress (streams end with UNAVAILABLE) and stops
    /// the listener, waiting up to a second.
    pub(crate) fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The IdService implementation.
struct Ids {
    observer: Arc<Observer>,
    policy: SourcePolicy,
    stopping: watch::Receiver<bool>,
}

impl Ids {
    fn check<T>(&self, request: &Request<T>, count: u32, limit: u32) -> Result<u32, Status> {
        match request.remote_addr() {
            Some(peer) if self.policy.allowed(peer.ip()) => {}
            Some(peer) => {
                return Err(Status::permission_denied(format!(
                    "peer {} is not in the server's --allow list",
                    peer.ip()
                )))
            }
            None => return Err(Status::permission_denied("the peer's address is unknown")),
        }
        if *self.stopping.borrow() {
            return Err(Status::unavailable("the server is stopping; retry on another"));
        }
        let count = count.max(1);
        if count > limit {
            return Err(Status::invalid_argument(format!("count {count} is over the limit of {limit} IDs per call")));
        }
        Ok(count)
    }

    /// Exactly `count` IDs, or an error (IDs drawn for a failed call are
    /// skipped, never handed out twice).
    async fn draw(observer: &Observer, count: u32) -> Result<Vec<String>, Status> {
        let mut raw = vec![0u8; count as usize * ID_LEN];
        let counters = &observer.grpc;
        let filled = match observer.grpc_ids.fill(&mut raw, PATIENCE).await {
            Ok(n) => n,
            Err(e) => {
                let (code, status) = status_of(e);
                counters.error(code);
                return Err(status);
            }
        };
        if filled < count as usize {
            counters.error(ErrorCode::Unavailable);
            return Err(Status::unavailable(format!("only {filled} of {count} IDs were ready; retry shortly")));
        }
        counters.served(filled);
        Ok(raw.chunks_exact(ID_LEN).map(|id| String::from_utf8_lossy(id).into_owned()).collect())
    }
}

fn status_of(e: GenError) -> (ErrorCode, Status) {
    match e {
        GenError::Exhausted => (ErrorCode::Exhausted, Status::resource_exhausted("the ID space is exhausted")),
        e => (ErrorCode::Unavailable, Status::unavailable(format!("{e}"))),
    }
}

#[tonic::async_trait]
impl IdService for Ids {
    async fn next(&self, request: Request<NextRequest>) -> Result<Response<NextReply>, Status> {
        let count = self.check(&request, request.get_ref().count, NEXT_LIMIT)?;
        let ids = Ids::draw(&self.observer, count).await?;
        Ok(Response::new(NextReply { ids }))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<NextReply, Status>> + Send>>;

    async fn stream(&self, request: Request<NextRequest>) -> Result<Response<Self::StreamStream>, Status> {
        let count = self.check(&request, request.get_ref().count, STREAM_LIMIT)?;
        let (tx, rx) = mpsc::channel(4);
        let observer = Arc::clone(&self.observer);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut left = count;
            while left > 0 {
                let chunk = left.min(STREAM_CHUNK);
                let reply = tokio::select! {
                    _ = stopping.wait_for(|stop| *stop) => Err(Status::unavailable("the server is stopping; the stream ends here")),
                    drawn = Ids::draw(&observer, chunk) => drawn.map(|ids| NextReply { ids }),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return; // the client went away, or the stream ended
                }
                left -= chunk;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
