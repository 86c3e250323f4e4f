//! Matching replies to requests, judging replies, and finding duplicates.
//!
//! Replies carry no request tag, so each socket matches replies to its
//! outstanding requests in FIFO order: the first reply answers the oldest
//! request. When a request is lost, later replies are matched to older
//! send times, which can only *overstate* latency, and the newest
//! outstanding request is the one that eventually times out and is counted
//! as lost.

use std::collections::VecDeque;

use tradeid::client::{classify, Reply};
use tradeid::id::{Id, ID_LEN};
use tradeid::protocol::ErrorCode;

/// How replies are judged.
#[derive(Clone, Debug)]
pub(crate) enum Expect {
    /// tradeid protocol: IDs (counted) or `!ERRnnn` (counted by code).
    Tradeid,
    /// Raw mode: any reply of exactly this length is good.
    Length(usize),
}

/// What one reply was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A good reply carrying this many IDs (1 in raw mode).
    Good(usize),
    /// An error reply.
    Error(ErrorCode),
    /// Not a well-formed reply.
    Malformed,
}

impl Expect {
    pub(crate) fn judge(&self, reply: &[u8]) -> Verdict {
        match self {
            Expect::Length(n) => {
                if reply.len() == *n {
                    Verdict::Good(1)
                } else {
                    Verdict::Malformed
                }
            }
            Expect::Tradeid => match classify(reply) {
                Reply::Ids => Verdict::Good(reply.len() / ID_LEN),
                Reply::Error(code) => Verdict::Error(code),
                Reply::Malformed => Verdict::Malformed,
            },
        }
    }
}

/// The outstanding requests of one socket, oldest first, by send time.
#[derive(Default)]
pub(crate) struct InFlight {
    times: VecDeque<u64>,
}

impl InFlight {
    pub(crate) fn push(&mut self, sent_at: u64) {
        self.times.push_back(sent_at);
    }

    /// Matches a reply: the send time of the oldest outstanding request.
    /// `None` means a reply with nothing outstanding (a late reply to a
    /// request already counted as lost, or a network duplicate).
    pub(crate) fn pop(&mut self) -> Option<u64> {
        self.times.pop_front()
    }

    /// Drops requests sent before `deadline`; returns how many.
    pub(crate) fn expire(&mut self, deadline: u64) -> usize {
        let mut lost = 0;
        while self.times.front().is_some_and(|&t| t < deadline) {
            self.times.pop_front();
            lost += 1;
        }
        lost
    }

    pub(crate) fn len(&self) -> usize {
        self.times.len()
    }
}

/// Counts duplicates among collected ID values (sorts in place).
pub(crate) fn count_duplicates(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values.windows(2).filter(|w| w[0] == w[1]).count() as u64
}

/// The ID values in a good tradeid reply.
pub(crate) fn id_values(reply: &[u8]) -> impl Iterator<Item = u64> + '_ {
    reply.chunks_exact(ID_LEN).filter_map(|c| Id::from_wire(c).map(Id::value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_mode_counts_only_the_expected_length() {
        let expect = Expect::Length(7);
        assert_eq!(expect.judge(b"1234567"), Verdict::Good(1));
        assert_eq!(expect.judge(b"123456"), Verdict::Malformed);
        assert_eq!(expect.judge(b"12345678"), Verdict::Malformed);
    }

    #[test]
    fn tradeid_mode_counts_ids_and_errors() {
        let expect = Expect::Tradeid;
        assert_eq!(expect.judge(b"B762F00ZZZZZZZ"), Verdict::Good(2));
        assert_eq!(expect.judge(b"!ERR503"), Verdict::Error(ErrorCode::Unavailable));
        assert_eq!(expect.judge(b"B762F0"), Verdict::Malformed);
        assert_eq!(expect.judge(b"b762f00"), Verdict::Malformed);
    }

    #[test]
    fn replies_match_in_order_and_expiry_counts_losses() {
        let mut f = InFlight::default();
        for t in [10, 20, 30, 40] {
            f.push(t);
        }
        assert_eq!(f.pop(), Some(10));
        assert_eq!(f.expire(35), 2, "20 and 30 timed out");
        assert_eq!(f.len(), 1);
        assert_eq!(f.pop(), Some(40));
        assert_eq!(f.pop(), None, "a late reply has nothing to match");
    }

    #[test]
    fn duplicates_are_counted() {
        let mut v = vec![5, 1, 3, 5, 2, 3, 5];
        assert_eq!(count_duplicates(&mut v), 3);
        assert_eq!(count_duplicates(&mut [1, 2, 3]), 0);
        let values: Vec<u64> = id_values(b"0000001000000A").collect();
        assert_eq!(values, vec![1, 10]);
    }
}
