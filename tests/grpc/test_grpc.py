"""tradeid's gRPC API, driven by a stock third-party client (Python grpcio)
with stubs generated from the proto at test time. Uniqueness is checked on
the IDs themselves."""
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

ID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{7}$")


def channel(server):
    return grpc.insecure_channel(server.grpc)


def test_next_returns_unique_well_formed_ids(server, stubs):
    stub = stubs["rpc"].IdServiceStub(channel(server))
    seen = set()
    for count in [0, 1, 2, 175, 1000, 100_000]:
        ids = list(stub.Next(stubs["pb"].NextRequest(count=count), timeout=10).ids)
        assert len(ids) == max(count, 1)
        assert all(ID.match(i) for i in ids)
        assert seen.isdisjoint(ids)
        seen.update(ids)
        assert len(set(ids)) == len(ids)


def test_many_threads_share_one_channel_without_duplicates(server, stubs):
    stub = stubs["rpc"].IdServiceStub(channel(server))

    def work(_):
        got = []
        for i in range(200):
            got.extend(stub.Next(stubs["pb"].NextRequest(count=1 + i % 50), timeout=10).ids)
        return got

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(work, range(16)))
    everything = [i for r in results for i in r]
    assert len(everything) == len(set(everything))
    assert len(everything) == 16 * sum(1 + i % 50 for i in range(200))


def test_udp_http_and_grpc_never_overlap(server, stubs):
    import socket
    stub = stubs["rpc"].IdServiceStub(channel(server))
    got = list(stub.Next(stubs["pb"].NextRequest(count=500), timeout=10).ids)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    host, port = server.udp.rsplit(":", 1)
    s.sendto(bytes.fromhex("494401010064" + "0000"), (host, int(port)))
    reply = s.recv(2048).decode()
    got += [reply[i:i + 7] for i in range(0, len(reply), 7)]
    got += urllib.request.urlopen(f"http://{server.admin}/ids?count=100", timeout=5).read().decode().split()
    assert len(got) == 700 and len(set(got)) == 700
    metrics = urllib.request.urlopen(f"http://{server.admin}/metrics", timeout=5).read().decode()
    assert 'tradeid_ids_served_total{protocol="grpc"} 500' in metrics
    assert 'tradeid_requests_total{protocol="grpc"} 1' in metrics


def test_stream_delivers_large_counts_in_chunks(server, stubs):
    stub = stubs["rpc"].IdServiceStub(channel(server))
    replies = list(stub.Stream(stubs["pb"].NextRequest(count=250_000), timeout=60))
    ids = [i for r in replies for i in r.ids]
    assert len(ids) == 250_000 and len(set(ids)) == 250_000
    assert max(len(r.ids) for r in replies) <= 10_000


def test_limits_are_invalid_argument(server, stubs):
    stub = stubs["rpc"].IdServiceStub(channel(server))
    with pytest.raises(grpc.RpcError) as e:
        stub.Next(stubs["pb"].NextRequest(count=100_001), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit of 100000" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Stream(stubs["pb"].NextRequest(count=100_000_001), timeout=5))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def health_of(server, stubs, service=""):
    health = stubs["health_rpc"].HealthStub(channel(server))
    return health.Check(stubs["health_pb"].HealthCheckRequest(service=service), timeout=5).status


def wait_for_health(server, stubs, want, within=15):
    """Polls Check (both names) until it reports `want`; fails after `within` s."""
    deadline = time.time() + within
    while True:
        got = [health_of(server, stubs, name) for name in ("", "tradeid.v1.IdService")]
        if got == [want, want]:
            return
        assert time.time() < deadline, f"health stayed {got}, wanted {want}"
        time.sleep(0.1)


def test_health_is_serving_while_ready(server, stubs):
    serving = stubs["health_pb"].HealthCheckResponse.SERVING
    # Right after "listening on", not only after the first housekeeping tick.
    assert health_of(server, stubs, "tradeid.v1.IdService") == serving
    assert health_of(server, stubs) == serving
    with pytest.raises(grpc.RpcError) as e:
        health_of(server, stubs, "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_not_serving_while_a_worker_is_stalled(make_server, stubs, tmp_path):
    # Test hook: while the stall file exists, UDP worker 0 (the only one
    # here) is wedged and its heartbeat stops.
    stall = tmp_path / "stall"
    server = make_server(env={"TRADEID_TEST_STALL_FILE": str(stall)})
    assert any("test hooks are active" in line for line in server.stderr), (
        f"{server.proc.args[0]} was built without test hooks: build it with `cargo test` (not `cargo build`)")
    pb = stubs["health_pb"]
    watch = stubs["health_rpc"].HealthStub(channel(server)).Watch(pb.HealthCheckRequest(service=""), timeout=60)
    seen = [next(watch).status]
    assert seen == [pb.HealthCheckResponse.SERVING]
    stall.touch()
    wait_for_health(server, stubs, pb.HealthCheckResponse.NOT_SERVING)
    # gRPC itself still answers (it has its own generator handle): only
    # the health of the UDP plane changed.
    ids = stubs["rpc"].IdServiceStub(channel(server)).Next(stubs["pb"].NextRequest(count=10), timeout=5).ids
    assert len(set(ids)) == 10
    stall.unlink()
    wait_for_health(server, stubs, pb.HealthCheckResponse.SERVING)
    # Watch sends one message per change, not one per second.
    seen += [next(watch).status, next(watch).status]
    assert seen == [pb.HealthCheckResponse.SERVING, pb.HealthCheckResponse.NOT_SERVING,
                    pb.HealthCheckResponse.SERVING]
    watch.cancel()
    assert any("NOT_SERVING" in line and "heartbeat" in line for line in server.stderr), "".join(server.stderr)


def test_health_is_not_serving_once_the_server_stops(server, stubs):
    pb = stubs["health_pb"]
    statuses = []
    ended = []

    def watch():
        stub = stubs["health_rpc"].HealthStub(channel(server))
        try:
            for reply in stub.Watch(pb.HealthCheckRequest(service="tradeid.v1.IdService"), timeout=30):
                statuses.append(reply.status)
        except grpc.RpcError as e:
            ended.append(e.code())
        else:
            ended.append("end")

    t = threading.Thread(target=watch)
    t.start()
    deadline = time.time() + 10
    while not statuses:
        assert time.time() < deadline, "no first health message"
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    t.join(20)
    assert not t.is_alive(), "the Watch call hung after the server stopped"
    assert statuses == [pb.HealthCheckResponse.SERVING, pb.HealthCheckResponse.NOT_SERVING], (statuses, ended)
    assert server.proc.wait(10) == 0


def reflect(server, pb, rpc):
    refl = rpc.ServerReflectionStub(channel(server))
    return list(refl.ServerReflectionInfo(iter([
        pb.ServerReflectionRequest(list_services=""),
        pb.ServerReflectionRequest(file_containing_symbol="tradeid.v1.IdService"),
    ]), timeout=5))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_service(server, stubs, version):
    from google.protobuf import descriptor_pb2

    pb, rpc = (stubs["refl_pb"], stubs["refl_rpc"]) if version == "v1" else (
        stubs["refl_alpha_pb"], stubs["refl_alpha_rpc"])
    listed, described = reflect(server, pb, rpc)
    names = {s.name for s in listed.list_services_response.service}
    assert {"tradeid.v1.IdService", "grpc.health.v1.Health"} <= names
    assert f"grpc.reflection.{version}.ServerReflection" in names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    service = {f.name: f for f in files}["tradeid/v1/tradeid.proto"].service[0]
    assert service.name == "IdService"
    assert [m.name for m in service.method] == ["Next", "Stream"]


def test_exhausted_space_is_resource_exhausted(make_server, stubs):
    server = make_server(init=["--width", "10", "--shard-bits", "4"], extra=["--max-batch", "4", "--block-max", "16"])
    stub = stubs["rpc"].IdServiceStub(channel(server))
    seen = set()
    deadline = time.time() + 30
    while True:
        assert time.time() < deadline
        try:
            ids = stub.Next(stubs["pb"].NextRequest(count=16), timeout=5).ids
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            continue
        assert seen.isdisjoint(ids)
        seen.update(ids)
    assert 900 <= len(seen) <= 1024


def test_a_peer_outside_the_allowlist_is_denied(make_server, stubs):
    server = make_server(extra=["--allow", "10.0.0.0/8"])
    stub = stubs["rpc"].IdServiceStub(channel(server))
    with pytest.raises(grpc.RpcError) as e:
        stub.Next(stubs["pb"].NextRequest(count=1), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "127.0.0.1" in e.value.details()


def test_no_block_ready_is_unavailable(make_server, stubs):
    # A slow disk (test hook): every flush takes 2 s, so after the first
    # small blocks nothing is ready for a while.
    server = make_server(env={"TRADEID_TEST_FLUSH_DELAY_MS": "2000"})
    assert any("test hooks are active" in line for line in server.stderr), (
        f"{server.proc.args[0]} was built without test hooks: build it with `cargo test` (not `cargo build`)")
    stub = stubs["rpc"].IdServiceStub(channel(server))
    codes = []
    for _ in range(4):
        try:
            stub.Next(stubs["pb"].NextRequest(count=100_000), timeout=10)
            codes.append("ok")
        except grpc.RpcError as e:
            codes.append(e.code())
    assert grpc.StatusCode.UNAVAILABLE in codes, codes


def test_shutdown_mid_stream_ends_the_stream_cleanly(server, stubs):
    stub = stubs["rpc"].IdServiceStub(channel(server))
    got = []
    errors = []

    def consume():
        try:
            for reply in stub.Stream(stubs["pb"].NextRequest(count=100_000_000), timeout=60):
                got.extend(reply.ids)
        except grpc.RpcError as e:
            errors.append(e.code())

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.time() + 20
    while len(got) < 50_000:
        assert time.time() < deadline, "the stream never started"
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    t.join(20)
    assert not t.is_alive(), "the client hung after the server stopped"
    assert errors and errors[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), errors
    assert len(got) == len(set(got))
    assert server.proc.wait(10) == 0


def test_accepted_connections_get_nodelay_and_keepalive(server, stubs, tmp_path):
    """The socket options are set on every accepted connection (tonic's
    builder options do not reach a listener it did not bind). Without
    TCP_NODELAY, large replies wait on delayed ACKs. Seen with strace
    attached to the running server, so nothing is timed."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is needed (apt-get install strace)")
    trace = tmp_path / "trace"
    tracer = subprocess.Popen([strace, "-f", "-p", str(server.proc.pid), "-e", "trace=setsockopt", "-o", str(trace)],
                              stderr=subprocess.PIPE, text=True)
    try:
        attached = tracer.stderr.readline()
        assert "attached" in attached, attached
        stub = stubs["rpc"].IdServiceStub(channel(server))
        assert len(stub.Next(stubs["pb"].NextRequest(count=1000), timeout=10).ids) == 1000
    finally:
        tracer.terminate()  # detaches; the server goes on
        tracer.wait(10)
    calls = trace.read_text()
    assert "TCP_NODELAY, [1]" in calls, calls
    assert "SO_KEEPALIVE, [1]" in calls and "TCP_KEEPIDLE, [60]" in calls, calls
