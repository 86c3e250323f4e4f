//! The state-file decoder on arbitrary bytes: it must never panic, and any
//! file it accepts must have marks within their shards.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tradeid::state::{decode_shard, Header, Snapshot, SHARD_RECORD_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(snapshot) = Snapshot::decode(Path::new("fuzz.state"), data) {
        let g = snapshot.header.geometry;
        assert_eq!(snapshot.marks.len(), g.shard_count() as usize);
        assert!(snapshot.marks.iter().all(|&m| m <= g.shard_size()));
    }
    // Shard records on their own, with the file id taken from the input.
    if data.len() >= SHARD_RECORD_LEN + 8 {
        let file_id = u64::from_le_bytes(data[..8].try_into().unwrap());
        if let Ok(state) = decode_shard(&data[8..8 + SHARD_RECORD_LEN], file_id, 3, 1 << 22) {
            assert!(state.mark <= 1 << 22);
        }
    }
    let _ = Header::decode(data);
});
