//! One worker's counters: written only by that worker (plain load and
//! store, no locked instruction per datagram), summed by the control plane
//! at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use tradeid::protocol::{ErrorCode, DEFAULT_MAX_BATCH};
use tradeid::respond::{DropReason, Outcome};

/// Upper bounds of the request-size histogram buckets (IDs asked for); the
/// last is "any".
pub(crate) const BATCH_BUCKETS: [u16; 7] = [1, 2, 4, 16, 64, DEFAULT_MAX_BATCH, u16::MAX];

/// One worker's counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams received.
    pub datagrams: AtomicU64,
    /// Requests answered with at least one ID.
    pub requests: AtomicU64,
    /// IDs sent.
    pub ids: AtomicU64,
    /// Replies cut short by the anti-amplification rule.
    pub amplification_limited: AtomicU64,
    /// Error replies, indexed by [`ErrorCode::index`].
    pub errors: [AtomicU64; ErrorCode::ALL.len()],
    /// Dropped datagrams, indexed by [`DropReason::index`].
    pub drops: [AtomicU64; DropReason::ALL.len()],
    /// Replies the kernel refused.
    pub send_failures: AtomicU64,
    /// The OS error number of the latest refused reply (0: none yet).
    pub last_send_errno: AtomicU64,
    /// Receive calls that failed (non-fatally).
    pub recv_failures: AtomicU64,
    /// Answered requests by IDs asked for, bucketed by [`BATCH_BUCKETS`].
    pub batch_sizes: [AtomicU64; BATCH_BUCKETS.len()],
    /// Advances every loop iteration (at least every read timeout).
    pub heartbeat: AtomicU64,
}

impl Counters {
    /// Counts what the responder decided for one datagram.
    #[inline]
    pub(crate) fn record(&self, outcome: &Outcome) {
        match *outcome {
            Outcome::Ids { asked, ids, amplification_limited } => {
                bump(&self.requests, 1);
                bump(&self.ids, ids as u64);
                bump(&self.batch_sizes[batch_bucket(asked)], 1);
                if amplification_limited {
                    bump(&self.amplification_limited, 1);
                }
            }
            Outcome::Error(code) => bump(&self.errors[code.index()], 1),
            Outcome::Drop(reason) => bump(&self.drops[reason.index()], 1),
        }
    }
}

/// Adds `by` to a counter only this thread writes: a plain load and store
/// is enough and avoids a locked instruction per datagram.
#[inline]
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

#[inline]
fn batch_bucket(asked: u16) -> usize {
    // The last bound is u16::MAX, so a bucket is always found.
    BATCH_BUCKETS.iter().position(|&b| asked <= b).unwrap_or(BATCH_BUCKETS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    #[test]
    fn outcomes_land_in_their_counters() {
        let c = Counters::default();
        c.record(&Outcome::Ids { asked: 175, ids: 3, amplification_limited: true });
        c.record(&Outcome::Ids { asked: 1, ids: 1, amplification_limited: false });
        c.record(&Outcome::Error(ErrorCode::Unavailable));
        c.record(&Outcome::Drop(DropReason::RateLimited));
        assert_eq!((load(&c.requests), load(&c.ids), load(&c.amplification_limited)), (2, 4, 1));
        assert_eq!(load(&c.errors[ErrorCode::Unavailable.index()]), 1);
        assert_eq!(load(&c.drops[DropReason::RateLimited.index()]), 1);
        assert_eq!(load(&c.batch_sizes[0]), 1, "asked 1");
        assert_eq!(load(&c.batch_sizes[5]), 1, "asked 175");
    }

    #[test]
    fn batch_buckets_cover_every_count() {
        assert_eq!(batch_bucket(0), 0);
        assert_eq!(batch_bucket(DEFAULT_MAX_BATCH + 1), BATCH_BUCKETS.len() - 1);
        assert_eq!(batch_bucket(u16::MAX), BATCH_BUCKETS.len() - 1);
    }

    #[test]
    fn indices_follow_the_all_lists() {
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }
}
