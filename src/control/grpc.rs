//! The gRPC API (`serve --grpc ADDR`): `tradeid.v1.IdService` from
//! `proto/tradeid/v1/tradeid.proto`, with the standard `grpc.health.v1`
//! health service and server reflection (both `v1` and the older
//! `v1alpha` that many `grpcurl` builds still ask for), so `grpcurl` and
//! `grpc_health_probe` work out of the box.
//!
//! Health is SERVING only while the UDP data plane is: the server is not
//! stopping, it is ready (as `/readyz` says) and every worker's heartbeat
//! moved since the last look, about a second ago (a wedged worker
//! black-holes its share of UDP requests). The control plane calls
//! [`GrpcServer::update_health`] on every housekeeping tick.
//!
//! It draws from its own generator handle (never a worker's), checks each
//! peer against the same `--allow` list as UDP, and counts requests, IDs
//! and errors under `protocol="grpc"`. It runs on a runtime of its own, so a
//! flood of gRPC requests cannot delay signals, the watchdog or `/metrics`
//! on the control runtime.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tradeid::id::ID_LEN;
use tradeid::policy::SourcePolicy;
use tradeid::protocol::ErrorCode;
use tradeid::GenError;

use super::metrics::{Observer, Readiness};

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
/// The least time between two looks at the workers' heartbeats. A healthy
/// worker beats at least every `WORKER_WAKE` (100 ms) even when idle, so
/// one that has not moved in this long is wedged; the housekeeping tick
/// (1 s) looks about this often, and a burst of late ticks does not make a
/// healthy worker look stuck.
const STALL_AFTER: Duration = Duration::from_millis(900);

/// A running gRPC listener.
pub(crate) struct GrpcServer {
    /// The bound address.
    pub(crate) addr: SocketAddr,
    observer: Arc<Observer>,
    health: HealthReporter,
    /// What health checks were last told (None: nothing since the start).
    reported: Option<bool>,
    /// The workers' heartbeats at the last look, and when that was.
    beats: Vec<u64>,
    sampled: Instant,
    /// Whether every heartbeat moved between the last two looks.
    workers_moving: bool,
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
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::DESCRIPTOR)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().context("cannot build the gRPC reflection service (v1)")?;
        let reflection_v1alpha =
            reflection().build_v1alpha().context("cannot build the gRPC reflection service (v1alpha)")?;
        let (shutdown, mut stopping) = watch::channel(false);
        let service = Ids { observer: Arc::clone(&observer), policy, stopping: stopping.clone() };
        // The workers are bound and hold a flushed block when this runs: the
        // first report is readiness alone, set before the first call is
        // accepted (the health service would otherwise say SERVING for ""
        // and NOT_FOUND for the IdService until the first tick).
        let initially = ready(&observer).is_ok();
        let first_report = health.clone();
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
                    set_status(&first_report, initially).await;
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return tracing::error!("cannot use the gRPC listener: {e}"),
                    };
                    // The socket options go on the incoming stream: the
                    // builder's own (tcp_nodelay, tcp_keepalive) apply only
                    // to listeners it binds itself. Without TCP_NODELAY a
                    // reply's last segment waits for the client's delayed
                    // ACK (Nagle): tens of milliseconds per large reply.
                    let incoming = TcpIncoming::from(listener)
                        .with_nodelay(Some(true))
                        .with_keepalive(Some(Duration::from_secs(60)));
                    let served = tonic::transport::Server::builder()
                        .http2_keepalive_interval(Some(Duration::from_secs(30)))
                        .add_service(health_service)
                        .add_service(reflection_v1)
                        .add_service(reflection_v1alpha)
                        .add_service(IdServiceServer::new(service))
                        .serve_with_incoming_shutdown(incoming, async move {
                            let _ = stopping.wait_for(|stop| *stop).await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!("the gRPC listener failed: {e}");
                    }
                });
            })
            .context("cannot spawn the gRPC thread")?;
        let beats = observer.heartbeats();
        Ok(GrpcServer {
            addr: bound,
            observer,
            health,
            reported: Some(initially),
            beats,
            sampled: Instant::now(),
            workers_moving: true,
            shutdown,
            thread: Some(thread),
        })
    }

    /// Looks at the data plane and reports SERVING or NOT_SERVING to health
    /// checks accordingly (see the module doc).
    pub(crate) async fn update_health(&mut self) {
        if self.sampled.elapsed() >= STALL_AFTER {
            let beats = self.observer.heartbeats();
            self.workers_moving = beats.iter().zip(&self.beats).all(|(now, before)| now != before);
            self.beats = beats;
            self.sampled = Instant::now();
        }
        let verdict = if self.workers_moving {
            ready(&self.observer)
        } else {
            Err("a UDP worker's heartbeat stopped (a wedged worker thread)".to_owned())
        };
        match &verdict {
            Err(why) if self.reported != Some(false) => tracing::warn!("gRPC health: NOT_SERVING: {why}"),
            Ok(()) if self.reported == Some(false) => tracing::info!("gRPC health: SERVING again"),
            _ => {}
        }
        self.set_serving(verdict.is_ok()).await;
    }

    /// Reports SERVING or NOT_SERVING to health checks (the whole server
    /// and the IdService alike). Only a change is sent, so a `Watch` sees
    /// one message per change rather than one a second.
    pub(crate) async fn set_serving(&mut self, serving: bool) {
        if self.reported != Some(serving) {
            set_status(&self.health, serving).await;
            self.reported = Some(serving);
        }
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

/// Ready to serve, or why not (see [`Observer::readiness`]).
fn ready(observer: &Observer) -> Result<(), String> {
    match observer.readiness() {
        Readiness::Ready(_) => Ok(()),
        Readiness::NotReady(why) => Err(why),
    }
}

async fn set_status(health: &HealthReporter, serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
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
