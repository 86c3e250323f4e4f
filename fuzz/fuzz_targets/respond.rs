//! The responder on arbitrary datagrams from arbitrary sources, with an ID
//! source that may run dry or be exhausted: it must never panic, never
//! write a reply larger than its buffer or, for an untrusted source, larger
//! than 3× the request, and every reply it sends must be whole IDs or one
//! error code.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use tradeid::id::{Id, ID_LEN};
use tradeid::policy::{default_allow, default_trust, RateLimiter, SourcePolicy};
use tradeid::respond::{IdSource, Outcome, Responder};
use tradeid::GenError;

struct Source {
    next: u64,
    ready: usize,
    exhausted: bool,
}

impl IdSource for Source {
    fn try_fill(&mut self, out: &mut [u8]) -> Result<usize, GenError> {
        if self.exhausted {
            return Err(GenError::Exhausted);
        }
        let n = (out.len() / ID_LEN).min(self.ready);
        if n == 0 {
            return Err(GenError::Unavailable);
        }
        for chunk in out.chunks_exact_mut(ID_LEN).take(n) {
            chunk.copy_from_slice(&Id::from_value(self.next & ((1 << 35) - 1)).unwrap().to_bytes());
            self.next += 1;
        }
        self.ready -= n;
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    // Header: max batch (2), flags (1), ready IDs (1), source (17), clock (4).
    let Some((head, rest)) = data.split_at_checked(25) else { return };
    let max_batch = u16::from_be_bytes([head[0], head[1]]) % 9358 + 1;
    let flags = head[2];
    let ip = if flags & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(head[4], head[5], head[6], head[7]))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&head[4..20]).unwrap()))
    };
    let port = u16::from_be_bytes([head[20], head[8]]);
    let source = (flags & 2 == 0).then_some(SocketAddr::new(ip, port));
    let now = u64::from(u32::from_be_bytes([head[21], head[22], head[23], head[24]])) * 1000;
    let policy = if flags & 4 == 0 {
        SourcePolicy { allow: default_allow(), trust: default_trust() }
    } else {
        SourcePolicy { allow: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()], trust: vec![] }
    };
    let limiter = (flags & 8 != 0).then(|| RateLimiter::new(5, 3, 16, 7));
    let mut responder = Responder::new(max_batch, policy, limiter);
    let mut ids = Source { next: 0, ready: usize::from(head[3]), exhausted: flags & 16 != 0 };
    let mut reply = vec![0u8; responder.max_reply_len()];
    // The rest is one or more datagrams, each preceded by its length byte,
    // so the rate limiter sees several requests from one source.
    let mut input = rest;
    while let Some((&len, tail)) = input.split_first() {
        let len = usize::from(len).min(tail.len());
        let (datagram, tail) = tail.split_at(len);
        input = tail;
        let wire_len = if flags & 32 != 0 { len + usize::from(head[9]) } else { len };
        let trusted = flags & 4 == 0 && source.is_some_and(|s| default_trust().iter().any(|c| c.contains(s.ip())));
        let outcome = responder.respond(source, datagram, wire_len, now, &mut reply, &mut ids);
        let sent = &reply[..outcome.reply_len()];
        assert!(sent.len() <= reply.len());
        match outcome {
            Outcome::Ids { asked, ids: n, amplification_limited } => {
                assert!(n >= 1 && n <= usize::from(asked) && asked <= max_batch);
                assert!(sent.chunks_exact(ID_LEN).all(|c| Id::from_wire(c).is_some()));
                if !trusted {
                    assert!(sent.len() <= 3 * wire_len, "{} bytes for a {wire_len}-byte request", sent.len());
                }
                assert!(!amplification_limited || !trusted);
            }
            Outcome::Error(code) => assert_eq!(sent, code.reply()),
            Outcome::Drop(_) => assert!(sent.is_empty()),
        }
    }
});
