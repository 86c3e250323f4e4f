//! The state file's on-disk format: geometry, the header page, shard slots
//! and their checksums, and whole-file validation. Pure: bytes in, values
//! or a reason out; no I/O. The fuzz target drives this module directly.
//!
//! The layout is documented in the [parent module](super).

use std::io;
use std::path::Path;

use super::StateError;
use crate::check::DATA_BITS;
use crate::id::{Key, Permutation, Scheme, MAX_WIDTH, MIN_WIDTH, ROUNDS};

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

    pub(super) fn file_len(&self) -> u64 {
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
    /// The etcd cluster this file is a node of, if any: its marks are then
    /// only a local floor, and it may be served only through that cluster.
    pub cluster: Option<ClusterBinding>,
    /// IDs end in a check character (`init --check-char`): 6 data
    /// characters carry the counter, so the width is at most 30 bits.
    pub check_char: bool,
}

/// The etcd cluster a state file belongs to: the cluster's random id (so a
/// cluster deleted and created again under the same name is another
/// cluster) and its name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClusterBinding {
    /// The cluster's random id, from its metadata in etcd. Never 0.
    pub id: u64,
    name: [u8; CLUSTER_NAME_MAX],
    name_len: u8,
}

impl ClusterBinding {
    /// A binding to cluster `name` (1..=64 of `A-Z a-z 0-9 . _ -`) with id `id`.
    pub fn new(id: u64, name: &str) -> Result<ClusterBinding, String> {
        check_cluster_name(name)?;
        if id == 0 {
            return Err("a cluster id is never 0".into());
        }
        let mut bytes = [0u8; CLUSTER_NAME_MAX];
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Ok(ClusterBinding { id, name: bytes, name_len: name.len() as u8 })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        // Only ever built from a checked ASCII name.
        std::str::from_utf8(&self.name[..usize::from(self.name_len)]).expect("cluster names are ASCII")
    }
}

impl std::fmt::Debug for ClusterBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterBinding({} {:016x})", self.name(), self.id)
    }
}

/// Checks a cluster name: 1..=64 characters of `A-Z a-z 0-9 . _ -`, so it
/// is safe in an etcd key and in a file header.
pub fn check_cluster_name(name: &str) -> Result<(), String> {
    let ok = (1..=CLUSTER_NAME_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("cluster name {name:?} must be 1 to {CLUSTER_NAME_MAX} characters of A-Z, a-z, 0-9, '.', '_', '-'"))
    }
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
        Ok(Header {
            geometry,
            sequential,
            key,
            file_id: u64::from_le_bytes(id),
            created_unix,
            records_space_id: true,
            cluster: None,
            check_char: false,
        })
    }

    /// A fresh header for a node of an etcd cluster whose space is `key`
    /// over `width` bits in shards of 2^`shard_bits`. Every shard is open to
    /// every node: the cluster, not a partition, keeps them apart.
    pub fn for_cluster(
        width: u32,
        shard_bits: u32,
        key: Key,
        check_char: bool,
        cluster: ClusterBinding,
    ) -> io::Result<Header> {
        let geometry = Geometry { width, shard_bits, node: 0, nodes: 1 };
        Ok(Header { cluster: Some(cluster), check_char, ..Header::with_key(geometry, false, key)? })
    }

    /// The identity of the ID space this file is a node of: files whose IDs
    /// can never collide with each other's share it (same key, same
    /// geometry, disjoint partitions). Derived from the key, so two nodes
    /// initialised from one key file show the same id.
    pub fn space_id(&self) -> SpaceId {
        SpaceId::derive(&self.key, self.geometry.width, self.geometry.shard_bits, self.sequential, self.check_char)
    }

    /// How this file's counters become IDs.
    pub fn scheme(&self) -> Scheme {
        if self.check_char {
            Scheme::with_check_char(self.permutation())
        } else {
            Scheme::plain(self.permutation())
        }
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
        let flags = u32::from(self.sequential)
            | if self.cluster.is_some() { FLAG_CLUSTER } else { 0 }
            | if self.check_char { FLAG_CHECK_CHAR } else { 0 };
        put_u32(&mut page, 12, flags);
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
        if let Some(cluster) = &self.cluster {
            put_u64(&mut page, 96, cluster.id);
            page[104..104 + CLUSTER_NAME_MAX].copy_from_slice(&cluster.name);
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
        if flags & !(FLAG_SEQUENTIAL | FLAG_CLUSTER | FLAG_CHECK_CHAR) != 0 {
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
            sequential: flags & FLAG_SEQUENTIAL != 0,
            key: Key(key),
            file_id: get_u64(page, 40),
            created_unix: get_u64(page, 80),
            records_space_id: stored_space != 0,
            cluster: None,
            check_char: flags & FLAG_CHECK_CHAR != 0,
        };
        if header.check_char && width > DATA_BITS {
            return Err(format!(
                "it has check characters but a {width}-bit counter; six data characters hold at most {DATA_BITS} bits"
            ));
        }
        let header = if flags & FLAG_CLUSTER == 0 {
            header
        } else {
            let name_bytes = &page[104..104 + CLUSTER_NAME_MAX];
            let len = name_bytes.iter().position(|&b| b == 0).unwrap_or(CLUSTER_NAME_MAX);
            let name =
                std::str::from_utf8(&name_bytes[..len]).map_err(|_| "its cluster name is not text".to_string())?;
            let binding = ClusterBinding::new(get_u64(page, 96), name)
                .map_err(|e| format!("its cluster binding is invalid: {e}"))?;
            if header.sequential || header.geometry.nodes != 1 {
                return Err("a cluster node's file must be keyed and unpartitioned".into());
            }
            Header { cluster: Some(binding), ..header }
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
    pub fn derive(key: &Key, width: u32, shard_bits: u32, sequential: bool, check_char: bool) -> SpaceId {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"tradeid space v1\0");
        h.update(width.to_le_bytes());
        h.update(shard_bits.to_le_bytes());
        h.update([u8::from(sequential)]);
        if check_char {
            // Only spaces with check characters hash this, so the ids of
            // every space made before they existed stay what they were.
            h.update(b"check-char\0");
        }
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
    /// The size of the last block reserved in the shard (0: unknown), so a
    /// restart can start with blocks sized to recent load.
    pub hint: u32,
    /// How many of the shard's IDs are known to have been handed out: a
    /// lower bound, never above `mark` (0 in files from before it was kept).
    pub served: u64,
    /// Whether the other slot was invalid (a torn or corrupt write).
    pub other_invalid: bool,
}

/// Reads one shard's two slots and picks the newest valid one. Pure.
///
/// Only the sequence number, the mark and the checksum decide which slot
/// wins: the hint and the served count are advice, and a served count above
/// the mark (which no tradeid writes) is read as the mark, never as a reason
/// to fall back to an older mark.
pub fn decode_shard(record: &[u8], file_id: u64, shard: u32, shard_size: u64) -> Result<SlotState, String> {
    let read = |slot: u8| -> Option<SlotState> {
        let bytes = &record[usize::from(slot) * SLOT_LEN..][..SLOT_LEN];
        let (seq, mark) = (get_u64(bytes, 0), get_u64(bytes, 8));
        let valid = get_u32(bytes, SLOT_CRC_AT) == slot_crc(bytes, file_id, shard, slot) && mark <= shard_size;
        valid.then(|| SlotState {
            seq,
            slot,
            mark,
            hint: get_u32(bytes, 16),
            served: get_u64(bytes, 20).min(mark),
            other_invalid: false,
        })
    };
    match (read(0), read(1)) {
        (None, None) => Err("neither of its two slots is valid".into()),
        (Some(only), None) | (None, Some(only)) => Ok(SlotState { other_invalid: true, ..only }),
        (Some(a), Some(b)) if a.seq == b.seq => Err(format!("both slots claim sequence number {}", a.seq)),
        (Some(a), Some(b)) => {
            let (newest, older) = if a.seq > b.seq { (a, b) } else { (b, a) };
            if newest.mark < older.mark {
                return Err(format!(
                    "its newest slot (seq {}) records mark {} below the older slot's {}; marks never go back",
                    newest.seq, newest.mark, older.mark
                ));
            }
            Ok(newest)
        }
    }
}

/// Serialises one slot: sequence number, mark, the block-size hint (the
/// size of the last block reserved in the shard, or 0) and the served count
/// (IDs of the shard known to have been handed out, at most `mark`).
pub fn encode_slot(seq: u64, mark: u64, hint: u32, served: u64, file_id: u64, shard: u32, slot: u8) -> [u8; SLOT_LEN] {
    let mut bytes = [0u8; SLOT_LEN];
    put_u64(&mut bytes, 0, seq);
    put_u64(&mut bytes, 8, mark);
    put_u32(&mut bytes, 16, hint);
    put_u64(&mut bytes, 20, served.min(mark));
    let crc = slot_crc(&bytes, file_id, shard, slot);
    put_u32(&mut bytes, SLOT_CRC_AT, crc);
    bytes
}

/// A read-only view of a state file, taken without the lock (so it works
/// while a server runs). For `inspect` and `decode`; never for serving.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated header.
    pub header: Header,
    /// The newest valid mark of every shard: IDs reserved.
    pub marks: Vec<u64>,
    /// Per shard, IDs known to have been handed out (see [`SlotState::served`]).
    pub served: Vec<u64>,
    /// Shards whose newest slot was invalid.
    pub fell_back: Vec<u32>,
}

impl Snapshot {
    /// Validates a state file's bytes (`path` only names it in errors).
    /// Pure: the same checks as opening for service.
    pub fn decode(path: &Path, contents: &[u8]) -> Result<Snapshot, StateError> {
        let (header, slots) = decode_file(path, contents)?;
        Ok(Snapshot {
            header,
            marks: slots.iter().map(|s| s.mark).collect(),
            served: slots.iter().map(|s| s.served).collect(),
            fell_back: (0..slots.len() as u32).filter(|&s| slots[s as usize].other_invalid).collect(),
        })
    }

    /// IDs of this node's shards that may have been handed out: every ID
    /// below a mark was reserved, so none of them is ever issued again.
    pub fn used(&self) -> u64 {
        self.header.geometry.node_shards().map(|s| self.marks[s as usize]).sum()
    }

    /// IDs of this node's shards known to have been handed out: at most
    /// [`used`](Self::used), which also counts blocks held by a running
    /// server or skipped by restarts.
    pub fn served(&self) -> u64 {
        self.header.geometry.node_shards().map(|s| self.served[s as usize]).sum()
    }
}

/// Validates a whole file's bytes: header, length, and every shard.
pub(super) fn decode_file(path: &Path, contents: &[u8]) -> Result<(Header, Vec<SlotState>), StateError> {
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

pub(super) fn slot_offset(shard: u32, slot: u8) -> usize {
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

const FLAG_SEQUENTIAL: u32 = 1;
const FLAG_CLUSTER: u32 = 2;
const FLAG_CHECK_CHAR: u32 = 4;
/// The longest cluster name.
pub const CLUSTER_NAME_MAX: usize = 64;

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

    #[test]
    fn format_golden_bytes_never_change() {
        let header = Header {
            geometry: Geometry { width: 35, shard_bits: 22, node: 1, nodes: 3 },
            sequential: false,
            key: Key([1, 2, 3, 4]),
            file_id: 0x0123_4567_89ab_cdef,
            created_unix: 1_700_000_000,
            records_space_id: false,
            cluster: None,
            check_char: false,
        };
        // A header from before the space id was recorded: still read as it was.
        let page = header.encode();
        assert_eq!(&page[..8], b"TRADEID\0");
        assert_eq!(crc32fast::hash(&page), GOLDEN_HEADER_CRC);
        assert_eq!(Header::decode(&page).unwrap(), header);
        assert_eq!(encode_slot(7, 1000, 0, 0, header.file_id, 42, 1), GOLDEN_SLOT);
        // The block-size hint lives in bytes 16..20, which older files
        // left zero: they read back as "no hint".
        let hinted = encode_slot(7, 1000, 65_536, 0, header.file_id, 42, 1);
        assert_eq!(&hinted[16..20], &65_536u32.to_le_bytes());
        let mut record = encode_slot(6, 900, 0, 0, header.file_id, 42, 0).to_vec();
        record.extend_from_slice(&hinted);
        let state = decode_shard(&record, header.file_id, 42, 1 << 22).unwrap();
        assert_eq!((state.seq, state.mark, state.hint, state.served), (7, 1000, 65_536, 0));
        // Today's header records the space id at offset 88.
        let current = Header { records_space_id: true, ..header };
        let page = current.encode();
        assert_eq!(get_u64(&page, 88), GOLDEN_SPACE_ID);
        assert_eq!(current.space_id().to_string(), "aea4-8dfe-3611-2351");
        assert_eq!(Header::decode(&page).unwrap(), current);
    }

    /// The served count lives in bytes 20..28, which older files left zero
    /// (they read as "none known"), is covered by the checksum, and never
    /// reads above the mark nor decides which slot wins.
    #[test]
    fn the_served_count_round_trips_under_the_checksum_and_never_exceeds_the_mark() {
        let served = encode_slot(7, 1000, 64, 640, 9, 42, 1);
        assert_eq!(&served[20..28], &640u64.to_le_bytes());
        let mut record = encode_slot(6, 900, 64, 600, 9, 42, 0).to_vec();
        record.extend_from_slice(&served);
        let state = decode_shard(&record, 9, 42, 1 << 22).unwrap();
        assert_eq!((state.mark, state.served, state.other_invalid), (1000, 640, false));
        // The encoder never writes more served than reserved ...
        assert_eq!(&encode_slot(7, 1000, 64, 5000, 9, 42, 1)[20..28], &1000u64.to_le_bytes());
        // ... and a slot that says so anyway (valid checksum) still counts
        // with its mark: the count is read as the mark.
        let mut bytes = encode_slot(7, 1000, 64, 0, 9, 42, 1);
        put_u64(&mut bytes, 20, 5000);
        let crc = slot_crc(&bytes, 9, 42, 1);
        put_u32(&mut bytes, SLOT_CRC_AT, crc);
        record.truncate(SLOT_LEN);
        record.extend_from_slice(&bytes);
        let state = decode_shard(&record, 9, 42, 1 << 22).unwrap();
        assert_eq!((state.mark, state.served, state.other_invalid), (1000, 1000, false));
        // A changed count without a new checksum is a torn slot.
        record[SLOT_LEN + 20] ^= 1;
        let state = decode_shard(&record, 9, 42, 1 << 22).unwrap();
        assert_eq!((state.mark, state.served, state.other_invalid), (900, 600, true));
    }

    #[test]
    fn a_cluster_binding_round_trips_and_is_validated() {
        let binding = ClusterBinding::new(0xfeed, "prod-eu.1").unwrap();
        let h = Header::for_cluster(20, 8, Key([5, 6, 7, 8]), false, binding).unwrap();
        let page = h.encode();
        assert_eq!(get_u32(&page, 12), FLAG_CLUSTER);
        let back = Header::decode(&page).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.cluster.unwrap().name(), "prod-eu.1");
        for bad in ["", "has space", "slash/", &"x".repeat(65), "ünï"] {
            assert!(ClusterBinding::new(1, bad).is_err(), "{bad:?}");
        }
        assert!(ClusterBinding::new(0, "ok").is_err());
        // A file written for a cluster with a flag an older tradeid does
        // not know is refused by it: "unknown header flags".
        let mut future = page;
        put_u32(&mut future, 12, FLAG_CLUSTER | 0x100);
        let crc = crc32fast::hash(&future[..HEADER_CRC_AT]);
        put_u32(&mut future, HEADER_CRC_AT, crc);
        assert!(Header::decode(&future).unwrap_err().contains("unknown header flags"));
    }

    /// A check-character header records its flag, reads back as one, and
    /// is its own space: the same key without the flag is another space.
    #[test]
    fn a_check_character_header_round_trips_and_is_its_own_space() {
        let plain = Header::with_key(small(30, 22), false, Key([1, 2, 3, 4])).unwrap();
        let checked = Header { check_char: true, ..plain };
        let page = checked.encode();
        assert_eq!(get_u32(&page, 12), FLAG_CHECK_CHAR);
        assert_eq!(Header::decode(&page).unwrap(), checked);
        assert!(checked.scheme().has_check_char() && !plain.scheme().has_check_char());
        assert_ne!(checked.space_id(), plain.space_id());
        // More than six data characters' worth of counter is refused.
        let wide = Header { check_char: true, geometry: small(31, 22), ..plain };
        let err = Header::decode(&wide.encode()).unwrap_err();
        assert!(err.contains("at most 30 bits"), "{err}");
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
    fn header_round_trips() {
        let h = Header::new(small(20, 8), true).unwrap();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn a_slot_copied_to_another_shard_is_invalid() {
        let record_for = |shard| {
            let mut r = encode_slot(5, 9, 0, 0, 42, shard, 0).to_vec();
            r.extend_from_slice(&encode_slot(4, 3, 0, 0, 42, shard, 1));
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
            let mut record = encode_slot(seq + 1, newer, 0, 0, 1, 0, 0).to_vec();
            record.extend_from_slice(&encode_slot(seq, older, 0, 0, 1, 0, 1));
            record[at] ^= 1 << bit;
            // CRC-32 detects every single-bit error, so the result is one of
            // the two written marks, never an invented one.
            let state = decode_shard(&record, 1, 0, 1 << 22).unwrap();
            prop_assert!(state.mark == newer || state.mark == older);
        }
    }
}
