//! Fault injection for tests, in one place.
//!
//! The integration tests must show what happens when a disk is slow, a
//! flush fails or a worker wedges, against the real binary. These hooks do
//! that. They are read once from `TRADEID_TEST_*` environment variables,
//! and only in builds with the `test-hooks` feature, which only the
//! server's tests enable (as a dev-dependency). The switch is the feature,
//! not the profile: every build without it (`cargo build`, debug or
//! release, `cargo install`, the Debian package) compiles [`get`] to the
//! all-off value, so no flag, variable or file can reach them in
//! production; a test build has them, whatever its profile.
//!
//! | variable | effect |
//! |---|---|
//! | `TRADEID_TEST_FLUSH_DELAY_MS=N` | every block flush sleeps N ms first (a slow disk) |
//! | `TRADEID_TEST_FAIL_FLUSH_AFTER=N` | after N flushes, every flush fails with EIO (a failing disk) |
//! | `TRADEID_TEST_STALL_FILE=PATH` | while PATH exists, worker 0 is wedged (a stuck thread) |
//! | `TRADEID_TEST_STUCK_FLUSH_FILE=PATH` | while PATH exists, every block flush waits before it starts (a stuck disk) |

use std::path::PathBuf;
use std::time::Duration;

/// The faults to inject. All off by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// Sleep this long before every flush.
    pub flush_delay: Duration,
    /// After this many successful flushes, every flush fails with EIO.
    pub fail_flush_after: Option<u64>,
    /// While this file exists, worker 0 stops serving and ignores `stop`.
    pub stall_file: Option<PathBuf>,
    /// While this file exists, every flush waits before it starts.
    pub stuck_flush_file: Option<PathBuf>,
}

static OFF: TestHooks =
    TestHooks { flush_delay: Duration::ZERO, fail_flush_after: None, stall_file: None, stuck_flush_file: None };

/// The process's hooks: from the environment with `test-hooks`, else off.
pub fn get() -> &'static TestHooks {
    #[cfg(feature = "test-hooks")]
    {
        static HOOKS: std::sync::OnceLock<TestHooks> = std::sync::OnceLock::new();
        HOOKS.get_or_init(from_env)
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        &OFF
    }
}

/// Whether `worker` is wedged by the stall hook right now.
#[inline]
pub fn stalled(worker: usize) -> bool {
    match &get().stall_file {
        None => false,
        Some(path) => worker == 0 && path.exists(),
    }
}

impl TestHooks {
    /// Waits as a slow or stuck disk would before a flush.
    pub(crate) fn before_flush(&self) {
        if !self.flush_delay.is_zero() {
            std::thread::sleep(self.flush_delay);
        }
        if let Some(path) = &self.stuck_flush_file {
            while path.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(feature = "test-hooks")]
fn from_env() -> TestHooks {
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let hooks = TestHooks {
        flush_delay: Duration::from_millis(number("TRADEID_TEST_FLUSH_DELAY_MS").unwrap_or(0)),
        fail_flush_after: number("TRADEID_TEST_FAIL_FLUSH_AFTER"),
        stall_file: std::env::var_os("TRADEID_TEST_STALL_FILE").map(PathBuf::from),
        stuck_flush_file: std::env::var_os("TRADEID_TEST_STUCK_FLUSH_FILE").map(PathBuf::from),
    };
    if hooks != OFF {
        tracing::warn!(?hooks, "test hooks are active: this build injects faults and must never serve IDs");
    }
    hooks
}
