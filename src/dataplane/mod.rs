//! The data plane: opens the state, binds one SO_REUSEPORT socket per
//! worker, and runs the pinned worker threads. It knows nothing of the
//! control plane: it is started with a [`Config`], observed through the
//! atomics it exposes, and stopped through [`Workers`].

mod counters;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use crossbeam_utils::CachePadded;
use tradeid::policy::{self, RateLimiter, SourcePolicy};
use tradeid::protocol::DEFAULT_MAX_BATCH;
use tradeid::respond::Responder;
use tradeid::state::{self, Geometry, Header, StateError, Store};
use tradeid::{Generator, GeneratorConfig};
use tradeid_udp::{self as udp, SocketOptions};

pub use counters::Counters;
pub(crate) use counters::BATCH_BUCKETS;

use crate::cluster::{self, ledger::ClusterStats, ledger::EtcdLedger};
use crate::errors::ConfigError;

/// What the data plane needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// State file and mirrors.
    pub state: Vec<PathBuf>,
    /// Create the state if missing (local runs only).
    pub create: bool,
    /// Expected partition (node, nodes), if given.
    pub partition: Option<(u32, u32)>,
    /// UDP address.
    pub listen: SocketAddr,
    /// CPU per worker (`None` = unpinned).
    pub worker_cpus: Vec<Option<usize>>,
    /// Largest batch.
    pub max_batch: u16,
    /// Allowlist and trusted networks.
    pub policy: SourcePolicy,
    /// Requests per second per prefix, if limited.
    pub rate_limit: Option<u32>,
    /// Socket buffer sizes and timeouts.
    pub sockets: SocketOptions,
    /// Block reservation tuning.
    pub generator: GeneratorConfig,
    /// SO_ATTACH_REUSEPORT_CBPF steering.
    pub cpu_steering: bool,
    /// The etcd cluster this node belongs to, if any.
    pub cluster: Option<cluster::Options>,
}

impl Config {
    /// The defaults of `tradeid serve` for `state` and `listen` with
    /// `workers` unpinned workers: for embedding the server (and its tests).
    pub fn new(state: Vec<PathBuf>, listen: SocketAddr, workers: usize) -> Config {
        Config {
            state,
            create: false,
            partition: None,
            listen,
            worker_cpus: vec![None; workers],
            max_batch: DEFAULT_MAX_BATCH,
            policy: SourcePolicy { allow: policy::default_allow(), trust: policy::default_trust() },
            rate_limit: None,
            sockets: SocketOptions {
                recv_buffer: DEFAULT_SOCKET_BUFFER,
                send_buffer: DEFAULT_SOCKET_BUFFER,
                read_timeout: WORKER_WAKE,
            },
            generator: GeneratorConfig { abort_on_storage_error: true, ..GeneratorConfig::default() },
            cpu_steering: false,
            cluster: None,
        }
    }

    /// The most IDs one restart can skip: two blocks per worker handle,
    /// plus `extra_handles` (the admin listener's, if it serves IDs).
    pub fn max_waste_per_restart(&self, extra_handles: usize) -> u64 {
        tradeid::generator::max_waste_per_restart(self.generator.block_max, self.worker_cpus.len() + extra_handles)
    }
}

/// SO_RCVBUF and SO_SNDBUF asked for by default, per socket.
pub const DEFAULT_SOCKET_BUFFER: usize = 4 << 20;

/// The longest a worker blocks in a receive before it looks around (stop
/// flag, heartbeat).
pub const WORKER_WAKE: Duration = Duration::from_millis(100);

/// A running data plane.
pub struct Server {
    /// The generator (and through it, the store).
    pub generator: Arc<Generator>,
    /// Per-worker counters, in worker order.
    pub counters: Arc<[Arc<CachePadded<Counters>>]>,
    /// The address the sockets are bound to.
    pub local_addr: SocketAddr,
    /// The inodes of the workers' sockets: everything else found bound to
    /// `local_addr` later is another process's (see
    /// [`udp::foreign_sockets_except`]).
    pub(crate) socket_inodes: Vec<u64>,
    /// The worker threads.
    pub workers: Workers,
    /// Coordination state, in cluster mode.
    pub(crate) cluster: Option<Arc<ClusterStats>>,
    /// What opening the state found.
    pub(crate) start_report: StartReport,
}

/// What opening the state found worth a metric.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StartReport {
    /// Shards repaired in mirrors that were behind.
    pub(crate) repaired_shards: u32,
    /// Shards whose newest slot was torn (the older one was used).
    pub(crate) torn_slots: u32,
}

/// The worker threads: whether any has ended, and how to stop them all.
pub struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
}

impl Workers {
    /// Whether any worker thread has ended (it only does on a fatal error
    /// or after [`stop`](Self::stop)).
    pub fn any_ended(&self) -> bool {
        self.threads.iter().any(|w| w.is_finished())
    }

    /// Stops the workers (they answer what is queued first) and waits.
    pub fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        let mut failed = None;
        for (i, worker) in self.threads.into_iter().enumerate() {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(anyhow::anyhow!("worker {i} stopped on a socket error: {e}")),
                Err(_) => failed = Some(anyhow::anyhow!("worker {i} panicked")),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

impl Server {
    /// Opens the state, binds the sockets, reserves every worker's first
    /// block and starts the workers. When this returns, the server answers.
    pub fn start(config: &Config) -> anyhow::Result<Server> {
        let (store, start_report) = open_store(config)?;
        log_state(&store, config);
        let (generator, cluster) = match &config.cluster {
            None => {
                store.check_standalone()?;
                (Generator::new(store, config.generator.clone()), None)
            }
            Some(options) => {
                let (etcd, meta) = cluster::open_for_serving(options, store.header().cluster.as_ref(), store.path())?;
                let h = store.header();
                if h.check_char != meta.check_char {
                    let says = |check: bool| if check { "with a check character" } else { "without a check character" };
                    anyhow::bail!(ConfigError(format!(
                        "state file {} makes IDs {} but cluster {:?} in etcd makes IDs {}: one space has one format. \
                         Serve this file with its own cluster, or make this node's state again with `tradeid init \
                         --state FILE --etcd URLS --cluster {}`",
                        store.path().display(),
                        says(h.check_char),
                        options.name,
                        says(meta.check_char),
                        options.name
                    )));
                }
                if (h.key, h.geometry.width, h.geometry.shard_bits) != (meta.key, meta.width, meta.shard_bits) {
                    anyhow::bail!(ConfigError(format!(
                        "state file {} does not match cluster {:?}'s key and geometry in etcd; it was not made by `tradeid init` for this cluster",
                        store.path().display(),
                        options.name
                    )));
                }
                let (ledger, stats) = EtcdLedger::start(etcd, meta, &store)?;
                (Generator::with_ledger(store, config.generator.clone(), Box::new(ledger)), Some(stats))
            }
        };
        let generator = Arc::new(generator);
        let workers = config.worker_cpus.len();
        if config.listen.port() != 0 {
            refuse_shared_address(config.listen, &[])?;
        }
        let (sockets, local_addr, granted) =
            udp::bind_group(config.listen, workers, &config.sockets).with_context(|| {
                format!(
                    "cannot bind UDP {} (--listen): is another process using it, or is the address not local?",
                    config.listen
                )
            })?;
        // Closes the race with a server that bound at the same moment: each
        // sees the other's sockets and refuses. (The control plane checks
        // again every second, by the same inodes.)
        let socket_inodes = udp::socket_inodes(&sockets).context("cannot read the worker sockets' inodes")?;
        refuse_shared_address(local_addr, &socket_inodes)?;
        // Linux reports twice the usable size; anything below what we asked
        // for means net.core.rmem_max / wmem_max capped it.
        if granted.recv < config.sockets.recv_buffer {
            tracing::warn!(
                asked = config.sockets.recv_buffer,
                got = granted.recv,
                "kernel shrank SO_RCVBUF; raise net.core.rmem_max to absorb bursts"
            );
        }
        if granted.send < config.sockets.send_buffer {
            tracing::warn!(
                asked = config.sockets.send_buffer,
                got = granted.send,
                "kernel shrank SO_SNDBUF; raise net.core.wmem_max"
            );
        }
        if let Some(stats) = &cluster {
            *stats.listen.lock().unwrap_or_else(|p| p.into_inner()) = Some(local_addr);
        }
        if config.cpu_steering {
            udp::attach_cpu_steering(&sockets[0], workers as u32)
                .context("cannot attach the CPU steering program (--cpu-steering)")?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut counters = Vec::new();
        let mut threads = Vec::new();
        for (index, (socket, cpu)) in sockets.into_iter().zip(config.worker_cpus.iter().copied()).enumerate() {
            // Reserve the first block before the worker starts, so the
            // server is ready to answer once `start` returns.
            let handle = generator.handle().map_err(|e| anyhow::anyhow!("cannot reserve the first block: {e}"))?;
            let worker_counters = Arc::new(CachePadded::new(Counters::default()));
            counters.push(Arc::clone(&worker_counters));
            // Each worker's table is hashed with a key of its own, drawn at
            // start, so which prefixes collide cannot be worked out offline.
            let limiter = config
                .rate_limit
                .map(|rate| RateLimiter::random(rate, rate.max(1), RATE_TABLE_SIZE))
                .transpose()
                .context("cannot read the OS random source for the rate limiter's key (--rate-limit)")?;
            let worker = worker::Worker {
                index,
                cpu,
                socket,
                handle,
                responder: Responder::new(config.max_batch, config.policy.clone(), limiter),
                counters: worker_counters,
                stop: Arc::clone(&stop),
            };
            let thread = std::thread::Builder::new()
                .name(format!("tradeid-w{index}"))
                .spawn(move || worker::run(worker))
                .context("cannot spawn a worker thread")?;
            threads.push(thread);
        }
        tracing::info!(
            %local_addr,
            workers,
            cpus = %cpu_list(&config.worker_cpus),
            max_batch = config.max_batch,
            allow = ?config.policy.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
            trust = ?config.policy.trust.iter().map(ToString::to_string).collect::<Vec<_>>(),
            rate_limit_per_second = ?config.rate_limit,
            cpu_steering = config.cpu_steering,
            "serving"
        );
        Ok(Server {
            generator,
            counters: counters.into(),
            local_addr,
            socket_inodes,
            workers: Workers { stop, threads },
            cluster,
            start_report,
        })
    }
}

/// Another socket is bound where we serve: serving beside it would split
/// traffic between two ID spaces.
#[derive(Debug, thiserror::Error)]
#[error("UDP {addr} (--listen) is already in use by {} socket(s) this server did not create ({}). Two servers on one address split the traffic between two ID spaces and hand out duplicates. Stop the other process (find it with `ss -uapn 'sport = :{}'`) or choose another --listen address", .others.len(), describe_sockets(.others), .addr.port())]
pub(crate) struct AddressTaken {
    /// The address asked for.
    pub(crate) addr: SocketAddr,
    /// The sockets found there.
    pub(crate) others: Vec<udp::ForeignSocket>,
}

pub(crate) fn describe_sockets(others: &[udp::ForeignSocket]) -> String {
    others.iter().map(|s| format!("{} inode {} uid {}", s.addr, s.inode, s.uid)).collect::<Vec<_>>().join("; ")
}

/// Refuses to serve on `addr` if any socket but ours (by inode) could
/// receive its datagrams.
fn refuse_shared_address(addr: SocketAddr, ours: &[u64]) -> anyhow::Result<()> {
    let others = udp::foreign_sockets_except(addr, ours)
        .context("cannot read /proc/net/udp to check that --listen is ours alone")?;
    if others.is_empty() {
        Ok(())
    } else {
        Err(AddressTaken { addr, others }.into())
    }
}

/// Opens the state (creating it if `create` and missing), with the
/// operator-facing errors of [`Store::open`].
fn open_store(config: &Config) -> anyhow::Result<(Store, StartReport)> {
    let (store, report) = match Store::open(&config.state) {
        Err(StateError::NotFound { .. }) if config.create => {
            let (node, nodes) = config.partition.unwrap_or((0, 1));
            if nodes > 1 {
                return Err(ConfigError(format!(
                    "--create cannot make node {node} of {nodes}: the nodes of one space must share a key. Create the \
                     state once with `tradeid init --state {} --node {node} --nodes {nodes} --key-file space.key`",
                    config.state[0].display()
                ))
                .into());
            }
            let geometry = Geometry { node, nodes, ..Geometry::DEFAULT };
            let header = Header::new(geometry, false).context("cannot read the OS random source")?;
            state::create(&config.state, &header)?;
            tracing::info!(state = ?config.state, "created a new state file (--create)");
            Store::open(&config.state)?
        }
        other => other?,
    };
    for (path, shard) in &report.fell_back {
        tracing::warn!(path = %path.display(), shard, "newest slot of a shard was torn; using the older slot (safe: its flush never completed)");
    }
    for (path, shards) in &report.repaired {
        tracing::warn!(path = %path.display(), shards, "mirror was behind (restored from an old copy?) and has been repaired from the newest marks");
    }
    if let Some((node, nodes)) = config.partition {
        store.check_partition(node, nodes)?;
    }
    let start_report = StartReport {
        repaired_shards: report.repaired.iter().map(|(_, n)| n).sum(),
        torn_slots: report.fell_back.len() as u32,
    };
    Ok((store, start_report))
}

fn log_state(store: &Store, config: &Config) {
    let h = store.header();
    let g = h.geometry;
    let used = store.used();
    let capacity = g.node_capacity();
    tracing::info!(
        state = ?config.state,
        space = %h.space_id(),
        width = g.width,
        shards = g.shard_count(),
        shard_size = g.shard_size(),
        node = g.node,
        nodes = g.nodes,
        sequential = h.sequential,
        used,
        remaining = capacity - used,
        block_max = config.generator.block_max,
        waste_per_restart = config.max_waste_per_restart(0),
        "state opened"
    );
}

/// The CPU each worker is pinned to, in worker order, for the log:
/// `0,1,0,1`, with `-` for a worker left unpinned, or `unpinned` when none
/// is pinned.
fn cpu_list(cpus: &[Option<usize>]) -> String {
    if cpus.iter().all(Option::is_none) {
        return "unpinned".into();
    }
    cpus.iter().map(|c| c.map_or_else(|| "-".to_string(), |c| c.to_string())).collect::<Vec<_>>().join(",")
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// The CPUs this process may run on (its affinity mask).
pub(crate) fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect()
}

/// Buckets per worker in the rate limiter's table (bounded memory).
const RATE_TABLE_SIZE: usize = 16_384;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_cleanly() {
        assert_eq!(cpu_list(&[Some(0), Some(1), Some(0)]), "0,1,0");
        assert_eq!(cpu_list(&[None, None]), "unpinned");
        assert_eq!(cpu_list(&[Some(3), None]), "3,-");
    }
}
