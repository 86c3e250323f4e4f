//! Creating state files: durably, and never over an existing file.
//!
//! Every new file is written to a temporary file in the same directory,
//! fsynced, hard-linked into place (which fails if the name exists) and the
//! directory fsynced, so a crash leaves either no file or a whole one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::format::{encode_slot, Header};
use super::lock::lock_path;
use super::{io_err, parent_dir, StateError};

/// Creates the state file at each path (mirrors share one header).
///
/// Every copy is first written to a temporary file beside it and fsynced;
/// only then are they linked into place one after the other (linking fails
/// if the name exists), and the directories fsynced. A crash can therefore
/// leave a partial set only between two links. If any copy fails, the
/// copies already linked are removed again: they never served an ID.
pub fn create(paths: &[PathBuf], header: &Header) -> Result<(), StateError> {
    // A server holding a path (even one whose file was just deleted) keeps
    // init away from it.
    let _locks = paths.iter().map(|p| lock_path(p)).collect::<Result<Vec<_>, _>>()?;
    // Before anything is refused: a run killed after linking some or all
    // of its copies left its temporaries too, and this run may stop at the
    // check below.
    for path in paths {
        remove_abandoned_temps(path);
    }
    check_none_exist(paths)?;
    let g = &header.geometry;
    let mut contents = Vec::with_capacity(g.file_len() as usize);
    contents.extend_from_slice(&header.encode());
    for shard in 0..g.shard_count() {
        // Both slots valid with mark 0: slot 0 is the newest.
        contents.extend_from_slice(&encode_slot(1, 0, 0, 0, header.file_id, shard, 0));
        contents.extend_from_slice(&encode_slot(0, 0, 0, 0, header.file_id, shard, 1));
    }
    let temps = paths.iter().map(|p| Temp::write(p, &contents, 0o600)).collect::<Result<Vec<_>, _>>()?;
    let mut linked: Vec<&PathBuf> = Vec::new();
    for (temp, path) in temps.iter().zip(paths) {
        if let Err(e) = temp.link(path) {
            for done in linked {
                let _ = std::fs::remove_file(done);
            }
            return Err(e);
        }
        linked.push(path);
    }
    drop(temps);
    for path in paths {
        let dir = parent_dir(path);
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", &dir))?;
    }
    Ok(())
}

/// Refuses if any of `paths` exists, and says what to do when the ones
/// that exist were left by an interrupted init (they never served an ID).
fn check_none_exist(paths: &[PathBuf]) -> Result<(), StateError> {
    let existing: Vec<&PathBuf> = paths.iter().filter(|p| p.exists()).collect();
    let Some(&first) = existing.first() else { return Ok(()) };
    if existing.len() < paths.len() && existing.iter().all(|p| never_served(p)) {
        return Err(StateError::InterruptedInit {
            existing: existing.into_iter().cloned().collect(),
            missing: paths.iter().filter(|p| !p.exists()).cloned().collect(),
        });
    }
    Err(StateError::Exists { path: first.clone() })
}

/// Whether the state file at `path` is valid and has never handed out an
/// ID (every mark 0: a server reserves a block before its first reply).
pub(crate) fn never_served(path: &Path) -> bool {
    super::Snapshot::read(path).is_ok_and(|snap| snap.marks.iter().all(|&m| m == 0))
}

/// A temporary file beside its destination, flocked while this process
/// owns it, so a later run can tell an abandoned one (no lock) from one in
/// use, and remove it.
struct Temp {
    path: PathBuf,
    _file: File,
}

impl Temp {
    /// Writes `contents` to `.NAME.tmp-PID` beside `dest` and fsyncs it,
    /// after removing temporaries that earlier, killed runs left there.
    fn write(dest: &Path, contents: &[u8], mode: u32) -> Result<Temp, StateError> {
        use std::os::unix::fs::OpenOptionsExt;
        remove_abandoned_temps(dest);
        let path = temp_name(dest)?;
        let needed = contents.len() as u64;
        let failed = |e: io::Error| match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StateError::NoSpace { path: dest.to_owned(), needed },
            _ => StateError::Io { what: "cannot create", path: dest.to_owned(), source: e },
        };
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(failed)?;
        let temp = Temp { path, _file: file.try_clone().map_err(failed)? };
        file.try_lock().map_err(|e| failed(io::Error::other(e.to_string())))?;
        file.write_all(contents).and_then(|()| file.sync_all()).map_err(failed)?;
        Ok(temp)
    }

    /// Links the temporary file to `dest`; fails if `dest` exists.
    fn link(&self, dest: &Path) -> Result<(), StateError> {
        std::fs::hard_link(&self.path, dest).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => StateError::Exists { path: dest.to_owned() },
            _ => StateError::Io { what: "cannot link into place", path: dest.to_owned(), source: e },
        })
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes `.NAME.tmp-*` files beside `dest` that no process holds: they
/// were left by a create that was killed (a live one holds its lock).
fn remove_abandoned_temps(dest: &Path) {
    let Some(name) = dest.file_name() else { return };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent_dir(dest)) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let Ok(file) = OpenOptions::new().read(true).open(entry.path()) else { continue };
        if file.try_lock().is_ok() {
            tracing::info!(path = %entry.path().display(), "removing a temporary file left by an interrupted init");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Replaces the file at `path` with `contents`, durably: a temporary file in
/// the same directory, fsynced, renamed over `path`, then the directory
/// fsynced. Only for restoring a state file whose path was tampered with.
pub(crate) fn replace_durably(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_dir(path);
    let tmp = temp_name(path)?;
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err("cannot replace", path))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", &dir))
}

/// `.NAME.tmp-PID` beside `path`.
fn temp_name(path: &Path) -> Result<PathBuf, StateError> {
    let name = path.file_name().ok_or_else(|| StateError::Io {
        what: "the path has no file name:",
        path: path.to_owned(),
        source: io::ErrorKind::InvalidInput.into(),
    })?;
    Ok(parent_dir(path).join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id())))
}

/// Creates `path` with exactly `contents`, durably and only if it does not
/// exist: the bytes go to a temporary file in the same directory (mode
/// `mode`), which is fsynced and then hard-linked into place (linking fails
/// if the name exists, so nothing is ever overwritten); the directory is
/// fsynced last. Errors name `path`, never the temporary file.
pub fn create_durably(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    let temp = Temp::write(path, contents, mode)?;
    temp.link(path)?;
    drop(temp);
    let dir = parent_dir(path);
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", &dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Geometry;

    fn small() -> Header {
        Header::new(Geometry { width: 12, shard_bits: 4, node: 0, nodes: 1 }, false).unwrap()
    }

    /// Temporaries a killed init left behind are removed by the next one;
    /// one that a live process holds is not.
    #[test]
    fn abandoned_temporaries_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let abandoned = dir.path().join(".s.tmp-424242");
        std::fs::write(&abandoned, b"left by a killed init").unwrap();
        let live = dir.path().join(".s.tmp-1");
        std::fs::write(&live, b"being written").unwrap();
        let holder = File::open(&live).unwrap();
        holder.try_lock().unwrap();
        create(std::slice::from_ref(&path), &small()).unwrap();
        assert!(!abandoned.exists(), "the abandoned temporary is gone");
        assert!(live.exists(), "a locked temporary belongs to a live process");
        drop(holder);
    }

    /// A set of mirrors whose creation was cut short: the next init says
    /// which file to delete and why that is safe.
    #[test]
    fn an_interrupted_mirror_set_names_the_file_to_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        create(std::slice::from_ref(&a), &small()).unwrap();
        // What a run killed between its two links leaves besides `a`.
        let abandoned = [dir.path().join(".a.tmp-424242"), dir.path().join(".b.tmp-424242")];
        std::fs::hard_link(&a, &abandoned[0]).unwrap();
        std::fs::copy(&a, &abandoned[1]).unwrap();
        let err = create(&[a.clone(), b.clone()], &small()).unwrap_err();
        assert!(abandoned.iter().all(|t| !t.exists()), "a refused init still removes the temporaries");
        assert!(a.exists());
        assert!(
            matches!(&err, StateError::InterruptedInit { existing, missing } if existing == std::slice::from_ref(&a) && missing == std::slice::from_ref(&b)),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("Delete {}", a.display())) && text.contains("never served"), "{text}");
    }

    #[test]
    fn a_failed_create_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let missing_dir = dir.path().join("no-such-dir").join("s");
        let err = create_durably(&missing_dir, b"x", 0o600).unwrap_err();
        assert!(err.to_string().contains(&missing_dir.display().to_string()), "names the path asked for: {err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        create(std::slice::from_ref(&path), &small()).unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = create(std::slice::from_ref(&path), &small()).unwrap_err();
        assert!(matches!(err, StateError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
