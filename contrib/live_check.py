#!/usr/bin/env python3
"""The dashboard and the alert rules against a real Prometheus scraping real
tradeid servers under load.

Starts, all on loopback and in a temporary directory:
- an etcd (Debian's etcd-server) and two tradeid nodes of one cluster, plus
  one standalone tradeid, each with --admin and --grpc;
- load on every node: UDP (single and bulk), gRPC (loadgen rpc) and HTTP
  /id and /ids, so every protocol label has samples;
- Prometheus (Debian's prometheus) scraping the three every second, with
  contrib/prometheus/alerts.yml loaded.

Then, through Prometheus's HTTP API, checks that:
- the rule file loaded (every group of alerts.yml present, every rule
  healthy);
- every query of contrib/grafana/tradeid.json is accepted and returns data
  (the cluster row's queries too: two of the targets are cluster nodes);
- `promtool check metrics` accepts each server's /metrics.

Usage: python3 contrib/live_check.py [--keep] (needs target/release/tradeid
and target/release/loadgen: `cargo build --release --workspace`).
Exits non-zero on the first failure. Standard library only.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRADEID = os.path.join(ROOT, "target", "release", "tradeid")
LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")
PROCS = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv, stdout=subprocess.DEVNULL):
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.DEVNULL, text=True)
    PROCS.append(proc)
    return proc


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def serve(work, name, extra):
    """Starts a tradeid and returns its (udp, admin, grpc) addresses."""
    state = os.path.join(work, name)
    proc = spawn([TRADEID, "serve", "--state", state, "--listen", "127.0.0.1:0", "--workers", "1",
                  "--admin", "127.0.0.1:0", "--grpc", "127.0.0.1:0", *extra], stdout=subprocess.PIPE)
    udp = admin = grpc = None
    for line in proc.stdout:
        if line.startswith("admin listening on "):
            admin = line.split()[-1]
        if line.startswith("grpc listening on "):
            grpc = line.split()[-1]
        if line.startswith("listening on "):
            udp = line.split()[-1]
            break
    if not udp or not admin or not grpc:
        fail(f"tradeid {name} did not start")
    # Whatever else it prints must never fill the pipe and block it.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return udp, admin, grpc


def get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def query(prom, expr):
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(get(url))
    except urllib.error.HTTPError as e:
        return json.loads(e.read().decode())


def main():
    keep = "--keep" in sys.argv
    for binary in (TRADEID, LOADGEN):
        if not os.path.exists(binary):
            fail(f"{binary} is missing: run `cargo build --release --workspace`")
    for tool in ("etcd", "prometheus", "promtool"):
        if not shutil.which(tool):
            fail(f"{tool} is not installed (apt-get install etcd-server prometheus)")
    work = tempfile.mkdtemp(prefix="tradeid-live-")
    try:
        etcd_url = f"http://127.0.0.1:{free_port()}"
        spawn(["etcd", "--data-dir", os.path.join(work, "etcd"), "--listen-client-urls", etcd_url,
               "--advertise-client-urls", etcd_url, "--listen-peer-urls", f"http://127.0.0.1:{free_port()}",
               "--logger", "zap", "--log-level", "error"])
        time.sleep(2)
        cluster = ["--etcd", etcd_url, "--cluster", "live"]
        for name in ("node-a", "node-b"):
            subprocess.run([TRADEID, "init", "--state", os.path.join(work, name), *cluster], check=True,
                           stdout=subprocess.DEVNULL)
        subprocess.run([TRADEID, "init", "--state", os.path.join(work, "standalone")], check=True,
                       stdout=subprocess.DEVNULL)
        servers = [serve(work, "node-a", cluster), serve(work, "node-b", cluster), serve(work, "standalone", [])]

        # Prometheus, scraping every second.
        prom = f"127.0.0.1:{free_port()}"
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            targets = ", ".join(f'"{admin}"' for _, admin, _ in servers)
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {os.path.join(ROOT, "contrib", "prometheus", "alerts.yml")}
scrape_configs:
  - job_name: tradeid
    static_configs:
      - targets: [{targets}]
""")
        spawn(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={os.path.join(work, 'tsdb')}",
               f"--web.listen-address={prom}"])

        # Load for long enough that every rate has two samples in its window.
        seconds = 25
        for udp, _, grpc in servers:
            spawn([LOADGEN, "--target", udp, "--duration", str(seconds), "--batch", "175", "--sockets", "1",
                   "--window", "4", "--quiet"])
            spawn([LOADGEN, "--target", udp, "--duration", str(seconds), "--rate", "2000", "--quiet"])
            spawn([LOADGEN, "rpc", "--protocol", "grpc", "--target", grpc, "--count", "100", "--connections", "1",
                   "--window", "2", "--duration", str(seconds), "--quiet"])
        deadline = time.time() + seconds
        while time.time() < deadline:
            for _, admin, _ in servers:
                get(f"http://{admin}/ids?count=10")
                get(f"http://{admin}/id")
            time.sleep(0.5)

        # The rules loaded, and are healthy.
        rules = json.loads(get(f"http://{prom}/api/v1/rules"))["data"]["groups"]
        with open(os.path.join(ROOT, "contrib", "prometheus", "alerts.yml")) as f:
            expected = re.findall(r"^  - name: (\S+)$", f.read(), re.MULTILINE)
        loaded = [g["name"] for g in rules]
        if not expected or sorted(loaded) != sorted(expected):
            fail(f"Prometheus loaded rule groups {loaded}; contrib/prometheus/alerts.yml has {expected}")
        broken = [(g["name"], r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r.get("health") != "ok"]
        if broken:
            fail(f"unhealthy rules: {broken}")
        print(f"ok: {sum(len(g['rules']) for g in rules)} rules in {len(rules)} groups loaded and healthy")

        # Every dashboard query is accepted and returns data.
        lines = subprocess.run([sys.executable, os.path.join(ROOT, "contrib", "grafana", "queries.py")],
                               check=True, capture_output=True, text=True).stdout.splitlines()
        empty = []
        for line in lines:
            q = json.loads(line)
            result = query(prom, q["expr"])
            if result.get("status") != "success":
                fail(f"panel {q['panel']!r}: query rejected: {result.get('error')}\n  {q['expr']}")
            if not result["data"]["result"]:
                empty.append(f"{q['row']} / {q['panel']}: {q['expr']}")
        if empty:
            fail("queries that returned no data:\n  " + "\n  ".join(empty))
        print(f"ok: all {len(lines)} dashboard queries accepted, each returned data")

        # promtool accepts each server's exposition.
        for _, admin, _ in servers:
            check = subprocess.run(["promtool", "check", "metrics"], input=get(f"http://{admin}/metrics"),
                                   capture_output=True, text=True)
            if check.returncode != 0:
                fail(f"promtool check metrics on {admin}:\n{check.stdout}{check.stderr}")
        print(f"ok: promtool check metrics accepts all {len(servers)} servers' /metrics")
    finally:
        for proc in PROCS:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
