"""tradeid.AsyncClient against the real server (no pytest-asyncio needed:
each test runs its own event loop with a time limit)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Awaitable, List, TypeVar

import pytest
from conftest import StartServer
from support import Server, address, assert_ids, free_udp_port

import tradeid

T = TypeVar("T")


def run(coroutine: Awaitable[T], limit: float = 120) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, limit)

    return asyncio.run(bounded())


def test_single_and_bulk(server: Server) -> None:
    async def main() -> List[str]:
        async with tradeid.AsyncClient(server.addr) as client:
            ids = [await client.next_id()]
            for count in [0, 1, 175, 176, 10_000]:
                ids += await client.next_ids(count)
            return ids

    assert_ids(run(main()), 1 + 1 + 175 + 176 + 10_000)


def test_two_hundred_concurrent_tasks(server: Server) -> None:
    async def main() -> List[str]:
        client = tradeid.AsyncClient(server.addr, max_concurrency=32)

        async def task(i: int) -> List[str]:
            ids = [await client.next_id() for _ in range(5)]
            ids += await client.next_ids(1 + i)
            return ids

        results = await asyncio.gather(*(task(i) for i in range(200)))
        await client.close()
        return [i for r in results for i in r]

    assert_ids(run(main()), 200 * 5 + sum(1 + i for i in range(200)))


def test_closed_client_refuses(server: Server) -> None:
    async def main() -> None:
        client = tradeid.AsyncClient(server.addr)
        await client.next_id()
        await client.close()
        with pytest.raises(tradeid.ClientClosed):
            await client.next_id()
        with pytest.raises(tradeid.ClientClosed):
            await client.next_ids(3)

    run(main())


def test_failover_and_timeout(server: Server, silent_server: socket.socket) -> None:
    closed = f"127.0.0.1:{free_udp_port()}"

    async def main() -> None:
        async with tradeid.AsyncClient([address(silent_server), closed, server.addr], timeout=0.05, attempts=2) as c:
            assert_ids(await c.next_ids(300) + [await c.next_id()], 301)
        async with tradeid.AsyncClient([address(silent_server), closed], timeout=0.05, attempts=2) as c:
            started = time.monotonic()
            with pytest.raises(tradeid.Timeout):
                await c.next_id()
            assert time.monotonic() - started < 2

    run(main())


def test_cancelled_calls_leave_the_client_usable(server: Server, silent_server: socket.socket) -> None:
    async def main() -> None:
        async with tradeid.AsyncClient([address(silent_server), server.addr], timeout=0.2, max_concurrency=4) as c:
            tasks = [asyncio.ensure_future(c.next_ids(10)) for _ in range(10)]
            await asyncio.sleep(0.05)  # all stuck on the silent server, or waiting for a channel
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            assert_ids(await c.next_ids(100), 100)

    run(main())


def test_one_client_one_loop(server: Server) -> None:
    client = tradeid.AsyncClient(server.addr)
    run(client.next_id())
    with pytest.raises(RuntimeError, match="event loop"):
        run(client.next_id())


def test_async_exhaustion(start_server: StartServer) -> None:
    server = start_server(tiny=True)

    async def main() -> List[str]:
        ids: List[str] = []
        async with tradeid.AsyncClient(server.addr) as client:
            with pytest.raises(tradeid.SpaceExhausted):
                while True:
                    ids += await client.next_ids(100)
            # What the failed call had received comes out of later calls.
            with pytest.raises(tradeid.SpaceExhausted):
                for _ in range(100):
                    ids.append(await client.next_id())
            with pytest.raises(tradeid.SpaceExhausted):
                await client.next_id()
        return ids

    ids = assert_ids(run(main()))
    assert 0 < len(ids) <= 4096


def test_async_unavailable_is_retried(start_server: StartServer) -> None:
    server = start_server(flush_delay_ms=30, block_max=1024, admin=True)

    async def main() -> List[str]:
        async with tradeid.AsyncClient(server.addr) as client:
            results: Any = await asyncio.gather(*(client.next_ids(2000) for _ in range(8)))
            return [i for r in results for i in r]

    assert_ids(run(main()), 16_000)
    assert server.error_replies(503) > 0, "no !ERR503 seen: a build without test hooks?"


def test_names_are_looked_up_at_use_and_skipped_if_unresolvable(localhost_server: str) -> None:
    async def main() -> List[str]:
        async with tradeid.AsyncClient("nonexistent.invalid:7070") as lonely:
            with pytest.raises(tradeid.ResolveError) as info:
                await lonely.next_id()
            assert info.value.servers == ["nonexistent.invalid:7070"]
        async with tradeid.AsyncClient(["nonexistent.invalid:7070", localhost_server]) as client:
            return [await client.next_id()] + await client.next_ids(500)

    assert_ids(run(main()), 501)
