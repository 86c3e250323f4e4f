"""tradeid.parse and tradeid.is_valid, driven by the shared vectors file
(tests/vectors/ids.json, also read by the Rust tests in
core/tests/vectors.rs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from support import VECTORS

import tradeid

DOC: Dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
#: The mode sections: every top-level object (the other fields describe the
#: file). Each is parsed with ``mode=<its name>``, so a mode added to the
#: file that the Python codec does not know fails here.
MODES: Dict[str, Dict[str, Any]] = {name: v for name, v in DOC.items() if isinstance(v, dict)}
VALID: List[Tuple[str, Dict[str, Any]]] = [(m, c) for m, s in MODES.items() for c in s["valid"]]
INVALID: List[Tuple[str, Dict[str, Any]]] = [(m, c) for m, s in MODES.items() for c in s["invalid"]]
PLAIN_VALID = [c for m, c in VALID if m == "plain"]
PLAIN_INVALID = [c for m, c in INVALID if m == "plain"]


def test_vectors_file_is_well_formed() -> None:
    assert DOC["version"] == 1
    assert DOC["alphabet"] == tradeid.ALPHABET
    assert "plain" in MODES
    assert set(DOC) - set(MODES) == {"description", "version", "alphabet"}
    assert len(PLAIN_VALID) >= 20 and len(PLAIN_INVALID) >= 20
    for _, case in VALID:
        assert set(case) <= {"input", "canonical", "note"}
        assert isinstance(case["input"], str) and isinstance(case["canonical"], str)
    for case in PLAIN_VALID:
        assert len(case["canonical"]) == 7
    for case in PLAIN_INVALID:
        assert case["reason"] in ("invalid_char", "length")
        if case["reason"] == "invalid_char":
            assert set(case) <= {"input", "reason", "char", "position", "note"}
            assert len(case["char"]) == 1 and isinstance(case["position"], int)
        else:
            assert set(case) <= {"input", "reason", "digits", "note"}
            assert isinstance(case["digits"], int)


def _ids(cases: List[Tuple[str, Dict[str, Any]]]) -> List[str]:
    return [f"{mode}:{case['input']!r}" for mode, case in cases]


@pytest.mark.parametrize("mode,case", VALID, ids=_ids(VALID))
def test_valid(mode: Any, case: Dict[str, Any]) -> None:
    assert tradeid.parse(case["input"], mode=mode) == case["canonical"]
    assert tradeid.is_valid(case["input"], mode=mode)
    # The canonical form is a fixed point.
    assert tradeid.parse(case["canonical"], mode=mode) == case["canonical"]


@pytest.mark.parametrize("mode,case", INVALID, ids=_ids(INVALID))
def test_invalid(mode: Any, case: Dict[str, Any]) -> None:
    assert not tradeid.is_valid(case["input"], mode=mode)
    with pytest.raises(tradeid.InvalidId) as info:
        tradeid.parse(case["input"], mode=mode)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, tradeid.TradeIdError)
    assert error.text == case["input"]
    # `reason` and every field that goes with it are attributes of the error.
    for field, value in case.items():
        if field not in ("input", "note"):
            assert getattr(error, field) == value, field


@pytest.mark.parametrize("case", PLAIN_INVALID, ids=[repr(c["input"]) for c in PLAIN_INVALID])
def test_plain_messages(case: Dict[str, Any]) -> None:
    with pytest.raises(tradeid.InvalidId) as info:
        tradeid.parse(case["input"])
    if case["reason"] == "invalid_char":
        assert f"at position {case['position']}" in str(info.value)
    else:
        assert str(info.value) == f"an ID has exactly 7 characters, found {case['digits']}"


def test_messages_match_the_rust_wording() -> None:
    def message(text: str) -> str:
        with pytest.raises(tradeid.InvalidId) as info:
            tradeid.parse(text)
        return str(info.value)

    tail = (
        "; an ID uses only 0-9 and A-Z without I, L, O, U "
        "(I and L read as 1, O as 0; hyphens and spaces are ignored)"
    )
    assert message("B762FU0") == "'U' is never used in IDs (Crockford base32 leaves it out) at position 5" + tail
    assert message("B76_F00") == "'_' is not an ID character at position 3" + tail
    assert message("B76\u00c9F00") == "'\u00c9' is not an ID character at position 3" + tail
    assert message("B762F0\t") == "control character '\\t' at position 6" + tail
    assert message("B762\x1bF00") == "control character '\\u{1b}' at position 4" + tail
    assert message("B762F0") == "an ID has exactly 7 characters, found 6"


def test_modes() -> None:
    assert tradeid.parse("b762f00", mode="plain") == "B762F00"
    assert tradeid.parse("938nkr1", mode="check") == "938NKR1"
    with pytest.raises(ValueError, match="unknown ID mode"):
        tradeid.parse("B762F00", mode="crc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown ID mode"):
        tradeid.is_valid("B762F00", mode="crc")  # type: ignore[arg-type]


def test_non_strings() -> None:
    with pytest.raises(TypeError):
        tradeid.parse(b"B762F00")  # type: ignore[arg-type]
    assert not tradeid.is_valid(b"B762F00")  # type: ignore[arg-type]
    assert not tradeid.is_valid(None)  # type: ignore[arg-type]


def test_every_alphabet_character_round_trips() -> None:
    for ch in tradeid.ALPHABET:
        assert tradeid.parse(ch * 7) == ch * 7
        assert tradeid.parse(ch.lower() * 7) == ch * 7


def test_the_check_section_is_well_formed() -> None:
    cases = [c for m, c in INVALID if m == "check"]
    assert len(cases) >= 10
    for case in cases:
        assert case["reason"] in ("invalid_char", "length", "check_mismatch")
        if case["reason"] == "check_mismatch":
            assert set(case) <= {"input", "reason", "note"}
            # Every mismatch is still a valid plain ID: only the check refuses it.
            assert tradeid.is_valid(case["input"])


def test_the_rust_check_command_agrees_with_the_check_vectors(tradeid_bin: Path) -> None:
    """`tradeid check` runs the Rust Id::parse_checked: the same verdict,
    canonical form and message for every case of the check section."""
    cases = [c for m, c in VALID + INVALID if m == "check" and c["input"].strip()]
    result = subprocess.run(
        [str(tradeid_bin), "check", "--", *[c["input"] for c in cases]],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 65, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(cases), lines
    for case, line in zip(cases, lines):
        if "canonical" in case:
            assert line == case["canonical"], (case, line)
        else:
            with pytest.raises(tradeid.InvalidId) as info:
                tradeid.parse(case["input"], mode="check")
            assert line.endswith(str(info.value)), (case, line)


def test_the_rust_parser_agrees_with_the_vectors(tradeid_bin: Path, tmp_path: Path) -> None:
    """`tradeid decode` runs the Rust Id::parse: same results, same messages
    (inputs with a NUL cannot be passed as an argument)."""
    from support import init_state

    state = init_state(tradeid_bin, tmp_path)
    for case in PLAIN_VALID + PLAIN_INVALID:
        text = case["input"]
        if "\x00" in text:
            continue
        result = subprocess.run(
            [str(tradeid_bin), "decode", "--state", str(state), "--", text],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if "canonical" in case:
            assert result.returncode == 0, (case, result.stderr)
            fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
            assert fields["id"].strip() == case["canonical"], case
        else:
            assert result.returncode != 0, case
            with pytest.raises(tradeid.InvalidId) as info:
                tradeid.parse(text)
            assert str(info.value) in result.stderr, (case, result.stderr)
