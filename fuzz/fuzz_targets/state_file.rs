//! The state-file decoder. Two modes, chosen by the first byte:
//! - raw: arbitrary bytes as a whole file (mostly exercises rejection, since
//!   random bytes rarely pass the header checksum);
//! - patched: a valid 4-shard file with the input applied as (offset, xor)
//!   patches, which reaches slot selection, fall-back and refusal.
//!
//! Either way it must never panic, and an accepted file's marks must be
//! within their shards; a file with one patch may only yield marks it held.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tradeid::id::Key;
use tradeid::state::{encode_slot, Geometry, Header, Snapshot};

fn pristine() -> (Vec<u8>, [[u64; 2]; 4]) {
    let geometry = Geometry { width: 6, shard_bits: 4, node: 0, nodes: 1 };
    let header = Header { geometry, sequential: false, key: Key([1, 2, 3, 4]), file_id: 7, created_unix: 0, records_space_id: true, cluster: None, check_char: false };
    let mut file = header.encode().to_vec();
    // Per shard: (older mark in slot 1 with seq 4, newer in slot 0 with seq 5).
    let marks = [[3, 7], [0, 16], [2, 5], [0, 0]];
    for (shard, [older, newer]) in marks.iter().enumerate() {
        file.extend_from_slice(&encode_slot(5, *newer, 0, 0, 7, shard as u32, 0));
        file.extend_from_slice(&encode_slot(4, *older, 0, 0, 7, shard as u32, 1));
    }
    (file, marks)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        if let Ok(snapshot) = Snapshot::decode(Path::new("fuzz.state"), rest) {
            let g = snapshot.header.geometry;
            assert_eq!(snapshot.marks.len(), g.shard_count() as usize);
            assert!(snapshot.marks.iter().all(|&m| m <= g.shard_size()));
        }
        return;
    }
    let (mut file, marks) = pristine();
    for patch in rest.chunks_exact(3) {
        let offset = usize::from(u16::from_le_bytes([patch[0], patch[1]])) % file.len();
        file[offset] ^= patch[2];
    }
    if let Ok(snapshot) = Snapshot::decode(Path::new("fuzz.state"), &file) {
        for (shard, mark) in snapshot.marks.iter().enumerate() {
            assert!(*mark <= 16);
            // CRC-32 detects every single-byte change, so one patch can only
            // make a slot fall back, never invent a mark. (Several patches
            // could be *built* into a CRC collision; the checksum guards
            // against accidents, not forgery, so that is not checked.)
            if rest.len() < 6 {
                assert!(marks[shard].contains(mark), "shard {shard}: invented mark {mark}");
            }
        }
    }
});
