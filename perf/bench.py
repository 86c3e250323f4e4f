#!/usr/bin/env python3
"""Side-by-side benchmarks of tradeid against the echo baseline (builds the
release binaries first).

Every comparison runs both servers in the same invocation, alternating
(A B B A ..., or A B C, B C A, ... for three), and reports the median of
the repetitions and the ratio. Run from
the repository root after `cargo build --release --workspace`:

    python3 perf/bench.py [--seconds 3] [--reps 3] [--only single,bulk,checkchar,latency,rss,limits,steering,cluster]
    python3 perf/bench.py --only protocols      # UDP vs gRPC Next vs HTTP /ids, 1 and 1,000 IDs per call
    python3 perf/bench.py --only python         # the Python client (clients/python/bench.py)
    python3 perf/bench.py --only builds --baseline-rev c139caf    # before/after, side by side
    python3 perf/bench.py --only builds --baseline-bin OTHER/tradeid --baseline-label "before X"
    python3 perf/bench.py --only restarts --baseline-rev 1360fe5^   # IDs reserved vs served over many restarts

`--only restarts` counts IDs, not time: each build is started and stopped
`--restarts` times on a state file of its own (half SIGTERM, half kill -9),
serving the same few requests each time, and `inspect` then tells how many
IDs the restarts reserved against how many the client received.

`--only builds` compares this build with another build of tradeid, single
ID and bulk, each as a ratio to the echo baseline, rotated in one run.
`--baseline-rev REV` builds the other one itself: it exports REV (any git
revision) into a temporary directory with `git archive`, builds its
`tradeid` binary in release (target/baseline/, reused by later runs) and
keeps it as target/baseline/tradeid-COMMIT.

Prints Markdown tables (the ones in perf.md).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRADEID = os.path.join(ROOT, "target/release/tradeid")
LOADGEN = os.path.join(ROOT, "target/release/loadgen")


class Server:
    """A server process on loopback, stopped on exit. `stderr` is a file to
    log to (default: discarded), `env` extra environment."""

    def __init__(self, argv, env=None, stderr=None):
        self.grpc = self.admin = None  # with --grpc / --admin
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr or subprocess.DEVNULL, text=True,
                                     env={**os.environ, **(env or {})})
        for line in self.proc.stdout:
            if line.startswith("grpc listening on "):
                self.grpc = line.split()[-1]
            elif line.startswith("admin listening on "):
                self.admin = line.split()[-1]
            elif line.startswith("listening on "):
                self.addr = line.split()[-1]
                return
        raise RuntimeError(f"{argv[0]} did not start")

    def metrics(self):
        """The admin listener's /metrics as {series: value}."""
        import urllib.request
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l and not l.startswith("#")}

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def tradeid(workers, extra=(), binary=None, init_extra=(), max_batch=175):
    binary = binary or TRADEID
    state = os.path.join(tempfile.mkdtemp(prefix="tradeid-bench-"), "state")
    subprocess.run([binary, "init", "--state", state, *init_extra], check=True, stdout=subprocess.DEVNULL)
    return Server([binary, "serve", "--state", state, "--listen", "127.0.0.1:0", "--workers", str(workers),
                   "--max-batch", str(max_batch), *extra])


def echo(workers, reply_len, cpus=None):
    pin = ["--cpus", cpus] if cpus else []
    return Server([LOADGEN, "echo", "--listen", "127.0.0.1:0", "--workers", str(workers),
                   "--reply-len", str(reply_len), "--duration", "600", *pin])


def load(server, seconds, args):
    out = subprocess.run([LOADGEN, "--target", server.addr, "--duration", str(seconds), "--quiet",
                          "--server-pid", str(server.proc.pid), "--json", "-", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def pair(make_a, make_b, seconds, reps, args_a, args_b):
    """Runs A and B alternately, in the order A B B A A B ... (so that
    neither always runs first or second: on this VM the second server of a
    back-to-back pair measured a few percent slower whichever it was);
    returns (runs_a, runs_b)."""
    runs_a, runs_b = [], []
    for rep in range(reps):
        order = ((make_a, args_a, runs_a), (make_b, args_b, runs_b))
        for make, args, runs in (order if rep % 2 == 0 else order[::-1]):
            server = make()
            try:
                time.sleep(0.2)
                runs.append(load(server, seconds, args))
            finally:
                server.stop()
    return runs_a, runs_b


def rotate(cases, seconds, reps):
    """Runs every (name, make_server, loadgen_args) case in turn, `reps`
    rounds, each starting one case later (A B C, B C A, C A B, ...), and
    returns {name: [runs]}."""
    runs = {name: [] for name, _, _ in cases}
    for rep in range(reps):
        k = rep % len(cases)  # so that no case always runs first
        for name, make, args in cases[k:] + cases[:k]:
            server = make()
            try:
                time.sleep(0.2)
                runs[name].append(load(server, seconds, args))
            finally:
                server.stop()
    return runs


def build_rev(rev):
    """The release `tradeid` binary of git revision `rev`, built from a
    clean export of that revision (not from the working tree), once per
    commit."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    out = os.path.join(ROOT, "target", "baseline")
    binary = os.path.join(out, f"tradeid-{commit[:12]}")
    if os.path.exists(binary):
        return binary
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tradeid-baseline-") as tree:
        archive = subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tree], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            sys.exit(f"git archive {commit} failed")
        print(f"building tradeid at {rev} ({commit[:12]}) in release; this takes minutes", file=sys.stderr)
        env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(out, "target"))
        subprocess.run(["cargo", "build", "--release", "--locked", "--quiet", "--bin", "tradeid"], cwd=tree, env=env,
                       check=True)
    os.replace(os.path.join(out, "target", "release", "tradeid"), binary)
    return binary


def builds(o):
    """This build against another build of tradeid (--baseline-bin, or
    --baseline-rev built here), each as a ratio to the echo baseline, all
    three rotated in one run."""
    if o.baseline_rev:
        o.baseline_bin = build_rev(o.baseline_rev)
        o.baseline_label = o.baseline_label if o.baseline_label != "baseline" else o.baseline_rev
    if not o.baseline_bin:
        sys.exit("--only builds needs --baseline-rev REV (a git revision to build) or --baseline-bin PATH (a tradeid "
                 "binary built from another commit)")
    print(f"\n### This build vs {o.baseline_label} (1 worker on CPU 1, loadgen on CPU 0, 4 sockets x 16)\n")
    print(f"| workload | echo req/s | this build req/s | ratio to echo | {o.baseline_label} req/s | ratio to echo | this / {o.baseline_label} |")
    print("|---|---|---|---|---|---|---|")
    lg = ["--sockets", "4", "--window", "16", "--cpus", "0"]
    pin = ["--cpus", "1"]
    for batch in (1, 175):
        hexreq = "49440101" + f"{batch:04x}" + "0000"
        runs = rotate([
            ("echo", lambda: echo(1, 7 * batch, "1"), lg + ["--request-hex", hexreq, "--reply-len", str(7 * batch)]),
            ("this", lambda: tradeid(1, pin), lg + ["--batch", str(batch)]),
            ("baseline", lambda: tradeid(1, pin, binary=o.baseline_bin), lg + ["--batch", str(batch)]),
        ], o.seconds, o.reps)
        e, t, b = (med(runs[k], "requests_per_second") for k in ("echo", "this", "baseline"))
        name = "single ID" if batch == 1 else f"bulk {batch}"
        print(f"| {name} | {e:,.0f} | {t:,.0f} | {t / e:.3f} | {b:,.0f} | {b / e:.3f} | {t / b:.3f} |")
        sys.stdout.flush()


def restarts(o):
    """IDs reserved against IDs served over many restarts of a lightly
    loaded server, for this build and, with --baseline-rev/-bin, another:
    what each restart costs the space. Every ID received is checked unique."""
    import socket
    builds = [("this build", TRADEID)]
    if o.baseline_rev:
        builds.append((o.baseline_rev, build_rev(o.baseline_rev)))
    elif o.baseline_bin:
        builds.append((o.baseline_label, o.baseline_bin))
    requests, batch = 124, 175
    request = bytes([0x49, 0x44, 0x01, 0x01]) + batch.to_bytes(2, "big") + bytes(2)
    print(f"\n### {o.restarts} restarts, 2 workers, {requests} requests of {batch} IDs each time, "
          "every other one ended by kill -9\n")
    print("| build | IDs received (all unique) | reserved | reserved per restart | reserved / received | served (inspect) |")
    print("|---|---|---|---|---|---|")
    for label, binary in builds:
        state = os.path.join(tempfile.mkdtemp(prefix="tradeid-bench-"), "state")
        subprocess.run([binary, "init", "--state", state], check=True, stdout=subprocess.DEVNULL)
        seen = set()
        for r in range(o.restarts):
            server = Server([binary, "serve", "--state", state, "--listen", "127.0.0.1:0", "--workers", "2"])
            host, port = server.addr.rsplit(":", 1)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(2)
                for _ in range(requests):
                    sock.sendto(request, (host, int(port)))
                    reply = sock.recv(65536)
                    if reply.startswith(b"!"):
                        continue
                    for k in range(0, len(reply), 7):
                        id_ = reply[k:k + 7]
                        if id_ in seen:
                            sys.exit(f"{label}: {id_!r} handed out twice")
                        seen.add(id_)
            if r % 2:
                server.stop()
            else:
                server.proc.kill()
                server.proc.wait()
        text = subprocess.run([binary, "inspect", "--state", state], check=True, capture_output=True,
                              text=True).stdout
        fields = {l.split()[0]: l.split()[1:] for l in text.splitlines() if l.strip()}
        # Builds before the served count print the reserved count as "used".
        reserved = int((fields.get("reserved") or fields["used"])[0])
        served = f"at least {int(fields['served'][2]):,}" if "served" in fields else "not recorded"
        print(f"| {label} | {len(seen):,} | {reserved:,} | {reserved / o.restarts:,.0f} | "
              f"{reserved / len(seen):.2f} | {served} |")
        sys.stdout.flush()


class Etcd:
    """A single-member etcd on loopback (Debian's etcd-server), data on disk."""

    def __init__(self):
        import socket
        def port():
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return sock.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="tradeid-bench-etcd-")
        self.url = f"http://127.0.0.1:{port()}"
        self.proc = subprocess.Popen(
            ["etcd", "--data-dir", os.path.join(self.dir, "data"), "--listen-client-urls", self.url,
             "--advertise-client-urls", self.url, "--listen-peer-urls", f"http://127.0.0.1:{port()}",
             "--logger", "zap", "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)

    def cpu_seconds(self):
        """etcd's user + system CPU time so far, from /proc."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def cluster_node(etcd, name, workers, extra=(), env=None, stderr=None):
    state = os.path.join(tempfile.mkdtemp(prefix="tradeid-bench-"), "state")
    subprocess.run([TRADEID, "init", "--state", state, "--etcd", etcd.url, "--cluster", name], check=True,
                   stdout=subprocess.DEVNULL)
    return Server([TRADEID, "serve", "--state", state, "--listen", "127.0.0.1:0", "--workers", str(workers),
                   "--max-batch", "175", "--etcd", etcd.url, "--cluster", name, *extra], env=env, stderr=stderr)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def cluster(o):
    """Cluster mode (one node on etcd) against standalone and echo, single ID
    and bulk 175, rotated in one run; then, at full bulk speed, the etcd
    transactions per second that load needs and their latency."""
    etcd = Etcd()
    try:
        print("\n### Cluster mode vs standalone (1 worker on CPU 1, loadgen on CPU 0, 4 sockets x 16; one etcd on loopback)\n")
        print("| workload | echo req/s | standalone req/s | cluster req/s | cluster / standalone | standalone / echo | cluster / echo "
              "| standalone CPU us/reply | cluster CPU us/reply | etcd CPU % of a core |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        lg = ["--sockets", "4", "--window", "16", "--cpus", "0"]
        counter = [0]

        def node():
            counter[0] += 1
            return cluster_node(etcd, f"bench{counter[0]}", 1, ["--cpus", "1"])

        for batch in (1, 175):
            hexreq = "49440101" + f"{batch:04x}" + "0000"
            # etcd's CPU over the whole rotation (it runs on these two cores
            # too, which a production etcd would not).
            etcd_cpu_before, etcd_wall_before = etcd.cpu_seconds(), time.time()
            runs = rotate([
                ("echo", lambda: echo(1, 7 * batch, "1"), lg + ["--request-hex", hexreq, "--reply-len", str(7 * batch)]),
                ("standalone", lambda: tradeid(1, ["--cpus", "1"]), lg + ["--batch", str(batch)]),
                ("cluster", node, lg + ["--batch", str(batch)]),
            ], o.seconds, o.reps)
            e, a, c = (med(runs[k], "requests_per_second") for k in ("echo", "standalone", "cluster"))
            ca, cc = (med(runs[k], "server_cpu_us_per_reply") for k in ("standalone", "cluster"))
            etcd_cpu = 100 * (etcd.cpu_seconds() - etcd_cpu_before) / (time.time() - etcd_wall_before)
            name = "single ID" if batch == 1 else f"bulk {batch}"
            print(f"| {name} | {e:,.0f} | {a:,.0f} | {c:,.0f} | {c / a:.3f} | {a / e:.3f} | {c / e:.3f} "
                  f"| {ca:.2f} | {cc:.2f} | {etcd_cpu:.1f} |")
            sys.stdout.flush()
        # The etcd load full bulk speed needs: transactions per second from
        # the node's metrics over the load, each transaction's latency and
        # each block's size from its debug log (one line per txn and block).
        print("\n### etcd reservations at full bulk speed (1 worker on CPU 1, bulk 175, loadgen on CPU 0; one etcd on loopback)\n")
        print("| run | IDs/s | committed txn/s | conflicts | errors | txn p50 us | txn p99 us | txn max us | median block |")
        print("|---|---|---|---|---|---|---|---|---|")
        log_filter = "info,tradeid_server::cluster=debug,tradeid::generator=debug"
        for rep in range(o.reps):
            log = tempfile.NamedTemporaryFile("w+", prefix="tradeid-bench-log-", suffix=".txt")
            server = cluster_node(etcd, f"load{rep}", 1, ["--cpus", "1", "--admin", "127.0.0.1:0"],
                                  env={"TRADEID_LOG": log_filter, "NO_COLOR": "1"}, stderr=log)
            try:
                time.sleep(0.2)
                before = server.metrics()
                result = load(server, o.seconds * 2, lg + ["--batch", "175"])
                after = server.metrics()
            finally:
                server.stop()
            log.seek(0)
            lines = log.read().splitlines()
            txn_us = [int(l.split(" us=")[1].split()[0]) for l in lines
                      if "etcd reservation txn" in l and 'result="committed"' in l]
            blocks = [int(l.split(" ids=")[1].split()[0]) for l in lines if "block reserved" in l]
            delta = lambda k: after.get(f'tradeid_etcd_txn_total{{result="{k}"}}', 0) - before.get(f'tradeid_etcd_txn_total{{result="{k}"}}', 0)
            print(f"| {rep + 1} | {result['ids_per_second']:,.0f} | {delta('committed') / result['seconds']:.1f} | "
                  f"{delta('conflict'):.0f} | {delta('error'):.0f} | {percentile(txn_us, 0.5):,} | "
                  f"{percentile(txn_us, 0.99):,} | {max(txn_us, default=0):,} | {percentile(blocks, 0.5):,} |")
            sys.stdout.flush()
        print("\nLatencies cover every committed reservation of the run (start included); see also "
              "`cargo bench --bench cluster_scale` for many nodes at once.")
    finally:
        etcd.stop()


def rpc_load(server, target, seconds, args):
    """`loadgen rpc` (gRPC or HTTP) against `target`, a listener of `server`."""
    out = subprocess.run([LOADGEN, "rpc", "--target", target, "--duration", str(seconds), "--quiet",
                          "--server-pid", str(server.proc.pid), "--json", "-", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def protocols(o):
    """UDP, gRPC Next and HTTP /ids side by side, at 1 and 1,000 IDs per
    call, from one Rust client (loadgen) on CPU 0 with 64 calls in flight,
    against one server (its UDP worker on CPU 1), rotated in one run.

    The client is Rust on a core of its own so that the server is what is
    measured (a Python grpcio client tops out far below the server); the
    server's CPU time per call and per ID, from /proc, compares what each
    protocol costs the server whatever the client's speed."""
    print("\n### Protocols: UDP vs gRPC `Next` vs HTTP `/ids` (server: 1 UDP worker on CPU 1, `--max-batch 1000`; "
          "client: loadgen on CPU 0, 64 calls in flight)\n")
    print("UDP: 4 sockets x window 16; a call for 1,000 IDs is 6 datagrams of at most 175 IDs (one MTU; the "
          "default --max-batch), so that row is loadgen --batch 175 counted per 1,000 IDs (its latency is per "
          "datagram). gRPC: 4 HTTP/2 connections x 16 concurrent calls. HTTP/1.1: 64 keep-alive connections, one "
          "call each. The gRPC runtime and the admin listener run on threads of their own, not pinned. Server CPU "
          "is the whole process's, per answered call.\n")
    print("| IDs per call | protocol | calls/s | IDs/s | calls/s vs UDP | server CPU us/call | server CPU ns/ID | "
          "client CPU us/call | p50 us | p99 us | lost + errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def make():
        return tradeid(1, ["--cpus", "1", "--grpc", "127.0.0.1:0", "--admin", "127.0.0.1:0"], max_batch=1000)

    for count in (1, 1000):
        per_datagram = min(count, 175)
        cases = [
            ("UDP", lambda s: load(s, o.seconds, ["--sockets", "4", "--window", "16", "--cpus", "0",
                                                  "--batch", str(per_datagram)])),
            ("gRPC", lambda s: rpc_load(s, s.grpc, o.seconds, ["--protocol", "grpc", "--count", str(count),
                                                               "--connections", "4", "--window", "16", "--cpu", "0"])),
            ("HTTP", lambda s: rpc_load(s, s.admin, o.seconds, ["--protocol", "http", "--count", str(count),
                                                                "--connections", "4", "--window", "16", "--cpu", "0"])),
        ]
        runs = {name: [] for name, _ in cases}
        for _ in range(o.reps):
            for name, run in cases:
                server = make()
                try:
                    time.sleep(0.2)
                    runs[name].append(run(server))
                finally:
                    server.stop()
        udp = med(runs["UDP"], "ids_per_second") / count
        for name, _ in cases:
            r = runs[name]
            # Per call of `count` IDs (UDP: `count / per_datagram` datagrams).
            scale = count / per_datagram if name == "UDP" else 1
            ids = med(r, "ids_per_second")
            calls = ids / count
            cpu = med(r, "server_cpu_us_per_reply") * scale
            client = med(r, "client_cpu_us_per_reply") * scale
            failed = sum(x["lost"] + x["malformed"] + sum(x["errors"].values()) for x in r)
            p50 = statistics.median(x["latency_us"]["p50"] for x in r)
            p99 = statistics.median(x["latency_us"]["p99"] for x in r)
            label = f"UDP ({count // per_datagram + (count % per_datagram > 0)} datagrams)" if scale > 1 else name
            print(f"| {count:,} | {label} | {calls:,.0f} | {ids:,.0f} | {calls / udp:.3f} | {cpu:.2f} | "
                  f"{cpu * 1000 / count:,.1f} | {client:.2f} | {p50:,.0f} | {p99:,.0f} | {failed} |")
            sys.stdout.flush()


def python(o):
    """The Python client's own benchmark (clients/python/bench.py): UDP
    generate_bulk and generate() vs HTTP /ids and /id driven from Python,
    against this release build, alternated in one run."""
    print("\n### The Python client (clients/python/bench.py)\n")
    sys.stdout.flush()
    subprocess.run([sys.executable, os.path.join(ROOT, "clients/python/bench.py"), "--bin", TRADEID,
                    "--reps", str(o.reps), "--seconds", str(o.seconds), "--bulk", str(o.python_bulk)], check=True)


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def single(o):
    print("\n### Single ID: tradeid vs echo (7-byte replies)\n")
    print("Pinned: the server's worker on CPU 1, loadgen on CPU 0. Unpinned 2-worker rows share both cores with loadgen.\n")
    print("| server workers | loadgen sockets x window | tradeid req/s | echo req/s | ratio | tradeid CPU us/reply | echo CPU us/reply | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|")
    configs = [(1, "1", s, w) for s, w in ((1, 16), (4, 16), (8, 32))] + [(2, None, s, w) for s, w in ((4, 16), (8, 32))]
    for workers, cpus, sockets, window in configs:
        lg = ["--sockets", str(sockets), "--window", str(window)] + (["--cpus", "0"] if cpus else [])
        pin = ["--cpus", cpus] if cpus else []
        a, b = pair(lambda: tradeid(workers, pin), lambda: echo(workers, 7, cpus), o.seconds, o.reps,
                    lg, lg + ["--request-hex", "4944010100010000", "--reply-len", "7"])
        ta, tb = med(a, "requests_per_second"), med(b, "requests_per_second")
        ca, cb = med(a, "server_cpu_us_per_reply"), med(b, "server_cpu_us_per_reply")
        label = f"{workers} (CPU {cpus})" if cpus else f"{workers} (unpinned load)"
        print(f"| {label} | {sockets} x {window} | {ta:,.0f} | {tb:,.0f} | {ta / tb:.3f} | {ca:.2f} | {cb:.2f} | {ca / cb:.3f} |")
        sys.stdout.flush()


def bulk(o):
    print("\n### Bulk: tradeid vs echo with the same reply sizes (1 worker on CPU 1, loadgen on CPU 0, 4 sockets x 16)\n")
    print("| IDs/request | reply bytes | tradeid req/s | echo req/s | datagram ratio | tradeid IDs/s | goal IDs/s (0.7 x echo x batch) |")
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 16, 175):
        lg = ["--sockets", "4", "--window", "16", "--cpus", "0"]
        hexreq = "49440101" + f"{batch:04x}" + "0000"
        a, b = pair(lambda: tradeid(1, ["--cpus", "1"]), lambda: echo(1, 7 * batch, "1"), o.seconds, o.reps,
                    lg + ["--batch", str(batch)], lg + ["--request-hex", hexreq, "--reply-len", str(7 * batch)])
        ta, tb = med(a, "requests_per_second"), med(b, "requests_per_second")
        print(f"| {batch} | {7 * batch} | {ta:,.0f} | {tb:,.0f} | {ta / tb:.3f} | {med(a, 'ids_per_second'):,.0f} | {0.7 * tb * batch:,.0f} |")
        sys.stdout.flush()


def checkchar(o):
    """Issue 15: IDs with a check character against plain IDs, side by side
    (1 worker on CPU 1, loadgen on CPU 0, 4 sockets x 16). Goal: within 2%."""
    print("\n### Check character: plain vs --check-char IDs (1 worker on CPU 1, loadgen on CPU 0, 4 sockets x 16)\n")
    print("| IDs/request | plain req/s | check req/s | ratio | plain CPU us/reply | check CPU us/reply |")
    print("|---|---|---|---|---|---|")
    for batch in (1, 175):
        lg = ["--sockets", "4", "--window", "16", "--cpus", "0", "--batch", str(batch)]
        a, b = pair(lambda: tradeid(1, ["--cpus", "1"]), lambda: tradeid(1, ["--cpus", "1"], init_extra=["--check-char"]),
                    o.seconds, o.reps, lg, lg)
        ta, tb = med(a, "requests_per_second"), med(b, "requests_per_second")
        ca, cb = med(a, "server_cpu_us_per_reply"), med(b, "server_cpu_us_per_reply")
        print(f"| {batch} | {ta:,.0f} | {tb:,.0f} | {tb / ta:.3f} | {ca:.2f} | {cb:.2f} |")
        sys.stdout.flush()


def latency(o):
    print("\n### Latency at fixed rates, open loop (1 worker on CPU 1, loadgen on CPU 0, 4 sockets; latency from intended send time)\n")
    lg = ["--sockets", "4", "--window", "16", "--cpus", "0"]
    a, _ = pair(lambda: tradeid(1, ["--cpus", "1"]), lambda: echo(1, 7, "1"), o.seconds, 1, lg,
                lg + ["--request-hex", "4944010100010000", "--reply-len", "7"])
    peak = med(a, "requests_per_second")
    print(f"Measured closed-loop maximum for tradeid: {peak:,.0f} req/s.\n")
    print(f"Each cell is the median of {o.reps} runs.\n")
    print("| rate | server | achieved/s | p50 us | p90 us | p99 us | p99.9 us | max us | runs where loadgen fell behind |")
    print("|---|---|---|---|---|---|---|---|---|")
    for frac in (0.25, 0.5, 0.75):
        rate = int(peak * frac)
        lg = ["--sockets", "4", "--rate", str(rate), "--cpus", "0"]
        a, b = pair(lambda: tradeid(1, ["--cpus", "1"]), lambda: echo(1, 7, "1"), o.seconds, o.reps, lg,
                    lg + ["--request-hex", "4944010100010000", "--reply-len", "7"])
        for name, runs in (("tradeid", a), ("echo", b)):
            pct = {k: statistics.median(r["latency_us"][k] for r in runs) for k in ("p50", "p90", "p99", "p999", "max")}
            behind = sum(r["generator_fell_behind"] for r in runs)
            achieved = statistics.median(r["sent"] / r["seconds"] for r in runs)
            print(f"| {int(frac * 100)}% ({rate:,}/s) | {name} | {achieved:,.0f} | {pct['p50']:.0f} | {pct['p90']:.0f} | {pct['p99']:.0f} | {pct['p999']:.0f} | {pct['max']:.0f} | {behind}/{len(runs)} |")
        sys.stdout.flush()


def rss(o):
    print("\n### Resident memory\n")
    server = tradeid(2)
    try:
        time.sleep(0.2)
        load(server, 2, ["--batch", "175", "--sockets", "4", "--window", "16"])
        print(f"tradeid with 2 workers after a bulk run: VmRSS {server.rss_kib() / 1024:.1f} MiB")
    finally:
        server.stop()


def limits(o):
    print("\n### Cost of the network protections (1 worker on CPU 1, loadgen on CPU 0, 4 sockets x 16, single ID)\n")
    print("| configuration | req/s | ratio to default | CPU us/reply |")
    print("|---|---|---|---|")
    lg = ["--sockets", "4", "--window", "16", "--cpus", "0"]
    pin = ["--cpus", "1"]
    base, limited = pair(lambda: tradeid(1, pin), lambda: tradeid(1, pin + ["--rate-limit", "100000000/s"]), o.seconds, o.reps, lg, lg)
    untrusted, _ = pair(lambda: tradeid(1, pin + ["--trust", "10.0.0.0/8"]), lambda: tradeid(1, pin), o.seconds, o.reps, lg, lg)
    b = med(base, "requests_per_second")
    for name, runs in (("default (allowlist + trust checks)", base), ("--rate-limit on (never triggers)", limited),
                       ("loopback untrusted (3x rule applied)", untrusted)):
        r = med(runs, "requests_per_second")
        print(f"| {name} | {r:,.0f} | {r / b:.3f} | {med(runs, 'server_cpu_us_per_reply'):.2f} |")


def steering(o):
    print("\n### SO_ATTACH_REUSEPORT_CBPF CPU steering (2 workers pinned to CPUs 0-1, 4 sockets x 16)\n")
    print("| configuration | req/s | ratio |")
    print("|---|---|---|")
    lg = ["--sockets", "4", "--window", "16"]
    off, on = pair(lambda: tradeid(2, ["--cpus", "0-1"]), lambda: tradeid(2, ["--cpus", "0-1", "--cpu-steering"]),
                   o.seconds, o.reps, lg, lg)
    a, b = med(off, "requests_per_second"), med(on, "requests_per_second")
    print(f"| hash (default) | {a:,.0f} | 1.000 |")
    print(f"| cpu steering | {b:,.0f} | {b / a:.3f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default="single,bulk,checkchar,latency,rss,limits,steering,cluster,protocols,python")
    p.add_argument("--python-bulk", type=int, default=5_000_000, help="for --only python: IDs per generate_bulk call")
    p.add_argument("--baseline-bin", help="for --only builds: a tradeid binary from another commit")
    p.add_argument("--baseline-rev", help="for --only builds: a git revision to build and compare with (e.g. c139caf)")
    p.add_argument("--baseline-label", default="baseline", help="what to call --baseline-bin in the table")
    p.add_argument("--restarts", type=int, default=100, help="for --only restarts: starts and stops per build")
    o = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "--workspace", "--quiet"], cwd=ROOT, check=True)
    for name in o.only.split(","):
        globals()[name](o)


if __name__ == "__main__":
    main()
