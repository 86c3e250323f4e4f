"""Reading IDs that people typed: the same forgiving rules as ``Id::parse``
in the Rust codec (core/src/id.rs).

* case-insensitive;
* ``O`` reads as ``0``, ``I`` and ``L`` as ``1``;
* hyphens and spaces are ignored wherever they are;
* anything else, including ``U``, tabs, newlines and every non-ASCII
  character, is an error naming the character and its position;
* exactly 7 ID characters must remain.

Characters are checked before the length, as in Rust: ``"B762F00ZZU"`` is
an ``invalid_char`` error (``U`` at 9), not a length error. Positions count
characters (code points) from 0, separators included.

Only ASCII is mapped, through an explicit table: Python's ``str.upper`` and
``str.lower`` would turn the dotless ``ı`` into ``I`` or the Kelvin sign
into ``k``, which Rust rejects.

``mode="check"`` is for spaces made with ``tradeid init --check-char``:
the 7th character is a Damm check character over the quasigroup
``x ∘ y = 2·x ⊕ y`` in GF(32) modulo ``t⁵ + t² + 1`` (see
docs/protocol.md and core/src/check.rs). The forgiving rules apply first,
then the check; a failure is ``reason="check_mismatch"``, never a silent
success.
"""

from __future__ import annotations

import unicodedata
from typing import Dict, Literal

from ._errors import InvalidId

#: The Crockford base32 alphabet: digits and letters without I, L, O, U.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: Length of an ID in characters (and bytes on the wire).
ID_LEN = 7

#: How an ID is written: ``"plain"`` (7 data characters, the default) or
#: ``"check"`` (6 data characters and a check character).
Mode = Literal["plain", "check"]

_MODES = ("plain", "check")

_SEPARATORS = "- "

# Character -> canonical character, or "" for a separator. Anything absent
# is invalid.
_DECODE: Dict[str, str] = {}
for _c in ALPHABET:
    _DECODE[_c] = _c
    _DECODE[_c.lower()] = _c
for _alias, _canonical in (("O", "0"), ("I", "1"), ("L", "1")):
    _DECODE[_alias] = _canonical
    _DECODE[_alias.lower()] = _canonical
for _c in _SEPARATORS:
    _DECODE[_c] = ""
del _c, _alias, _canonical

# The check character: Damm's run over x ∘ y = 2·x ⊕ y in GF(32).
def _mul2(x: int) -> int:
    x <<= 1
    return (x ^ 0b100101) if x & 32 else x


_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_STEP = [[_mul2(s) ^ d for d in range(32)] for s in range(32)]


def _check_ok(canonical: str) -> bool:
    """Whether the run over the 7 canonical characters ends at 0."""
    s = 0
    for ch in canonical:
        s = _STEP[s][_VALUE[ch]]
    return s == 0


CHECK_MISMATCH = "check character mismatch: probably a typo; compare with the source"

# str.translate table deleting every canonical character.
_DELETE_ALPHABET = str.maketrans("", "", ALPHABET)

_RUST_ESCAPES = {"\0": "\\0", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _describe(ch: str) -> str:
    """The start of an invalid-character message, worded as in Rust."""
    if ch in "Uu":
        return f"'{ch}' is never used in IDs (Crockford base32 leaves it out)"
    if unicodedata.category(ch) == "Cc":
        # Rust prints a control character with {:?}: '\t', '\0', '\u{1b}'.
        escaped = _RUST_ESCAPES.get(ch, f"\\u{{{ord(ch):x}}}")
        return f"control character '{escaped}'"
    return f"'{ch}' is not an ID character"


def _invalid_char(text: str, ch: str, position: int) -> InvalidId:
    return InvalidId(
        f"{_describe(ch)} at position {position}; an ID uses only 0-9 and A-Z without "
        "I, L, O, U (I and L read as 1, O as 0; hyphens and spaces are ignored)",
        text=text,
        reason="invalid_char",
        char=ch,
        position=position,
    )


def _length(text: str, digits: int) -> InvalidId:
    return InvalidId(
        f"an ID has exactly {ID_LEN} characters, found {digits}",
        text=text,
        reason="length",
        digits=digits,
    )


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"unknown ID mode {mode!r}; use 'plain' or 'check'")


def _checked(text: str, canonical: str, mode: str) -> str:
    if mode == "check" and not _check_ok(canonical):
        raise InvalidId(CHECK_MISMATCH, text=text, reason="check_mismatch")
    return canonical


def parse(text: str, *, mode: Mode = "plain") -> str:
    """The canonical form of an ID as a person might type or read it.

    >>> parse("b76-2fo0")
    'B762F00'
    >>> parse("938-nkr1", mode="check")
    '938NKR1'

    Raises :class:`tradeid.InvalidId` (a ``ValueError``) with a message that
    names the offending character and position, or the number of ID
    characters found, or (``mode="check"``) that the check character does
    not match.
    """
    _check_mode(mode)
    if not isinstance(text, str):
        raise TypeError(f"an ID is parsed from str, not {type(text).__name__}")
    if len(text) == ID_LEN and not text.translate(_DELETE_ALPHABET):
        return _checked(text, text, mode)  # already canonical: the common case
    decoded = []
    digits = 0
    decode = _DECODE.get
    for position, ch in enumerate(text):
        canonical = decode(ch)
        if canonical is None:
            raise _invalid_char(text, ch, position)
        if canonical:
            digits += 1
            decoded.append(canonical)
    if digits != ID_LEN:
        raise _length(text, digits)
    return _checked(text, "".join(decoded), mode)


def is_valid(text: str, *, mode: Mode = "plain") -> bool:
    """Whether :func:`parse` accepts ``text`` (never raises for a bad ID;
    a non-``str`` is simply not valid)."""
    _check_mode(mode)
    if not isinstance(text, str):
        return False
    try:
        parse(text, mode=mode)
    except InvalidId:
        return False
    return True

