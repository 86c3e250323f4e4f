"""Fixtures for the gRPC tests: stubs generated at test time from the repo's
.proto files by stock tooling (protoc with grpc_python_plugin, from Debian's
protobuf-compiler and protobuf-compiler-grpc), and a real tradeid server.

Run: python3 -m pytest tests/grpc  (with Debian's python3-grpcio and
python3-protobuf; TRADEID_BIN picks the binary, default target/debug/tradeid).
"""
import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")
BIN = os.environ.get("TRADEID_BIN", os.path.join(ROOT, "target", "debug", "tradeid"))


@pytest.fixture(scope="session")
def stubs():
    """Generates Python modules for tradeid.v1, grpc.health.v1 and server
    reflection, and imports them."""
    plugin = shutil.which("grpc_python_plugin")
    protoc = shutil.which("protoc")
    if not plugin or not protoc:
        pytest.fail("protoc and grpc_python_plugin are needed (apt-get install protobuf-compiler protobuf-compiler-grpc)")
    out = tempfile.mkdtemp(prefix="tradeid-grpc-stubs-")
    files = [
        "tradeid/v1/tradeid.proto",
        "grpc/health/v1/health.proto",
        "grpc/reflection/v1/reflection.proto",
        "grpc/reflection/v1alpha/reflection.proto",
    ]
    subprocess.run(
        [protoc, f"-I{PROTO}", f"--python_out={out}", f"--grpc_out={out}", f"--plugin=protoc-gen-grpc={plugin}", *files],
        check=True,
    )
    packages = ["tradeid", "tradeid/v1", "grpc", "grpc/health", "grpc/health/v1", "grpc/reflection",
                "grpc/reflection/v1", "grpc/reflection/v1alpha"]
    for package in packages:
        open(os.path.join(out, package, "__init__.py"), "a").close()
    # The generated `grpc` package would shadow grpcio's: load ours under
    # another name.
    os.rename(os.path.join(out, "grpc"), os.path.join(out, "grpcproto"))
    for root, _, names in os.walk(os.path.join(out, "grpcproto")):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                text = open(path).read().replace("from grpc.health", "from grpcproto.health").replace(
                    "from grpc.reflection", "from grpcproto.reflection")
                open(path, "w").write(text)
    sys.path.insert(0, out)
    mods = {
        "pb": importlib.import_module("tradeid.v1.tradeid_pb2"),
        "rpc": importlib.import_module("tradeid.v1.tradeid_pb2_grpc"),
        "health_pb": importlib.import_module("grpcproto.health.v1.health_pb2"),
        "health_rpc": importlib.import_module("grpcproto.health.v1.health_pb2_grpc"),
        "refl_pb": importlib.import_module("grpcproto.reflection.v1.reflection_pb2"),
        "refl_rpc": importlib.import_module("grpcproto.reflection.v1.reflection_pb2_grpc"),
        "refl_alpha_pb": importlib.import_module("grpcproto.reflection.v1alpha.reflection_pb2"),
        "refl_alpha_rpc": importlib.import_module("grpcproto.reflection.v1alpha.reflection_pb2_grpc"),
    }
    yield mods
    shutil.rmtree(out, ignore_errors=True)


class Server:
    """A `tradeid serve --grpc 127.0.0.1:0` process, killed at teardown."""

    def __init__(self, extra=(), init=(), env=None):
        self.dir = tempfile.mkdtemp(prefix="tradeid-grpc-")
        self.state = os.path.join(self.dir, "state")
        subprocess.run([BIN, "init", "--state", self.state, *init], check=True, stdout=subprocess.DEVNULL)
        self.start(extra, env)

    def start(self, extra=(), env=None):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--state", self.state, "--listen", "127.0.0.1:0", "--workers", "1",
             "--grpc", "127.0.0.1:0", "--admin", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.grpc = self.udp = self.admin = None
        deadline = threading.Event()
        timer = threading.Timer(30, deadline.set)
        timer.start()
        for line in self.proc.stdout:
            if line.startswith("grpc listening on "):
                self.grpc = line.split()[-1]
            elif line.startswith("admin listening on "):
                self.admin = line.split()[-1]
            elif line.startswith("listening on "):
                self.udp = line.split()[-1]
                break
            if deadline.is_set():
                break
        timer.cancel()
        assert self.grpc and self.udp, f"server did not start: {''.join(self.stderr)}"

    def stop(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()
    shutil.rmtree(s.dir, ignore_errors=True)


@pytest.fixture
def make_server():
    servers = []

    def make(**kwargs):
        s = Server(**kwargs)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)
