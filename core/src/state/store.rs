//! An open state: the file and its mirrors, locked and memory-mapped, and
//! the one operation that matters: [`Store::persist`], which durably raises
//! a shard's mark. Holds the crate's only mmap `unsafe`.
//!
//! The contract that makes the mapping sound: nobody else writes the file
//! while it is open. Other tradeid processes are kept out twice: by `flock`
//! on the file (which follows the inode) and by a lock on its path (an
//! abstract Unix socket named after the canonical path, which stays with
//! the name even if another file is moved there). A person or program that
//! writes over, moves or deletes the file anyway is caught by
//! [`Store::verify`], which the server runs every second: it writes this
//! process's marks back (only ever raising them), and where the file at the
//! path is no longer the one it opened, it restores the path and stops the
//! reservations. A truncation is also caught by the size check after every
//! flush.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::MmapRaw;

use super::create::{create_durably, replace_durably};
use super::format::{
    decode_file, decode_shard, encode_slot, slot_offset, Header, SlotState, HEADER_LEN, SHARD_RECORD_LEN, SLOT_LEN,
};
use super::lock::{lock_file, lock_path, PathLock};
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
    /// Per shard: the size of the last block reserved in it (0: unknown).
    hints: Box<[AtomicU32]>,
    /// Per shard: the persisted count of its IDs known to be handed out.
    served: Box<[AtomicU64]>,
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
    /// Held for the path lock, which lasts as long as the process.
    _path_lock: PathLock,
}

/// What [`Store::verify`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Integrity {
    /// Every file at its path is the one this process opened, holding
    /// exactly what it wrote.
    Intact,
    /// A file's bytes were changed under this process (an old copy written
    /// over it): its marks, only ever raised, were written back and flushed.
    Repaired {
        /// The file.
        path: PathBuf,
        /// Shard records rewritten (the header counts as one).
        records: u32,
    },
    /// A reservation was in progress; nothing was looked at this time.
    Busy,
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
        let missing: Vec<PathBuf> = paths.iter().filter(|p| !p.exists()).cloned().collect();
        if !missing.is_empty() && missing.len() < paths.len() {
            let existing: Vec<PathBuf> = paths.iter().filter(|p| p.exists()).cloned().collect();
            if existing.iter().all(|p| super::create::never_served(p)) {
                return Err(StateError::InterruptedInit { existing, missing });
            }
            return Err(StateError::MirrorMissing { missing: missing[0].clone(), present: existing[0].clone() });
        }
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
        let hints: Vec<u32> =
            (0..shard_count).map(|s| loaded.iter().map(|(_, _, slots)| slots[s].hint).max().unwrap_or(0)).collect();
        let served: Vec<u64> =
            (0..shard_count).map(|s| loaded.iter().map(|(_, _, slots)| slots[s].served).max().unwrap_or(0)).collect();
        let mut behind = vec![0u32; loaded.len()];
        let mut lagging_shards = Vec::new();
        for (s, &mark) in best.iter().enumerate() {
            let mut lagging = false;
            for (m, (_, _, slots)) in loaded.iter().enumerate() {
                if slots[s].mark < mark {
                    behind[m] += 1;
                    lagging = true;
                }
                // Only the count behind (a stop between two mirrors'
                // flushes of it): brought up to date without a report.
                lagging |= slots[s].served < served[s];
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
            hints: hints.iter().map(|&h| AtomicU32::new(h)).collect(),
            served: served.iter().map(|&n| AtomicU64::new(n)).collect(),
            poisoned: AtomicBool::new(false),
            fail_flushes_after: AtomicU64::new(u64::MAX),
            flushes: AtomicU64::new(0),
        };
        // Repair before anything is served: rewriting the best mark into every
        // mirror is harmless for those already there.
        for shard in lagging_shards {
            let mut disk = store.shards[shard as usize].lock().unwrap_or_else(|p| p.into_inner());
            let s = shard as usize;
            store.write_and_flush(&mut disk, shard, best[s], hints[s], served[s])?;
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

    /// The size of the last block reserved in `shard` (0: unknown).
    pub fn hint(&self, shard: u32) -> u32 {
        self.hints[shard as usize].load(Ordering::Relaxed)
    }

    /// The persisted count of `shard`'s IDs known to have been handed out
    /// (at most its mark).
    pub fn served(&self, shard: u32) -> u64 {
        self.served[shard as usize].load(Ordering::Relaxed)
    }

    /// IDs of this node's shards that may have been handed out.
    pub fn used(&self) -> u64 {
        self.header.geometry.node_shards().map(|s| self.mark(s)).sum()
    }

    /// Durably raises the mark of `shard` to `mark` in every mirror, and
    /// records `hint` (the block's size) for the next start and `served`
    /// (how many of its IDs are known to have been handed out; a count
    /// below the one recorded, or above `mark`, is raised or capped).
    /// `mark` may equal the current mark, to record only a new count.
    ///
    /// Returns only after every copy is flushed, so the caller may hand out
    /// counters below `mark` once this returns `Ok`. Any failure poisons the
    /// store: a flush is never retried (its outcome on disk is unknown).
    pub fn persist(&self, shard: u32, mark: u64, hint: u32, served: u64) -> Result<Duration, StateError> {
        self.write_slot(shard, Some((mark, hint)), served)
    }

    /// Durably records `served` as the count of `shard`'s IDs known to have
    /// been handed out, keeping its mark and hint (read under the shard's
    /// lock, so a mark raised meanwhile is kept, never lowered). The count
    /// is raised or capped as in [`persist`](Self::persist), and a failure
    /// poisons the store the same way.
    pub fn record_served(&self, shard: u32, served: u64) -> Result<Duration, StateError> {
        self.write_slot(shard, None, served)
    }

    /// [`persist`](Self::persist) and [`record_served`](Self::record_served):
    /// refused once poisoned, and any failure poisons.
    fn write_slot(&self, shard: u32, block: Option<(u64, u32)>, served: u64) -> Result<Duration, StateError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StateError::Poisoned);
        }
        let result = self.write_slot_inner(shard, block, served);
        if result.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        result
    }

    /// Writes `block` (a new mark and hint; `None` keeps both) and the
    /// served count into `shard`'s slots, flushed.
    fn write_slot_inner(&self, shard: u32, block: Option<(u64, u32)>, served: u64) -> Result<Duration, StateError> {
        let g = &self.header.geometry;
        let shard_size = g.shard_size();
        assert!(g.owns(shard) && block.is_none_or(|(mark, _)| mark <= shard_size), "{block:?} for shard {shard}");
        let started = Instant::now();
        // Writing through the map into a truncated file would be a SIGBUS:
        // restore the file first (someone is copying over it, or cut it).
        self.heal_if_shrunk()?;
        let mut disk = self.shards[shard as usize].lock().unwrap_or_else(|p| p.into_inner());
        let (mark, hint) = block.unwrap_or((self.mark(shard), self.hint(shard)));
        assert!(mark >= self.mark(shard), "marks never go back");
        // Checked under the lock, so `verify` never races a write.
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StateError::Poisoned);
        }
        let served = served.max(self.served(shard)).min(mark);
        self.write_and_flush(&mut disk, shard, mark, hint, served)?;
        self.marks[shard as usize].store(mark, Ordering::Release);
        self.hints[shard as usize].store(hint, Ordering::Relaxed);
        self.served[shard as usize].store(served, Ordering::Relaxed);
        drop(disk);
        // A file truncated during the flush may still flush without error
        // (the page is simply gone): check the size before trusting it,
        // and if it shrank, write every mark (this one included) back.
        self.heal_if_shrunk()?;
        Ok(started.elapsed())
    }

    /// If any file is shorter than its geometry needs (truncated, or being
    /// written over by `cp`), extends it again and rewrites every record
    /// from this process's marks, flushed. Takes every shard's lock.
    fn heal_if_shrunk(&self) -> Result<(), StateError> {
        let len = self.header.geometry.file_len();
        let mut shrunk = Vec::new();
        for (m, mirror) in self.mirrors.iter().enumerate() {
            let found = mirror.file.metadata().map_err(io_err("cannot stat state file", &mirror.path))?.len();
            if found < len {
                shrunk.push((m, found));
            }
        }
        if shrunk.is_empty() {
            return Ok(());
        }
        let mut disks: Vec<MutexGuard<'_, ShardDisk>> =
            self.shards.iter().map(|d| d.lock().unwrap_or_else(|p| p.into_inner())).collect();
        for (m, found) in shrunk {
            let mirror = &self.mirrors[m];
            let ours = mirror.file.metadata().map_err(io_err("cannot stat state file", &mirror.path))?;
            tracing::debug!(path = %mirror.path.display(), found, "state file found short before a flush");
            self.repair_in_place(m, mirror, &ours, &mut disks)?;
        }
        Ok(())
    }

    /// Writes `mark` into the older slot of `shard` in every mirror, then
    /// flushes each. The caller holds the shard's lock (`disk`).
    fn write_and_flush(
        &self,
        disk: &mut ShardDisk,
        shard: u32,
        mark: u64,
        hint: u32,
        served: u64,
    ) -> Result<(), StateError> {
        let offsets: Vec<usize> = self
            .mirrors
            .iter()
            .zip(&disk.newest)
            .map(|(mirror, &(seq, newest_slot))| {
                let slot = 1 - newest_slot;
                let offset = slot_offset(shard, slot);
                let bytes = encode_slot(seq + 1, mark, hint, served, self.header.file_id, shard, slot);
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
    /// Checks that every file at its path is still the one this process
    /// opened and holds what it wrote, and repairs what it safely can. The
    /// server calls it every second.
    ///
    /// - Bytes changed in place (`cp old s.state` writes over the same
    ///   inode): this process's marks, raised to the file's where those are
    ///   higher, are written back and flushed; serving goes on.
    /// - The path is deleted, or holds another inode (`mv old s.state`):
    ///   the store is poisoned (no further block is reserved) and a file
    ///   with this process's marks is put at the path, if that is safe: the
    ///   path is empty, or holds a copy of this same file. Returns
    ///   [`StateError::Displaced`] either way: the caller must stop, and a
    ///   restart opens the restored file.
    ///
    /// It never waits for a reservation in progress ([`Integrity::Busy`]).
    pub fn verify(&self) -> Result<Integrity, StateError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Ok(Integrity::Intact);
        }
        // Freeze this process's writes while looking: every shard's lock.
        let mut disks = Vec::with_capacity(self.shards.len());
        for shard in self.shards.iter() {
            match shard.try_lock() {
                Ok(guard) => disks.push(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => disks.push(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(Integrity::Busy),
            }
        }
        let mut outcome = Integrity::Intact;
        for (m, mirror) in self.mirrors.iter().enumerate() {
            let ours = mirror.file.metadata().map_err(io_err("cannot stat open state file", &mirror.path))?;
            let displaced = match std::fs::metadata(&mirror.path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Some("was deleted"),
                Err(e) => return Err(io_err("cannot stat state file", &mirror.path)(e)),
                Ok(at_path) if (at_path.dev(), at_path.ino()) != (ours.dev(), ours.ino()) => {
                    Some("was replaced by another file (moved or renamed over)")
                }
                Ok(_) if ours.nlink() == 0 => Some("was unlinked"),
                Ok(_) => None,
            };
            if let Some(what) = displaced {
                self.poisoned.store(true, Ordering::Release);
                let restored = self.restore_at_path(&mirror.path);
                return Err(StateError::Displaced { path: mirror.path.clone(), what, restored });
            }
            let records = self.repair_in_place(m, mirror, &ours, &mut disks)?;
            if records > 0 {
                outcome = Integrity::Repaired { path: mirror.path.clone(), records };
            }
        }
        Ok(outcome)
    }

    /// Compares the file's header and every shard's newest slot with what
    /// this process wrote; rewrites what differs. Returns how many records
    /// were rewritten. The caller holds every shard's lock (`disks`).
    fn repair_in_place(
        &self,
        m: usize,
        mirror: &Mirror,
        ours: &std::fs::Metadata,
        disks: &mut [MutexGuard<'_, ShardDisk>],
    ) -> Result<u32, StateError> {
        let len = self.header.geometry.file_len();
        if ours.len() < len {
            // Written over by a shorter file: extend it again before the
            // map is read (reading past the end would be a SIGBUS). Said
            // here, whichever check (a flush or the periodic one) saw it.
            tracing::error!(
                path = %mirror.path.display(),
                found = ours.len(),
                "the state file shrank while in use (truncated, or something is copying over it); restoring this process's marks into it"
            );
            mirror.file.set_len(len).map_err(io_err("cannot restore the size of state file", &mirror.path))?;
        }
        let mut current = vec![0u8; len as usize];
        // SAFETY: the map covers `len` bytes (checked at open, and the file
        // is at least that long, see above). This process does not write
        // it concurrently (the caller holds every shard's lock); another
        // process may, and any byte value is a valid u8, so the copy only
        // ever sees bytes, which are then compared, never trusted.
        unsafe {
            std::ptr::copy_nonoverlapping(mirror.map.as_ptr(), current.as_mut_ptr(), current.len());
        }
        let header = self.header.encode();
        let header_intact = current[..HEADER_LEN] == header[..];
        let mut writes: Vec<(usize, Vec<u8>)> = Vec::new();
        if !header_intact {
            writes.push((0, header.to_vec()));
        }
        let file_id = self.header.file_id;
        for (shard, disk) in disks.iter_mut().enumerate() {
            let shard = shard as u32;
            let (seq, slot) = disk.newest[m];
            let (mark, hint, served) = (self.mark(shard), self.hint(shard), self.served(shard));
            let at = slot_offset(shard, slot);
            let ours = encode_slot(seq, mark, hint, served, file_id, shard, slot);
            if header_intact && current[at..at + SLOT_LEN] == ours {
                continue;
            }
            // Whatever is there now may only raise the mark (a copy of a
            // newer state of this same file), never lower it.
            let record = &current[slot_offset(shard, 0)..][..SHARD_RECORD_LEN];
            let theirs = if header_intact {
                decode_shard(record, file_id, shard, self.header.geometry.shard_size()).ok()
            } else {
                None
            };
            let mark = mark.max(theirs.map_or(0, |t| t.mark));
            let served = served.max(theirs.map_or(0, |t| t.served));
            let encode = |seq, slot| encode_slot(seq, mark, hint, served, file_id, shard, slot);
            let mut bytes = vec![0u8; SHARD_RECORD_LEN];
            let newest = usize::from(slot) * SLOT_LEN;
            let older = usize::from(1 - slot) * SLOT_LEN;
            bytes[newest..newest + SLOT_LEN].copy_from_slice(&encode(seq, slot));
            bytes[older..older + SLOT_LEN].copy_from_slice(&encode(seq - 1, 1 - slot));
            writes.push((slot_offset(shard, 0), bytes));
            self.marks[shard as usize].fetch_max(mark, Ordering::AcqRel);
            self.served[shard as usize].fetch_max(served.min(mark), Ordering::Relaxed);
        }
        if writes.is_empty() {
            return Ok(0);
        }
        for (offset, bytes) in &writes {
            // SAFETY: every write lies inside the map (header page, or one
            // shard's record at its checked offset); the caller holds every
            // shard's lock, so no other thread of this process writes.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), mirror.map.as_mut_ptr().add(*offset), bytes.len());
            }
        }
        mirror.map.flush().map_err(|source| StateError::Flush { path: mirror.path.clone(), source })?;
        mirror.file.sync_all().map_err(|source| StateError::Flush { path: mirror.path.clone(), source })?;
        Ok(writes.len() as u32)
    }

    /// Puts a file holding this process's marks at `path`, if the path is
    /// empty or holds a copy of this same file (raising nothing it holds).
    /// Returns whether it did.
    fn restore_at_path(&self, path: &Path) -> bool {
        let g = self.header.geometry;
        let mut marks: Vec<u64> = (0..g.shard_count()).map(|s| self.mark(s)).collect();
        let mut served: Vec<u64> = (0..g.shard_count()).map(|s| self.served(s)).collect();
        let existing = match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot read the file now at the state path: {e}");
                return false;
            }
        };
        if let Some(bytes) = &existing {
            match decode_file(path, bytes) {
                Ok((header, slots)) if header.file_id == self.header.file_id => {
                    for ((mark, served), slot) in marks.iter_mut().zip(&mut served).zip(slots) {
                        *mark = (*mark).max(slot.mark);
                        *served = (*served).max(slot.served);
                    }
                }
                _ => {
                    tracing::error!(
                        path = %path.display(),
                        "the file now at the state path is not a copy of the file this process opened; leaving it alone"
                    );
                    return false;
                }
            }
        }
        let mut contents = Vec::with_capacity(g.file_len() as usize);
        contents.extend_from_slice(&self.header.encode());
        for (shard, (&mark, &served)) in marks.iter().zip(&served).enumerate() {
            let (shard, hint, file_id) = (shard as u32, self.hint(shard as u32), self.header.file_id);
            contents.extend_from_slice(&encode_slot(1, mark, hint, served, file_id, shard, 0));
            contents.extend_from_slice(&encode_slot(0, mark, hint, served, file_id, shard, 1));
        }
        let written =
            if existing.is_some() { replace_durably(path, &contents) } else { create_durably(path, &contents, 0o600) };
        match written {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot restore the state file: {e}");
                false
            }
        }
    }
}

fn open_one(path: &Path, report: &mut OpenReport) -> Result<(Mirror, Header, Vec<SlotState>), StateError> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StateError::NotFound { path: path.to_owned() }),
        Err(e) => return Err(io_err("cannot open state file", path)(e)),
    };
    lock_file(&file, path)?;
    let path_lock = lock_path(path)?;
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
    Ok((Mirror { path: path.to_owned(), file, map, _path_lock: path_lock }, header, slots))
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
            store.persist(3, 5, 0, 0).unwrap();
            store.persist(3, 9, 0, 0).unwrap();
            store.persist(7, 16, 0, 0).unwrap();
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
            store.persist(2, 4, 0, 0).unwrap(); // slot 1, seq 2
            store.persist(2, 8, 0, 0).unwrap(); // slot 0, seq 3: the newest
        }
        flip(&path, slot_offset(2, 0) + 9); // tear the newest slot's mark
        let (store, report) = Store::open(std::slice::from_ref(&path)).unwrap();
        assert_eq!(store.mark(2), 4, "fell back to the older slot");
        assert_eq!(report.fell_back, vec![(path.clone(), 2)]);
        // The next write goes to the torn slot and repairs it.
        store.persist(2, 12, 0, 0).unwrap();
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
                store.persist(shard, mark, 0, 0).unwrap();
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
            store.persist(1, 4, 0, 0).unwrap();
            std::fs::copy(&paths[1], &backup).unwrap();
            store.persist(1, 10, 0, 0).unwrap();
            store.persist(2, 16, 0, 0).unwrap();
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
    fn block_size_hints_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 6));
        {
            let (store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
            assert_eq!(store.hint(3), 0, "a new file has no hints");
            store.persist(3, 40, 32, 0).unwrap();
        }
        let (store, _) = Store::open(&[path]).unwrap();
        assert_eq!((store.mark(3), store.hint(3), store.hint(4)), (40, 32, 0));
    }

    /// The served count is kept beside the mark: it survives a restart,
    /// only rises, never exceeds the mark, may be recorded without raising
    /// the mark, and the largest count among mirrors wins.
    #[test]
    fn served_counts_survive_a_restart_and_only_rise_up_to_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        create(&[a.clone(), b.clone()], &Header::new(small(12, 6), false).unwrap()).unwrap();
        let both = [a.clone(), b.clone()];
        {
            let (store, _) = Store::open(&both).unwrap();
            assert_eq!(store.served(3), 0, "a new file has served nothing");
            store.persist(3, 40, 32, 10).unwrap();
            store.record_served(3, 25).unwrap(); // the count alone
            assert_eq!((store.mark(3), store.hint(3), store.served(3)), (40, 32, 25));
            store.persist(3, 48, 32, 5).unwrap(); // never lowered
            store.persist(4, 8, 8, 64).unwrap(); // capped at the mark
            assert_eq!((store.mark(3), store.served(3), store.served(4)), (48, 25, 8));
        }
        let snap = Snapshot::read(&a).unwrap();
        assert_eq!((snap.served[3], snap.served[4], snap.served()), (25, 8, 33));
        assert_eq!(snap.used(), 56);
        let old_b = std::fs::read(&b).unwrap();
        {
            let (store, _) = Store::open(&both).unwrap();
            assert_eq!((store.mark(3), store.served(3)), (48, 25));
            store.record_served(3, 40).unwrap();
        }
        // A mirror restored from an older copy: the larger count wins, and
        // the repair at open writes it back into the mirror.
        std::fs::write(&b, &old_b).unwrap();
        let (store, _) = Store::open(&both).unwrap();
        assert_eq!(store.served(3), 40);
        drop(store);
        assert_eq!(Snapshot::read(&b).unwrap().served[3], 40);
    }

    fn serving_store(dir: &Path) -> (PathBuf, Store) {
        let path = init(dir, "s", small(12, 4));
        let (store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
        store.persist(1, 8, 8, 0).unwrap();
        store.persist(2, 16, 16, 0).unwrap();
        (path, store)
    }

    #[test]
    fn an_untouched_file_verifies_intact() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, store) = serving_store(dir.path());
        assert_eq!(store.verify().unwrap(), Integrity::Intact);
    }

    /// `cp old s.state` writes old bytes into the inode the server has
    /// mapped: verify writes the marks back, and a reopen sees them.
    #[test]
    fn an_old_copy_written_over_the_file_is_repaired_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = init(dir.path(), "s", small(12, 4));
        let (store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
        store.persist(1, 4, 4, 0).unwrap();
        let old = std::fs::read(&path).unwrap();
        store.persist(1, 12, 4, 0).unwrap();
        store.persist(2, 16, 16, 0).unwrap();
        std::fs::write(&path, &old).unwrap(); // same inode, old bytes
        match store.verify().unwrap() {
            Integrity::Repaired { records, .. } => assert!(records >= 2, "{records}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.verify().unwrap(), Integrity::Intact, "repaired for good");
        drop(store);
        let snap = Snapshot::read(&path).unwrap();
        assert_eq!((snap.marks[1], snap.marks[2]), (12, 16), "the file on disk has the marks back");
        // A shorter file written over it (another geometry) is repaired too.
        let (store, _) = Store::open(std::slice::from_ref(&path)).unwrap();
        std::fs::write(&path, &old[..HEADER_LEN]).unwrap();
        assert!(matches!(store.verify().unwrap(), Integrity::Repaired { .. }));
        drop(store);
        assert_eq!(Snapshot::read(&path).unwrap().marks[1], 12);
    }

    /// `mv old s.state` swaps the inode: the store stops reserving, writes
    /// its marks to the path, and says so.
    #[test]
    fn a_copy_moved_over_the_path_is_replaced_with_the_current_marks() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = serving_store(dir.path());
        let old = dir.path().join("old");
        std::fs::copy(&path, &old).unwrap();
        store.persist(1, 15, 8, 0).unwrap();
        std::fs::rename(&old, &path).unwrap();
        let err = store.verify().unwrap_err();
        assert!(matches!(err, StateError::Displaced { restored: true, .. }), "{err}");
        assert!(err.to_string().contains("was replaced by another file"), "{err}");
        assert!(matches!(store.persist(1, 16, 8, 0), Err(StateError::Poisoned)), "no more reservations");
        drop(store);
        assert_eq!(Snapshot::read(&path).unwrap().marks[1], 15);
    }

    #[test]
    fn a_deleted_file_is_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = serving_store(dir.path());
        std::fs::remove_file(&path).unwrap();
        let err = store.verify().unwrap_err();
        assert!(matches!(err, StateError::Displaced { restored: true, what: "was deleted", .. }), "{err}");
        drop(store);
        let snap = Snapshot::read(&path).unwrap();
        assert_eq!((snap.marks[1], snap.marks[2]), (8, 16));
    }

    /// Another state file moved to the path is never overwritten.
    #[test]
    fn a_foreign_file_at_the_path_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (path, store) = serving_store(dir.path());
        let other = init(dir.path(), "other", small(12, 4));
        let other_bytes = std::fs::read(&other).unwrap();
        std::fs::rename(&other, &path).unwrap();
        let err = store.verify().unwrap_err();
        assert!(matches!(err, StateError::Displaced { restored: false, .. }), "{err}");
        assert!(err.to_string().contains("could not be restored safely"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), other_bytes);
    }

    /// While a store is open, its path stays locked even after the file was
    /// moved away and another put in its place.
    #[test]
    fn the_path_stays_locked_whatever_inode_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _store) = serving_store(dir.path());
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        std::fs::copy(dir.path().join("moved"), &path).unwrap();
        let err = Store::open(std::slice::from_ref(&path)).err().unwrap();
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
    }

    #[test]
    fn a_missing_mirror_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        create(&[a.clone(), b.clone()], &Header::new(small(12, 4), false).unwrap()).unwrap();
        std::fs::remove_file(&b).unwrap();
        // Never served: the set was cut short, delete the rest.
        let err = Store::open(&[a.clone(), b.clone()]).err().unwrap();
        assert!(matches!(err, StateError::InterruptedInit { .. }), "{err}");
        // Served: restore the mirror from the other.
        {
            let (store, _) = Store::open(std::slice::from_ref(&a)).unwrap();
            store.persist(0, 4, 4, 0).unwrap();
        }
        let err = Store::open(&[a.clone(), b.clone()]).err().unwrap();
        assert!(matches!(err, StateError::MirrorMissing { .. }), "{err}");
        assert!(err.to_string().contains(&format!("cp {} {}", a.display(), b.display())), "{err}");
    }
}
