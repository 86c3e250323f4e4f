"""``mode="check"``: IDs of a space made with ``tradeid init --check-char``,
served by the real binary, checked by the Python codec and by ``tradeid
check`` alike."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from typing import List

import pytest
from conftest import StartServer

import tradeid


def _check_state(binary: Path, directory: Path) -> Path:
    state = directory / "state"
    result = subprocess.run(
        [str(binary), "init", "--state", str(state), "--check-char"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return state


def _typos(ident: str) -> List[str]:
    """Every single substitution and every swap of different neighbours."""
    out = []
    for i, ch in enumerate(ident):
        for other in tradeid.ALPHABET:
            if other != ch:
                out.append(ident[:i] + other + ident[i + 1 :])
    for i in range(6):
        if ident[i] != ident[i + 1]:
            out.append(ident[:i] + ident[i + 1] + ident[i] + ident[i + 2 :])
    return out


def test_served_ids_pass_and_every_typo_fails(tradeid_bin: Path, tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(_check_state(tradeid_bin, tmp_path))
    with tradeid.Client(server.addr) as client:
        ids = client.next_ids(2_000) + [client.next_id() for _ in range(50)]
    assert len(set(ids)) == len(ids)
    for ident in ids:
        assert tradeid.parse(ident, mode="check") == ident
        assert tradeid.parse(ident.lower(), mode="check") == ident
    for ident in ids[:40]:
        for typo in _typos(ident):
            assert not tradeid.is_valid(typo, mode="check"), (ident, typo)
            with pytest.raises(tradeid.InvalidId) as info:
                tradeid.parse(typo, mode="check")
            assert info.value.reason == "check_mismatch"
            assert str(info.value) == "check character mismatch: probably a typo; compare with the source"
            # Plain mode knows nothing of checks: the typo is a valid ID.
            assert tradeid.is_valid(typo)


def test_python_and_the_binary_agree(tradeid_bin: Path, tmp_path: Path) -> None:
    """A random mix of valid IDs, typos and garbage through ``tradeid
    check -``: the same verdict, and the same canonical form, line by line."""
    state = _check_state(tradeid_bin, tmp_path)
    gen = subprocess.run(
        [str(tradeid_bin), "gen", "--state", str(state), "-n", "300"], capture_output=True, text=True, timeout=60
    )
    assert gen.returncode == 0, gen.stderr
    rng = random.Random(7)
    inputs: List[str] = []
    for ident in gen.stdout.split():
        inputs.append(rng.choice([ident, ident.lower(), ident[:3] + "-" + ident[3:]]))
        inputs.append(rng.choice(_typos(ident)))
    inputs += ["".join(rng.choice(tradeid.ALPHABET) for _ in range(7)) for _ in range(300)]
    inputs += ["B76", "B762FU0", "o0o0o0o"]
    result = subprocess.run(
        [str(tradeid_bin), "check", "-"], input="\n".join(inputs) + "\n", capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 65, result.stderr  # some inputs are typos
    lines = result.stdout.splitlines()
    assert len(lines) == len(inputs)
    for text, line in zip(inputs, lines):
        if tradeid.is_valid(text, mode="check"):
            assert line == tradeid.parse(text, mode="check"), (text, line)
        else:
            with pytest.raises(tradeid.InvalidId) as info:
                tradeid.parse(text, mode="check")
            assert line.endswith(str(info.value)), (text, line)
