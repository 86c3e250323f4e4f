//! The optional check character: the 7th character of an ID in a space made
//! with `init --check-char`, computed from the first six. It catches every
//! single mistyped character and every swap of two neighbours, so a lookup
//! refuses a typo instead of returning another trade.
//!
//! This module is pure: tables built at compile time, no I/O, no state.
//!
//! # The scheme
//!
//! Damm's check-digit method over a totally anti-symmetric quasigroup of
//! order 32, the size of the alphabet. The quasigroup is
//!
//! ```text
//! x ∘ y = 2·x ⊕ y        in GF(32) = GF(2)[t] / (t⁵ + t² + 1)
//! ```
//!
//! where `2` is the field element `t` and `⊕` is addition (XOR). This is
//! the construction H. Michael Damm gives for every prime-power order:
//! `x ∘ y = a·x + y` over GF(q) with `a ∉ {0, 1}` is a totally
//! anti-symmetric quasigroup (Damm, *Total anti-symmetrische Quasigruppen*,
//! dissertation, Philipps-Universität Marburg, 2004, Beispiel 5.2; see also
//! Damm, "Totally anti-symmetric quasigroups for all orders n ≠ 2, 6",
//! *Discrete Mathematics* 307 (2007) 715–729). Why it works:
//!
//! - **Quasigroup** (a Latin square): for fixed `x`, `y ↦ 2x ⊕ y` is a
//!   bijection; for fixed `y`, `x ↦ 2x ⊕ y` is one because `2 ≠ 0`.
//! - **Total anti-symmetry**: `(c∘x)∘y = (c∘y)∘x` means
//!   `4c ⊕ 2x ⊕ y = 4c ⊕ 2y ⊕ x`, i.e. `3·(x ⊕ y) = 0`, so `x = y`
//!   because `3 = 2 ⊕ 1 ≠ 0`. Likewise `x∘y = y∘x` forces `x = y`.
//!
//! Damm's method runs an interim value through the characters: start at 0,
//! then `s ← s ∘ d` for each character `d`. The check character `c` of six
//! data characters is the one that brings the interim to 0: `r ∘ c = 0`,
//! i.e. `c = 2·r`. A 7-character ID is valid iff its full run ends at 0.
//!
//! - A changed character at any position (the check character included)
//!   changes the interim there (Latin rows), and every later step is a
//!   bijection of the interim (Latin columns), so the run cannot end at 0.
//! - Two different neighbours swapped change `(s∘x)∘y` into `(s∘y)∘x`,
//!   which differ by total anti-symmetry; again the rest cannot undo it.
//!
//! The tests prove both properties exhaustively: every position, every
//! interim value that a prefix can lead to (all 32), every pair of symbols.
//!
//! # Speed
//!
//! The run is linear over GF(2): the check character is the XOR of the
//! contributions of the six characters, `2^(7-k)·d_k`. So it costs three
//! look-ups of 10-bit chunks of the 30-bit data value, precomputed here.

use crate::alphabet::{ALPHABET, PAIRS};

/// Bits of data an ID with a check character carries: 6 characters × 5.
pub const DATA_BITS: u32 = 30;

/// The check character's value (0..32) for 30 bits of data (the first six
/// characters' values, most significant first).
#[inline(always)]
pub fn check_value(data: u64) -> u64 {
    debug_assert!(data >> DATA_BITS == 0);
    u64::from(
        CONTRIB[0][(data >> 20) as usize & 1023]
            ^ CONTRIB[1][(data >> 10) as usize & 1023]
            ^ CONTRIB[2][data as usize & 1023],
    )
}

/// The 35-bit value of the ID that carries `data` (30 bits) and its check
/// character.
#[inline(always)]
pub fn with_check(data: u64) -> u64 {
    data << 5 | check_value(data)
}

/// The 7 characters of the ID carrying `data` (30 bits) and its check
/// character, in the low 7 bytes of a little-endian word, as
/// [`encode_word`](crate::id::encode_word) gives them for plain IDs.
///
/// The hot path of check-character spaces. The three 10-bit chunks of the
/// data are both the pairs of characters 1-2, 3-4, 5-6 and the inputs of
/// the check's three contributions, so one table entry holds both, the
/// contribution placed so that, once the three entries are shifted to
/// their characters' places and XORed together, the three contributions
/// land on the same bits (56-60) and XOR into the check value there. The
/// check character then costs one alphabet look-up and a mask more than a
/// plain ID.
#[inline(always)]
pub fn encode_word_checked(data: u64) -> u64 {
    debug_assert!(data >> DATA_BITS == 0);
    let a = PAIRS_AND_CONTRIB[0][(data >> 20) as usize & 1023];
    let b = PAIRS_AND_CONTRIB[1][(data >> 10) as usize & 1023];
    let c = PAIRS_AND_CONTRIB[2][data as usize & 1023];
    let w = a ^ b << 16 ^ c << 32;
    (w & 0xffff_ffff_ffff) | u64::from(ALPHABET[(w >> CHECK_AT) as usize & 31]) << 48
}

/// Whether a 35-bit ID value ends in the right check character.
#[inline]
pub fn is_valid(value: u64) -> bool {
    interim(value, 7) == 0
}

/// Damm's run over the top `len` of the 7 characters of `value`, done the
/// slow way, one quasigroup step per character. The definition the fast
/// path is tested against.
fn interim(value: u64, len: u32) -> u8 {
    (0..len).fold(0, |s, k| op(s, ((value >> (5 * (6 - k))) & 31) as u8))
}

/// The quasigroup operation `x ∘ y = 2·x ⊕ y`.
const fn op(x: u8, y: u8) -> u8 {
    mul2(x) ^ y
}

/// Multiplication by `t` in GF(32) modulo `t⁵ + t² + 1` (binary 100101).
const fn mul2(x: u8) -> u8 {
    let shifted = x << 1;
    if shifted & 32 != 0 {
        (shifted ^ 0b10_0101) & 31
    } else {
        shifted
    }
}

/// `CONTRIB[j][v]`: what two data characters of value `v` (10 bits) at
/// character positions `2j+1` and `2j+2` (1-based, of six) add to the
/// check character. Character `k` contributes `2^(7-k)·d_k`, which is what
/// a run from an interim of 0 over `d_k` followed by `7-k` zeros gives.
const CONTRIB: [[u8; 1024]; 3] = {
    let mut table = [[0u8; 1024]; 3];
    let mut j = 0;
    while j < 3 {
        let mut v = 0;
        while v < 1024 {
            let (hi, lo) = ((v >> 5) as u8, (v & 31) as u8);
            // Run hi, lo, then the zeros that follow them up to position 7.
            let mut s = op(op(0, hi), lo);
            let mut k = 2 * j + 2;
            while k < 7 {
                s = op(s, 0);
                k += 1;
            }
            table[j][v] = s;
            v += 1;
        }
        j += 1;
    }
    table
};

/// Where the check value sits in a word of [`encode_word_checked`] before
/// it is replaced by its character.
const CHECK_AT: u32 = 56;

/// `PAIRS_AND_CONTRIB[j][v]`: the two characters of the 10-bit chunk `v`
/// (as [`crate::id`]'s pair table has them) in the low 16 bits, and its
/// contribution at chunk `j` to the check character at bit
/// `CHECK_AT - 16·j`, which the chunk's shift to its place (by `16·j`)
/// moves to `CHECK_AT`.
static PAIRS_AND_CONTRIB: [[u64; 1024]; 3] = {
    let mut table = [[0u64; 1024]; 3];
    let mut j = 0;
    while j < 3 {
        let mut v = 0;
        while v < 1024 {
            table[j][v] = PAIRS[v] as u64 | (CONTRIB[j][v] as u64) << (CHECK_AT - 16 * j as u32);
            v += 1;
        }
        j += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;

    /// Every row and every column of the operation table is a permutation.
    #[test]
    fn the_operation_is_a_quasigroup() {
        for x in 0..32u8 {
            let mut row = [false; 32];
            let mut column = [false; 32];
            for y in 0..32u8 {
                row[op(x, y) as usize] = true;
                column[op(y, x) as usize] = true;
            }
            assert!(row.iter().all(|&b| b), "row {x} repeats a value");
            assert!(column.iter().all(|&b| b), "column {x} repeats a value");
        }
    }

    /// `(c∘x)∘y = (c∘y)∘x ⇒ x = y` and `x∘y = y∘x ⇒ x = y`, for all 32³.
    #[test]
    fn the_quasigroup_is_totally_anti_symmetric() {
        for x in 0..32u8 {
            for y in 0..32u8 {
                if x != y {
                    assert_ne!(op(x, y), op(y, x), "{x}∘{y} commutes");
                    for c in 0..32u8 {
                        assert_ne!(op(op(c, x), y), op(op(c, y), x), "c={c} x={x} y={y}");
                    }
                }
            }
        }
    }

    /// Every interim value is reached by some prefix of every length ≥ 1,
    /// so checking all 32 interim values at a position covers every prefix.
    #[test]
    fn every_interim_value_is_reachable_after_one_character() {
        let reached: std::collections::HashSet<u8> = (0..32u8).map(|d| op(0, d)).collect();
        assert_eq!(reached.len(), 32);
    }

    /// Runs characters `from..7` of `digits` from interim `s`.
    fn run_from(mut s: u8, digits: &[u8; 7], from: usize) -> u8 {
        for &d in &digits[from..] {
            s = op(s, d);
        }
        s
    }

    /// Every single substitution at every position (the check character's
    /// included), after every prefix, is detected: exhaustive over the
    /// position, the interim value the prefix leads to, the original
    /// symbol and its replacement; the characters after it (which cannot
    /// undo the change, each step being a bijection of the interim) are
    /// exercised with every symbol in turn.
    #[test]
    fn every_single_substitution_is_detected() {
        for position in 0..7 {
            // Position 0 is always reached from interim 0.
            let interims: Vec<u8> = if position == 0 { vec![0] } else { (0..32).collect() };
            for &s in &interims {
                for a in 0..32u8 {
                    for b in (0..32u8).filter(|&b| b != a) {
                        let after = (op(s, a), op(s, b));
                        assert_ne!(after.0, after.1, "position {position} interim {s}: {a}→{b}");
                        // Whatever follows, the runs stay apart.
                        for fill in 0..32u8 {
                            let mut tail = [fill; 7];
                            tail[position] = a;
                            let x = run_from(after.0, &tail, position + 1);
                            tail[position] = b;
                            let y = run_from(after.1, &tail, position + 1);
                            assert_ne!(x, y, "position {position}: {a}→{b} then {fill}s");
                        }
                    }
                }
            }
        }
    }

    /// Every swap of two different neighbours, at each of the 6 places in
    /// 7 characters (the last one swaps the check character), after every
    /// prefix, is detected: exhaustive as above.
    #[test]
    fn every_adjacent_transposition_is_detected() {
        for position in 0..6 {
            let interims: Vec<u8> = if position == 0 { vec![0] } else { (0..32).collect() };
            for &s in &interims {
                for a in 0..32u8 {
                    for b in (0..32u8).filter(|&b| b != a) {
                        assert_ne!(op(op(s, a), b), op(op(s, b), a), "position {position} interim {s}: {a}{b}");
                    }
                }
            }
        }
    }

    /// The table-driven check equals Damm's run, one step per character,
    /// and a valid ID's run ends at 0.
    #[test]
    fn the_fast_check_is_the_damm_run() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let data = x & ((1 << DATA_BITS) - 1);
            let slow = mul2(interim(data << 5, 6));
            assert_eq!(check_value(data), u64::from(slow), "data {data:#x}");
            assert!(is_valid(with_check(data)));
        }
        assert_eq!(with_check(0), 0);
        assert!(is_valid(0));
    }

    /// At full width: every single substitution (7 × 31) and every adjacent
    /// transposition that changes the text (up to 6) of many IDs fails the
    /// check, as text through the parser too.
    #[test]
    fn many_full_width_ids_reject_every_typo() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let value = with_check(x & ((1 << DATA_BITS) - 1));
            let text = Id::from_value(value).expect("35 bits").to_string();
            assert!(is_valid(Id::parse(&text).unwrap().value()));
            let bytes = text.as_bytes();
            for position in 0..7 {
                for &symbol in ALPHABET.iter().filter(|&&c| c != bytes[position]) {
                    let mut typo = bytes.to_vec();
                    typo[position] = symbol;
                    let typo = Id::parse(std::str::from_utf8(&typo).unwrap()).unwrap();
                    assert!(!is_valid(typo.value()), "{text}: position {position} → {}", symbol as char);
                }
            }
            for position in 0..6 {
                if bytes[position] != bytes[position + 1] {
                    let mut swapped = bytes.to_vec();
                    swapped.swap(position, position + 1);
                    let swapped = Id::parse(std::str::from_utf8(&swapped).unwrap()).unwrap();
                    assert!(!is_valid(swapped.value()), "{text}: swap at {position}");
                }
            }
        }
    }

    /// The one-look-up-per-pair encoder writes what the definition says:
    /// the data's characters, then its check character.
    #[test]
    fn the_fused_encoder_writes_the_checked_id() {
        let mut x = 0x1357_9bdf_2468_ace0u64;
        for data in (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x & ((1 << DATA_BITS) - 1)
            })
            .chain([0, (1 << DATA_BITS) - 1])
        {
            assert_eq!(encode_word_checked(data), crate::id::encode_word(with_check(data)), "data {data:#x}");
        }
        // Every value of every 10-bit chunk, the other two random: each
        // table entry is used, at its place.
        for chunk in 0..3 {
            for v in 0..1024u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let shift = 20 - 10 * chunk;
                let data = (x & ((1 << DATA_BITS) - 1) & !(1023 << shift)) | v << shift;
                assert_eq!(encode_word_checked(data), crate::id::encode_word(with_check(data)), "data {data:#x}");
            }
        }
    }

    /// The scheme is part of the ID format: these never change.
    #[test]
    fn golden_check_characters_never_change() {
        let ids: Vec<String> = [0u64, 1, 0x3fff_ffff, 0x1234_5678, 1 << 29]
            .iter()
            .map(|&d| Id::from_value(with_check(d)).unwrap().to_string())
            .collect();
        assert_eq!(ids, ["0000000", "0000012", "ZZZZZZS", "938NKR1", "G00000H"]);
    }
}
