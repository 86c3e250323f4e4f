//! The state file: the only durable memory of which IDs were handed out.
//!
//! It owns the on-disk format, its creation, locking, validation, mirroring
//! and the memory map. It holds the crate's only mmap `unsafe`. It never
//! guesses: a file it cannot fully validate is refused with an error naming
//! the file and the problem, and it is never re-initialised.
//!
//! # Format (version 1, all integers little-endian)
//!
//! ```text
//! offset 0     header, 4096 bytes
//!   0   8  magic "TRADEID\0"
//!   8   4  format version (1)
//!  12   4  flags (bit 0: sequential, identity permutation)
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
//!  96 ...  zero
//! 4092  4  CRC-32 of bytes 0..4092
//! offset 4096  shard records, 64 bytes each, in shard order
//!   two 32-byte slots: seq u64 | mark u64 | 12 zero bytes | CRC-32
//!   the CRC covers the slot's first 28 bytes and (file id, shard, slot).
//! ```
//!
//! A shard's *mark* is how many of its counters may have been handed out.
//! Updating it writes the slot with the older sequence number, then flushes
//! it. On open the newest valid slot wins; a torn newest slot means its flush
//! never returned, so no ID of its block left the process, and the older slot
//! is a safe fall-back.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use memmap2::MmapRaw;

use crate::id::{Key, Permutation, MAX_WIDTH, MIN_WIDTH, ROUNDS};

/// How the counter space is cut into shards, and which shards are ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Counter width in bits; the space holds 2^width IDs.
    pub width: u32,
    /// log2 of the shard size.
    pub shard_bits: u32,
    /// This node's index in the partition.
    pub node: u32,
    /// Number of nodes the shards are dealt out to.
    pub nodes: u32,
}

impl Geometry {
    /// The production geometry: 2^35 IDs in 8192 shards of 4,194,304.
    pub const DEFAULT: Geometry = Geometry { width: MAX_WIDTH, shard_bits: 22, node: 0, nodes: 1 };

    /// Number of shards in the whole space (all nodes).
    pub fn shard_count(&self) -> u32 {
        1 << (self.width - self.shard_bits)
    }

    /// IDs per shard.
    pub fn shard_size(&self) -> u64 {
        1 << self.shard_bits
    }

    /// Whether `shard` belongs to this node.
    pub fn owns(&self, shard: u32) -> bool {
        shard % self.nodes == self.node
    }

    /// The shards this node serves from, in order.
    pub fn node_shards(self) -> impl Iterator<Item = u32> {
        (self.node..self.shard_count()).step_by(self.nodes as usize)
    }

    /// How many IDs this node can ever hand out.
    pub fn node_capacity(&self) -> u64 {
        self.node_shards().count() as u64 * self.shard_size()
    }

    /// Checks the geometry is one this format can hold.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_WIDTH..=MAX_WIDTH).contains(&self.width) {
            return Err(format!("counter width {} is outside {MIN_WIDTH}..={MAX_WIDTH}", self.width));
        }
        if self.shard_bits > self.width {
            return Err(format!("shard size 2^{} exceeds the space 2^{}", self.shard_bits, self.width));
        }
        if self.width - self.shard_bits > MAX_SHARD_COUNT_BITS {
            return Err(format!(
                "2^{} shards is more than the 2^{MAX_SHARD_COUNT_BITS} this format allows",
                self.width - self.shard_bits
            ));
        }
        if self.nodes == 0 || self.node >= self.nodes {
            return Err(format!("node {} is not in 0..{}", self.node, self.nodes));
        }
        if self.nodes > self.shard_count() {
            return Err(format!("{} nodes but only {} shards", self.nodes, self.shard_count()));
        }
        Ok(())
    }

    fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.shard_count()) * SHARD_RECORD_LEN as u64
    }
}

/// Everything the header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Shards and partition.
    pub geometry: Geometry,
    /// Identity permutation: IDs follow the counter.
    pub sequential: bool,
    /// The permutation key (unused when `sequential`).
    pub key: Key,
    /// Random identity of this file (and its mirrors).
    pub file_id: u64,
    /// When `init` ran, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// Whether the header records its space id (files made before it was
    /// recorded have zeros there; their id is derived from the key).
    pub records_space_id: bool,
}

impl Header {
    /// A fresh header with a random key and file id: a space of its own.
    pub fn new(geometry: Geometry, sequential: bool) -> io::Result<Header> {
        Header::with_key(geometry, sequential, Key::random()?)
    }

    /// A fresh header (random file id) for node `geometry.node` of the
    /// space that `key` defines. Every node of one multi-node space must be
    /// created with the same key, or their IDs collide.
    pub fn with_key(geometry: Geometry, sequential: bool, key: Key) -> io::Result<Header> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(io::Error::other)?;
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Header { geometry, sequential, key, file_id: u64::from_le_bytes(id), created_unix, records_space_id: true })
    }

    /// The identity of the ID space this file is a node of: files whose IDs
    /// can never collide with each other's share it (same key, same
    /// geometry, disjoint partitions). Derived from the key, so two nodes
    /// initialised from one key file show the same id.
    pub fn space_id(&self) -> SpaceId {
        SpaceId::derive(&self.key, self.geometry.width, self.geometry.shard_bits, self.sequential)
    }

    /// Whether this file may serve: a keyed partition of several nodes is
    /// only safe if every node shares one key, which only files created
    /// from a key file (`init --key-file`) guarantee. Older multi-node files
    /// each drew their own key, so their IDs collide with the other nodes'.
    pub fn check_servable(&self, path: &Path) -> Result<(), StateError> {
        if self.geometry.nodes > 1 && !self.sequential && !self.records_space_id {
            return Err(StateError::UnsharedKey { path: path.to_owned(), nodes: self.geometry.nodes });
        }
        Ok(())
    }

    /// The counter → ID permutation this file prescribes.
    pub fn permutation(&self) -> Permutation {
        if self.sequential {
            Permutation::identity(self.geometry.width)
        } else {
            Permutation::keyed(self.geometry.width, self.key)
        }
    }

    /// Refuses a request to serve node `node` of `nodes` from the file at
    /// `path` (named in the error) if the header records another partition.
    pub fn check_partition(&self, path: &Path, node: u32, nodes: u32) -> Result<(), StateError> {
        let g = self.geometry;
        if (g.node, g.nodes) == (node, nodes) {
            return Ok(());
        }
        Err(StateError::PartitionMismatch {
            path: path.to_owned(),
            file_node: g.node,
            file_nodes: g.nodes,
            node,
            nodes,
        })
    }

    /// Serialises the header page, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let g = &self.geometry;
        let mut page = [0u8; HEADER_LEN];
        page[0..8].copy_from_slice(MAGIC);
        put_u32(&mut page, 8, FORMAT_VERSION);
        put_u32(&mut page, 12, u32::from(self.sequential));
        put_u32(&mut page, 16, g.width);
        put_u32(&mut page, 20, g.shard_count());
        put_u64(&mut page, 24, g.shard_size());
        put_u32(&mut page, 32, g.node);
        put_u32(&mut page, 36, g.nodes);
        put_u64(&mut page, 40, self.file_id);
        for (i, k) in self.key.0.iter().enumerate() {
            put_u64(&mut page, 48 + 8 * i, *k);
        }
        put_u64(&mut page, 80, self.created_unix);
        if self.records_space_id {
            put_u64(&mut page, 88, self.space_id().0);
        }
        let crc = crc32fast::hash(&page[..HEADER_CRC_AT]);
        put_u32(&mut page, HEADER_CRC_AT, crc);
        page
    }

    /// Parses and checks a header page. Pure; the error says what is wrong.
    pub fn decode(page: &[u8]) -> Result<Header, String> {
        if page.len() < HEADER_LEN {
            return Err(format!("the file is {} bytes, shorter than its {HEADER_LEN}-byte header", page.len()));
        }
        if &page[0..8] != MAGIC {
            return Err("it does not start with the tradeid magic; it is not a tradeid state file".into());
        }
        let stored = get_u32(page, HEADER_CRC_AT);
        let actual = crc32fast::hash(&page[..HEADER_CRC_AT]);
        if stored != actual {
            return Err(format!(
                "the header checksum is wrong (stored {stored:08x}, computed {actual:08x}); the header is corrupt"
            ));
        }
        let version = get_u32(page, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version} is not supported (this build reads version {FORMAT_VERSION})"
            ));
        }
        let flags = get_u32(page, 12);
        if flags & !1 != 0 {
            return Err(format!("unknown header flags {flags:#x}; written by a newer tradeid?"));
        }
        let width = get_u32(page, 16);
        let shard_count = get_u32(page, 20);
        let shard_size = get_u64(page, 24);
        if !shard_count.is_power_of_two() || !shard_size.is_power_of_two() {
            return Err(format!("shard count {shard_count} and size {shard_size} must be powers of two"));
        }
        let geometry = Geometry {
            width,
            shard_bits: shard_size.trailing_zeros(),
            node: get_u32(page, 32),
            nodes: get_u32(page, 36),
        };
        geometry.validate()?;
        if geometry.shard_count() != shard_count {
            return Err(format!("{shard_count} shards of {shard_size} do not make 2^{width} IDs"));
        }
        let mut key = [0u64; ROUNDS];
        for (i, k) in key.iter_mut().enumerate() {
            *k = get_u64(page, 48 + 8 * i);
        }
        let stored_space = get_u64(page, 88);
        let header = Header {
            geometry,
            sequential: flags & 1 == 1,
            key: Key(key),
            file_id: get_u64(page, 40),
            created_unix: get_u64(page, 80),
            records_space_id: stored_space != 0,
        };
        if header.records_space_id && stored_space != header.space_id().0 {
            return Err(format!(
                "its recorded space id {} does not match its key ({}); the header was altered",
                SpaceId(stored_space),
                header.space_id()
            ));
        }
        Ok(header)
    }
}

/// The identity of an ID space: the first 8 bytes of SHA-256 over the
/// permutation key and the geometry that decide which ID each counter maps
/// to. Printed as 16 hex digits in groups of four.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpaceId(pub u64);

impl SpaceId {
    /// The id of the space defined by `key` over `width` bits cut into
    /// shards of 2^`shard_bits` (`sequential`: the key is not used).
    pub fn derive(key: &Key, width: u32, shard_bits: u32, sequential: bool) -> SpaceId {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"tradeid space v1\0");
        h.update(width.to_le_bytes());
        h.update(shard_bits.to_le_bytes());
        h.update([u8::from(sequential)]);
        if !sequential {
            for k in key.0 {
                h.update(k.to_le_bytes());
            }
        }
        let digest = h.finalize();
        let id = u64::from_le_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"));
        // 0 means "not recorded" in the header; never derive it.
        SpaceId(id.max(1))
    }
}

impl std::fmt::Display for SpaceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = format!("{:016x}", self.0);
        write!(f, "{}-{}-{}-{}", &h[0..4], &h[4..8], &h[8..12], &h[12..16])
    }
}

impl std::fmt::Debug for SpaceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpaceId({self})")
    }
}

/// The newest valid slot of one shard in one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotState {
    /// Sequence number of the newest valid slot.
    pub seq: u64,
    /// Which slot (0 or 1) holds it.
    pub slot: u8,
    /// The mark it records.
    pub mark: u64,
    /// Whether the other slot was invalid (a torn or corrupt write).
    pub other_invalid: bool,
}

/// Reads one shard's two slots and picks the newest valid one. Pure.
pub fn decode_shard(record: &[u8], file_id: u64, shard: u32, shard_size: u64) -> Result<SlotState, String> {
    let read = |slot: u8| -> Option<(u64, u64)> {
        let bytes = &record[usize::from(slot) * SLOT_LEN..][..SLOT_LEN];
        let (seq, mark) = (get_u64(bytes, 0), get_u64(bytes, 8));
        let valid = get_u32(bytes, SLOT_CRC_AT) == slot_crc(bytes, file_id, shard, slot) && mark <= shard_size;
        valid.then_some((seq, mark))
    };
    match (read(0), read(1)) {
        (None, None) => Err("neither of its two slots is valid".into()),
        (Some((seq, mark)), None) => Ok(SlotState { seq, slot: 0, mark, other_invalid: true }),
        (None, Some((seq, mark))) => Ok(SlotState { seq, slot: 1, mark, other_invalid: true }),
        (Some(a), Some(b)) if a.0 == b.0 => Err(format!("both slots claim sequence number {}", a.0)),
        (Some(a), Some(b)) => {
            let (newest, older, slot) = if a.0 > b.0 { (a, b, 0) } else { (b, a, 1) };
            if newest.1 < older.1 {
                return Err(format!(
                    "its newest slot (seq {}) records mark {} below the older slot's {}; marks never go back",
                    newest.0, newest.1, older.1
                ));
            }
            Ok(SlotState { seq: newest.0, slot, mark: newest.1, other_invalid: false })
        }
    }
}

/// Serialises one slot.
pub fn encode_slot(seq: u64, mark: u64, file_id: u64, shard: u32, slot: u8) -> [u8; SLOT_LEN] {
    let mut bytes = [0u8; SLOT_LEN];
    put_u64(&mut bytes, 0, seq);
    put_u64(&mut bytes, 8, mark);
    let crc = slot_crc(&bytes, file_id, shard, slot);
    put_u32(&mut bytes, SLOT_CRC_AT, crc);
    bytes
}

/// Why a state file could not be created, opened or updated.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists; `init` and `keygen` never overwrite.
    #[error("{path} already exists; refusing to overwrite it. A state file or key that has served IDs must never be replaced: choose another path")]
    Exists {
        /// The file.
        path: PathBuf,
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
    /// A previous flush failed, so nothing more is written.
    #[error("an earlier flush of the state failed; no more blocks are reserved in this process")]
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

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io { what, path: path.to_owned(), source }
}

/// Creates the state file at each path (mirrors share one header).
///
/// Each copy is written to a temporary file in the same directory, fully
/// allocated and fsynced, then linked into place (which fails if the name
/// exists), and the directory is fsynced. If any copy fails, the copies
/// already created are removed again: they never served an ID.
pub fn create(paths: &[PathBuf], header: &Header) -> Result<(), StateError> {
    for path in paths {
        if path.exists() {
            return Err(StateError::Exists { path: path.clone() });
        }
    }
    let mut created: Vec<&PathBuf> = Vec::new();
    for path in paths {
        if let Err(e) = create_one(path, header) {
            for done in created {
                let _ = std::fs::remove_file(done);
            }
            return Err(e);
        }
        created.push(path);
    }
    Ok(())
}

fn create_one(path: &Path, header: &Header) -> Result<(), StateError> {
    let g = &header.geometry;
    let mut contents = Vec::with_capacity(g.file_len() as usize);
    contents.extend_from_slice(&header.encode());
    for shard in 0..g.shard_count() {
        // Both slots valid with mark 0: slot 0 is the newest.
        contents.extend_from_slice(&encode_slot(1, 0, header.file_id, shard, 0));
        contents.extend_from_slice(&encode_slot(0, 0, header.file_id, shard, 1));
    }
    create_durably(path, &contents, 0o600)
}

/// Creates `path` with exactly `contents`, durably and only if it does not
/// exist: the bytes go to a temporary file in the same directory (mode
/// `mode`), which is fsynced and then hard-linked into place (linking fails
/// if the name exists, so nothing is ever overwritten); the directory is
/// fsynced last. Errors name `path`, never the temporary file.
pub fn create_durably(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| StateError::Io {
        what: "the path has no file name:",
        path: path.to_owned(),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let needed = contents.len() as u64;
    let failed = |e: io::Error| match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StateError::NoSpace { path: path.to_owned(), needed },
        _ => StateError::Io { what: "cannot create", path: path.to_owned(), source: e },
    };
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .map_err(failed)
        .and_then(|()| {
            std::fs::hard_link(&tmp, path).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => StateError::Exists { path: path.to_owned() },
                _ => StateError::Io { what: "cannot link into place", path: path.to_owned(), source: e },
            })
        });
    let _ = std::fs::remove_file(&tmp);
    written?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", &dir))
}

/// What [`Store::open`] found worth telling the operator.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Shards whose newest slot was invalid, so the older one was used, per file.
    pub fell_back: Vec<(PathBuf, u32)>,
    /// Mirrors that were behind, with how many shards were repaired in each.
    pub repaired: Vec<(PathBuf, u32)>,
}

/// An open, locked, validated state (one file plus optional mirrors).
pub struct Store {
    header: Header,
    mirrors: Vec<Mirror>,
    /// Per shard: its on-disk slot positions. The lock is what makes slot
    /// writes exclusive (see `Store::persist`).
    shards: Box<[Mutex<ShardDisk>]>,
    /// Per shard: the persisted mark, readable without a lock.
    marks: Box<[AtomicU64]>,
    poisoned: AtomicBool,
    /// Test hook: flushes after this many fail with EIO (`u64::MAX`: never).
    fail_flushes_after: AtomicU64,
    flushes: AtomicU64,
}

struct Mirror {
    path: PathBuf,
    /// Held for the flock, which lasts as long as the file is open.
    file: File,
    map: MmapRaw,
}

struct ShardDisk {
    /// Per mirror: (sequence number, slot index) of the newest slot.
    newest: Vec<(u64, u8)>,
}

impl Store {
    /// Opens, locks and validates the state file and its mirrors.
    ///
    /// Per shard, the largest mark among the mirrors wins; mirrors that are
    /// behind (restored from an old copy) are repaired before this returns.
    pub fn open(paths: &[PathBuf]) -> Result<(Store, OpenReport), StateError> {
        assert!(!paths.is_empty(), "at least one state file");
        let mut report = OpenReport::default();
        let mut loaded: Vec<(Mirror, Header, Vec<SlotState>)> = Vec::new();
        for path in paths {
            let (mirror, header, slots) = open_one(path, &mut report)?;
            if let Some((first, first_header, _)) = loaded.first() {
                if header.file_id != first_header.file_id {
                    return Err(StateError::MirrorMismatch {
                        first: first.path.clone(),
                        other: path.clone(),
                        what: "different file ids",
                    });
                }
                if header != *first_header {
                    return Err(StateError::MirrorMismatch {
                        first: first.path.clone(),
                        other: path.clone(),
                        what: "same file id but different headers",
                    });
                }
            }
            loaded.push((mirror, header, slots));
        }
        let header = loaded[0].1;
        header.check_servable(&loaded[0].0.path)?;
        let shard_count = header.geometry.shard_count() as usize;
        // Per shard, the largest mark in any mirror wins: a larger mark is
        // always safe (it only skips IDs), a smaller one may repeat IDs.
        let best: Vec<u64> =
            (0..shard_count).map(|s| loaded.iter().map(|(_, _, slots)| slots[s].mark).max().unwrap_or(0)).collect();
        let mut behind = vec![0u32; loaded.len()];
        let mut lagging_shards = Vec::new();
        for (s, &mark) in best.iter().enumerate() {
            let mut lagging = false;
            for (m, (_, _, slots)) in loaded.iter().enumerate() {
                if slots[s].mark < mark {
                    behind[m] += 1;
                    lagging = true;
                }
            }
            if lagging {
                lagging_shards.push(s as u32);
            }
        }

        let mut mirrors = Vec::new();
        let mut newest: Vec<Vec<(u64, u8)>> = vec![Vec::new(); shard_count];
        for (mirror, _, slots) in loaded {
            for (s, slot) in slots.iter().enumerate() {
                newest[s].push((slot.seq, slot.slot));
            }
            mirrors.push(mirror);
        }
        let store = Store {
            header,
            mirrors,
            shards: newest.into_iter().map(|n| Mutex::new(ShardDisk { newest: n })).collect(),
            marks: best.iter().map(|&m| AtomicU64::new(m)).collect(),
            poisoned: AtomicBool::new(false),
            fail_flushes_after: AtomicU64::new(u64::MAX),
            flushes: AtomicU64::new(0),
        };
        // Repair before anything is served: rewriting the best mark into every
        // mirror is harmless for those already there.
        for shard in lagging_shards {
            let mut disk = store.shards[shard as usize].lock().unwrap_or_else(|p| p.into_inner());
            store.write_and_flush(&mut disk, shard, best[shard as usize])?;
        }
        for (m, count) in behind.into_iter().enumerate() {
            if count > 0 {
                report.repaired.push((store.mirrors[m].path.clone(), count));
            }
        }
        Ok((store, report))
    }

    /// Test hook: after `n` more successful flushes, every flush fails with
    /// EIO, exactly where a failing `msync` would (after the slot bytes were
    /// written). Lets tests prove that a failed flush never lets an ID of
    /// its block out, without strace.
    pub fn fail_flushes_after(&self, n: u64) {
        self.flushes.store(0, Ordering::SeqCst);
        self.fail_flushes_after.store(n, Ordering::SeqCst);
    }

    /// Refuses to go on if the caller expects another node partition.
    pub fn check_partition(&self, node: u32, nodes: u32) -> Result<(), StateError> {
        self.header.check_partition(&self.mirrors[0].path, node, nodes)
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The persisted mark of `shard`.
    pub fn mark(&self, shard: u32) -> u64 {
        self.marks[shard as usize].load(Ordering::Acquire)
    }

    /// IDs of this node's shards that may have been handed out.
    pub fn used(&self) -> u64 {
        self.header.geometry.node_shards().map(|s| self.mark(s)).sum()
    }

    /// Durably raises the mark of `shard` to `mark` in every mirror.
    ///
    /// Returns only after every copy is flushed, so the caller may hand out
    /// counters below `mark` once this returns `Ok`. Any failure poisons the
    /// store: a flush is never retried (its outcome on disk is unknown).
    pub fn persist(&self, shard: u32, mark: u64) -> Result<Duration, StateError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StateError::Poisoned);
        }
        let result = self.persist_inner(shard, mark);
        if result.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        result
    }

    fn persist_inner(&self, shard: u32, mark: u64) -> Result<Duration, StateError> {
        let g = &self.header.geometry;
        assert!(g.owns(shard) && mark <= g.shard_size(), "mark {mark} for shard {shard}");
        let started = Instant::now();
        let mut disk = self.shards[shard as usize].lock().unwrap_or_else(|p| p.into_inner());
        assert!(mark >= self.mark(shard), "marks never go back");
        self.write_and_flush(&mut disk, shard, mark)?;
        for mirror in &self.mirrors {
            // A truncated file may still flush without error (the page is
            // simply gone), so check the size before trusting the flush.
            let len = mirror.file.metadata().map_err(io_err("cannot stat state file", &mirror.path))?.len();
            if len < g.file_len() {
                return Err(StateError::Shrunk { path: mirror.path.clone(), found: len });
            }
        }
        self.marks[shard as usize].store(mark, Ordering::Release);
        Ok(started.elapsed())
    }

    /// Writes `mark` into the older slot of `shard` in every mirror, then
    /// flushes each. The caller holds the shard's lock (`disk`).
    fn write_and_flush(&self, disk: &mut ShardDisk, shard: u32, mark: u64) -> Result<(), StateError> {
        let offsets: Vec<usize> = self
            .mirrors
            .iter()
            .zip(&disk.newest)
            .map(|(mirror, &(seq, newest_slot))| {
                let slot = 1 - newest_slot;
                let offset = slot_offset(shard, slot);
                let bytes = encode_slot(seq + 1, mark, self.header.file_id, shard, slot);
                // SAFETY: `offset + SLOT_LEN <= map.len()`: the map length was
                // checked against the geometry at open and `shard` is in
                // range. No other thread writes these bytes: slot writes for
                // a shard happen only here, and the caller holds that shard's
                // lock. Other threads only flush (the kernel reads the page),
                // which is not a Rust data race. If the file was truncated
                // behind our back, the write raises SIGBUS and the process
                // dies before any ID relies on it, which is the safe outcome.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), mirror.map.as_mut_ptr().add(offset), SLOT_LEN);
                }
                offset
            })
            .collect();
        for (mirror, offset) in self.mirrors.iter().zip(offsets) {
            let injected =
                self.flushes.fetch_add(1, Ordering::SeqCst) >= self.fail_flushes_after.load(Ordering::SeqCst);
            let result = if injected {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                mirror.map.flush_range(offset, SLOT_LEN)
            };
            result.map_err(|source| StateError::Flush { path: mirror.path.clone(), source })?;
        }
        for (seq, slot) in disk.newest.iter_mut() {
            *seq += 1;
            *slot = 1 - *slot;
        }
        Ok(())
    }
}

fn open_one(path: &Path, report: &mut OpenReport) -> Result<(Mirror, Header, Vec<SlotState>), StateError> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StateError::NotFound { path: path.to_owned() }),
        Err(e) => return Err(io_err("cannot open state file", path)(e)),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(StateError::Locked { path: path.to_owned() }),
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err("cannot lock state file", path)(e)),
    }
    let contents = std::fs::read(path).map_err(io_err("cannot read state file", path))?;
    let (header, slots) = decode_file(path, &contents)?;
    for (shard, state) in slots.iter().enumerate() {
        if state.other_invalid {
            report.fell_back.push((path.to_owned(), shard as u32));
        }
    }
    let g = header.geometry;
    let map = MmapRaw::map_raw(&file).map_err(io_err("cannot memory-map state file", path))?;
    if (map.len() as u64) < g.file_len() {
        return Err(StateError::Shrunk { path: path.to_owned(), found: map.len() as u64 });
    }
    Ok((Mirror { path: path.to_owned(), file, map }, header, slots))
}

/// A read-only view of a state file, taken without the lock (so it works
/// while a server runs). For `inspect` and `decode`; never for serving.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated header.
    pub header: Header,
    /// The newest valid mark of every shard.
    pub marks: Vec<u64>,
    /// Shards whose newest slot was invalid.
    pub fell_back: Vec<u32>,
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

    /// Validates a state file's bytes (`path` only names it in errors).
    /// Pure: the same checks as opening for service.
    pub fn decode(path: &Path, contents: &[u8]) -> Result<Snapshot, StateError> {
        let (header, slots) = decode_file(path, contents)?;
        Ok(Snapshot {
            header,
            marks: slots.iter().map(|s| s.mark).collect(),
            fell_back: (0..slots.len() as u32).filter(|&s| slots[s as usize].other_invalid).collect(),
        })
    }

    /// IDs of this node's shards that may have been handed out.
    pub fn used(&self) -> u64 {
        self.header.geometry.node_shards().map(|s| self.marks[s as usize]).sum()
    }
}

/// Validates a whole file's bytes: header, length, and every shard.
fn decode_file(path: &Path, contents: &[u8]) -> Result<(Header, Vec<SlotState>), StateError> {
    let header = Header::decode(contents).map_err(|reason| StateError::BadHeader { path: path.to_owned(), reason })?;
    let g = header.geometry;
    if contents.len() as u64 != g.file_len() {
        return Err(StateError::WrongSize {
            path: path.to_owned(),
            expected: g.file_len(),
            found: contents.len() as u64,
        });
    }
    let slots = (0..g.shard_count())
        .map(|shard| {
            let record = &contents[slot_offset(shard, 0)..][..SHARD_RECORD_LEN];
            decode_shard(record, header.file_id, shard, g.shard_size()).map_err(|reason| StateError::BadShard {
                path: path.to_owned(),
                shard,
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((header, slots))
}

fn slot_offset(shard: u32, slot: u8) -> usize {
    HEADER_LEN + shard as usize * SHARD_RECORD_LEN + usize::from(slot) * SLOT_LEN
}

fn slot_crc(bytes: &[u8], file_id: u64, shard: u32, slot: u8) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..SLOT_CRC_AT]);
    h.update(&file_id.to_le_bytes());
    h.update(&shard.to_le_bytes());
    h.update(&[slot]);
    h.finalize()
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Size of the header page.
pub const HEADER_LEN: usize = 4096;
const HEADER_CRC_AT: usize = HEADER_LEN - 4;
const MAGIC: &[u8; 8] = b"TRADEID\0";
const FORMAT_VERSION: u32 = 1;
/// Size of one slot.
pub const SLOT_LEN: usize = 32;
const SLOT_CRC_AT: usize = SLOT_LEN - 4;
/// Size of one shard's record (two slots).
pub const SHARD_RECORD_LEN: usize = 2 * SLOT_LEN;
/// At most 2^20 shards (a 64 MiB file).
const MAX_SHARD_COUNT_BITS: u32 = 20;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOLDEN_HEADER_CRC: u32 = 558_161_692;
    const GOLDEN_SPACE_ID: u64 = 12_584_339_381_748_310_865;
    #[rustfmt::skip]
    const GOLDEN_SLOT: [u8; SLOT_LEN] = [
        7, 0, 0, 0, 0, 0, 0, 0, // seq 7
        232, 3, 0, 0, 0, 0, 0, 0, // mark 1000
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // reserved
        228, 202, 232, 224, // CRC-32
    ];

    fn small(width: u32, shard_bits: u32) -> Geometry {
        Geometry { width, shard_bits, node: 0, nodes: 1 }
    }

    fn init(dir: &Path, name: &str, g: Geometry) -> PathBuf {
        let path = dir.join(name);
        create(std::slice::from_ref(&path), &Header::new(g, false).unwrap()).unwrap();
        path
    }

    fn flip(path: &Path, offset: usize) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[offset] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    }

    /// The on-disk format is a promise to every existing state file: these
    /// checksums pin the exact bytes of a header and a slot.
    #[test]
    fn format_golden_bytes_never_change() {
        let header = Header {
            geometry: Geometry { width: 35, shard_bits: 22, node: 1, nodes: 3 },
            sequential: false,
            key: Key([1, 2, 3, 4]),
            file_id: 0x0123_4567_89ab_cdef,
            created_unix: 1_700_000_000,
            records_space_id: false,
        };
        // A header from before the space id was recorded: still read as it was.
        let page = header.encode();
        assert_eq!(&page[..8], b"TRADEID\0");
        assert_eq!(crc32fast::hash(&page), GOLDEN_HEADER_CRC);
        assert_eq!(Header::decode(&page).unwrap(), header);
        assert_eq!(encode_slot(7, 1000, header.file_id, 42, 1), GOLDEN_SLOT);
        // Today's header records the space id at offset 88.
        let current = Header { records_space_id: true, ..header };
        let page = current.encode();
        assert_eq!(get_u64(&page, 88), GOLDEN_SPACE_ID);
        assert_eq!(current.space_id().to_string(), "aea4-8dfe-3611-2351");
        assert_eq!(Header::decode(&page).unwrap(), current);
    }

    #[test]
    fn a_tampered_space_id_is_refused() {
        let mut page = Header::new(small(12, 4), false).unwrap().encode();
        put_u64(&mut page, 88, 12345);
        let crc = crc32fast::hash(&page[..HEADER_CRC_AT]);
        put_u32(&mut page, HEADER_CRC_AT, crc);
        assert!(Header::decode(&page).unwrap_err().contains("does not match its key"));
    }

    #[test]
    fn the_space_id_depends_on_key_and_geometry_only() {
        let key = Key([9, 8, 7, 6]);
        let a = Header::with_key(Geometry { node: 0, nodes: 3, ..small(20, 8) }, false, key).unwrap();
        let b = Header::with_key(Geometry { node: 2, nodes: 3, ..small(20, 8) }, false, key).unwrap();
        assert_ne!(a.file_id, b.file_id);
        assert_eq!(a.space_id(), b.space_id(), "two nodes of one key share the space");
        assert_ne!(a.space_id(), Header::with_key(small(20, 9), false, key).unwrap().space_id());
        assert_ne!(a.space_id(), Header::with_key(small(20, 8), false, Key([9, 8, 7, 5])).unwrap().space_id());
    }

    #[test]
    fn a_multi_node_file_with_its_own_key_is_refused_for_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("legacy");
        let legacy = Header {
            records_space_id: false,
            ..Header::new(Geometry { node: 1, nodes: 2, ..small(12, 4) }, false).unwrap()
        };
        create(std::slice::from_ref(&path), &legacy).unwrap();
        let err = Store::open(std::slice::from_ref(&path)).err().unwrap();
        assert!(matches!(err, StateError::UnsharedKey { nodes: 2, .. }), "{err}");
        assert!(err.to_string().contains("tradeid keygen"), "{err}");
        // Still readable for inspect and decode.
        assert!(Snapshot::read(&path).is_ok());
    }

    #[test]
    fn header_round_trips() {
        let h = Header::new(small(20, 8), true).unwrap();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn marks_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        {
            let (store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
            store.persist(3, 5).unwrap();
            store.persist(3, 9).unwrap();
            store.persist(7, 16).unwrap();
            assert_eq!(store.used(), 25);
        }
        let (store, report) = Store::open(&[path]).unwrap();
        assert_eq!((store.mark(3), store.mark(7), store.mark(0)), (9, 16, 0));
        assert!(report.fell_back.is_empty() && report.repaired.is_empty());
    }

    #[test]
    fn torn_newest_slot_falls_back_to_the_older() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        {
            let (store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
            store.persist(2, 4).unwrap(); // slot 1, seq 2
            store.persist(2, 8).unwrap(); // slot 0, seq 3: the newest
        }
        flip(&path, slot_offset(2, 0) + 9); // tear the newest slot's mark
        let (store, report) = Store::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(store.mark(2), 4, "fell back to the older slot");
        assert_eq!(report.fell_back, vec![(path.clone(), 2)]);
        // The next write goes to the torn slot and repairs it.
        store.persist(2, 12).unwrap();
        drop(store);
        let (store, report) = Store::open(&[path]).unwrap();
        assert_eq!(store.mark(2), 12);
        assert!(report.fell_back.is_empty());
    }

    #[test]
    fn both_slots_corrupt_is_refused_naming_file_and_shard() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        flip(&path, slot_offset(5, 0));
        flip(&path, slot_offset(5, 1) + 20);
        let err = Store::open(std::slice::from_ref(&path)).err().unwrap();
        let text = err.to_string();
        assert!(matches!(err, StateError::BadShard { shard: 5, .. }), "{text}");
        assert!(text.contains(&path.display().to_string()) && text.contains("shard 5"), "{text}");
        assert!(text.contains("neither of its two slots is valid"), "{text}");
    }

    #[test]
    fn corrupt_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        flip(&path, 100); // padding is covered by the checksum too
        let text = Store::open(std::slice::from_ref(&path)).err().unwrap().to_string();
        assert!(text.contains("header checksum is wrong") && text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn every_byte_flip_recovers_or_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(6, 4)); // 4 shards: 4096 + 256 bytes
        {
            let (store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
            for (shard, mark) in [(0, 3), (0, 7), (1, 16), (2, 1), (2, 2), (2, 5)] {
                store.persist(shard, mark).unwrap();
            }
        }
        let pristine = std::fs::read(&path).unwrap();
        let expected = [7, 16, 5, 0];
        // The only marks a flip may legally fall back to: the older slots.
        let older = [3, 0, 2, 0];
        for offset in 0..pristine.len() {
            let mut bytes = pristine.clone();
            bytes[offset] ^= 0x01;
            std::fs::write(&path, &bytes).unwrap();
            match Store::open(std::slice::from_ref(&path)) {
                Ok((store, report)) => {
                    assert!(offset >= HEADER_LEN, "header flip at {offset} was accepted");
                    let shard = ((offset - HEADER_LEN) / SHARD_RECORD_LEN) as u32;
                    for s in 0..4u32 {
                        let mark = store.mark(s);
                        if s == shard {
                            assert!(mark == expected[s as usize] || mark == older[s as usize], "offset {offset}");
                        } else {
                            assert_eq!(mark, expected[s as usize], "offset {offset} changed shard {s}");
                        }
                    }
                    assert_eq!(report.fell_back.len(), 1, "offset {offset}");
                }
                Err(e) => {
                    let text = e.to_string();
                    assert!(text.contains(&path.display().to_string()), "{text}");
                    assert!(matches!(e, StateError::BadHeader { .. } | StateError::BadShard { .. }), "{text}");
                }
            }
        }
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        let before = std::fs::read(&path).unwrap();
        let err = create(std::slice::from_ref(&path), &Header::new(small(12, 4), false).unwrap()).unwrap_err();
        assert!(matches!(err, StateError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        let (_store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
        let err = Store::open(std::slice::from_ref(&path)).err().unwrap();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("locked by another process"));
    }

    #[test]
    fn missing_file_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let err = Store::open(std::slice::from_ref(&path)).err().unwrap();
        assert!(err.to_string().contains("tradeid init --state"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn truncated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 64).unwrap();
        let err = Store::open(std::slice::from_ref(&path)).err().unwrap();
        assert!(matches!(err, StateError::WrongSize { .. }), "{err}");
        OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
        let err = Store::open(std::slice::from_ref(&path)).err().unwrap();
        assert!(matches!(err, StateError::BadHeader { .. }), "{err}");
    }

    #[test]
    fn mismatched_partition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", Geometry { node: 1, nodes: 3, ..small(12, 4) });
        let (store, _) = Store::open(&[path]).unwrap();
        assert!(store.check_partition(1, 3).is_ok());
        let err = store.check_partition(0, 3).unwrap_err();
        assert!(err.to_string().contains("belongs to node 1 of 3, but node 0 of 3 was requested"), "{err}");
        assert_eq!(store.header().geometry.node_shards().take(3).collect::<Vec<_>>(), vec![1, 4, 7]);
    }

    #[test]
    fn a_mirror_restored_from_an_old_copy_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![dir.path().join("a"), dir.path().join("b")];
        create(&paths, &Header::new(small(12, 4), false).unwrap()).unwrap();
        let backup = dir.path().join("b.backup");
        {
            let (store, _) = Store::open(&paths).unwrap();
            store.persist(1, 4).unwrap();
            std::fs::copy(&paths[1], &backup).unwrap();
            store.persist(1, 10).unwrap();
            store.persist(2, 16).unwrap();
        }
        std::fs::copy(&backup, &paths[1]).unwrap(); // roll mirror b back
        let (store, report) = Store::open(&paths).unwrap();
        assert_eq!((store.mark(1), store.mark(2)), (10, 16), "newest mark per shard wins");
        assert_eq!(report.repaired, vec![(paths[1].clone(), 2)]);
        drop(store);
        // b alone now carries the repaired marks.
        let (store, _) = Store::open(&paths[1..]).unwrap();
        assert_eq!((store.mark(1), store.mark(2)), (10, 16));
    }

    #[test]
    fn files_from_different_inits_are_not_mirrors() {
        let dir = tempfile::tempdir().unwrap();
        let a = init(dir.path(), "a", small(12, 4));
        let b = init(dir.path(), "b", small(12, 4));
        let err = Store::open(&[a, b]).err().unwrap();
        assert!(matches!(err, StateError::MirrorMismatch { .. }), "{err}");
    }

    #[test]
    fn a_slot_copied_to_another_shard_is_invalid() {
        let record_for = |shard| {
            let mut r = encode_slot(5, 9, 42, shard, 0).to_vec();
            r.extend_from_slice(&encode_slot(4, 3, 42, shard, 1));
            r
        };
        assert_eq!(decode_shard(&record_for(3), 42, 3, 16).unwrap().mark, 9);
        assert!(decode_shard(&record_for(3), 42, 4, 16).is_err(), "moved record");
        assert!(decode_shard(&record_for(3), 43, 3, 16).is_err(), "other file");
    }

    proptest! {
        #[test]
        fn header_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Header::decode(&bytes);
        }

        #[test]
        fn shard_decoder_never_panics_and_never_exceeds_the_shard(
            record in proptest::collection::vec(any::<u8>(), SHARD_RECORD_LEN),
            shard: u32,
        ) {
            if let Ok(state) = decode_shard(&record, 7, shard, 1 << 22) {
                prop_assert!(state.mark <= 1 << 22);
            }
        }

        #[test]
        fn a_single_flip_in_a_valid_record_never_raises_the_mark(
            seq in 1u64..1000, older in 0u64..100, extra in 0u64..100, at in 0usize..SHARD_RECORD_LEN, bit in 0u8..8,
        ) {
            let newer = older + extra;
            let mut record = encode_slot(seq + 1, newer, 1, 0, 0).to_vec();
            record.extend_from_slice(&encode_slot(seq, older, 1, 0, 1));
            record[at] ^= 1 << bit;
            // CRC-32 detects every single-bit error, so the result is one of
            // the two written marks, never an invented one.
            let state = decode_shard(&record, 1, 0, 1 << 22).unwrap();
            prop_assert!(state.mark == newer || state.mark == older);
        }
    }
}
