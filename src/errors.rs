//! The small error types that more than one layer returns and that
//! [`exit`](crate::exit) maps to exit codes. A leaf: it uses nothing of this
//! crate, so the data plane, the cluster code and the application all
//! return these without pointing up at `exit`.

/// A configuration or usage mistake the operator must fix (exit code 78).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ConfigError(pub(crate) String);

/// The node's ID space is used up (exit code 65: it is final, so not 75).
#[derive(Debug, thiserror::Error)]
#[error("the ID space of this node is exhausted; no more IDs can be issued from this state file")]
pub(crate) struct Exhausted;

/// Some of the IDs given to `check` or `decode` are not valid: mistyped,
/// or failing their check character (exit code 65).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct InvalidIds(pub(crate) String);

/// No server answered (exit code 69).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unreachable(pub(crate) String);

/// A second SIGTERM or SIGINT arrived while the server was stopping: the
/// process ends now (exit code 1), without waiting for the workers to
/// drain. Every ID already sent is covered by a flushed mark, so nothing
/// is lost.
#[derive(Debug, thiserror::Error)]
#[error("second signal, exiting at once")]
pub(crate) struct SecondSignal;
