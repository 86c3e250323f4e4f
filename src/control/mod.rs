//! The control plane, on a single-threaded tokio runtime: signals, systemd
//! notification (readiness, status, watchdog), capacity warnings and the
//! admin HTTP listener. It only observes the data plane (through atomics)
//! and tells it to stop; it never touches a datagram.

mod admin;
mod grpc;
mod ids;
mod metrics;
pub(crate) mod systemd;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use tradeid::state::{Integrity, StateError};
use tradeid_udp::{self as udp, ForeignSocket};

use crate::dataplane::{describe_sockets, Server};
use crate::errors::SecondSignal;
use metrics::Observer;
use systemd::Notifier;

/// What the control plane needs besides the running data plane.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Admin HTTP address, if any.
    pub(crate) admin: Option<SocketAddr>,
    /// Largest batch, for `/ids`.
    pub(crate) max_batch: u16,
    /// The most IDs one restart can skip (for metrics).
    pub(crate) max_waste_per_restart: u64,
    /// The systemd watchdog interval, if any.
    pub(crate) watchdog: Option<Duration>,
    /// gRPC address, if any.
    pub(crate) grpc: Option<SocketAddr>,
    /// Who may ask for IDs over gRPC (the UDP allowlist).
    pub(crate) policy: tradeid::policy::SourcePolicy,
}

/// Runs the control plane until SIGTERM/SIGINT (exit 0 after a clean stop)
/// or until a worker dies (an error, so systemd restarts us).
///
/// A second signal while the workers drain returns [`SecondSignal`] at
/// once, without waiting for them: the caller ends the process (this code
/// never exits it).
pub(crate) fn run(server: Server, config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control-plane runtime")?;
    let result = runtime.block_on(control(server, config));
    if result.as_ref().is_err_and(|e| e.is::<SecondSignal>()) {
        // The workers may still be draining (or wedged) on a blocking
        // thread: dropping the runtime would wait for them.
        runtime.shutdown_background();
    }
    result
}

async fn control(server: Server, config: Config) -> anyhow::Result<()> {
    let Server { generator, counters, local_addr, socket_inodes, workers, cluster, start_report } = server;
    let observer = Arc::new(Observer::new(
        generator,
        counters,
        cluster,
        start_report,
        config.max_batch,
        config.max_waste_per_restart,
    ));
    if let Some(addr) = config.admin {
        let bound = admin::spawn(addr, Arc::clone(&observer))
            .await
            .with_context(|| format!("cannot bind the admin listener {addr} (--admin): is the port in use?"))?;
        tracing::info!(%bound, "admin HTTP listening");
        announce(&format!("admin listening on {bound}"));
    }
    let mut grpc = match config.grpc {
        None => None,
        Some(addr) => {
            let server = grpc::GrpcServer::start(addr, Arc::clone(&observer), config.policy.clone())?;
            tracing::info!(bound = %server.addr, "gRPC listening");
            announce(&format!("grpc listening on {}", server.addr));
            Some(server)
        }
    };
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;

    // Every worker is bound and holds a flushed block: we are ready.
    announce(&format!("listening on {local_addr}"));
    let notifier = Notifier::from_env();
    let watchdog = config.watchdog;
    notifier.send(&format!("READY=1\nSTATUS={}", observer.status_line()));

    // Housekeeping once a second; watchdog pings at exactly half the
    // interval systemd asked for (a far-future timer when there is none).
    // The first ping is one period away, not immediate: it compares the
    // heartbeats with those sampled just below, and the workers need that
    // period to move them. After a late tick (a busy runtime) the next one
    // is a whole period later, never a burst of back-to-back ticks, which
    // would find the heartbeats unmoved and withhold pings from a healthy
    // server.
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let ping_every = watchdog.map_or(Duration::from_secs(86_400), |w| w / 2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats = observer.heartbeats();
    let mut capacity = CapacityAlarm::default();
    let mut send_errors = SendErrorLog::default();
    let mut verifying: OffRuntime<Result<Integrity, StateError>> = OffRuntime::default();
    let mut address = AddressWatch::new(local_addr);
    let ours: Arc<[u64]> = socket_inodes.into();
    let mut watching: OffRuntime<std::io::Result<Vec<ForeignSocket>>> = OffRuntime::default();
    let mut last_status = Instant::now();
    observer.sample_rate();
    let outcome = loop {
        tokio::select! {
            _ = term.recv() => break Ok("SIGTERM"),
            _ = int.recv() => break Ok("SIGINT"),
            _ = ping.tick(), if watchdog.is_some() => {
                // Ping only if every worker's heartbeat moved since the last
                // ping and no flush is stuck: a stuck worker or disk stops
                // the pings, and systemd restarts the service.
                let now = observer.heartbeats();
                let all_alive = now.iter().zip(&beats).all(|(n, b)| n != b);
                beats = now;
                let flush_stuck = match (observer.generator.flush_in_progress_for(), watchdog) {
                    (Some(running), Some(w)) => running > w / 2,
                    _ => false,
                };
                if all_alive && !flush_stuck && !workers.any_ended() {
                    notifier.send("WATCHDOG=1");
                } else {
                    tracing::warn!(all_alive, flush_stuck, "withholding the watchdog ping");
                }
            }
            _ = housekeeping.tick() => {
                if workers.any_ended() {
                    break Err(anyhow::anyhow!("a worker thread stopped unexpectedly"));
                }
                capacity.check(observer.used_fraction());
                send_errors.check(&observer.send_failures());
                if let Some(grpc) = grpc.as_mut() {
                    grpc.update_health().await;
                }
                // Every second, whether traffic flows or not: is the state
                // file at its path still the one we write? (Off the runtime:
                // it stats and reads the file.)
                if let Some(verdict) = verifying.finished().await {
                    match verdict {
                        Ok(Ok(Integrity::Intact | Integrity::Busy)) => {}
                        Ok(Ok(Integrity::Repaired { path, records })) => tracing::error!(
                            path = %path.display(),
                            records,
                            "the state file was written over while in use (an old copy put in place?); this process's marks were written back and flushed. Find out who did it: an old state file hands out IDs again"
                        ),
                        Ok(Err(e @ StateError::Displaced { .. })) => break Err(e.into()),
                        Ok(Err(e)) => tracing::warn!("cannot verify the state file: {e}"),
                        Err(e) => tracing::warn!("the state file check failed: {e}"),
                    }
                }
                let generator = Arc::clone(&observer.generator);
                verifying.start_unless_running(move || generator.store().verify());
                // And is our UDP address still ours alone? SO_REUSEPORT lets
                // any socket of the same user join it at any time, not only
                // before we start. (Off the runtime: it reads /proc.)
                if let Some(outcome) = watching.finished().await {
                    match outcome {
                        Ok(Ok(found)) => {
                            observer.listen_foreign_sockets.store(found.len() as u64, Ordering::Relaxed);
                            address.check(&found);
                        }
                        Ok(Err(e)) => address.unreadable(&e),
                        Err(e) => tracing::warn!("the --listen address check failed: {e}"),
                    }
                }
                let ours = Arc::clone(&ours);
                watching.start_unless_running(move || udp::foreign_sockets_except(local_addr, &ours));
                if last_status.elapsed() >= Duration::from_secs(5) {
                    observer.sample_rate();
                    notifier.send(&format!("STATUS={}", observer.status_line()));
                    last_status = Instant::now();
                }
            }
        }
    };
    // From here on the server is stopping: /readyz and gRPC health say so,
    // and gRPC calls in progress end.
    observer.running.store(false, Ordering::Relaxed);
    if let Some(mut grpc) = grpc {
        grpc.set_serving(false).await;
        tokio::task::spawn_blocking(move || grpc.stop()).await.context("stopping the gRPC listener")?;
    }
    let signal_name = match outcome {
        Ok(name) => name,
        Err(e) => {
            notifier.send("STOPPING=1");
            return Err(e);
        }
    };
    tracing::info!(signal = signal_name, "stopping: answering queued requests, then exiting");
    notifier.send("STOPPING=1");
    // A second signal means "now": the caller ends the process at once
    // (see `run`). Every ID already sent is covered by a flushed mark, so
    // nothing is lost either way.
    let stopping = tokio::task::spawn_blocking(move || workers.stop());
    tokio::select! {
        stopped = stopping => {
            stopped.context("shutdown task")??;
            tracing::info!("stopped cleanly");
            Ok(())
        }
        _ = term.recv() => Err(SecondSignal.into()),
        _ = int.recv() => Err(SecondSignal.into()),
    }
}

/// Prints a line for scripts and tests on stdout ("listening on ADDR").
/// A closed stdout must not stop a server (`println!` would panic, and a
/// panic aborts), so a failed write is ignored: the log says it too.
fn announce(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// Logs refused replies at most once a minute, with the OS error of the
/// latest refusal of each worker that had one since the last report: the
/// workers only count them (a log line per datagram could be provoked from
/// outside).
#[derive(Default)]
struct SendErrorLog {
    /// Per worker, the refused replies already reported.
    logged: Vec<u64>,
    at: Option<Instant>,
}

impl SendErrorLog {
    const EVERY: Duration = Duration::from_secs(60);

    fn check(&mut self, per_worker: &[(u64, i32)]) {
        if let Some(line) = self.report(per_worker, Instant::now()) {
            tracing::warn!("{line}");
        }
    }

    /// The line to log at `now`, if any: `per_worker` is each worker's
    /// (refused replies so far, OS error of its latest refusal).
    fn report(&mut self, per_worker: &[(u64, i32)], now: Instant) -> Option<String> {
        self.logged.resize(per_worker.len(), 0);
        let new: u64 =
            per_worker.iter().zip(&self.logged).map(|(&(total, _), &logged)| total.saturating_sub(logged)).sum();
        if new == 0 || self.at.is_some_and(|at| now.duration_since(at) < Self::EVERY) {
            return None;
        }
        // Only workers refused since the last report: an errno a worker
        // recorded long ago says nothing about the refusals now.
        let mut errors: Vec<String> = Vec::new();
        for (worker, (&(total, errno), &logged)) in per_worker.iter().zip(&self.logged).enumerate() {
            if total > logged {
                let error = if errno == 0 {
                    "unknown error".to_string()
                } else {
                    std::io::Error::from_raw_os_error(errno).to_string()
                };
                errors.push(format!("worker {worker}: {error}"));
            }
        }
        let total: u64 = per_worker.iter().map(|&(t, _)| t).sum();
        self.logged = per_worker.iter().map(|&(t, _)| t).collect();
        self.at = Some(now);
        Some(format!(
            "the kernel refused {new} replies since the last report ({total} in all; latest error per worker: {}); check firewalls and the send buffer (--send-buffer)",
            errors.join(", ")
        ))
    }
}

/// A check run off the runtime (it does blocking I/O), one run at a time:
/// a run that has not finished (a stuck disk) is not stacked upon.
struct OffRuntime<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Default for OffRuntime<T> {
    fn default() -> Self {
        OffRuntime(None)
    }
}

impl<T: Send + 'static> OffRuntime<T> {
    /// The outcome of the run started last, once it has finished.
    async fn finished(&mut self) -> Option<Result<T, tokio::task::JoinError>> {
        match self.0.take_if(|task| task.is_finished()) {
            Some(task) => Some(task.await),
            None => None,
        }
    }

    /// Starts `check` on the blocking pool, unless a run is still going.
    fn start_unless_running(&mut self, check: impl FnOnce() -> T + Send + 'static) {
        if self.0.is_none() {
            self.0 = Some(tokio::task::spawn_blocking(check));
        }
    }
}

/// Reports sockets of other processes that joined our UDP address after
/// start: an error when one appears (once per socket, not every second),
/// and a line when the address is ours alone again.
struct AddressWatch {
    addr: SocketAddr,
    /// The foreign sockets found at the last check, by inode.
    known: Vec<u64>,
    /// Whether the last check could not read /proc (said once).
    unreadable: bool,
}

impl AddressWatch {
    fn new(addr: SocketAddr) -> AddressWatch {
        AddressWatch { addr, known: Vec::new(), unreadable: false }
    }

    /// A check that could not read /proc: warned once, until one can.
    fn unreadable(&mut self, e: &std::io::Error) {
        if !self.unreadable {
            tracing::warn!(
                "cannot read /proc/net/udp to check that UDP {} (--listen) is this server's alone: {e}; the check goes on trying every second",
                self.addr
            );
            self.unreadable = true;
        }
    }

    fn check(&mut self, found: &[ForeignSocket]) {
        self.unreadable = false;
        match self.report(found) {
            Some(Report::Shared(line)) => tracing::error!("{line}"),
            Some(Report::Alone(line)) => tracing::info!("{line}"),
            None => {}
        }
    }

    /// What to log for the foreign sockets `found` now, if anything.
    fn report(&mut self, found: &[ForeignSocket]) -> Option<Report> {
        let appeared = found.iter().any(|s| !self.known.contains(&s.inode));
        let was_shared = !self.known.is_empty();
        self.known = found.iter().map(|s| s.inode).collect();
        if appeared {
            Some(Report::Shared(format!(
                "UDP {addr} (--listen) is now shared with {} socket(s) this server did not create ({}): on the same port, at the same address or a wildcard, they can take datagrams meant for this server, and if one belongs to another ID server, the IDs it hands out are not from this server's space and may repeat. Stop the other process (find it with `ss -uapn 'sport = :{port}'`); this server keeps serving",
                found.len(),
                describe_sockets(found),
                addr = self.addr,
                port = self.addr.port(),
            )))
        } else if was_shared && found.is_empty() {
            Some(Report::Alone(format!("UDP {} (--listen) is this server's alone again", self.addr)))
        } else {
            None
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Report {
    /// Someone joined the address.
    Shared(String),
    /// Everyone else left it.
    Alone(String),
}

/// Logs once as usage crosses 50, 80, 90 and 99% of the node's space.
#[derive(Default)]
struct CapacityAlarm {
    warned: usize,
}

impl CapacityAlarm {
    const LEVELS: [f64; 4] = [0.50, 0.80, 0.90, 0.99];

    fn check(&mut self, used: f64) {
        while self.warned < Self::LEVELS.len() && used >= Self::LEVELS[self.warned] {
            let level = Self::LEVELS[self.warned] * 100.0;
            tracing::warn!(
                used_percent = used * 100.0,
                "ID space {level:.0}% used; once it is used up every request gets !ERR507. Plan for it now (docs/operations.md): never answer it with a new key or state file for the same IDs, whose IDs would collide with these"
            );
            self.warned += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that joins is reported once, with the address, the socket
    /// and how to find its owner; another joining is reported again; the
    /// address being ours alone again is said once.
    #[test]
    fn the_address_watch_reports_each_joiner_once() {
        let addr: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let mut watch = AddressWatch::new(addr);
        let socket = |inode| ForeignSocket { addr, inode, uid: 0 };
        assert_eq!(watch.report(&[]), None, "alone from the start");
        let Some(Report::Shared(line)) = watch.report(&[socket(9)]) else { panic!("a joiner is reported") };
        assert!(line.contains("UDP 127.0.0.1:7070 (--listen) is now shared with 1 socket(s)"), "{line}");
        assert!(line.contains("inode 9") && line.contains("sport = :7070"), "{line}");
        assert_eq!(watch.report(&[socket(9)]), None, "reported once, not every second");
        let Some(Report::Shared(line)) = watch.report(&[socket(9), socket(10)]) else { panic!("a second joiner") };
        assert!(line.contains("2 socket(s)") && line.contains("inode 10"), "{line}");
        assert_eq!(watch.report(&[socket(10)]), None, "one left, one stays: still shared, nothing new");
        assert_eq!(
            watch.report(&[]),
            Some(Report::Alone("UDP 127.0.0.1:7070 (--listen) is this server's alone again".into()))
        );
        assert_eq!(watch.report(&[]), None);
    }

    /// The error named is each refusing worker's latest, never a stale one
    /// of a worker that has been quiet since the last report.
    #[test]
    fn the_send_error_log_names_the_latest_errors() {
        let mut log = SendErrorLog::default();
        let start = Instant::now();
        let eperm = std::io::Error::from_raw_os_error(libc::EPERM).to_string();
        let enobufs = std::io::Error::from_raw_os_error(libc::ENOBUFS).to_string();
        assert_eq!(log.report(&[(0, 0), (0, 0)], start), None, "nothing refused");
        let first = log.report(&[(3, libc::EPERM), (0, 0)], start).unwrap();
        assert!(first.contains("refused 3 replies") && first.contains(&format!("worker 0: {eperm}")), "{first}");
        assert!(!first.contains("worker 1"), "{first}");
        // Within the minute: counted, not logged.
        assert_eq!(log.report(&[(3, libc::EPERM), (5, libc::ENOBUFS)], start + Duration::from_secs(10)), None);
        let later = log.report(&[(3, libc::EPERM), (5, libc::ENOBUFS)], start + Duration::from_secs(61)).unwrap();
        assert!(later.contains("refused 5 replies") && later.contains("8 in all"), "{later}");
        assert!(later.contains(&format!("worker 1: {enobufs}")), "{later}");
        assert!(!later.contains(&eperm), "worker 0 refused nothing since: {later}");
        assert_eq!(log.report(&[(3, libc::EPERM), (5, libc::ENOBUFS)], start + Duration::from_secs(200)), None);
    }
}
