//! `tradeid serve`: turns flags into a validated [`ServeConfig`], opens the
//! state, binds one SO_REUSEPORT socket per worker, starts the pinned worker
//! threads, and hands over to the control plane until a signal arrives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use crossbeam::utils::CachePadded;

use crate::alloc::{max_waste_per_restart, Generator, GeneratorConfig};
use crate::net::{self, SocketOptions};
use crate::policy::{self, Cidr, RateLimiter, SourcePolicy};
use crate::protocol::{DEFAULT_MAX_BATCH, MAX_BATCH_LIMIT};
use crate::state::{self, Geometry, Header, StateError, Store};
use crate::worker::{self, Counters, WorkerContext};
use crate::ConfigError;

/// `tradeid serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The state file; repeat (or comma-separate) for mirrors on other disks.
    #[arg(long = "state", required = true, env = "TRADEID_STATE", value_delimiter = ',')]
    pub state: Vec<PathBuf>,
    /// UDP address to serve on. Port 0 picks a free port (see the
    /// "listening on" line).
    #[arg(long, default_value = "127.0.0.1:7070", env = "TRADEID_LISTEN")]
    pub listen: SocketAddr,
    /// Worker threads, one socket each [default: one per CPU in the
    /// process's affinity mask, or per --cpus entry].
    #[arg(long, env = "TRADEID_WORKERS")]
    pub workers: Option<usize>,
    /// CPUs to pin workers to, e.g. "0,1" or "0-3"; worker i gets entry
    /// i mod the list length [default: the affinity mask].
    #[arg(long, env = "TRADEID_CPUS")]
    pub cpus: Option<String>,
    /// Largest number of IDs one request may ask for (1..=9358).
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH, env = "TRADEID_MAX_BATCH")]
    pub max_batch: u16,
    /// Create the state file if it does not exist (for a first local run;
    /// never use it in a unit file: a lost file must stop the service).
    #[arg(long, env = "TRADEID_CREATE")]
    pub create: bool,
    /// Refuse to start unless the state file is for this node index.
    #[arg(long, env = "TRADEID_NODE", requires = "nodes")]
    pub node: Option<u32>,
    /// Refuse to start unless the state file is for this many nodes.
    #[arg(long, env = "TRADEID_NODES", requires = "node")]
    pub nodes: Option<u32>,
    /// Admin HTTP listener for /metrics, /healthz, /readyz, /id, /ids
    /// (off by default; keep it on loopback).
    #[arg(long, env = "TRADEID_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// Source networks allowed to request IDs (repeatable)
    /// [default: loopback and private ranges].
    #[arg(long = "allow", env = "TRADEID_ALLOW", value_delimiter = ',')]
    pub allow: Vec<Cidr>,
    /// Source networks exempt from the 3x anti-amplification limit
    /// (repeatable) [default: loopback].
    #[arg(long = "trust", env = "TRADEID_TRUST", value_delimiter = ',')]
    pub trust: Vec<Cidr>,
    /// Per-source-prefix request limit, e.g. "1000/s" (per /24 or /56, per
    /// worker). Off by default.
    #[arg(long, env = "TRADEID_RATE_LIMIT")]
    pub rate_limit: Option<String>,
    /// SO_RCVBUF per socket, in bytes.
    #[arg(long, default_value_t = 4 << 20, env = "TRADEID_RECV_BUFFER")]
    pub recv_buffer: usize,
    /// SO_SNDBUF per socket, in bytes.
    #[arg(long, default_value_t = 4 << 20, env = "TRADEID_SEND_BUFFER")]
    pub send_buffer: usize,
    /// Largest block of IDs reserved at once; bounds the waste per restart
    /// to 2 blocks per worker.
    #[arg(long, default_value_t = GeneratorConfig::default().block_max, env = "TRADEID_BLOCK_MAX")]
    pub block_max: u64,
    /// Steer each datagram to the worker on the CPU it arrived on
    /// (SO_ATTACH_REUSEPORT_CBPF). Needs workers pinned to CPUs 0..N-1.
    #[arg(long, env = "TRADEID_CPU_STEERING")]
    pub cpu_steering: bool,
    /// Validate the configuration and the state file, then exit.
    #[arg(long, env = "TRADEID_CHECK_CONFIG")]
    pub check_config: bool,
    /// Test hook: a file whose existence stalls worker 0 (to prove the
    /// watchdog notices a stuck worker).
    #[arg(long, hide = true, env = "TRADEID_TEST_STALL_FILE")]
    pub test_stall_file: Option<PathBuf>,
    /// Test hook: flushes after this many fail with EIO (a failing disk).
    #[arg(long, hide = true, env = "TRADEID_TEST_FAIL_FLUSH_AFTER")]
    pub test_fail_flush_after: Option<u64>,
    /// Test hook: milliseconds to sleep before every flush (a slow disk).
    #[arg(long, hide = true, default_value_t = 0, env = "TRADEID_TEST_FLUSH_DELAY_MS")]
    pub test_flush_delay_ms: u64,
}

/// A validated serving configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// State file and mirrors.
    pub state: Vec<PathBuf>,
    /// Create the state if missing.
    pub create: bool,
    /// Expected partition, if given.
    pub partition: Option<(u32, u32)>,
    /// UDP address.
    pub listen: SocketAddr,
    /// CPU per worker (`None` = unpinned).
    pub worker_cpus: Vec<Option<usize>>,
    /// Largest batch.
    pub max_batch: u16,
    /// Admin HTTP address.
    pub admin: Option<SocketAddr>,
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
    /// Test hook (see [`ServeArgs::test_stall_file`]).
    pub test_stall_file: Option<PathBuf>,
}

impl ServeConfig {
    /// The defaults `tradeid serve` would use for `state` and `listen`, for
    /// embedding the server in another program (and for tests).
    pub fn new(state: Vec<PathBuf>, listen: SocketAddr) -> ServeConfig {
        use clap::Parser;
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            args: ServeArgs,
        }
        let mut args = Defaults::parse_from(["serve", "--state", "unused"]).args;
        args.state = state;
        args.listen = listen;
        ServeConfig::from_args(&args).expect("the defaults are valid")
    }

    /// Validates flags ("parse, don't validate"): every error names its flag.
    pub fn from_args(args: &ServeArgs) -> Result<ServeConfig, ConfigError> {
        if !(1..=MAX_BATCH_LIMIT).contains(&args.max_batch) {
            return Err(ConfigError(format!(
                "--max-batch {} is out of range: it must be 1..={MAX_BATCH_LIMIT} (a reply must fit one UDP datagram)",
                args.max_batch
            )));
        }
        let allowed = net::allowed_cpus();
        let cpus: Vec<usize> = match &args.cpus {
            Some(list) => parse_cpu_list(list)?,
            None => allowed.clone(),
        };
        if let Some(bad) = cpus.iter().find(|c| !allowed.is_empty() && !allowed.contains(c)) {
            return Err(ConfigError(format!(
                "--cpus includes CPU {bad}, which is outside this process's affinity mask {allowed:?}"
            )));
        }
        let workers = args.workers.unwrap_or(cpus.len().max(1));
        if !(1..=1024).contains(&workers) {
            return Err(ConfigError(format!("--workers {workers} is out of range: it must be 1..=1024")));
        }
        let worker_cpus =
            (0..workers).map(|i| if cpus.is_empty() { None } else { Some(cpus[i % cpus.len()]) }).collect::<Vec<_>>();
        if args.cpu_steering && worker_cpus.iter().enumerate().any(|(i, c)| *c != Some(i)) {
            return Err(ConfigError(
                "--cpu-steering needs worker i pinned to CPU i (use --cpus 0-N with as many workers as CPUs)".into(),
            ));
        }
        let rate_limit = args.rate_limit.as_deref().map(parse_rate).transpose()?;
        if args.block_max == 0 || args.block_max > 1 << 30 {
            return Err(ConfigError(format!("--block-max {} is out of range: it must be 1..=2^30", args.block_max)));
        }
        let defaults = GeneratorConfig::default();
        Ok(ServeConfig {
            state: args.state.clone(),
            create: args.create,
            partition: args.node.zip(args.nodes),
            listen: args.listen,
            worker_cpus,
            max_batch: args.max_batch,
            admin: args.admin,
            policy: SourcePolicy {
                allow: if args.allow.is_empty() { policy::default_allow() } else { args.allow.clone() },
                trust: if args.trust.is_empty() { policy::default_trust() } else { args.trust.clone() },
            },
            rate_limit,
            sockets: SocketOptions {
                recv_buffer: args.recv_buffer,
                send_buffer: args.send_buffer,
                // Workers beat at least once per receive timeout; keep that
                // well inside half a watchdog interval so an idle, healthy
                // worker never looks stuck.
                read_timeout: crate::control::watchdog_interval()
                    .map_or(WORKER_WAKE, |w| (w / 4).clamp(Duration::from_millis(1), WORKER_WAKE)),
            },
            generator: GeneratorConfig {
                block_max: args.block_max,
                // A request then spans at most the current block and the
                // prefetched one, so replies are full in steady state.
                block_min: defaults.block_min.max(4 * u64::from(args.max_batch)).min(args.block_max),
                abort_on_storage_error: true,
                flush_delay: Duration::from_millis(args.test_flush_delay_ms),
                fail_flushes_after: args.test_fail_flush_after,
                ..defaults
            },
            cpu_steering: args.cpu_steering,
            test_stall_file: args.test_stall_file.clone(),
        })
    }
}

impl ServeConfig {
    /// The most IDs one restart can skip: two blocks per handle, one handle
    /// per worker plus the admin listener's (if it is on).
    pub fn max_waste_per_restart(&self) -> u64 {
        let handles = self.worker_cpus.len() + usize::from(self.admin.is_some());
        max_waste_per_restart(self.generator.block_max, handles)
    }
}

/// Parses "0,2,4-7" into CPU numbers.
fn parse_cpu_list(list: &str) -> Result<Vec<usize>, ConfigError> {
    let bad = || ConfigError(format!("--cpus {list:?} is not a CPU list; use a form like \"0,1\" or \"0-3\""));
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b > 4095 {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(cpus)
}

/// Parses "1000/s" (or a bare number) into requests per second.
fn parse_rate(text: &str) -> Result<u32, ConfigError> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    number.trim().parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
        ConfigError(format!("--rate-limit {text:?} is not a rate; use requests per second like \"1000/s\""))
    })
}

/// A running data plane: the generator, the sockets' workers and their
/// counters. The control plane observes it; [`Server::shutdown`] stops it.
pub struct Server {
    /// The generator (and through it, the store).
    pub generator: Arc<Generator>,
    /// Per-worker counters, in worker order.
    pub counters: Vec<Arc<CachePadded<Counters>>>,
    /// The address the sockets are bound to.
    pub local_addr: SocketAddr,
    /// The validated configuration.
    pub config: ServeConfig,
    stop: Arc<AtomicBool>,
    /// Test hook shared with worker 0.
    pub stall: Arc<AtomicBool>,
    workers: Vec<JoinHandle<std::io::Result<()>>>,
}

/// Opens the state (creating it if `create` and missing), with the
/// operator-facing errors of [`Store::open`].
pub fn open_store(config: &ServeConfig) -> anyhow::Result<Store> {
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
            geometry.validate().map_err(|e| ConfigError(format!("--node/--nodes: {e}")))?;
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
    Ok(store)
}

impl Server {
    /// Opens the state, binds the sockets, reserves every worker's first
    /// block and starts the workers. When this returns, the server answers.
    pub fn start(config: ServeConfig) -> anyhow::Result<Server> {
        let store = open_store(&config)?;
        log_state(&store, &config);
        let generator = Arc::new(Generator::new(store, config.generator.clone()));
        let workers = config.worker_cpus.len();
        let (sockets, local_addr, granted) =
            net::bind_group(config.listen, workers, &config.sockets).with_context(|| {
                format!(
                    "cannot bind UDP {} (--listen): is another process using it, or is the address not local?",
                    config.listen
                )
            })?;
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
        if config.cpu_steering {
            net::attach_cpu_steering(&sockets[0], workers as u32)
                .context("cannot attach the CPU steering program (--cpu-steering)")?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stall = Arc::new(AtomicBool::new(false));
        let policy = Arc::new(config.policy.clone());
        let mut counters = Vec::new();
        let mut threads = Vec::new();
        for (index, (socket, cpu)) in sockets.into_iter().zip(config.worker_cpus.iter().copied()).enumerate() {
            // Reserve the first block before the worker starts, so the
            // server is ready to answer once `start` returns.
            let handle = generator.handle().map_err(|e| anyhow::anyhow!("cannot reserve the first block: {e}"))?;
            let worker_counters = Arc::new(CachePadded::new(Counters::default()));
            counters.push(Arc::clone(&worker_counters));
            let ctx = WorkerContext {
                index,
                cpu,
                counters: worker_counters,
                stop: Arc::clone(&stop),
                max_batch: config.max_batch,
                policy: Arc::clone(&policy),
                rate_limiter: config.rate_limit.map(|rate| {
                    RateLimiter::new(rate, rate.max(1), RATE_TABLE_SIZE, 0x9e37_79b9_7f4a_7c15 ^ index as u64)
                }),
                stall: if index == 0 { Arc::clone(&stall) } else { Arc::new(AtomicBool::new(false)) },
            };
            let thread = std::thread::Builder::new()
                .name(format!("tradeid-w{index}"))
                .spawn(move || worker::run(socket, handle, ctx))
                .context("cannot spawn a worker thread")?;
            threads.push(thread);
        }
        tracing::info!(
            %local_addr,
            workers,
            cpus = ?config.worker_cpus,
            max_batch = config.max_batch,
            allow = ?config.policy.allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
            trust = ?config.policy.trust.iter().map(ToString::to_string).collect::<Vec<_>>(),
            rate_limit_per_second = ?config.rate_limit,
            admin = ?config.admin,
            cpu_steering = config.cpu_steering,
            "serving"
        );
        Ok(Server { generator, counters, local_addr, config, stop, stall, workers: threads })
    }

    /// Whether any worker thread has ended (it only does on a fatal error
    /// or after `shutdown`).
    pub fn worker_died(&self) -> bool {
        self.workers.iter().any(|w| w.is_finished())
    }

    /// Stops the workers (they answer what is queued first) and waits.
    pub fn shutdown(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        let mut failed = None;
        for (i, worker) in self.workers.into_iter().enumerate() {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(anyhow::anyhow!("worker {i} stopped on a socket error: {e}")),
                Err(_) => failed = Some(anyhow::anyhow!("worker {i} panicked")),
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

fn log_state(store: &Store, config: &ServeConfig) {
    let h = store.header();
    let g = h.geometry;
    let used = store.used();
    let capacity = g.node_capacity();
    tracing::info!(
        state = ?config.state,
        width = g.width,
        shards = g.shard_count(),
        shard_size = g.shard_size(),
        node = g.node,
        nodes = g.nodes,
        sequential = h.sequential,
        used,
        remaining = capacity - used,
        block_max = config.generator.block_max,
        waste_per_restart = config.max_waste_per_restart(),
        "state opened"
    );
}

/// Runs `tradeid serve` until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::from_args(&args)?;
    if args.check_config {
        return check_config(&config);
    }
    let server = Server::start(config)?;
    crate::control::run(server)
}

fn check_config(config: &ServeConfig) -> anyhow::Result<()> {
    // Validate the state without taking its lock, so this works next to a
    // running server.
    for path in &config.state {
        match state::Snapshot::read(path) {
            Ok(snap) => {
                if let Some((node, nodes)) = config.partition {
                    snap.header.check_partition(path, node, nodes)?;
                }
            }
            Err(StateError::NotFound { .. }) if config.create => {}
            Err(e) => return Err(e.into()),
        }
    }
    println!(
        "configuration OK: {} worker(s) on {}, state {:?}, max batch {}",
        config.worker_cpus.len(),
        config.listen,
        config.state,
        config.max_batch
    );
    Ok(())
}

/// The longest a worker blocks in a receive before it looks around (stop
/// flag, heartbeat).
const WORKER_WAKE: Duration = Duration::from_millis(100);

/// Buckets per worker in the rate limiter's table (bounded memory).
const RATE_TABLE_SIZE: usize = 16_384;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2,4-6").unwrap(), vec![0, 2, 4, 5, 6]);
        assert!(parse_cpu_list("3-1").unwrap_err().0.contains("--cpus"));
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1000/s").unwrap(), 1000);
        assert_eq!(parse_rate("5").unwrap(), 5);
        assert!(parse_rate("0/s").unwrap_err().0.contains("--rate-limit"));
        assert!(parse_rate("fast").is_err());
    }
}
