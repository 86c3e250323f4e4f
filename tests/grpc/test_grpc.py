"""tradeid's gRPC API, driven by a stock third-party client (Python grpcio)
with stubs generated from the proto at test time. Uniqueness is checked on
the IDs themselves."""
import re
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


def test_health_is_serving_while_ready(server, stubs):
    health = stubs["health_rpc"].HealthStub(channel(server))
    req = stubs["health_pb"].HealthCheckRequest
    serving = stubs["health_pb"].HealthCheckResponse.SERVING
    assert health.Check(req(service=""), timeout=5).status == serving
    assert health.Check(req(service="tradeid.v1.IdService"), timeout=5).status == serving


def test_reflection_lists_and_describes_the_service(server, stubs):
    refl = stubs["refl_rpc"].ServerReflectionStub(channel(server))
    pb = stubs["refl_pb"]
    replies = list(refl.ServerReflectionInfo(iter([
        pb.ServerReflectionRequest(list_services=""),
        pb.ServerReflectionRequest(file_containing_symbol="tradeid.v1.IdService"),
    ]), timeout=5))
    names = [s.name for s in replies[0].list_services_response.service]
    assert "tradeid.v1.IdService" in names and "grpc.health.v1.Health" in names
    assert replies[1].file_descriptor_response.file_descriptor_proto, "a descriptor for the service"


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
    import signal
    server.proc.send_signal(signal.SIGTERM)
    t.join(20)
    assert not t.is_alive(), "the client hung after the server stopped"
    assert errors and errors[0] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), errors
    assert len(got) == len(set(got))
    assert server.proc.wait(10) == 0
