//! The per-datagram responder: every decision about one request datagram,
//! in one pure function, after ntp-proto's `Server::handle`.
//!
//! Given who sent a datagram, its bytes, its true length on the wire and a
//! reply buffer, [`Responder::respond`] either writes a reply and says how
//! long it is, or says why nothing is sent. In order:
//!
//! 1. the source must be one a reply may go to (no port 0, broadcast,
//!    multicast or unspecified address);
//! 2. it must be in the allowlist;
//! 3. it must be within its prefix's rate limit, if one is set;
//! 4. the bytes must decode ([`protocol::decode`]): garbage is dropped,
//!    bad versions, opcodes and counts get an error reply;
//! 5. an untrusted source gets at most 3× its request's bytes back;
//! 6. the IDs come from an [`IdSource`] that never blocks: no block ready
//!    means `!ERR503`, an exhausted space `!ERR507`.
//!
//! The socket loop around it only receives, calls this, records the
//! [`Outcome`] and sends. Nothing here touches a socket, allocates or logs,
//! so every rule is unit-tested and fuzzed without a network.

use std::net::SocketAddr;
use std::time::Instant;

use crate::generator::{GenError, Handle};
use crate::id::ID_LEN;
use crate::policy::{self, RateLimiter, SourcePolicy};
use crate::protocol::{self, Decision, ErrorCode, Malformed};

/// Where the responder gets IDs: a generator [`Handle`] in the server, or
/// anything else in tests and fuzzing.
pub trait IdSource {
    /// Writes up to `out.len() / 7` IDs without waiting and returns how
    /// many; fewer than asked means no more are ready right now. Errors only
    /// when not even one could be written.
    fn try_fill(&mut self, out: &mut [u8]) -> Result<usize, GenError>;
}

impl IdSource for Handle {
    #[inline]
    fn try_fill(&mut self, out: &mut [u8]) -> Result<usize, GenError> {
        Handle::try_fill(self, out)
    }
}

/// What to do with one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the first `ids × 7` bytes of the reply buffer.
    Ids {
        /// IDs the request asked for (after "0 means 1").
        asked: u16,
        /// IDs written (fewer than asked if cut or if a block ran out).
        ids: usize,
        /// Whether the 3× rule cut the reply.
        amplification_limited: bool,
    },
    /// Send this error (7 bytes, already in the reply buffer).
    Error(ErrorCode),
    /// Send nothing.
    Drop(DropReason),
}

impl Outcome {
    /// How many bytes of the reply buffer to send (0: none).
    #[inline]
    pub fn reply_len(&self) -> usize {
        match self {
            Outcome::Ids { ids, .. } => ids * ID_LEN,
            Outcome::Error(_) => protocol::ERROR_LEN,
            Outcome::Drop(_) => 0,
        }
    }
}

/// Why a datagram got no reply at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than 8 bytes.
    Short,
    /// Does not start with the magic.
    BadMagic,
    /// From port 0, a broadcast, multicast or unspecified address, or an
    /// address family we cannot reply to.
    BadSource,
    /// From a source outside the allowlist.
    NotAllowed,
    /// Over the per-prefix rate limit.
    RateLimited,
}

impl DropReason {
    /// Every reason, in metrics order.
    pub const ALL: [DropReason; 5] = [
        DropReason::Short,
        DropReason::BadMagic,
        DropReason::BadSource,
        DropReason::NotAllowed,
        DropReason::RateLimited,
    ];

    /// Position in [`DropReason::ALL`] (declaration order), for counters.
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Short => "short",
            DropReason::BadMagic => "bad_magic",
            DropReason::BadSource => "bad_source",
            DropReason::NotAllowed => "not_allowed",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

impl From<Malformed> for DropReason {
    fn from(m: Malformed) -> DropReason {
        match m {
            Malformed::Short => DropReason::Short,
            Malformed::BadMagic => DropReason::BadMagic,
        }
    }
}

/// One worker's responder: its limits, source policy and rate limiter.
pub struct Responder {
    max_batch: u16,
    policy: SourcePolicy,
    limiter: Option<RateLimiter>,
    epoch: Instant,
}

impl Responder {
    /// A responder that answers requests of up to `max_batch` IDs from the
    /// sources `policy` allows, each prefix limited by `limiter` if given.
    pub fn new(max_batch: u16, policy: SourcePolicy, limiter: Option<RateLimiter>) -> Responder {
        Responder { max_batch, policy, limiter, epoch: Instant::now() }
    }

    /// The largest reply this responder writes, in bytes: the size of the
    /// reply buffer to pass to [`respond`](Self::respond).
    pub fn max_reply_len(&self) -> usize {
        usize::from(self.max_batch).max(1) * ID_LEN
    }

    /// Nanoseconds since this responder was made: the clock to pass to
    /// [`respond`](Self::respond). Read it once per batch of datagrams.
    #[inline]
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Decides what to do with one datagram and writes the reply, if any,
    /// into the start of `reply` (which must hold
    /// [`max_reply_len`](Self::max_reply_len) bytes).
    ///
    /// `source` is `None` if the sender's address could not be read;
    /// `payload` is the bytes received (possibly cut short) and `wire_len`
    /// the datagram's true length, which the 3× rule needs; `now` comes
    /// from [`now`](Self::now).
    #[inline]
    pub fn respond(
        &mut self,
        source: Option<SocketAddr>,
        payload: &[u8],
        wire_len: usize,
        now: u64,
        reply: &mut [u8],
        ids: &mut impl IdSource,
    ) -> Outcome {
        let Some(source) = source.filter(|s| policy::valid_source(*s)) else {
            return Outcome::Drop(DropReason::BadSource);
        };
        let ip = source.ip();
        if !self.policy.allowed(ip) {
            return Outcome::Drop(DropReason::NotAllowed);
        }
        if let Some(limiter) = self.limiter.as_mut() {
            if !limiter.allow_at(ip, now) {
                return Outcome::Drop(DropReason::RateLimited);
            }
        }
        let asked = match protocol::decode(payload, self.max_batch) {
            Decision::Next { count } => count,
            Decision::Error(code) => return error(reply, code),
            Decision::Drop(malformed) => return Outcome::Drop(malformed.into()),
        };
        let mut allowed = usize::from(asked);
        let mut amplification_limited = false;
        if !self.policy.trusted(ip) {
            let limit = protocol::amplification_limit(wire_len);
            if limit < allowed {
                allowed = limit;
                amplification_limited = true;
            }
        }
        match ids.try_fill(&mut reply[..allowed * ID_LEN]) {
            Ok(filled) => Outcome::Ids { asked, ids: filled, amplification_limited },
            Err(GenError::Exhausted) => error(reply, ErrorCode::Exhausted),
            // A storage failure aborts the server before a handle can see
            // it; a library user without that abort gets "retry later".
            Err(GenError::Unavailable | GenError::Closed | GenError::Storage(_)) => {
                error(reply, ErrorCode::Unavailable)
            }
        }
    }
}

fn error(reply: &mut [u8], code: ErrorCode) -> Outcome {
    reply[..protocol::ERROR_LEN].copy_from_slice(&code.reply());
    Outcome::Error(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;
    use crate::policy::{default_allow, default_trust, Cidr};
    use crate::protocol::{encode_request, padded_len, REQUEST_LEN};

    /// Counts up from 0, with a limit on how many IDs are ready.
    struct Counter {
        next: u64,
        ready: usize,
        exhausted: bool,
    }

    impl Counter {
        fn plenty() -> Counter {
            Counter { next: 0, ready: usize::MAX, exhausted: false }
        }
    }

    impl IdSource for Counter {
        fn try_fill(&mut self, out: &mut [u8]) -> Result<usize, GenError> {
            if self.exhausted {
                return Err(GenError::Exhausted);
            }
            let n = (out.len() / ID_LEN).min(self.ready);
            if n == 0 {
                return Err(GenError::Unavailable);
            }
            for chunk in out.chunks_exact_mut(ID_LEN).take(n) {
                chunk.copy_from_slice(&Id::from_value(self.next).unwrap().to_bytes());
                self.next += 1;
            }
            self.ready -= n;
            Ok(n)
        }
    }

    fn request(count: u16, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len.max(REQUEST_LEN)];
        encode_request(count, &mut buf);
        buf
    }

    fn responder(policy: SourcePolicy, limiter: Option<RateLimiter>) -> Responder {
        Responder::new(175, policy, limiter)
    }

    fn defaults() -> SourcePolicy {
        SourcePolicy { allow: default_allow(), trust: default_trust() }
    }

    fn src(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    /// Runs one datagram through `r` and returns the outcome and reply bytes.
    fn ask(r: &mut Responder, from: Option<SocketAddr>, datagram: &[u8], ids: &mut Counter) -> (Outcome, Vec<u8>) {
        let mut reply = vec![0u8; r.max_reply_len()];
        let outcome = r.respond(from, datagram, datagram.len(), 1, &mut reply, ids);
        reply.truncate(outcome.reply_len());
        (outcome, reply)
    }

    #[test]
    fn a_trusted_source_gets_the_whole_batch() {
        let mut r = responder(defaults(), None);
        let mut ids = Counter::plenty();
        let (outcome, reply) = ask(&mut r, src("127.0.0.1:5000"), &request(175, 8), &mut ids);
        assert_eq!(outcome, Outcome::Ids { asked: 175, ids: 175, amplification_limited: false });
        assert_eq!(reply.len(), 175 * 7);
        assert!(reply.chunks(7).all(|c| Id::from_wire(c).is_some()));
        let (outcome, _) = ask(&mut r, src("[::1]:5000"), &request(0, 8), &mut ids);
        assert_eq!(outcome, Outcome::Ids { asked: 1, ids: 1, amplification_limited: false }, "0 means 1");
    }

    #[test]
    fn bad_sources_are_dropped_before_anything_else() {
        let mut r = responder(defaults(), None);
        let mut ids = Counter::plenty();
        for bad in ["10.0.0.1:0", "255.255.255.255:53", "224.0.0.1:53", "[ff02::1]:53", "0.0.0.0:53"] {
            let (outcome, reply) = ask(&mut r, src(bad), &request(1, 8), &mut ids);
            assert_eq!(outcome, Outcome::Drop(DropReason::BadSource), "{bad}");
            assert!(reply.is_empty());
        }
        assert_eq!(ask(&mut r, None, &request(1, 8), &mut ids).0, Outcome::Drop(DropReason::BadSource));
        assert_eq!(ids.next, 0, "no ID was drawn");
    }

    #[test]
    fn the_allowlist_is_checked_before_decoding() {
        let only_ten = SourcePolicy { allow: vec!["10.0.0.0/8".parse().unwrap()], trust: default_trust() };
        let mut r = responder(only_ten, None);
        let mut ids = Counter::plenty();
        assert_eq!(
            ask(&mut r, src("127.0.0.1:5000"), &request(1, 8), &mut ids).0,
            Outcome::Drop(DropReason::NotAllowed)
        );
        // Even garbage from outside the allowlist is counted as not allowed.
        assert_eq!(ask(&mut r, src("8.8.8.8:53"), b"xx", &mut ids).0, Outcome::Drop(DropReason::NotAllowed));
        assert!(matches!(ask(&mut r, src("10.1.2.3:5000"), &request(1, 8), &mut ids).0, Outcome::Ids { ids: 1, .. }));
    }

    #[test]
    fn the_three_times_rule_cuts_untrusted_replies_to_the_request_size() {
        let mut r = responder(SourcePolicy { allow: default_allow(), trust: vec![] }, None);
        let mut ids = Counter::plenty();
        let (outcome, reply) = ask(&mut r, src("10.0.0.1:5000"), &request(175, 8), &mut ids);
        assert_eq!(outcome, Outcome::Ids { asked: 175, ids: 3, amplification_limited: true });
        assert_eq!(reply.len(), 21);
        for count in [4u16, 16, 175] {
            let padded = request(count, padded_len(count));
            let (outcome, reply) = ask(&mut r, src("10.0.0.1:5000"), &padded, &mut ids);
            assert_eq!(outcome, Outcome::Ids { asked: count, ids: usize::from(count), amplification_limited: false });
            assert!(reply.len() <= 3 * padded.len());
            let short = &padded[..padded.len() - 1];
            let (outcome, reply) = ask(&mut r, src("10.0.0.1:5000"), short, &mut ids);
            assert!(reply.len() <= 3 * short.len() && reply.len() < 7 * usize::from(count), "{outcome:?}");
        }
        // The true wire length counts, not the bytes kept.
        let mut reply = vec![0u8; r.max_reply_len()];
        let outcome = r.respond(src("10.0.0.1:5000"), &request(175, 8), 409, 1, &mut reply, &mut ids);
        assert_eq!(outcome, Outcome::Ids { asked: 175, ids: 175, amplification_limited: false });
    }

    #[test]
    fn errors_map_to_their_codes() {
        let mut r = responder(defaults(), None);
        let from = src("127.0.0.1:5000");
        let mut ids = Counter::plenty();
        let cases: [(&[u8], Outcome); 5] = [
            (b"ID\x02\x01\x00\x01\x00\x00", Outcome::Error(ErrorCode::BadVersion)),
            (b"ID\x01\x07\x00\x01\x00\x00", Outcome::Error(ErrorCode::UnknownOpcode)),
            (&request(176, 8), Outcome::Error(ErrorCode::TooMany)),
            (b"ID\x01", Outcome::Drop(DropReason::Short)),
            (b"XD\x01\x01\x00\x01\x00\x00", Outcome::Drop(DropReason::BadMagic)),
        ];
        for (datagram, expected) in cases {
            let (outcome, reply) = ask(&mut r, from, datagram, &mut ids);
            assert_eq!(outcome, expected);
            if let Outcome::Error(code) = expected {
                assert_eq!(reply, code.reply());
            }
        }
        let mut dry = Counter { next: 0, ready: 0, exhausted: false };
        let (outcome, reply) = ask(&mut r, from, &request(5, 8), &mut dry);
        assert_eq!((outcome, reply.as_slice()), (Outcome::Error(ErrorCode::Unavailable), b"!ERR503".as_slice()));
        let mut done = Counter { next: 0, ready: 10, exhausted: true };
        let (outcome, reply) = ask(&mut r, from, &request(5, 8), &mut done);
        assert_eq!((outcome, reply.as_slice()), (Outcome::Error(ErrorCode::Exhausted), b"!ERR507".as_slice()));
        // A block that runs out mid-request gives a short reply, not an error.
        let mut short = Counter { next: 0, ready: 2, exhausted: false };
        assert_eq!(
            ask(&mut r, from, &request(5, 8), &mut short).0,
            Outcome::Ids { asked: 5, ids: 2, amplification_limited: false }
        );
    }

    #[test]
    fn rate_limits_apply_per_prefix_and_refill_with_time() {
        let limiter = RateLimiter::new(10, 5, 64, 1);
        let mut r = responder(defaults(), Some(limiter));
        let mut ids = Counter::plenty();
        let mut reply = vec![0u8; r.max_reply_len()];
        let mut at = |r: &mut Responder, from: &str, now: u64| {
            let datagram = request(1, 8);
            r.respond(src(from), &datagram, 8, now, &mut reply, &mut ids)
        };
        for _ in 0..5 {
            assert!(matches!(at(&mut r, "10.9.9.1:1", 1_000), Outcome::Ids { .. }));
        }
        assert_eq!(at(&mut r, "10.9.9.2:1", 1_000), Outcome::Drop(DropReason::RateLimited), "same /24");
        assert!(matches!(at(&mut r, "10.9.8.1:1", 1_000), Outcome::Ids { .. }), "another /24");
        assert!(matches!(at(&mut r, "10.9.9.1:1", 100_001_000), Outcome::Ids { .. }), "refilled after 100 ms");
    }

    #[test]
    fn nothing_panics_and_no_reply_exceeds_its_limits() {
        // A cheap deterministic sweep here; the fuzz target goes further.
        let policy = SourcePolicy { allow: vec!["0.0.0.0/0".parse::<Cidr>().unwrap()], trust: vec![] };
        let mut r = Responder::new(20, policy, None);
        let mut ids = Counter::plenty();
        let mut reply = vec![0u8; r.max_reply_len()];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut datagram: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if x & 1 == 0 && len >= 2 {
                datagram[..2].copy_from_slice(b"ID");
            }
            let outcome = r.respond(src("192.0.2.1:9"), &datagram, len, 0, &mut reply, &mut ids);
            assert!(outcome.reply_len() <= 3 * len.max(1), "{outcome:?} for {len} bytes");
            if let Outcome::Ids { ids, asked, .. } = outcome {
                assert!(ids >= 1 && ids <= usize::from(asked) && asked <= 20);
            }
        }
    }
}
