"""Test support: servers on loopback, fault injection, ID checks."""

from __future__ import annotations

import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Dict, Iterable, List, Optional

import tradeid

REPO_ROOT = Path(__file__).resolve().parents[3]
VECTORS = REPO_ROOT / "tests" / "vectors" / "ids.json"

#: How long a server may take to print its "listening on" line.
START_TIMEOUT = 30.0


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the test process
    dies, even by SIGKILL or the hard time limit, so no server outlives a
    test run."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_env(extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    # No TRADEID_* setting from the caller's environment may reach the
    # server (TRADEID_MAX_BATCH, TRADEID_ALLOW, ...): tests set what they use.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEID_")}
    env.setdefault("RUST_LOG", "warn")
    env.update(extra or {})
    return env


def init_state(binary: Path, directory: Path, *, tiny: bool = False) -> Path:
    """``tradeid init``; ``tiny`` makes a 4096-ID space (for !ERR507)."""
    state = directory / "state"
    command = [str(binary), "init", "--state", str(state)]
    if tiny:
        command += ["--width", "12", "--shard-bits", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=_child_env(None), timeout=60)
    assert result.returncode == 0, f"init failed: {result.stderr}"
    return state


class Server:
    """A running ``tradeid serve``."""

    def __init__(
        self,
        binary: Path,
        state: Path,
        *,
        listen: str = "127.0.0.1:0",
        workers: int = 2,
        max_batch: Optional[int] = None,
        block_max: Optional[int] = None,
        admin: bool = False,
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        command = [str(binary), "serve", "--state", str(state), "--listen", listen, "--workers", str(workers)]
        if max_batch is not None:
            command += ["--max-batch", str(max_batch)]
        if block_max is not None:
            command += ["--block-max", str(block_max)]
        if admin:
            command += ["--admin", "127.0.0.1:0"]
        self.stderr_path = state.with_name(state.name + f".stderr.{time.monotonic_ns()}")
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=_child_env(env),
            preexec_fn=_die_with_parent,
        )
        self.admin: Optional[str] = None
        self.addr = self._wait_listening()

    def _wait_listening(self) -> str:
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        assert self.process.stdout is not None
        stdout: IO[bytes] = self.process.stdout

        def read() -> None:  # keeps draining stdout for the server's lifetime
            for raw in stdout:
                lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise AssertionError(f"server did not start:\n{self.stderr_text()}")
            if line.startswith("admin listening on "):
                self.admin = line[len("admin listening on ") :].strip()
            elif line.startswith("listening on "):
                return line[len("listening on ") :].strip()

    def stderr_text(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9, and wait for the process to go."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._stderr.close()

    def error_replies(self, code: int) -> float:
        """How many ``!ERR<code>`` replies the server sent over UDP, from its
        admin /metrics page (needs ``admin=True``): the sum of the
        ``tradeid_errors_total`` samples labelled with that code (and with
        protocol "udp", where samples carry a protocol)."""
        assert self.admin is not None, "start the server with admin=True"
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=10) as response:
            text = response.read().decode()
        total, seen = 0.0, False
        for line in text.splitlines():
            if not line.startswith("tradeid_errors_total{"):
                continue
            labels = line[line.index("{") : line.index("}")]
            if f'code="{code}"' in labels and ("protocol=" not in labels or 'protocol="udp"' in labels):
                total += float(line.split()[-1])
                seen = True
        assert seen, f"no tradeid_errors_total sample for code {code} in /metrics:\n{text}"
        return total


_GIVEN_PORTS: "set[int]" = set()


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nothing listens on right now, and that nothing else can
    take while the test does not hold it: it lies outside the kernel's
    ephemeral range (net.ipv4.ip_local_port_range), where no bind to port
    0 and no outgoing connection anywhere on the machine lands. A test that
    stops a server and starts it again on the same port needs that: a port
    from the ephemeral range can be taken in between, and the server then
    rightly refuses to share it. Never the same port twice in this process.
    (On a host whose ephemeral range leaves no room outside it, an ordinary
    free port.)"""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first, last = (int(v) for v in f.read().split()[:2])
    except (OSError, ValueError):
        first, last = 32768, 60999
    if first >= 1024 + 4000:  # below the range if there is room, else above
        low, high = max(1024, first - 12000), first
    elif last <= 65535 - 4000:
        low, high = last + 1, min(65535, last + 12000)
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in _GIVEN_PORTS:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        _GIVEN_PORTS.add(port)
        return port
    raise AssertionError(f"no free UDP port in {low}..{high} after 1000 tries")


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"



_ALPHABET_DELETE = str.maketrans("", "", tradeid.ALPHABET)


def assert_ids(ids: Iterable[str], count: Optional[int] = None) -> List[str]:
    """Every ID is 7 canonical characters and none repeats; returns them."""
    ids = list(ids)
    if count is not None:
        assert len(ids) == count, f"got {len(ids)} IDs, wanted {count}"
    assert all(type(i) is str and len(i) == 7 for i in ids), "an ID is not a 7-character str"
    assert not "".join(ids).translate(_ALPHABET_DELETE), "an ID has a non-canonical character"
    duplicates = len(ids) - len(set(ids))
    assert duplicates == 0, f"{duplicates} duplicate IDs"
    return ids
