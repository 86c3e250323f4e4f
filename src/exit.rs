//! Errors a person reads, how `main` prints them (once), and the process
//! exit codes they map to.

use std::error::Error;
use std::io;
use std::path::{Path, PathBuf};

use crate::errors::{ConfigError, Exhausted, InvalidIds, Unreachable};

/// Prints a fatal error once (see [`message`]) and returns the process
/// exit code (see [`code`]).
///
/// Standard output closed early (`tradeid gen -n 100000 | head -1`) is not
/// a failure: the reader has what it wanted, so nothing is printed and the
/// code is 0, as ripgrep does.
pub fn report(err: &anyhow::Error) -> u8 {
    let stdout_closed =
        err.chain().any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe));
    if stdout_closed {
        return 0;
    }
    crate::logging::fatal(&message(err));
    code(err)
}

/// The text of a fatal error: every cause in the chain once, then what to
/// do about an OS error a person can fix (a missing directory, a refused
/// permission).
///
/// A cause whose text the message already holds is skipped: an error that
/// shows its `{source}` and also returns it as its source would otherwise
/// repeat the OS error's text.
pub(crate) fn message(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    if let Some(hint) = hint(err) {
        text.push_str(if text.ends_with('.') { " " } else { ". " });
        text.push_str(&hint);
    }
    text
}

/// What to do about the OS error at the root of `err`, if a person can fix
/// it: create a missing directory, or give the user tradeid runs as access.
fn hint(err: &anyhow::Error) -> Option<String> {
    let os_error = err.chain().find_map(|c| c.downcast_ref::<io::Error>())?;
    let path = err.chain().find_map(path_of);
    match os_error.kind() {
        io::ErrorKind::NotFound => {
            let dir = match path?.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => PathBuf::from("."),
            };
            (!dir.exists()).then(|| {
                format!(
                    "The directory {dir} does not exist; create it (`mkdir -p {dir}`) or choose a path in a directory \
                     that exists",
                    dir = dir.display()
                )
            })
        }
        io::ErrorKind::PermissionDenied => {
            let (user, who) = current_user();
            Some(match path {
                Some(path) => format!(
                    "tradeid runs as {user}, which may not access {} or a directory above it; give {who} access \
                     (chown, chmod), or run tradeid as a user that has it",
                    path.display()
                ),
                None => format!("tradeid runs as {user}; give {who} access to the file named above"),
            })
        }
        _ => None,
    }
}

/// The path a state or key file error is about: the one the user gave.
fn path_of<'a>(cause: &'a (dyn Error + 'static)) -> Option<&'a Path> {
    use tradeid::keyfile::KeyFileError;
    use tradeid::state::StateError;
    fn state_path(e: &StateError) -> Option<&Path> {
        match e {
            StateError::Io { path, .. } | StateError::Flush { path, .. } => Some(path),
            _ => None,
        }
    }
    match cause.downcast_ref::<KeyFileError>() {
        Some(KeyFileError::Read { path, .. }) => Some(path),
        Some(KeyFileError::Create(e)) => state_path(e),
        _ => cause.downcast_ref::<StateError>().and_then(state_path),
    }
}

/// The user this process runs as (its effective uid, which file access is
/// checked against), described and named: (`user NAME (uid N)`, `NAME`), or
/// (`uid N`, `uid N`) when /etc/passwd does not name it.
fn current_user() -> (String, String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // "Uid:" is followed by the real, effective, saved and file-system uids.
    let Some(uid) = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|uid| uid.parse::<u32>().ok())
    else {
        return ("the current user".into(), "that user".into());
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    match user_name(&passwd, uid) {
        Some(name) => (format!("user {name} (uid {uid})"), name.to_string()),
        None => (format!("uid {uid}"), format!("uid {uid}")),
    }
}

/// The name of `uid` in the text of /etc/passwd (`name:x:uid:...`).
fn user_name(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid && !name.is_empty()).then_some(name)
    })
}

/// Maps an error chain to a process exit code (sysexits.h values).
///
/// | code | meaning |
/// |---|---|
/// | 0  | success, or standard output closed early (`| head`): see [`report`] |
/// | 1  | any other failure, including a second SIGTERM/SIGINT while stopping |
/// | 65 | EX_DATAERR: the state file or the cluster's metadata in etcd is corrupt, the space is exhausted, or an ID given to `check` or `decode` is not valid |
/// | 66 | EX_NOINPUT: the state file does not exist |
/// | 69 | EX_UNAVAILABLE: the state file is locked by another process, a listen address (`--listen`, `--admin`, `--grpc`) is in use, no server answered, or etcd did not |
/// | 73 | EX_CANTCREAT: init refused (file exists, or no space) |
/// | 74 | EX_IOERR: an I/O error, including a failed flush |
/// | 77 | EX_NOPERM: etcd refused the credentials or certificate |
/// | 78 | EX_CONFIG: invalid flags (usage errors included: `main` maps clap's) or configuration, or a listen address that is not one of this host's |
pub fn code(err: &anyhow::Error) -> u8 {
    use tradeid::keyfile;
    use tradeid::state::StateError as S;
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
                S::NotFound { .. } | S::MirrorMissing { .. } | S::InterruptedInit { .. } => 66,
                S::Locked { .. } => 69,
                S::Exists { .. } | S::NoSpace { .. } => 73,
                S::BadHeader { .. } | S::BadShard { .. } | S::WrongSize { .. } | S::MirrorMismatch { .. } => 65,
                S::PartitionMismatch { .. } | S::UnsharedKey { .. } | S::ClusterBound { .. } => 78,
                S::Flush { .. } | S::Shrunk { .. } | S::Poisoned | S::Io { .. } => 74,
                S::Displaced { .. } => 65,
            };
        }
        if cause.is::<ConfigError>() {
            return 78;
        }
        if cause.is::<Exhausted>() || cause.is::<InvalidIds>() {
            return 65;
        }
        if cause.is::<Unreachable>() {
            return 69;
        }
        if cause.is::<crate::cluster::CorruptMeta>() {
            return 65;
        }
        if let Some(e) = cause.downcast_ref::<crate::cluster::EtcdError>() {
            // Refused credentials are a configuration to fix; anything else
            // is etcd being unavailable.
            return if e.denied { 77 } else { 69 };
        }
        if cause.is::<crate::dataplane::AddressTaken>() {
            return 69;
        }
        // Binding a listener: another process holds the address (it may
        // go away), or the address is not this host's (a setting to fix).
        match cause.downcast_ref::<io::Error>().map(io::Error::kind) {
            Some(io::ErrorKind::AddrInUse) => return 69,
            Some(io::ErrorKind::AddrNotAvailable) => return 78,
            _ => {}
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;
    use tradeid::state::StateError;

    #[test]
    fn the_os_error_is_shown_once() {
        let io = io::Error::from_raw_os_error(libc::EIO);
        let err = anyhow::Error::new(StateError::Io { what: "cannot read", path: "/x/s".into(), source: io })
            .context("opening the state");
        let text = message(&err);
        assert_eq!(text.matches("os error 5").count(), 1, "{text}");
        assert!(text.starts_with("opening the state: cannot read /x/s: "), "{text}");
    }

    #[test]
    fn a_missing_directory_is_named_with_what_to_do() {
        let io = io::Error::from(io::ErrorKind::NotFound);
        let err =
            anyhow::Error::new(StateError::Io { what: "cannot create", path: "/no/such/dir/s".into(), source: io });
        let text = message(&err);
        assert!(
            text.contains("The directory /no/such/dir does not exist; create it (`mkdir -p /no/such/dir`)"),
            "{text}"
        );
    }

    #[test]
    fn user_names_come_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        assert_eq!(user_name(passwd, 65534), Some("nobody"));
        assert_eq!(user_name(passwd, 0), Some("root"));
        assert_eq!(user_name(passwd, 1000), None);
    }

    #[test]
    fn bind_failures_have_their_own_codes() {
        let bind =
            |kind: io::ErrorKind| anyhow::Error::new(io::Error::from(kind)).context("cannot bind UDP (--listen)");
        assert_eq!(code(&bind(io::ErrorKind::AddrInUse)), 69);
        assert_eq!(code(&bind(io::ErrorKind::AddrNotAvailable)), 78);
    }
}
