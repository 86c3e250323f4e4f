//! The state file: the only durable memory of which IDs were handed out.
//!
//! - `format`: the bytes: header, slots, checksums. Pure.
//! - `create`: durable creation that never overwrites.
//! - `lock`: the file's `flock` and the lock on its path.
//! - `store`: the open, locked, mapped file and its mirrors; the crate's
//!   only mmap `unsafe`.
//!
//! The submodules are private; what they offer is re-exported here, so
//! `tradeid::state::X` is the one name of everything.
//!
//! It never guesses: a file it cannot fully validate is refused with an
//! error naming the file and the problem, and it is never re-initialised.
//!
//! # Format (version 1, all integers little-endian)
//!
//! ```text
//! offset 0     header, 4096 bytes
//!   0   8  magic "TRADEID\0"
//!   8   4  format version (1)
//!  12   4  flags (bit 0: sequential, identity permutation;
//!           bit 1: a node of an etcd cluster)
//!  16   4  counter width in bits (2..=35)
//!  20   4  shard count
//!  24   8  shard size (IDs per shard); count × size = 2^width
//!  32   4  node index       } the node partition: this file's node serves
//!  36   4  node count       } the shards with shard % nodes == node
//!  40   8  file id (random; ties every slot checksum to this file)
//!  48  32  permutation key (4 × u64)
//!  80   8  creation time, seconds since the Unix epoch
//!  88   8  space id: SHA-256 of the key and geometry (see `Header::space_id`);
//!           0 in files made before it was recorded
//!  96   8  cluster id   } with flag bit 1 (cluster): the etcd cluster this
//! 104  64  cluster name } node belongs to; zero otherwise
//! 168 ...  zero
//! 4092  4  CRC-32 of bytes 0..4092
//! offset 4096  shard records, 64 bytes each, in shard order
//!   two 32-byte slots: seq u64 | mark u64 | hint u32 | served u64 | CRC-32
//!   (hint: the size of the last block reserved in the shard, 0 if unknown;
//!   served: how many of the shard's IDs are known to have been handed out,
//!   at most the mark; files from before these were kept hold zeros there)
//!   the CRC covers the slot's first 28 bytes and (file id, shard, slot).
//! ```
//!
//! A shard's *mark* is how many of its counters may have been handed out.
//! Updating it writes the slot with the older sequence number, then flushes
//! it. On open the newest valid slot wins; a torn newest slot means its flush
//! never returned, so no ID of its block left the process, and the older slot
//! is a safe fall-back.

use std::io;
use std::path::{Path, PathBuf};

mod create;
mod format;
mod lock;
mod store;

pub use create::{create, create_durably};
pub use format::{
    check_cluster_name, decode_shard, encode_slot, ClusterBinding, Geometry, Header, SlotState, Snapshot, SpaceId,
    CLUSTER_NAME_MAX, HEADER_LEN, SHARD_RECORD_LEN, SLOT_LEN,
};
pub use store::{Integrity, OpenReport, Store};

/// Why a state file could not be created, opened or updated.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists; `init` and `keygen` never overwrite.
    #[error("{path} already exists; refusing to overwrite it. A state file or key that has served IDs must never be replaced: choose another path")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Some files of a mirror set exist, none ever served, the others are
    /// missing: an init was killed between creating them.
    #[error("state files {} exist but {} do not, and the existing ones have never served an ID (every mark is 0): an init was interrupted while creating the set. Delete {} (safe: nothing was ever handed out from it) and run init again with every path", list(.existing), list(.missing), delete_list(.existing))]
    InterruptedInit {
        /// The files that exist.
        existing: Vec<PathBuf>,
        /// The files that do not.
        missing: Vec<PathBuf>,
    },
    /// One mirror of a set that has served is missing.
    #[error("state file {missing} does not exist, but its mirror {present} does and has served IDs. Restore the missing mirror from it while no server runs (`cp {present} {missing}`; a copy that is behind is repaired from the newest marks at start), or remove {missing} from --state")]
    MirrorMissing {
        /// The missing mirror.
        missing: PathBuf,
        /// A mirror that exists.
        present: PathBuf,
    },
    /// The file is missing at open.
    #[error("state file {path} does not exist. Create it once with `tradeid init --state {path}`; if it existed before, restore it (with its mirrors) instead, because a new file would hand out old IDs again")]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds the lock.
    #[error("state file {path} is locked by another process; only one tradeid may use a state file at a time. Stop the other process first (check `systemctl status tradeid` or `fuser {path}`)")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The header is not valid.
    #[error("state file {path} is unusable: {reason}. Refusing to guess; restore the file or its mirror from a copy that was in use, never re-initialise it")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A shard's record cannot be trusted.
    #[error("state file {path}: shard {shard} is corrupt: {reason}. Refusing to guess its mark; restore the file or its mirror")]
    BadShard {
        /// The file.
        path: PathBuf,
        /// The shard index.
        shard: u32,
        /// What is wrong.
        reason: String,
    },
    /// The file's length does not match its geometry.
    #[error("state file {path} is {found} bytes but its header needs {expected}; it was truncated or extended. Restore it from its mirror or a copy that was in use")]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// The size the geometry implies.
        expected: u64,
        /// The size on disk.
        found: u64,
    },
    /// Mirrors that are not copies of one state.
    #[error("state files {first} and {other} are not mirrors of each other ({what}); pass only copies made by one `tradeid init`")]
    MirrorMismatch {
        /// The first file.
        first: PathBuf,
        /// The disagreeing file.
        other: PathBuf,
        /// What differs.
        what: &'static str,
    },
    /// The disk is full while creating.
    #[error("no space left on the device while creating {path} (it needs {needed} bytes); nothing was created. Free some space and run the command again")]
    NoSpace {
        /// The file.
        path: PathBuf,
        /// The file's size.
        needed: u64,
    },
    /// A flush failed: the block must never be used. Fatal.
    #[error("flushing state file {path} failed: {source}. The block being reserved is abandoned and this process must stop; check the disk, then restart")]
    Flush {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file changed size while mapped. Fatal.
    #[error("state file {path} shrank to {found} bytes while in use (something truncated it); stopping before any ID relies on it. Restore it from its mirror or a copy")]
    Shrunk {
        /// The file.
        path: PathBuf,
        /// Its size now.
        found: u64,
    },
    /// Serving was asked for another partition than the file records.
    #[error("state file {path} belongs to node {file_node} of {file_nodes}, but node {node} of {nodes} was requested; serving another node's shards would duplicate its IDs. Use the file initialised for this node")]
    PartitionMismatch {
        /// The file.
        path: PathBuf,
        /// The node recorded in the file.
        file_node: u32,
        /// The node count recorded in the file.
        file_nodes: u32,
        /// The node requested.
        node: u32,
        /// The node count requested.
        nodes: u32,
    },
    /// A multi-node file from before shared keys: its IDs collide with the
    /// other nodes'.
    #[error("state file {path} is one node of {nodes} but was created with its own permutation key (by a tradeid before key files), so its IDs collide with the other nodes' IDs. Refusing to serve it. Create a new ID space whose nodes share one key: `tradeid keygen --out space.key`, then `tradeid init --state NEW --node I --nodes {nodes} --key-file space.key` on every node")]
    UnsharedKey {
        /// The file.
        path: PathBuf,
        /// How many nodes its header records.
        nodes: u32,
    },
    /// A cluster node's file, opened without its cluster.
    #[error("state file {path} belongs to etcd cluster {cluster:?}: its marks are only a local floor, and serving or generating from it without etcd would hand out IDs other nodes hold. Use `tradeid serve --state {path} --etcd URLS --cluster {cluster}`")]
    ClusterBound {
        /// The file.
        path: PathBuf,
        /// The cluster's name.
        cluster: String,
    },
    /// The file at a state path is no longer the one this process opened.
    #[error("state file {path} {what} while this process was using it. {}", if *.restored { "This process's marks (raised only) were written to a new file at that path and flushed; no further block is reserved, and this process stops so that a restart opens the restored file" } else { "It could not be restored safely (see the log); no further block is reserved. Put back the file this process opened, or restore the path from a copy that was in use together with its mirrors, before restarting: a file with old marks would hand out IDs again" })]
    Displaced {
        /// The path.
        path: PathBuf,
        /// What happened to it.
        what: &'static str,
        /// Whether this process's marks were written to the path.
        restored: bool,
    },
    /// A previous flush failed, so nothing more is written.
    #[error("the state file can no longer be trusted in this process (an earlier flush failed, or the file was tampered with); no more blocks are reserved")]
    Poisoned,
    /// Any other I/O error.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn delete_list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ")
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io { what, path: path.to_owned(), source }
}

impl Snapshot {
    /// Reads and validates `path` without locking or mapping it.
    pub fn read(path: &Path) -> Result<Snapshot, StateError> {
        let contents = match std::fs::read(path) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound { path: path.to_owned() })
            }
            Err(e) => return Err(io_err("cannot read state file", path)(e)),
        };
        Snapshot::decode(path, &contents)
    }
}
