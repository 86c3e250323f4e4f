"""Fixtures: the real tradeid binary, servers on loopback, time limits.

The binary is ``$TRADEID_BIN``, else ``target/debug/tradeid`` in the repo
(built with ``cargo`` if missing). It must be a build with the test hooks
compiled in (the one ``cargo test`` builds) for the fault-injection tests.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional, cast

import pytest
from support import REPO_ROOT, Server, init_state

#: No test may take longer than this; a hung test dumps every thread's stack
#: and ends the run instead of hanging CI.
TEST_TIME_LIMIT = float(os.environ.get("TRADEID_PY_TEST_TIME_LIMIT", "180"))


# ---------------------------------------------------------------------------
# Fault injection: the ONE place that knows the names of the server's
# test-only environment variables (they may change).


def fault_env(flush_delay_ms: Optional[int] = None, fail_flush_after: Optional[int] = None) -> Dict[str, str]:
    """Environment for a server with injected faults (test builds only).

    ``flush_delay_ms``: every block flush sleeps this long first (a slow
    disk), so prefetches lag and the server answers ``!ERR503``.
    ``fail_flush_after``: after this many flushes every flush fails with EIO
    (a failing disk).
    """
    env: Dict[str, str] = {}
    if flush_delay_ms is not None:
        env["TRADEID_TEST_FLUSH_DELAY_MS"] = str(flush_delay_ms)
    if fail_flush_after is not None:
        env["TRADEID_TEST_FAIL_FLUSH_AFTER"] = str(fail_flush_after)
    return env


# ---------------------------------------------------------------------------
# The binary and servers.


def _build_binary(path: Path) -> None:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.fail(f"{path} does not exist and cargo is not on PATH; set TRADEID_BIN")
    # The test hooks are a feature of the core crate that only the server's
    # own tests enable; ask for it so that this build injects faults too.
    command = [cargo, "build", "--bin", "tradeid", "--features", "tradeid/test-hooks"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        # The feature may have moved; a plain build still runs most tests.
        result = subprocess.run(
            [cargo, "build", "--bin", "tradeid"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800
        )
    if result.returncode != 0 or not path.exists():
        pytest.fail(f"could not build {path}:\n{result.stderr[-4000:]}")


@pytest.fixture(scope="session")
def tradeid_bin() -> Path:
    path = Path(os.environ.get("TRADEID_BIN") or REPO_ROOT / "target" / "debug" / "tradeid")
    if not path.exists():
        _build_binary(path)
    return path


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tradeid_bin: Path, tmp_path: Path) -> Iterator[StartServer]:
    """``start_server(state=None, tiny=False, flush_delay_ms=None,
    fail_flush_after=None, **Server kwargs)``: a new state file (unless
    given) and a server on it, with faults injected if asked. Every server
    started is killed at teardown."""
    servers: List[Server] = []

    def start(
        state: Optional[Path] = None,
        *,
        tiny: bool = False,
        flush_delay_ms: Optional[int] = None,
        fail_flush_after: Optional[int] = None,
        **kwargs: Any,
    ) -> Server:
        if state is None:
            directory = tmp_path / f"s{len(servers)}"
            directory.mkdir()
            state = init_state(tradeid_bin, directory, tiny=tiny)
        env = fault_env(flush_delay_ms, fail_flush_after)
        server = Server(tradeid_bin, state, env=env, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(start_server: StartServer) -> Server:
    """One ordinary server."""
    return start_server()


@pytest.fixture
def localhost_server(start_server: StartServer) -> str:
    """A server on whatever "localhost" resolves to first (as the client
    uses it); returns ``"localhost:PORT"``."""
    family, _, _, _, sockaddr = socket.getaddrinfo("localhost", 0, type=socket.SOCK_DGRAM)[0]
    host = sockaddr[0] if family == socket.AF_INET else f"[{sockaddr[0]}]"
    server = start_server(listen=f"{host}:0")
    return f"localhost:{server.addr.rsplit(':', 1)[1]}"


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A bound UDP socket that receives requests and never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()


# ---------------------------------------------------------------------------
# Time limits and hygiene.


class TimeLimitExceeded(Exception):
    pass


def _expire(signum: int, frame: Optional[FrameType]) -> None:
    raise TimeLimitExceeded(f"the test ran longer than {TEST_TIME_LIMIT:g} s")


# Typed by hand: older pytest releases (Debian's) ship hookimpl untyped.
_hook_wrapper = cast(
    Callable[[Callable[[pytest.Item], Iterator[None]]], Callable[[pytest.Item], Iterator[None]]],
    pytest.hookimpl(hookwrapper=True),
)


@_hook_wrapper
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Fails a test whose body runs longer than TEST_TIME_LIMIT: SIGALRM
    raises in the main thread, interrupting a blocking call, so the test
    fails with its traceback and its fixtures still clean up."""
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def _last_resort_time_limit() -> Iterator[None]:
    """For a hang that never returns to Python (or one in a fixture):
    faulthandler dumps every thread's stack and ends the process."""
    faulthandler.dump_traceback_later(TEST_TIME_LIMIT + 60, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _fresh_default_client() -> Iterator[None]:
    import tradeid

    tradeid.reset_default_client()
    yield
    tradeid.reset_default_client()
