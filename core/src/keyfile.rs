//! The key file: one small text file that defines a multi-node ID space.
//!
//! Every node of a static partition must map counters to IDs with the same
//! permutation, or two nodes' disjoint counters land on the same IDs (about
//! n²/2^35 of them for n IDs). `tradeid keygen` writes the key once; every
//! node's `tradeid init --key-file` copies it into its state file's header.
//! The file also pins the geometry, because nodes that cut the space into
//! shards of different sizes would overlap too.
//!
//! ```text
//! # tradeid key ...comments...
//! tradeid-key 1
//! width 35
//! shard-bits 22
//! key 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
//! space 1f3a-9c0b-5e6d-7a8f
//! ```
//!
//! A space whose IDs end in a check character (`keygen --check-char`) has
//! one more line, `check-char yes`, which older builds refuse as unknown
//! rather than make nodes of another format in the same space.
//!
//! The `space` line is derived from the others and checked on load, so a
//! damaged key is refused instead of silently defining another space.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::check::DATA_BITS;
use crate::id::{Key, ROUNDS};
use crate::state::{create_durably, Geometry, SpaceId, StateError};

/// A parsed key file: the permutation key and the geometry of its space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpaceKey {
    /// The permutation key every node uses.
    pub key: Key,
    /// Counter width in bits.
    pub width: u32,
    /// log2 of the shard size.
    pub shard_bits: u32,
    /// IDs end in a check character (then `width` is at most 30).
    pub check_char: bool,
}

/// Why a key file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Creating the file failed (it exists, the disk is full, ...).
    #[error(transparent)]
    Create(#[from] StateError),
    /// The file is missing.
    #[error("key file {path} does not exist. Create one key per ID space with `tradeid keygen --out {path}` and copy that same file to every node")]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid key file.
    #[error(
        "key file {path} is not valid: {reason}. Copy the key file again from the node it came from; never edit it"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl SpaceKey {
    /// A new random key for a space of the given geometry.
    pub fn generate(width: u32, shard_bits: u32, check_char: bool) -> std::io::Result<SpaceKey> {
        Ok(SpaceKey { key: Key::random()?, width, shard_bits, check_char })
    }

    /// The id every node of this space records.
    pub fn space_id(&self) -> SpaceId {
        SpaceId::derive(&self.key, self.width, self.shard_bits, false, self.check_char)
    }

    /// Writes the key to `path` (mode 0600), durably, never overwriting.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyFileError> {
        Ok(create_durably(path, self.encode().as_bytes(), 0o600)?)
    }

    /// Reads and checks a key file.
    pub fn read(path: &Path) -> Result<SpaceKey, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => KeyFileError::NotFound { path: path.to_owned() },
            _ => KeyFileError::Read { path: path.to_owned(), source },
        })?;
        SpaceKey::decode(&text).map_err(|reason| KeyFileError::Invalid { path: path.to_owned(), reason })
    }

    /// The file's text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        out.push_str("# tradeid key: it defines one ID space. Every node of the space needs this same\n");
        out.push_str("# file (tradeid init --key-file). Keep it private and backed up; never edit it.\n");
        let _ = writeln!(out, "tradeid-key {FORMAT_VERSION}");
        let _ = writeln!(out, "width {}", self.width);
        let _ = writeln!(out, "shard-bits {}", self.shard_bits);
        if self.check_char {
            out.push_str("check-char yes\n");
        }
        out.push_str("key ");
        for word in self.key.0 {
            let _ = write!(out, "{word:016x}");
        }
        out.push('\n');
        let _ = writeln!(out, "space {}", self.space_id());
        out
    }

    /// Parses the text of a key file. Pure; the error says what is wrong.
    pub fn decode(text: &str) -> Result<SpaceKey, String> {
        let mut fields: Vec<(&str, &str)> = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (name, value) = line.split_once(' ').ok_or_else(|| format!("line {line:?} has no value"))?;
            if fields.iter().any(|(n, _)| *n == name) {
                return Err(format!("{name:?} appears twice"));
            }
            fields.push((name, value.trim()));
        }
        let get = |name: &str| {
            fields.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(|| format!("it has no {name:?} line"))
        };
        if let Some((name, _)) = fields.iter().find(|(n, _)| !FIELDS.contains(n)) {
            return Err(format!("unknown line {name:?}"));
        }
        let version = get("tradeid-key")?;
        if version != FORMAT_VERSION.to_string() {
            return Err(format!("format version {version} is not supported (this build reads {FORMAT_VERSION})"));
        }
        let number = |name: &str| -> Result<u32, String> {
            let v = get(name)?;
            v.parse().map_err(|_| format!("{name} {v:?} is not a number"))
        };
        let (width, shard_bits) = (number("width")?, number("shard-bits")?);
        Geometry { width, shard_bits, node: 0, nodes: 1 }.validate()?;
        let hex = get("key")?;
        if hex.len() != ROUNDS * 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("the key must be {} hex digits", ROUNDS * 16));
        }
        let mut words = [0u64; ROUNDS];
        for (i, word) in words.iter_mut().enumerate() {
            *word = u64::from_str_radix(&hex[i * 16..(i + 1) * 16], 16).expect("checked hex digits");
        }
        let check_char = match fields.iter().find(|(n, _)| *n == "check-char") {
            None => false,
            Some((_, "yes")) => true,
            Some((_, other)) => return Err(format!("check-char {other:?} must be \"yes\" (or the line left out)")),
        };
        if check_char && width > DATA_BITS {
            return Err(format!("a space with check characters has at most {DATA_BITS} bits, not {width}"));
        }
        let key = SpaceKey { key: Key(words), width, shard_bits, check_char };
        let space = get("space")?;
        if space != key.space_id().to_string() {
            return Err(format!("its space line {space} does not match its key (expected {})", key.space_id()));
        }
        Ok(key)
    }
}

const FORMAT_VERSION: u32 = 1;
const FIELDS: [&str; 6] = ["tradeid-key", "width", "shard-bits", "check-char", "key", "space"];

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SpaceKey {
        SpaceKey { key: Key([1, 2, 0xdead_beef, u64::MAX]), width: 35, shard_bits: 22, check_char: false }
    }

    #[test]
    fn round_trips_through_text() {
        let key = sample();
        assert_eq!(SpaceKey::decode(&key.encode()).unwrap(), key);
        let random = SpaceKey::generate(20, 8, false).unwrap();
        assert_eq!(SpaceKey::decode(&random.encode()).unwrap(), random);
        let checked = SpaceKey::generate(30, 22, true).unwrap();
        let text = checked.encode();
        assert!(text.contains("\ncheck-char yes\n"), "{text}");
        assert_eq!(SpaceKey::decode(&text).unwrap(), checked);
        assert!(!random.encode().contains("check-char"), "plain keys are written as before");
    }

    /// The check-character line is part of the space: removing it, or
    /// adding it to a plain key, changes the space id and is refused.
    #[test]
    fn the_check_character_line_cannot_be_added_or_removed() {
        let checked = SpaceKey { width: 30, check_char: true, ..sample() };
        let text = checked.encode();
        let removed = text.replace("check-char yes\n", "");
        assert!(SpaceKey::decode(&removed).unwrap_err().contains("does not match its key"));
        let plain = SpaceKey { width: 30, ..sample() }.encode();
        let added = plain.replace("shard-bits 22\n", "shard-bits 22\ncheck-char yes\n");
        assert!(SpaceKey::decode(&added).unwrap_err().contains("does not match its key"));
        let bad = text.replace("check-char yes", "check-char no");
        assert!(SpaceKey::decode(&bad).unwrap_err().contains("must be \"yes\""));
        let wide = SpaceKey { width: 31, check_char: true, ..sample() }.encode();
        assert!(SpaceKey::decode(&wide).unwrap_err().contains("at most 30 bits"));
    }

    #[test]
    fn any_change_is_refused() {
        let text = sample().encode();
        let key_line = text.lines().find(|l| l.starts_with("key ")).unwrap();
        let mut flipped = key_line.to_string();
        flipped.replace_range(10..11, if &key_line[10..11] == "0" { "1" } else { "0" });
        let cases = [
            (text.replace(key_line, &flipped), "does not match its key"),
            (text.replace("width 35", "width 34"), "does not match its key"),
            (text.replace("shard-bits 22", "shard-bits 21"), "does not match its key"),
            (text.replace("width 35", "width 36"), "outside"),
            (text.replace("tradeid-key 1", "tradeid-key 2"), "version 2 is not supported"),
            (text.replace(key_line, "key 12"), "64 hex digits"),
            (text.clone() + "width 35\n", "appears twice"),
            (text.clone() + "colour blue\n", "unknown line"),
            (text.lines().filter(|l| !l.starts_with("space")).collect::<Vec<_>>().join("\n"), "no \"space\" line"),
        ];
        for (bad, needle) in cases {
            let err = SpaceKey::decode(&bad).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn written_once_with_mode_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("space.key");
        let key = sample();
        key.write_new(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(SpaceKey::read(&path).unwrap(), key);
        let err = SpaceKey::generate(35, 22, false).unwrap().write_new(&path).unwrap_err();
        assert!(err.to_string().contains("already exists; refusing to overwrite"), "{err}");
        assert_eq!(SpaceKey::read(&path).unwrap(), key, "the first key is untouched");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        let missing = SpaceKey::read(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("tradeid keygen --out"), "{missing}");
    }
}
