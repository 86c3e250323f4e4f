//! Every flag of every command, in one place: the raw command line as clap
//! parses it. [`crate::config`] turns the `serve` flags into a validated
//! configuration; [`crate::commands`] runs the rest.
//!
//! Every flag has a `TRADEID_*` environment fallback so a systemd drop-in can
//! set it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tradeid::client::ClientConfig;
use tradeid::policy::Cidr;
use tradeid::protocol::DEFAULT_MAX_BATCH;
use tradeid::state::Geometry;
use tradeid::GeneratorConfig;

use crate::dataplane::DEFAULT_SOCKET_BUFFER;

/// Unique 7-character trade IDs, served over UDP.
#[derive(Debug, Parser)]
#[command(name = "tradeid", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a key file for a new multi-node ID space (copy it to every node).
    Keygen(KeygenArgs),
    /// Create a new state file (once per ID space; never overwrites).
    Init(InitArgs),
    /// Serve IDs over UDP.
    Serve(Box<ServeArgs>),
    /// Fetch IDs from running servers.
    Get(GetArgs),
    /// Generate IDs in-process and print them, one per line.
    Gen(GenArgs),
    /// Show a state file's geometry, usage and waste bound (works while serving).
    Inspect(InspectArgs),
    /// Decode an ID back to its counter and shard (for support).
    Decode(DecodeArgs),
    /// Check IDs' check characters (spaces made with --check-char); no state file needed.
    Check(CheckArgs),
    /// After an etcd restore: raise the cluster's marks in etcd to a stopped
    /// node's state file (serves nothing; run it for every node before any serves).
    RaiseMarks(RaiseMarksArgs),
}

/// `tradeid init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The state file to create; repeat to create mirrors on other disks.
    #[arg(long = "state", required = true, env = "TRADEID_STATE", value_delimiter = ',')]
    pub state: Vec<PathBuf>,
    /// This node's index in 0..NODES (for several machines sharing one space).
    #[arg(long, default_value_t = 0, env = "TRADEID_NODE")]
    pub node: u32,
    /// How many nodes share the ID space.
    #[arg(long, default_value_t = 1, env = "TRADEID_NODES")]
    pub nodes: u32,
    /// Hand out IDs in counter order (no permutation).
    #[arg(long, env = "TRADEID_SEQUENTIAL")]
    pub sequential: bool,
    /// The key file of a multi-node ID space (from `tradeid keygen`): every
    /// node of the space must be created from the same key file.
    #[arg(long, env = "TRADEID_KEY_FILE", conflicts_with = "sequential")]
    pub key_file: Option<PathBuf>,
    /// End every ID in a check character that catches any one mistyped
    /// character and any swap of neighbours: 6 data characters, so 2^30
    /// (about 1.07 billion) IDs instead of 2^35. A key file or an existing
    /// etcd cluster already says which; this flag must then agree.
    #[arg(long, env = "TRADEID_CHECK_CHAR")]
    pub check_char: bool,
    /// Counter width in bits (for tests: small spaces) [default: 35, 30
    /// with --check-char, or the key file's].
    #[arg(long, hide = true, env = "TRADEID_WIDTH")]
    pub width: Option<u32>,
    /// log2 of the shard size (for tests: small shards) [default: 22, or the key file's].
    #[arg(long, hide = true, env = "TRADEID_SHARD_BITS")]
    pub shard_bits: Option<u32>,
    /// Cluster mode: create the cluster in etcd unless it exists, then this
    /// node's state file bound to it.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// How to reach an etcd cluster (cluster mode). The password is never a
/// flag: it comes from `--etcd-password-file` or `TRADEID_ETCD_PASSWORD`.
#[derive(Debug, Args, Clone, Default)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. http://10.0.0.1:2379); turns
    /// on cluster mode.
    #[arg(long = "etcd", env = "TRADEID_ETCD", value_delimiter = ',', requires = "cluster")]
    pub endpoints: Vec<String>,
    /// The cluster's name: its key prefix in etcd (/tradeid/NAME/).
    #[arg(long, env = "TRADEID_CLUSTER", requires = "endpoints")]
    pub cluster: Option<String>,
    /// CA certificate (PEM) that signed etcd's server certificate; turns on TLS.
    #[arg(long, env = "TRADEID_ETCD_CA", requires = "endpoints")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "TRADEID_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "TRADEID_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name (etcd authentication); the password comes from
    /// --etcd-password-file or TRADEID_ETCD_PASSWORD.
    #[arg(long, env = "TRADEID_ETCD_USER", requires = "endpoints")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (one line).
    #[arg(long, env = "TRADEID_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

/// `tradeid keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the new key (mode 0600; never overwrites).
    #[arg(long, env = "TRADEID_KEY_FILE")]
    pub out: PathBuf,
    /// The space's IDs end in a check character (see `init --check-char`).
    #[arg(long, env = "TRADEID_CHECK_CHAR")]
    pub check_char: bool,
    /// Counter width in bits (for tests: small spaces) [default: 35, 30
    /// with --check-char].
    #[arg(long, hide = true, env = "TRADEID_WIDTH")]
    pub width: Option<u32>,
    /// log2 of the shard size (for tests: small shards).
    #[arg(long, default_value_t = Geometry::DEFAULT.shard_bits, hide = true, env = "TRADEID_SHARD_BITS")]
    pub shard_bits: u32,
}

/// `tradeid gen`.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// The state file (and mirrors).
    #[arg(long = "state", required = true, env = "TRADEID_STATE", value_delimiter = ',')]
    pub state: Vec<PathBuf>,
    /// How many IDs to print.
    #[arg(short = 'n', long = "count", default_value_t = 1, env = "TRADEID_COUNT")]
    pub count: u64,
}

/// `tradeid inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The state file; with mirrors (repeated or comma-separated, as for
    /// `serve`), each mirror is compared with the first.
    #[arg(long = "state", required_unless_present = "endpoints", env = "TRADEID_STATE", value_delimiter = ',')]
    pub state: Vec<PathBuf>,
    /// With --etcd and --cluster: the cluster-wide view instead.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// The largest block size the server uses (for the waste bound).
    #[arg(long, default_value_t = GeneratorConfig::default().block_max, env = "TRADEID_BLOCK_MAX")]
    pub block_max: u64,
}

/// `tradeid decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// The state file whose key made the ID (the first, if mirrors are
    /// listed as for `serve`).
    #[arg(long = "state", required = true, env = "TRADEID_STATE", value_delimiter = ',')]
    pub state: Vec<PathBuf>,
    /// The ID, as typed (case, hyphens, spaces, O/I/L are forgiven).
    pub id: String,
}

/// `tradeid check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The IDs, as typed (case, hyphens, spaces, O/I/L are forgiven); `-`
    /// reads them from standard input, one per line.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// `tradeid raise-marks`.
#[derive(Debug, Args)]
pub struct RaiseMarksArgs {
    /// The node's state file (and mirrors, as for `serve`). The node must be
    /// stopped: the file is locked as `serve` locks it.
    #[arg(long = "state", required = true, env = "TRADEID_STATE", value_delimiter = ',')]
    pub state: Vec<PathBuf>,
    /// The cluster (--etcd and --cluster are required).
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

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
    /// Cluster mode: serve as a node of an etcd cluster.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Cluster mode: seconds a stopped or cut-off node's shard claims
    /// outlive it (its etcd lease), 2..=300 [default: 10]. Only spreads
    /// nodes over shards; uniqueness never depends on it.
    #[arg(long, env = "TRADEID_ETCD_LEASE_TTL")]
    pub etcd_lease_ttl: Option<u64>,
    /// Admin HTTP listener for /metrics, /healthz, /readyz, /id, /ids
    /// (off by default; keep it on loopback).
    #[arg(long, env = "TRADEID_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// gRPC listener (tradeid.v1.IdService, health, reflection); off by
    /// default. Peers are checked against --allow.
    #[arg(long, env = "TRADEID_GRPC")]
    pub grpc: Option<SocketAddr>,
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
    #[arg(long, default_value_t = DEFAULT_SOCKET_BUFFER, env = "TRADEID_RECV_BUFFER")]
    pub recv_buffer: usize,
    /// SO_SNDBUF per socket, in bytes.
    #[arg(long, default_value_t = DEFAULT_SOCKET_BUFFER, env = "TRADEID_SEND_BUFFER")]
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
}

/// `tradeid get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// How many IDs to fetch.
    #[arg(short = 'n', long = "count", default_value_t = 1, env = "TRADEID_COUNT")]
    pub count: usize,
    /// A server address (HOST:PORT); repeat for failover.
    #[arg(long = "server", required = true, env = "TRADEID_SERVER", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Milliseconds to wait for each reply.
    #[arg(long, default_value_t = ClientConfig::DEFAULT_TIMEOUT.as_millis() as u64, env = "TRADEID_TIMEOUT_MS")]
    pub timeout_ms: u64,
    /// Attempts per server before failing over.
    #[arg(long, default_value_t = ClientConfig::DEFAULT_ATTEMPTS, env = "TRADEID_ATTEMPTS")]
    pub attempts: u32,
    /// The most IDs per request.
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH, env = "TRADEID_MAX_BATCH")]
    pub max_batch: u16,
}
