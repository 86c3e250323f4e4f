"""Error replies, crashes and a bad network, against the real server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
from conftest import StartServer
from impaired_link import ImpairedLink
from support import assert_ids, free_udp_port, init_state

import tradeid


def test_too_many_lowers_the_batch(start_server: StartServer) -> None:
    server = start_server(max_batch=50, admin=True)
    with tradeid.Client(server.addr, max_batch=175) as client:
        ids = client.next_ids(1000)
        for count in [1, 50, 51, 175, 176]:
            ids += client.next_ids(count)
        assert_ids(ids, 1000 + 1 + 50 + 51 + 175 + 176)
    assert server.error_replies(413) > 0


def test_unavailable_is_retried_with_backoff(start_server: StartServer) -> None:
    # Slow flushes and small blocks: prefetches lag and the server answers
    # !ERR503 until the next block is on disk.
    server = start_server(flush_delay_ms=30, block_max=1024, admin=True)
    with tradeid.Client(server.addr) as client:
        ids = client.next_ids(20_000) + [client.next_id() for _ in range(500)]
    assert_ids(ids, 20_500)
    assert server.error_replies(503) > 0, "no !ERR503 seen: a build without test hooks?"


def test_unavailable_for_too_long_is_an_error(start_server: StartServer) -> None:
    # One worker flushes its first block and the next at startup; the flush
    # after that takes 2.5 s, longer than the client's 503 budget (1 s here).
    server = start_server(workers=1, flush_delay_ms=2500, block_max=1024)
    with tradeid.Client(server.addr, timeout=0.05, attempts=2) as client:
        ids: List[str] = []
        started = time.monotonic()
        with pytest.raises(tradeid.Unavailable) as info:
            for _ in range(100):  # more than two blocks' worth
                ids += client.next_ids(175)
        assert 1.0 <= time.monotonic() - started < 10
        assert server.addr in str(info.value)
        assert len(assert_ids(ids)) > 0


def test_a_server_that_aborts_is_a_timeout_not_a_hang(start_server: StartServer) -> None:
    # One worker flushes twice at startup; the 5th flush fails and the
    # server aborts rather than hand out IDs it could not make durable.
    server = start_server(workers=1, fail_flush_after=4, block_max=1024)
    with tradeid.Client(server.addr, timeout=0.05, attempts=2) as client:
        ids: List[str] = []
        started = time.monotonic()
        with pytest.raises(tradeid.Timeout):
            for _ in range(1000):
                ids += client.next_ids(175)
        assert time.monotonic() - started < 30
    assert len(assert_ids(ids)) >= 1024
    assert server.process.wait(timeout=10) != 0


def test_exhaustion(start_server: StartServer) -> None:
    server = start_server(tiny=True)  # 4096 IDs
    ids: List[str] = []
    client = tradeid.Client(server.addr)
    with pytest.raises(tradeid.SpaceExhausted) as info:
        for _ in range(100):
            ids += client.next_ids(100)
            ids.append(client.next_id())
    assert "!ERR507" in str(info.value)
    # The failed call kept what it had received for later calls.
    for _ in range(100):
        try:
            ids.append(client.next_id())
        except tradeid.SpaceExhausted:
            break
    # Another client (another socket, maybe another worker) may still get
    # the rest of a block; never an ID handed out before.
    with tradeid.Client(server.addr) as other:
        try:
            while True:
                ids.append(other.next_id())
        except tradeid.SpaceExhausted:
            pass
    assert 0 < len(assert_ids(ids)) <= 4096
    # Final: later calls fail without asking again (with the server gone,
    # asking would be a timeout).
    server.kill()
    for _ in range(3):
        with pytest.raises(tradeid.SpaceExhausted):
            client.next_ids(10)
    client.close()


def test_kill_9_and_restart_on_the_same_state_and_port(tradeid_bin: Path, tmp_path: Path, start_server: StartServer) -> None:
    state = init_state(tradeid_bin, tmp_path)
    listen = f"127.0.0.1:{free_udp_port()}"
    server = start_server(state, listen=listen)
    client = tradeid.Client(listen, timeout=0.05, attempts=2)
    ids: List[str] = []
    after_restart: List[str] = []
    errors: List[BaseException] = []
    stop = threading.Event()
    restarted = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                got = client.next_ids(40) + [client.next_id()]
            except (tradeid.Timeout, tradeid.Unavailable):
                continue  # the server is down for a moment
            except BaseException as e:
                errors.append(e)
                return
            ids.extend(got)
            if restarted.is_set():
                after_restart.extend(got)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.5)
        before = len(ids)
        server.kill()
        time.sleep(0.3)
        start_server(state, listen=listen)
        restarted.set()
        time.sleep(0.7)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive() and not errors, errors
    assert before > 0 and len(after_restart) > 0
    assert_ids(ids)
    client.close()


LinkFactory = Callable[..., ImpairedLink]


@pytest.fixture
def impaired_link(start_server: StartServer) -> Iterator[LinkFactory]:
    """``impaired_link(**impairments)``: an ImpairedLink in front of a new
    server, closed at teardown."""
    links: List[ImpairedLink] = []

    def make(**impairments: Any) -> ImpairedLink:
        link = ImpairedLink(start_server().addr, **impairments)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_impaired_link_sync(impaired_link: LinkFactory, seed: int) -> None:
    link = impaired_link(loss=0.1, duplicate=0.2, delay=0.3, max_delay=0.08, seed=seed)
    client = tradeid.Client(link.address, timeout=0.05, attempts=8)
    results: List[List[str]] = [[] for _ in range(4)]
    errors: List[BaseException] = []

    def work(slot: int) -> None:
        try:
            for round_ in range(15):
                results[slot].append(client.next_id())
                results[slot].extend(client.next_ids(1 + 97 * round_))
        except BaseException as e:
            errors.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a call hung"
    assert time.monotonic() - started < 90
    assert not errors, errors
    assert_ids([i for r in results for i in r], 4 * sum(2 + 97 * r for r in range(15)))
    assert link.counts["duplicated"] > 0 and link.counts["lost"] > 0 and link.counts["delayed"] > 0
    client.close()


def test_impaired_link_async(impaired_link: LinkFactory) -> None:
    link = impaired_link(loss=0.1, duplicate=0.3, delay=0.3, max_delay=0.08, seed=7)

    async def main() -> List[str]:
        async with tradeid.AsyncClient(link.address, timeout=0.05, attempts=8, max_concurrency=16) as client:

            async def task(i: int) -> List[str]:
                return [await client.next_id() for _ in range(3)] + await client.next_ids(1 + 13 * i)

            results = await asyncio.gather(*(task(i) for i in range(60)))
            return [i for r in results for i in r]

    async def bounded() -> List[str]:
        return await asyncio.wait_for(main(), 90)

    assert_ids(asyncio.run(bounded()), 60 * 4 + sum(13 * i for i in range(60)))
    assert link.counts["duplicated"] > 0


def test_a_misbehaving_server_never_causes_a_repeat() -> None:
    """A fake server that repeats every reply and replays old ones, over
    real sockets: the client returns each ID once."""
    from test_engine import id_source

    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", 0))
    fake.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        source = id_source()
        history: List[bytes] = []
        while not stop.is_set():
            try:
                request, peer = fake.recvfrom(65535)
            except socket.timeout:
                continue
            count = int.from_bytes(request[4:6], "big")
            reply = b"".join(next(source) for _ in range(count))
            history.append(reply)
            for datagram in [reply, reply, *history[-4:-1], reply]:
                fake.sendto(datagram, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        host, port = fake.getsockname()
        with tradeid.Client(f"{host}:{port}", timeout=0.2) as client:
            ids = [client.next_id() for _ in range(300)] + client.next_ids(5000)
            ids += [client.next_id() for _ in range(300)]
        assert_ids(ids, 5600)
    finally:
        stop.set()
        thread.join(timeout=10)
        fake.close()
