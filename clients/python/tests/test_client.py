"""tradeid.Client and tradeid.generate against the real server."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable, List

import pytest
from conftest import StartServer
from support import Server, address, assert_ids, free_udp_port

import tradeid
from tradeid import _protocol


def test_ids_look_right(server: Server) -> None:
    with tradeid.Client(server.addr) as client:
        one = client.next_id()
        assert len(one) == 7 and tradeid.parse(one) == one and tradeid.is_valid(one)
        assert one == one.upper() and not set(one) & set("ILOU")


def test_many_single_calls_are_unique(server: Server) -> None:
    with tradeid.Client([server.addr]) as client:
        assert_ids([client.next_id() for _ in range(5000)], 5000)


@pytest.mark.parametrize("count", [0, 1, 2, 175, 176, 10_000, 1_000_000])
def test_bulk_sizes(server: Server, count: int) -> None:
    with tradeid.Client(server.addr) as client:
        assert_ids(client.next_ids(count), count)


def test_bulk_and_single_never_overlap(server: Server) -> None:
    with tradeid.Client(server.addr) as client:
        ids: List[str] = []
        for count in [1, 175, 176, 3, 10_000, 1, 350]:
            ids += client.next_ids(count)
            ids.append(client.next_id())
        assert_ids(ids)


def test_bad_counts(server: Server) -> None:
    with tradeid.Client(server.addr) as client:
        with pytest.raises(ValueError):
            client.next_ids(-1)
        with pytest.raises(TypeError):
            client.next_ids(1.5)  # type: ignore[arg-type]


def test_sixteen_threads_share_one_client(server: Server) -> None:
    client = tradeid.Client(server.addr)
    results: List[List[str]] = [[] for _ in range(16)]
    errors: List[BaseException] = []
    start = threading.Barrier(16)

    def work(slot: int) -> None:
        try:
            start.wait(timeout=30)
            out = results[slot]
            for round_ in range(20):
                out.append(client.next_id())
                out.extend(client.next_ids(1 + round_ * 37))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    expected = 16 * sum(1 + 1 + r * 37 for r in range(20))
    assert_ids([i for out in results for i in out], expected)
    client.close()


def test_closed_client_refuses(server: Server) -> None:
    client = tradeid.Client(server.addr)
    client.next_id()
    client.close()
    client.close()  # idempotent
    with pytest.raises(tradeid.ClientClosed):
        client.next_id()
    with pytest.raises(tradeid.ClientClosed):
        client.next_ids(5)
    # A thread that never used the client is refused too.
    errors: List[BaseException] = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(tradeid.ClientClosed, client.next_id).value))
    thread.start()
    thread.join(timeout=30)
    assert len(errors) == 1


def test_requests_are_always_padded(silent_server: socket.socket) -> None:
    silent_server.settimeout(5)
    client = tradeid.Client(address(silent_server), timeout=0.02, attempts=1)
    for count in [1, 3, 4, 16, 175]:
        with pytest.raises(tradeid.Timeout):
            client.next_ids(count)
        request = silent_server.recv(65535)
        assert len(request) == max(8, -(-7 * count // 3)) == _protocol.padded_len(count)
        assert request[:6] == b"ID\x01\x01" + count.to_bytes(2, "big")
    client.close()


def test_failover_past_a_silent_server(server: Server, silent_server: socket.socket) -> None:
    client = tradeid.Client([address(silent_server), server.addr], timeout=0.05, attempts=2)
    started = time.monotonic()
    ids = client.next_ids(10)
    assert time.monotonic() - started >= 0.1  # two attempts on the silent one
    silent_server.settimeout(1)
    assert len([silent_server.recv(65535) for _ in range(2)]) == 2
    # The client now sticks to the server that answers.
    ids += [client.next_id() for _ in range(100)] + client.next_ids(500)
    silent_server.setblocking(False)
    with pytest.raises(BlockingIOError):
        silent_server.recv(65535)
    assert_ids(ids, 610)
    client.close()


def test_failover_past_a_closed_port(server: Server) -> None:
    closed = f"127.0.0.1:{free_udp_port()}"
    with tradeid.Client([closed, server.addr], timeout=1.0, attempts=3) as client:
        started = time.monotonic()
        assert_ids(client.next_ids(50) + [client.next_id()], 51)
        # ECONNREFUSED ends each attempt at once: far less than 3 x 1 s.
        assert time.monotonic() - started < 1.5


def test_no_server_answers(silent_server: socket.socket) -> None:
    closed = f"127.0.0.1:{free_udp_port()}"
    client = tradeid.Client([address(silent_server), closed], timeout=0.03, attempts=2)
    started = time.monotonic()
    with pytest.raises(tradeid.Timeout) as info:
        client.next_id()
    assert time.monotonic() - started < 2
    assert info.value.servers == [address(silent_server), closed]
    assert "--allow" in str(info.value)
    client.close()


def test_ipv6(start_server: StartServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    server = start_server(listen="[::1]:0")
    assert server.addr.startswith("[::1]:")
    with tradeid.Client(server.addr) as client:
        assert_ids(client.next_ids(500) + [client.next_id()], 501)


def test_hostname(localhost_server: str) -> None:
    with tradeid.Client(localhost_server) as client:
        assert_ids(client.next_ids(10), 10)


def test_bad_configuration() -> None:
    bad_addresses = ["", "nohost", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999", "::1:7070", "[::1]7070",
                     "host:port", "two words:7070", "a..b:7070", "x" * 64 + ".example:7070"]
    for bad in bad_addresses:
        with pytest.raises(tradeid.ConfigError):
            tradeid.Client(bad)
    for kwargs in [{"timeout": 0}, {"timeout": -1}, {"attempts": 0}, {"max_batch": 0}, {"max_batch": 9359}]:
        with pytest.raises(tradeid.ConfigError):
            tradeid.Client("127.0.0.1:7070", **kwargs)


def test_generate_uses_tradeid_servers(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEID_SERVERS", f"127.0.0.1:{free_udp_port()},{server.addr}")
    tradeid.reset_default_client()
    first = tradeid.generate()
    assert tradeid.default_client().servers[1] == server.addr
    ids = [first] + tradeid.generate_bulk(1000) + [tradeid.generate() for _ in range(100)]
    assert_ids(ids, 1101)


def test_generate_defaults_to_port_7070(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRADEID_SERVERS", raising=False)
    assert tradeid.default_client().servers == ["127.0.0.1:7070"]


def test_default_client_is_shared_by_threads(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEID_SERVERS", server.addr)
    clients: List[tradeid.Client] = []
    ids: List[str] = []
    lock = threading.Lock()

    def work() -> None:
        got = [tradeid.generate() for _ in range(200)] + tradeid.generate_bulk(300)
        with lock:
            clients.append(tradeid.default_client())
            ids.extend(got)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len({id(c) for c in clients}) == 1
    assert_ids(ids, 8 * 500)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_sockets(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEID_SERVERS", server.addr)
    parent_ids = tradeid.generate_bulk(100)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            child_ids = tradeid.generate_bulk(500) + [tradeid.generate() for _ in range(10)]
            os.write(write_end, "".join(child_ids).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    parent_ids += tradeid.generate_bulk(500)  # at the same time as the child
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    text = b"".join(chunks).decode()
    child_ids = [text[i : i + 7] for i in range(0, len(text), 7)]
    assert_ids(parent_ids + child_ids, 600 + 510)


# ---------------------------------------------------------------------------
# Host names: looked up when first used, and again after a server fails.

UNRESOLVABLE = "nonexistent.invalid:7070"  # .invalid never resolves (RFC 6761)


def test_a_name_that_does_not_resolve_fails_at_use_not_creation() -> None:
    client = tradeid.Client(UNRESOLVABLE)  # no lookup yet: creating never fails on DNS
    calls: List[Callable[[], object]] = [client.next_id, lambda: client.next_ids(500)]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(tradeid.ResolveError) as info:
            call()
        assert time.monotonic() - started < 5
        assert info.value.servers == [UNRESOLVABLE]
        assert "nonexistent.invalid" in str(info.value) and "DNS" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)
        assert not isinstance(info.value, tradeid.ConfigError)
    client.close()


def test_failover_past_a_name_that_does_not_resolve(localhost_server: str) -> None:
    with tradeid.Client([UNRESOLVABLE, localhost_server]) as client:
        assert_ids([client.next_id()] + client.next_ids(1000), 1001)


def test_generate_with_a_name_that_does_not_resolve(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADEID_SERVERS", UNRESOLVABLE)
    tradeid.reset_default_client()
    with pytest.raises(tradeid.ResolveError):
        tradeid.generate()
    monkeypatch.setenv("TRADEID_SERVERS", f"{UNRESOLVABLE},{server.addr}")
    tradeid.reset_default_client()
    assert_ids([tradeid.generate()] + tradeid.generate_bulk(10), 11)


def test_unresolved_and_silent_is_a_timeout_naming_both(silent_server: socket.socket) -> None:
    with tradeid.Client([UNRESOLVABLE, address(silent_server)], timeout=0.05, attempts=2) as client:
        with pytest.raises(tradeid.Timeout) as info:
            client.next_id()
    assert list(info.value.unresolved) == [UNRESOLVABLE]
    assert f"{UNRESOLVABLE} did not resolve" in str(info.value)


def test_a_server_that_moved_is_found_once_its_old_address_fails(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS is played by a patched getaddrinfo for one made-up name; the
    servers are real. While the server answers its name is not looked up
    again; once it stops answering, the next use looks the name up anew."""
    old, new = start_server(), start_server()
    where = {"ids.tradeid.test": old.addr}
    lookups: List[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in where:
            lookups.append(host)
            ip, real_port = where[host].rsplit(":", 1)
            return real_getaddrinfo(ip, int(real_port), *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    client = tradeid.Client("ids.tradeid.test:7070", timeout=0.1, attempts=2)
    ids = [client.next_id() for _ in range(100)] + client.next_ids(1000)
    assert len(lookups) == 1, "a healthy server is not looked up again"
    old.kill()
    where["ids.tradeid.test"] = new.addr  # the name moves to the new server
    deadline = time.monotonic() + 10
    while True:
        try:
            ids.append(client.next_id())
            break
        except tradeid.Timeout:  # the call that found the old address dead
            assert time.monotonic() < deadline, "never looked the name up again"
    ids += client.next_ids(1000)
    assert len(lookups) == 2
    assert_ids(ids, 2101)
    client.close()
