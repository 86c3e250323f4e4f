"""Wire protocol v1 (docs/protocol.md): request encoding and reply decoding.

Pure functions on bytes; no sockets.
"""

from __future__ import annotations

import enum
import functools
import operator
import struct
from typing import Callable, Tuple, Union

from ._codec import ALPHABET, ID_LEN

#: Length of a request; longer datagrams are padding.
REQUEST_LEN = 8
#: The default largest batch (a 1225-byte reply).
DEFAULT_MAX_BATCH = 175
#: The largest batch whose reply fits one UDP datagram (65507 // 7).
MAX_BATCH_LIMIT = 9358
#: For untrusted sources a reply is at most this many times the request.
AMPLIFICATION_FACTOR = 3

_HEADER = struct.Struct(">2sBBHH")
_MAGIC = b"ID"
_VERSION = 1
_OP_NEXT = 1


class ErrorCode(enum.IntEnum):
    """The ``!ERRnnn`` replies."""

    UNKNOWN_OPCODE = 400
    TOO_MANY = 413
    UNAVAILABLE = 503
    BAD_VERSION = 505
    EXHAUSTED = 507


_ERROR_REPLIES = {b"!ERR%d" % code: code for code in ErrorCode}

# bytes.translate(None, _ALPHABET_BYTES) deletes every canonical character,
# so a reply made only of IDs translates to b"".
_ALPHABET_BYTES = ALPHABET.encode("ascii")


def padded_len(count: int) -> int:
    """The request length that lets an untrusted path carry ``count`` IDs:
    ``max(8, ceil(7 * count / 3))`` (reply <= 3 x request)."""
    return max(REQUEST_LEN, -(-count * ID_LEN // AMPLIFICATION_FACTOR))


@functools.lru_cache(maxsize=1024)
def encode_request(count: int) -> bytes:
    """A NEXT request for ``count`` IDs, zero-padded to :func:`padded_len`."""
    if not 1 <= count <= 0xFFFF:
        raise ValueError(f"count {count} out of range 1..=65535")
    header = _HEADER.pack(_MAGIC, _VERSION, _OP_NEXT, count, 0)
    return header + bytes(padded_len(count) - REQUEST_LEN)


#: What a reply datagram is: the IDs it carries, an error code, or ``None``
#: for anything else (not from a tradeid server: ignored).
Reply = Union[Tuple[str, ...], ErrorCode, None]

# Above this many IDs a reply is split with a comprehension; up to it, with
# a cached operator.itemgetter of slices, which cuts a text into a tuple of
# 7-character strings in one C call (about twice as fast). The cache is
# bounded: replies cut short at a block boundary come in every size.
_SPLIT_CACHED_UP_TO = 1024


@functools.lru_cache(maxsize=256)
def _splitter(count: int) -> Callable[[str], Tuple[str, ...]]:
    if count == 1:
        return lambda text: (text,)
    return operator.itemgetter(*(slice(i, i + ID_LEN) for i in range(0, count * ID_LEN, ID_LEN)))


def _split(text: str) -> Tuple[str, ...]:
    count = len(text) // ID_LEN
    if count <= _SPLIT_CACHED_UP_TO:
        return _splitter(count)(text)
    return tuple([text[i : i + ID_LEN] for i in range(0, len(text), ID_LEN)])


def decode_reply(data: bytes) -> Reply:
    """Classifies and decodes one reply datagram.

    IDs must be canonical (uppercase, no aliases), 7 bytes each, back to
    back; the check and the split work on the whole datagram with C-level
    operations (``translate``, ``decode``, slicing), not per character.
    """
    size = len(data)
    if size == 0 or size % ID_LEN:
        return None
    if data[0] == 0x21:  # "!": outside the alphabet, so only an error reply
        return _ERROR_REPLIES.get(data) if size == ID_LEN else None
    if data.translate(None, _ALPHABET_BYTES):
        return None  # some byte is not a canonical ID character
    return _split(data.decode("ascii"))
