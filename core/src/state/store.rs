//! An open state: the file and its mirrors, locked and memory-mapped, and
//! the one operation that matters: [`Store::persist`], which durably raises
//! a shard's mark. Holds the crate's only mmap `unsafe`.
//!
//! The contract that makes the mapping sound: nobody else writes the file
//! while it is open. Other tradeid processes are kept out by `flock`; a
//! person or program that truncates or overwrites the file anyway is caught
//! by the size check after every flush (truncation) or loses to the higher
//! mark on the next open.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use memmap2::MmapRaw;

use super::format::{decode_file, encode_slot, slot_offset, Header, SlotState, SLOT_LEN};
use super::{io_err, StateError};

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

    /// Test hook (see `crate::hooks`): after `n` more successful flushes,
    /// every flush fails with EIO, exactly where a failing `msync` would
    /// (after the slot bytes were written). Lets tests prove that a failed
    /// flush never lets an ID of its block out, without strace.
    pub(crate) fn fail_flushes_after(&self, n: u64) {
        self.flushes.store(0, Ordering::SeqCst);
        self.fail_flushes_after.store(n, Ordering::SeqCst);
    }

    /// Refuses to go on if the caller expects another node partition.
    pub fn check_partition(&self, node: u32, nodes: u32) -> Result<(), StateError> {
        self.header.check_partition(&self.mirrors[0].path, node, nodes)
    }

    /// Refuses a file that belongs to an etcd cluster: only the cluster may
    /// grant its blocks.
    pub fn check_standalone(&self) -> Result<(), StateError> {
        match &self.header.cluster {
            None => Ok(()),
            Some(c) => {
                Err(StateError::ClusterBound { path: self.mirrors[0].path.clone(), cluster: c.name().to_string() })
            }
        }
    }

    /// The first file's path (the one errors name).
    pub fn path(&self) -> &Path {
        &self.mirrors[0].path
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::format::{HEADER_LEN, SHARD_RECORD_LEN};
    use crate::state::{create, Geometry, Snapshot};

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
}
