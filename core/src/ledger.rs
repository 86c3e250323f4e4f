//! Who decides a shard's mark.
//!
//! A standalone node, or one node of a static partition, decides alone: its
//! state file is the authority ([`LocalLedger`]). A node of a cluster asks a
//! coordinator first (etcd, in the server): the coordinator's
//! compare-and-swap raises the shard's authoritative mark past the block,
//! and only then does the node write its own file. Either way, the
//! generator hands a block out only after *both* the ledger's
//! [`advance`](Ledger::advance) and the local flush succeeded.
//!
//! The reserver thread is a ledger's only caller, one request at a time.
//! Implementations may block (a network round trip). The one rule they must
//! keep: **two calls of `advance` anywhere, in any process, never return
//! overlapping blocks of one shard.**

use std::time::Duration;

use crate::state::Store;

/// The authority over shard marks.
pub trait Ledger: Send + 'static {
    /// Picks a shard for a handle: not `busy` (claimed by another handle of
    /// this process), not full. `None` when every shard this node may use
    /// is full: the space is exhausted.
    fn claim(&mut self, store: &Store, busy: &[bool]) -> Result<Option<u32>, LedgerError>;

    /// Raises `shard`'s authoritative mark so that the block
    /// `start..end` (offsets within the shard) is this caller's alone, with
    /// `start >= floor` (the local file's mark: nothing below it may be
    /// reused), `end - start <= size` and `end` within the shard.
    fn advance(&mut self, shard: u32, floor: u64, size: u64) -> Result<Advance, LedgerError>;

    /// The caller no longer draws from `shard`.
    fn release(&mut self, shard: u32);

    /// How often the reserver should call [`maintain`](Ledger::maintain),
    /// busy or idle; `None` (the default): never.
    fn maintenance_every(&self) -> Option<Duration> {
        None
    }

    /// Periodic housekeeping against the coordinator, with the local marks
    /// at hand (the etcd ledger re-asserts them: a coordinator restored
    /// from an old backup gets its marks raised again). An error is the
    /// ledger's to report; the reserver calls again at the next interval.
    fn maintain(&mut self, _store: &Store) {}
}

/// The result of [`Ledger::advance`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advance {
    /// The block `start..end` of the shard is the caller's.
    Block {
        /// First offset of the block.
        start: u64,
        /// One past its last offset.
        end: u64,
    },
    /// The shard is full; claim another.
    Full,
    /// Someone else is drawing from the shard; claim another.
    Lost,
}

/// Why a ledger could not answer. The caller retries; a ledger that has
/// stopped granting for good (its coordinator's state contradicts this
/// node's) answers every retry with the same error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The coordinator could not be reached or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
}

/// The ledger of a node that decides alone: the state file's marks are the
/// authority, and the header's partition says which shards are this node's.
#[derive(Debug)]
pub struct LocalLedger {
    shard_size: u64,
}

impl LocalLedger {
    /// The ledger of `store`'s node.
    pub fn new(store: &Store) -> LocalLedger {
        LocalLedger { shard_size: store.header().geometry.shard_size() }
    }
}

impl Ledger for LocalLedger {
    /// Prefers a partly used shard (so restarts and worker-count changes
    /// leave no holes), then the first untouched one.
    fn claim(&mut self, store: &Store, busy: &[bool]) -> Result<Option<u32>, LedgerError> {
        let geometry = store.header().geometry;
        let size = geometry.shard_size();
        let free = |s: &u32| !busy[*s as usize] && store.mark(*s) < size;
        Ok(geometry
            .node_shards()
            .filter(free)
            .find(|&s| store.mark(s) > 0)
            .or_else(|| geometry.node_shards().find(free)))
    }

    fn advance(&mut self, _shard: u32, floor: u64, size: u64) -> Result<Advance, LedgerError> {
        if floor >= self.shard_size {
            return Ok(Advance::Full);
        }
        Ok(Advance::Block { start: floor, end: (floor + size).min(self.shard_size) })
    }

    fn release(&mut self, _shard: u32) {}
}
