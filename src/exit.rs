//! Errors a person reads, and the process exit codes they map to.

/// A configuration or usage mistake the operator must fix (exit code 78).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConfigError(pub(crate) String);

/// The node's ID space is used up (exit code 75 is wrong here: it is final).
#[derive(Debug, thiserror::Error)]
#[error("the ID space of this node is exhausted; no more IDs can be issued from this state file")]
pub(crate) struct Exhausted;

/// No server answered (exit code 69).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unreachable(pub(crate) String);

/// Maps an error chain to a process exit code (sysexits.h values).
///
/// | code | meaning |
/// |---|---|
/// | 1  | any other failure |
/// | 65 | EX_DATAERR: the state file is corrupt, or the space is exhausted |
/// | 66 | EX_NOINPUT: the state file does not exist |
/// | 69 | EX_UNAVAILABLE: the state file is locked by another process, no server answered, or etcd did not |
/// | 73 | EX_CANTCREAT: init refused (file exists, or no space) |
/// | 74 | EX_IOERR: an I/O error, including a failed flush |
/// | 77 | EX_NOPERM: etcd refused the credentials or certificate |
/// | 78 | EX_CONFIG: invalid flags or configuration |
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
        if cause.is::<Exhausted>() {
            return 65;
        }
        if cause.is::<Unreachable>() {
            return 69;
        }
        if let Some(e) = cause.downcast_ref::<crate::cluster::EtcdError>() {
            // Refused credentials are a configuration to fix; anything else
            // is etcd being unavailable.
            return if e.denied { 77 } else { 69 };
        }
    }
    1
}
