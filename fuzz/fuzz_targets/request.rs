//! The request decoder on arbitrary datagrams: it must never panic, and a
//! NEXT decision must respect max-batch and come only from a datagram with
//! the magic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tradeid::protocol::{amplification_limit, decode, Decision, MAGIC, MAX_BATCH_LIMIT};

fuzz_target!(|data: &[u8]| {
    let max = match data {
        [a, b, ..] => u16::from_be_bytes([*a, *b]) % MAX_BATCH_LIMIT + 1,
        _ => 175,
    };
    let datagram = data.get(2..).unwrap_or(&[]);
    match decode(datagram, max) {
        Decision::Next { count } => {
            assert!(datagram.len() >= 8 && datagram[..2] == MAGIC);
            assert!((1..=max).contains(&count));
        }
        Decision::Error(_) => assert!(datagram.len() >= 8 && datagram[..2] == MAGIC),
        Decision::Drop(_) => assert!(datagram.len() < 8 || datagram[..2] != MAGIC),
    }
    let _ = amplification_limit(datagram.len());
});
