//! Wire protocol v1: decide what a request datagram asks for, and encode
//! replies. Pure: it takes bytes and returns a decision; it never touches a
//! socket, allocates or logs. See `docs/protocol.md` for the byte layout.

/// Length of a request; longer datagrams are allowed only as padding.
pub const REQUEST_LEN: usize = 8;
/// Length of an error reply (`!ERR` and three digits), the same as one ID.
pub const ERROR_LEN: usize = 7;
/// The two magic bytes every request starts with: "ID".
pub const MAGIC: [u8; 2] = *b"ID";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Opcode: hand out `count` IDs.
pub const OP_NEXT: u8 = 1;
/// The default largest batch: 175 IDs, a 1225-byte reply, below common MTUs.
pub const DEFAULT_MAX_BATCH: u16 = 175;
/// The largest batch whose reply fits one UDP datagram (65507 / 7).
pub const MAX_BATCH_LIMIT: u16 = 9358;
/// The anti-amplification factor: an untrusted source gets at most this many
/// reply bytes per request byte (the QUIC rule, RFC 9000 §8.1).
pub const AMPLIFICATION_FACTOR: usize = 3;

/// What to do with one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Reply with this many IDs (already limited by max-batch).
    Next {
        /// IDs to send, 1..=max-batch.
        count: u16,
    },
    /// Reply with this error.
    Error(ErrorCode),
    /// Send nothing.
    Drop(Malformed),
}

/// Error replies. The numbers echo HTTP's where one fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `!ERR400`: unknown opcode.
    UnknownOpcode,
    /// `!ERR413`: count over max-batch.
    TooMany,
    /// `!ERR503`: no block ready yet, or shutting down. Retry.
    Unavailable,
    /// `!ERR505`: unsupported protocol version.
    BadVersion,
    /// `!ERR507`: the ID space is exhausted. Final.
    Exhausted,
}

/// Why a datagram is not a request at all (it gets no reply: answering
/// garbage would make the server a reflector).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Shorter than 8 bytes.
    Short,
    /// Does not start with the magic.
    BadMagic,
}

impl ErrorCode {
    /// Every code, in metrics order.
    pub const ALL: [ErrorCode; 5] = [
        ErrorCode::UnknownOpcode,
        ErrorCode::TooMany,
        ErrorCode::Unavailable,
        ErrorCode::BadVersion,
        ErrorCode::Exhausted,
    ];

    /// Position in [`ErrorCode::ALL`] (declaration order), for counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The numeric code.
    pub fn number(self) -> u16 {
        match self {
            ErrorCode::UnknownOpcode => 400,
            ErrorCode::TooMany => 413,
            ErrorCode::Unavailable => 503,
            ErrorCode::BadVersion => 505,
            ErrorCode::Exhausted => 507,
        }
    }

    /// The 7 reply bytes, e.g. `!ERR503`.
    pub fn reply(self) -> [u8; ERROR_LEN] {
        let n = self.number();
        let digit = |d: u16| b'0' + (d % 10) as u8;
        [b'!', b'E', b'R', b'R', digit(n / 100), digit(n / 10), digit(n)]
    }

    /// Parses an error reply; `None` if `bytes` is not one we send.
    pub fn parse(bytes: &[u8]) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|code| bytes == code.reply())
    }
}

/// Decides what `datagram` asks for. `max_batch` is the server's limit.
///
/// Checks run in this order: length and magic (failures are dropped), then
/// version (505), opcode (400) and count (413). A count of 0 means 1.
pub fn decode(datagram: &[u8], max_batch: u16) -> Decision {
    let Some(request) = datagram.first_chunk::<REQUEST_LEN>() else {
        return Decision::Drop(Malformed::Short);
    };
    if request[0..2] != MAGIC {
        return Decision::Drop(Malformed::BadMagic);
    }
    if request[2] != VERSION {
        return Decision::Error(ErrorCode::BadVersion);
    }
    if request[3] != OP_NEXT {
        return Decision::Error(ErrorCode::UnknownOpcode);
    }
    let count = u16::from_be_bytes([request[4], request[5]]).max(1);
    if count > max_batch {
        return Decision::Error(ErrorCode::TooMany);
    }
    Decision::Next { count }
}

/// The most IDs a reply to a `request_len`-byte datagram may carry for an
/// untrusted source: reply bytes ≤ 3 × request bytes.
#[inline]
pub fn amplification_limit(request_len: usize) -> usize {
    request_len * AMPLIFICATION_FACTOR / crate::id::ID_LEN
}

/// The request datagram length a client should send so that an untrusted
/// server path still allows `count` IDs: padded to a third of the reply.
pub fn padded_len(count: u16) -> usize {
    (usize::from(count) * crate::id::ID_LEN).div_ceil(AMPLIFICATION_FACTOR).max(REQUEST_LEN)
}

/// Writes a NEXT request for `count` IDs into the first 8 bytes of `buf`.
/// Any bytes after the 8th are padding and are left as they are (zero them).
pub fn encode_request(count: u16, buf: &mut [u8]) {
    let c = count.to_be_bytes();
    buf[..REQUEST_LEN].copy_from_slice(&[MAGIC[0], MAGIC[1], VERSION, OP_NEXT, c[0], c[1], 0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_documented_single_request() {
        let mut buf = [0u8; 8];
        encode_request(1, &mut buf);
        assert_eq!(buf, [0x49, 0x44, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(decode(&buf, 175), Decision::Next { count: 1 });
    }

    #[test]
    fn count_zero_means_one_and_limits_apply() {
        let req = |count: u16| {
            let mut b = [0u8; 8];
            encode_request(count, &mut b);
            b
        };
        assert_eq!(decode(&req(0), 175), Decision::Next { count: 1 });
        assert_eq!(decode(&req(175), 175), Decision::Next { count: 175 });
        assert_eq!(decode(&req(176), 175), Decision::Error(ErrorCode::TooMany));
        assert_eq!(decode(&req(u16::MAX), MAX_BATCH_LIMIT), Decision::Error(ErrorCode::TooMany));
    }

    #[test]
    fn garbage_is_dropped_and_bad_fields_get_errors() {
        assert_eq!(decode(&[], 175), Decision::Drop(Malformed::Short));
        assert_eq!(decode(b"ID\x01\x01\x00\x01\x00", 175), Decision::Drop(Malformed::Short));
        assert_eq!(decode(b"XD\x01\x01\x00\x01\x00\x00", 175), Decision::Drop(Malformed::BadMagic));
        assert_eq!(decode(b"ID\x02\x01\x00\x01\x00\x00", 175), Decision::Error(ErrorCode::BadVersion));
        assert_eq!(decode(b"ID\x01\x07\x00\x01\x00\x00", 175), Decision::Error(ErrorCode::UnknownOpcode));
        // Reserved bytes and padding are ignored.
        assert_eq!(decode(b"ID\x01\x01\x00\x02\xff\xffpadding", 175), Decision::Next { count: 2 });
    }

    #[test]
    fn counter_indices_follow_the_all_lists() {
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.index(), i);
        }
    }

    #[test]
    fn error_replies_are_seven_bytes_outside_the_id_alphabet() {
        for code in ErrorCode::ALL {
            let reply = code.reply();
            assert_eq!(reply.len(), 7);
            assert_eq!(&reply[..4], b"!ERR");
            assert_eq!(ErrorCode::parse(&reply), Some(code));
            assert!(crate::id::Id::from_wire(&reply).is_none());
        }
        assert_eq!(&ErrorCode::Unavailable.reply(), b"!ERR503");
        assert_eq!(ErrorCode::parse(b"!ERR999"), None);
    }

    #[test]
    fn amplification_allows_three_ids_for_a_bare_request() {
        assert_eq!(amplification_limit(8), 3);
        assert_eq!(padded_len(3), 8);
        for count in [1u16, 4, 16, 175, MAX_BATCH_LIMIT] {
            let len = padded_len(count);
            assert!(amplification_limit(len) >= usize::from(count), "{count}");
            assert!(len * 3 < usize::from(count) * 7 + 3 * 3 || len == 8, "{count}: {len} is more padding than needed");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_respects_max_batch(bytes in proptest::collection::vec(any::<u8>(), 0..64), max in 1u16..MAX_BATCH_LIMIT) {
            match decode(&bytes, max) {
                Decision::Next { count } => {
                    prop_assert!(bytes.len() >= 8 && bytes[..2] == MAGIC);
                    prop_assert!((1..=max).contains(&count));
                }
                Decision::Error(_) => prop_assert!(bytes.len() >= 8 && bytes[..2] == MAGIC),
                Decision::Drop(_) => prop_assert!(bytes.len() < 8 || bytes[..2] != MAGIC),
            }
        }
    }
}
