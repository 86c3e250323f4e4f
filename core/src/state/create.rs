//! Creating state files: durably, and never over an existing file.
//!
//! Every new file is written to a temporary file in the same directory,
//! fsynced, hard-linked into place (which fails if the name exists) and the
//! directory fsynced, so a crash leaves either no file or a whole one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::format::{encode_slot, Header};
use super::{io_err, StateError};

/// Creates the state file at each path (mirrors share one header).
///
/// Each copy is written to a temporary file in the same directory, fully
/// allocated and fsynced, then linked into place (which fails if the name
/// exists), and the directory is fsynced. If any copy fails, the copies
/// already created are removed again: they never served an ID.
pub fn create(paths: &[PathBuf], header: &Header) -> Result<(), StateError> {
    // A server holding a path (even one whose file was just deleted) keeps
    // init away from it.
    let _locks = paths.iter().map(|p| super::store::lock_path(p)).collect::<Result<Vec<_>, _>>()?;
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
        contents.extend_from_slice(&encode_slot(1, 0, 0, header.file_id, shard, 0));
        contents.extend_from_slice(&encode_slot(0, 0, 0, header.file_id, shard, 1));
    }
    create_durably(path, &contents, 0o600)
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

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
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
    use std::os::unix::fs::OpenOptionsExt;
    let dir = parent_dir(path);
    let tmp = temp_name(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Geometry;

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
        let small = Geometry { width: 12, shard_bits: 4, node: 0, nodes: 1 };
        let path = dir.path().join("s");
        create(std::slice::from_ref(&path), &Header::new(small, false).unwrap()).unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = create(std::slice::from_ref(&path), &Header::new(small, false).unwrap()).unwrap_err();
        assert!(matches!(err, StateError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
