//! The 32 symbols every ID is written in, and the table that writes two of
//! them at once. A leaf: the codec ([`id`](crate::id)) and the check
//! character ([`check`](crate::check)) both build on it.

/// The Crockford base32 alphabet: digits and letters without I, L, O, U.
pub const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// 10-bit value → two characters, first character in the low byte.
pub(crate) const PAIRS: [u16; 1024] = {
    let mut table = [0u16; 1024];
    let mut i = 0;
    while i < 1024 {
        table[i] = ALPHABET[i >> 5] as u16 | (ALPHABET[i & 31] as u16) << 8;
        i += 1;
    }
    table
};
