#!/usr/bin/env python3
"""Measures the Python client against a local tradeid server, side by side
with the server's HTTP endpoints driven from Python.

    python3 clients/python/bench.py [--reps 5] [--bulk 5000000] [--seconds 2]

Starts ``tradeid serve`` (release build: ``--bin``, else ``$TRADEID_BIN``,
else target/release/tradeid, built if missing) on a fresh state file with
``--admin 127.0.0.1:0``, then runs each case ``--reps`` times, alternating
the cases, and prints the median, min and max of each:

* ``generate_bulk(N)``: IDs/s of one call for N IDs (pipelined UDP);
* ``generate()``: single IDs/s from a loop of calls (one round trip each);
* HTTP ``GET /ids?count=175``: IDs/s over one keep-alive http.client
  connection;
* HTTP ``GET /id``: single IDs/s over the same kind of connection.

``--placement`` decides where the server's worker and this process run:
``same`` (the default: both on CPU 0), ``split`` (worker on CPU 1, this
process on CPU 0) or ``free`` (the server's own default pinning, this
process wherever the scheduler puts it, which varies from run to run). On a
VM, ``split`` makes every round trip pay for waking the other, idle vCPU.
A timeout during a run (a busy machine) is counted and reported, not fatal.
The tradeid package is imported from the source tree next to this script
unless it is installed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
try:
    import tradeid
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(HERE / "src"))
    import tradeid


def find_binary(explicit: Optional[str]) -> Path:
    path = Path(explicit or os.environ.get("TRADEID_BIN") or REPO_ROOT / "target" / "release" / "tradeid")
    if not path.exists():
        print(f"building {path} ...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--bin", "tradeid"], cwd=REPO_ROOT, check=True)
    return path


class Server:
    """``tradeid serve`` with the admin listener, on a fresh state file."""

    def __init__(self, binary: Path, directory: Path, workers: int, cpus: Optional[str]) -> None:
        state = directory / "state"
        subprocess.run([str(binary), "init", "--state", str(state)], check=True, capture_output=True)
        command = [str(binary), "serve", "--state", str(state), "--listen", "127.0.0.1:0"]
        command += ["--workers", str(workers), "--admin", "127.0.0.1:0"]
        if cpus is not None:
            command += ["--cpus", cpus]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEID_")}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env
        )
        self.udp = self.admin = ""
        assert self.process.stdout is not None
        deadline = time.monotonic() + 30
        for raw in self.process.stdout:  # "admin listening on" comes first
            line = raw.decode().strip()
            if line.startswith("admin listening on "):
                self.admin = line.split()[-1]
            elif line.startswith("listening on "):
                self.udp = line.split()[-1]
                break
            if time.monotonic() > deadline:
                break
        if not self.udp or not self.admin:
            self.stop()
            raise SystemExit("the server did not start")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


#: Client errors (timeouts on a busy machine) seen during the runs.
errors: Dict[str, int] = {}


def udp_bulk(count: int) -> Tuple[float, List[str]]:
    ids: List[str] = []
    started = time.perf_counter()
    while len(ids) < count:
        try:
            ids += tradeid.generate_bulk(count - len(ids))
        except tradeid.TradeIdError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    elapsed = time.perf_counter() - started
    return count / elapsed, ids


def udp_single(seconds: float) -> float:
    generate = tradeid.generate
    calls = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        try:
            for _ in range(1000):
                generate()
                calls += 1
        except tradeid.TradeIdError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - started)


def http_rate(admin: str, path: str, seconds: float) -> float:
    """IDs/s from GET ``path`` repeated on one keep-alive connection."""
    host, port = admin.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    ids = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while True:
            for _ in range(100):
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise SystemExit(f"GET {path}: HTTP {response.status}: {body[:200]!r}")
                ids += len(body.split())
            now = time.perf_counter()
            if now >= deadline:
                return ids / (now - started)
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", help="the tradeid binary (default: $TRADEID_BIN or target/release/tradeid)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bulk", type=int, default=5_000_000, help="IDs per generate_bulk call")
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each single-ID and HTTP run")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--placement",
        choices=["same", "split", "free"],
        default="same",
        help="server worker and this process on one CPU, on two, or left to the scheduler",
    )
    parser.add_argument("--no-check", action="store_true", help="skip checking the bulk IDs for repeats")
    args = parser.parse_args()

    binary = find_binary(args.bin)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    placement = args.placement if len(cpus) >= 2 else "free"
    server_cpus = None
    if placement == "same":
        server_cpus = str(cpus[0])
    elif placement == "split":
        server_cpus = ",".join(str(c) for c in cpus[1 : 1 + args.workers])
    with tempfile.TemporaryDirectory() as directory:
        server = Server(binary, Path(directory), args.workers, server_cpus)
        try:
            if placement != "free":
                os.sched_setaffinity(0, {cpus[0]})
            os.environ["TRADEID_SERVERS"] = server.udp
            tradeid.reset_default_client()
            tradeid.generate_bulk(10_000)  # warm up: sockets, first blocks

            cases: Dict[str, Callable[[], float]] = {}
            checked = args.no_check

            def bulk() -> float:
                nonlocal checked
                rate, ids = udp_bulk(args.bulk)
                if not checked:
                    assert len(set(ids)) == len(ids), "repeated IDs"
                    checked = True
                return rate

            cases[f"UDP generate_bulk({args.bulk:,}), IDs/s"] = bulk
            cases["UDP generate() loop, IDs/s"] = lambda: udp_single(args.seconds)
            cases["HTTP GET /ids?count=175 keep-alive, IDs/s"] = lambda: http_rate(
                server.admin, "/ids?count=175", args.seconds
            )
            cases["HTTP GET /id keep-alive, IDs/s"] = lambda: http_rate(server.admin, "/id", args.seconds)
            results: Dict[str, List[float]] = {name: [] for name in cases}
            for rep in range(args.reps):
                for name, case in cases.items():
                    results[name].append(case())
                print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
        finally:
            server.stop()

    print(f"Python {platform.python_version()} ({sys.executable}), {platform.machine()}, {os.cpu_count()} CPUs")
    where = f"server worker on CPU {server_cpus}, bench on CPU {cpus[0]}" if server_cpus else "unpinned"
    print(f"server: {binary} --workers {args.workers}; placement {placement}: {where}; {args.reps} reps, cases alternated")
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    print(f"1-minute load average: {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    print("| case | median | min | max |")
    print("|---|---:|---:|---:|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f} | {max(values):,.0f} |")
    if errors:
        print()
        print("client errors during the runs (retried): " + ", ".join(f"{k} x{v}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
