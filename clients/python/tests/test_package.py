"""What the package promises, checked on the installed copy (run_tests.sh
installs the built wheel, not the source tree): typed, standard library
only, Python >= 3.9."""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest

import tradeid

PACKAGE = Path(tradeid.__file__).parent


def test_installed_from_a_wheel_not_the_source_tree() -> None:
    assert "src" not in PACKAGE.parts[-3:], f"tests import {PACKAGE}, not the installed package"


def test_ships_py_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()
    files = [str(f) for f in metadata.files("tradeid") or []]
    assert "tradeid/py.typed" in files


def test_metadata_promises_python_3_9_and_no_dependencies() -> None:
    meta = metadata.metadata("tradeid")
    assert meta["Requires-Python"] == ">=3.9"
    runtime = [r for r in (metadata.requires("tradeid") or []) if "extra ==" not in r]
    assert runtime == []


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="needs Python 3.10+ to list the stdlib")
def test_imports_only_the_standard_library() -> None:
    stdlib = set(sys.stdlib_module_names)
    for source in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top == "__future__", f"{source.name} imports {name}"
