//! tradeid: unique, human-readable 7-character trade IDs, served over UDP.
//!
//! Data flows one way: socket → protocol → allocator → id → socket.
//!
//! - [`id`]: the ID, its Crockford base32 codec and the keyed permutation. Pure.
//! - [`keyfile`]: the key file that every node of a multi-node space shares.
//! - [`state`]: the memory-mapped state file. Holds the only mmap `unsafe`.
//! - [`alloc`]: shards, block reservation, background prefetch; the in-process generator.
//! - [`protocol`]: the wire format: decode a request, encode a reply. Pure.
//! - [`policy`]: source checks, allowlist, anti-amplification trust, rate limiting. Pure.
//! - [`net`]: socket building and batched recvmmsg/sendmmsg. Holds the only syscall `unsafe`.
//! - [`worker`]: the pinned per-core data-plane loop.
//! - [`server`]: `serve` flags, validated config, starting and stopping the data plane.
//! - [`control`]: the tokio control plane: signals, systemd notify and watchdog.
//! - [`stats`]: per-worker counters summed at scrape time; Prometheus text.
//! - [`admin`]: the admin HTTP listener (metrics, health, IDs over HTTP).
//! - [`client`]: the client library and `tradeid get`.
//! - [`cli`]: the command line and the offline commands.
//! - [`logging`]: terminal or journald log format.
#![warn(missing_docs)]

pub mod admin;
pub mod alloc;
pub mod cli;
pub mod client;
pub mod control;
pub mod id;
pub mod keyfile;
pub mod logging;
pub mod net;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod state;
pub mod stats;
pub mod worker;

pub use alloc::{GenError, Generator, GeneratorConfig, Handle};
pub use id::Id;

/// A configuration or usage mistake the operator must fix (exit code 78).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The node's ID space is used up (exit code 75 is wrong here: it is final).
#[derive(Debug, thiserror::Error)]
#[error("the ID space of this node is exhausted; no more IDs can be issued from this state file")]
pub struct Exhausted;

/// No server answered (exit code 69).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Maps an error chain to a process exit code (sysexits.h values).
///
/// | code | meaning |
/// |---|---|
/// | 1  | any other failure |
/// | 65 | EX_DATAERR: the state file is corrupt, or the space is exhausted |
/// | 66 | EX_NOINPUT: the state file does not exist |
/// | 69 | EX_UNAVAILABLE: the state file is locked by another process, or no server answered |
/// | 73 | EX_CANTCREAT: init refused (file exists, or no space) |
/// | 74 | EX_IOERR: an I/O error, including a failed flush |
/// | 78 | EX_CONFIG: invalid flags or configuration |
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use state::StateError as S;
    for cause in err.chain() {
        let state_error = match cause.downcast_ref::<keyfile::KeyFileError>() {
            Some(keyfile::KeyFileError::Create(e)) => Some(e),
            Some(keyfile::KeyFileError::NotFound { .. }) => return 66,
            Some(keyfile::KeyFileError::Read { .. }) => return 74,
            Some(keyfile::KeyFileError::Invalid { .. }) => return 65,
            None => cause.downcast_ref::<S>(),
        };
        if let Some(e) = state_error {
            return match e {
                S::NotFound { .. } => 66,
                S::Locked { .. } => 69,
                S::Exists { .. } | S::NoSpace { .. } => 73,
                S::BadHeader { .. } | S::BadShard { .. } | S::WrongSize { .. } | S::MirrorMismatch { .. } => 65,
                S::PartitionMismatch { .. } | S::UnsharedKey { .. } => 78,
                S::Flush { .. } | S::Shrunk { .. } | S::Poisoned | S::Io { .. } => 74,
            };
        }
        if cause.is::<ConfigError>() {
            return 78;
        }
        if cause.is::<Exhausted>() {
            return 65;
        }
        if cause.is::<Unreachable>() {
            return 69;
        }
    }
    1
}
