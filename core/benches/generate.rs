//! In-process generation speed: permute + encode, in IDs per second on one
//! core. Run with `cargo bench -p tradeid --bench generate` (from anywhere
//! in the workspace). Prints one line per case.
//!
//! Cases:
//! - `permute+encode`: the pure hot loop over a counter range.
//! - `handle.fill(175)`: the generator's bulk path (blocks, prefetch, flushes).
//! - `handle.next_id()`: one ID per call.
//!
//! Each is run twice, side by side: for a plain 35-bit space, then (`+check`)
//! for a 30-bit space whose IDs end in a check character.
//!
//! `cargo bench -p tradeid --bench generate -- --fixed [--check]` instead
//! does a fixed amount of work (10,000 fills of 175 IDs; `--check`: with
//! check characters) with no timing, for instruction counting:
//! `valgrind --tool=callgrind target/release/deps/generate-* --fixed`, then
//! `callgrind_annotate --inclusive=yes` and read `Handle::fill`. Unlike
//! seconds on a shared VM, instruction counts repeat exactly.

use std::hint::black_box;
use std::time::{Duration, Instant};

use tradeid::check;
use tradeid::id::{encode_into, Key, Permutation, Scheme, ID_LEN, MAX_WIDTH};
use tradeid::state::{create, Geometry, Header, Store};
use tradeid::{Generator, GeneratorConfig};

const RUN: Duration = Duration::from_secs(2);

fn main() {
    if std::env::args().any(|a| a == "--fixed") {
        return fixed_work(std::env::args().any(|a| a == "--check"));
    }
    pin_to_cpu0();
    let key = Key([0x1234, 0x5678, 0x9abc, 0xdef0]);
    let plain = Scheme::plain(Permutation::keyed(MAX_WIDTH, key));
    let checked = Scheme::with_check_char(Permutation::keyed(check::DATA_BITS, key));
    for (suffix, scheme) in [("", plain), ("+check", checked)] {
        let mut buf = vec![0u8; 4096 * ID_LEN];
        let mut counter = 0u64;
        report(&format!("permute+encode{suffix}"), || {
            for chunk in buf.chunks_exact_mut(ID_LEN) {
                encode_into(scheme.id_value(counter), chunk.try_into().unwrap());
                counter = (counter + 1) & ((1 << 30) - 1);
            }
            black_box(&buf);
            4096
        });
    }
    for (suffix, check_char, width) in [("", false, MAX_WIDTH), ("+check", true, check::DATA_BITS)] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("bench.state");
        let geometry = Geometry { width, ..Geometry::DEFAULT };
        let header = Header { check_char, ..Header::new(geometry, false).unwrap() };
        create(std::slice::from_ref(&path), &header).unwrap();
        let (store, _) = Store::open(&[path]).unwrap();
        let generator = Generator::new(store, GeneratorConfig::default());
        let mut handle = generator.handle().unwrap();
        let mut reply = [0u8; 175 * ID_LEN];
        report(&format!("handle.fill(175){suffix}"), || {
            for _ in 0..64 {
                handle.fill(&mut reply).unwrap();
                black_box(&reply);
            }
            64 * 175
        });
        report(&format!("handle.next_id(){suffix}"), || {
            for _ in 0..4096 {
                black_box(handle.next_id().unwrap());
            }
            4096
        });
    }
}

/// 10,000 fills of 175 IDs through a real generator, untimed.
/// With `check`, in a space whose IDs end in a check character.
fn fixed_work(check_char: bool) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bench.state");
    let width = if check_char { check::DATA_BITS } else { MAX_WIDTH };
    let header = Header { check_char, ..Header::new(Geometry { width, ..Geometry::DEFAULT }, false).unwrap() };
    create(std::slice::from_ref(&path), &header).unwrap();
    let (store, _) = Store::open(&[path]).unwrap();
    let config = GeneratorConfig { block_min: 1 << 20, block_max: 1 << 22, ..GeneratorConfig::default() };
    let generator = Generator::new(store, config);
    let mut handle = generator.handle().unwrap();
    let mut reply = [0u8; 175 * ID_LEN];
    for _ in 0..10_000 {
        handle.fill(&mut reply).unwrap();
        black_box(&reply);
    }
}

/// Runs `batch` (which returns how many IDs it made) for `RUN` and prints
/// the rate. The first quarter is warm-up and is not counted.
fn report(name: &str, mut batch: impl FnMut() -> u64) {
    let warm = Instant::now();
    while warm.elapsed() < RUN / 4 {
        batch();
    }
    let start = Instant::now();
    let mut ids = 0u64;
    while start.elapsed() < RUN {
        ids += batch();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{name:<24} {:>8.1} M IDs/s  ({:.2} ns/ID)", ids as f64 / secs / 1e6, secs * 1e9 / ids as f64);
}

fn pin_to_cpu0() {
    // Best effort: numbers are per core, so keep the thread on one.
    let _ = std::process::Command::new("taskset").args(["-pc", "0", &std::process::id().to_string()]).output();
}
