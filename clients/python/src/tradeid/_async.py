"""The asyncio client: a pool of channels, each a set of datagram endpoints.

Replies carry no request tag, so on a shared socket one call could not
tell its replies (or its error replies, or its late ones) from another's.
Instead each call borrows a channel of its own (its own sockets, one per
server, and its own engine state) for its duration, exactly like a thread
of the blocking client, and the per-channel duplicate filter is sound for
the same reason (see ``_sync._Channel``). Concurrent calls use different
channels, up to ``max_concurrency``; later calls wait for one to be
returned. Channels are reused, so a busy service keeps a small, steady set
of sockets.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from types import TracebackType
from typing import Any, Deque, List, Optional, Sequence, Tuple, Type, TypeVar, Union, cast

from . import _engine
from ._address import Resolved, Targets, split_servers
from ._errors import ClientClosed, ConfigError, ResolveError, TransportError
from ._protocol import DEFAULT_MAX_BATCH
from ._sync import check_count, check_settings

T = TypeVar("T")

#: Datagrams an endpoint keeps while nobody is waiting; more are dropped
#: (they can only be IDs nobody asked for any more).
MAX_QUEUED = 1024


class _Endpoint(asyncio.DatagramProtocol):
    """Receives one connected socket's datagrams and errors into a queue."""

    def __init__(self, target: Resolved) -> None:
        self.target = target
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.queue: Deque[bytes] = collections.deque()
        self.refused = False  # an ICMP "port unreachable" was reported
        self.error: Optional[Exception] = None
        self.lost = False
        self.waiter: Optional["asyncio.Future[None]"] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Tuple[Any, ...]) -> None:
        if len(self.queue) < MAX_QUEUED:
            self.queue.append(data)
        self._wake()

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self.refused = True
        else:
            self.error = exc
        self._wake()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Channel:
    """One borrower's endpoints (opened on first use) and engine state."""

    def __init__(self, client: "AsyncClient") -> None:
        self.session = _engine.Session(client._shared)
        self._client = client
        self._endpoints: List[Optional[_Endpoint]] = [None] * len(client._servers)
        self.broken = False

    def close(self) -> None:
        for endpoint in self._endpoints:
            if endpoint is not None and endpoint.transport is not None:
                endpoint.transport.close()

    def _forget(self, index: int) -> None:
        """Closes the endpoint of a server that failed; its name is looked
        up again when next used."""
        endpoint = self._endpoints[index]
        if endpoint is not None:
            self._endpoints[index] = None
            if endpoint.transport is not None:
                endpoint.transport.close()
            self._client._targets.forget(index, endpoint.target)

    async def _endpoint(self, index: int) -> _Endpoint:
        endpoint = self._endpoints[index]
        if endpoint is None:
            target = await self._client._targets.get_async(index)  # may raise ResolveError
            sock = socket.socket(target.family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(target.sockaddr)
                loop = asyncio.get_running_loop()
                _, protocol = await loop.create_datagram_endpoint(lambda: _Endpoint(target), sock=sock)
            except BaseException:
                sock.close()
                raise
            endpoint = self._endpoints[index] = protocol
            if self._client._closed:
                self.close()
                raise ClientClosed()
        return endpoint

    def _check(self, endpoint: _Endpoint, index: int) -> None:
        if self._client._closed:
            raise ClientClosed()
        if endpoint.error is not None:
            error, endpoint.error = endpoint.error, None
            self.broken = True
            raise TransportError(self._client._servers[index], cast(OSError, error)) from error
        if endpoint.lost:
            self.broken = True
            raise TransportError(self._client._servers[index], OSError("socket closed"))

    async def _send(self, index: int, payload: bytes) -> Optional[bytes]:
        endpoint = await self._endpoint(index)
        self._check(endpoint, index)
        if endpoint.refused:  # reported since the last call: the port is closed
            endpoint.refused = False
            return None
        assert endpoint.transport is not None
        endpoint.transport.sendto(payload)  # errors arrive via error_received
        if endpoint.refused:
            endpoint.refused = False
            return None
        self._check(endpoint, index)
        return b""

    async def _recv(self, index: int, timeout: float) -> Optional[bytes]:
        endpoint = await self._endpoint(index)
        if not endpoint.queue and not endpoint.refused:
            self._check(endpoint, index)
            waiter: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
            endpoint.waiter = waiter
            timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                endpoint.waiter = None
        if endpoint.queue:
            return endpoint.queue.popleft()
        if endpoint.refused:
            endpoint.refused = False
            return None
        self._check(endpoint, index)
        return None  # timed out

    async def run(self, steps: _engine.Steps[T]) -> T:
        """Performs the engine's I/O until it returns."""
        result: Optional[bytes] = None
        unresolved: Optional[ResolveError] = None
        try:
            while True:
                if unresolved is None:
                    action = steps.send(result)
                else:
                    action, unresolved = steps.throw(unresolved), None
                result = None
                try:
                    if isinstance(action, _engine.Recv):
                        result = await self._recv(action.server, action.timeout)
                    elif isinstance(action, _engine.Send):
                        result = await self._send(action.server, action.payload)
                    elif isinstance(action, _engine.Forget):
                        self._forget(action.server)
                    else:
                        await asyncio.sleep(action.seconds)
                except ResolveError as e:
                    unresolved = e  # the engine moves on to the next server
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            steps.close()  # on an error or cancellation: the engine keeps its IDs


class AsyncClient:
    """The asyncio counterpart of :class:`tradeid.Client`, with the same
    arguments and semantics.

    Use it from one event loop. Every concurrent call borrows a channel (its
    own UDP sockets), at most ``max_concurrency`` at once; channels are
    reused by later calls, so a busy service keeps a small, steady set of
    sockets.
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str]],
        timeout: float = 0.25,
        attempts: int = 3,
        max_batch: int = DEFAULT_MAX_BATCH,
        *,
        window: int = _engine.DEFAULT_WINDOW,
        max_concurrency: int = 64,
    ) -> None:
        check_settings(timeout, attempts, max_batch, window)
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be a whole number >= 1, got {max_concurrency!r}")
        # Addresses are parsed now (ConfigError); names are looked up when
        # first used, and again after a server fails (see Targets).
        self._targets = Targets(split_servers(servers))
        self._servers = list(self._targets.servers)
        self._settings = _engine.Settings(self._servers, float(timeout), attempts, window)
        self._shared = _engine.Shared(max_batch, len(self._servers))
        self._max_channels = max_concurrency
        self._idle: List[_Channel] = []
        self._all: List[_Channel] = []
        self._waiters: Deque["asyncio.Future[_Channel]"] = collections.deque()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = False

    @property
    def servers(self) -> List[str]:
        """The servers, as given."""
        return list(self._servers)

    async def _acquire(self) -> _Channel:
        if self._closed:
            raise ClientClosed()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a tradeid.AsyncClient can only be used from the event loop that first used it")
        if self._idle:
            return self._idle.pop()
        if len(self._all) < self._max_channels:
            channel = _Channel(self)
            self._all.append(channel)
            return channel
        waiter: "asyncio.Future[_Channel]" = loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed over as we were cancelled
            raise

    def _release(self, channel: _Channel) -> None:
        if self._closed:
            channel.close()
            return
        if channel.broken:  # a socket error: replace its sockets
            channel.close()
            self._all.remove(channel)
            spare = channel.session.spare
            channel = _Channel(self)
            channel.session.spare.extend(spare)  # its IDs are still good
            self._all.append(channel)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(channel)
                return
        self._idle.append(channel)

    async def _take(self, count: int) -> List[str]:
        channel = await self._acquire()
        try:
            spare = channel.session.spare
            if len(spare) >= count:
                return [spare.popleft() for _ in range(count)]
            return await channel.run(_engine.take(self._settings, self._shared, channel.session, count))
        finally:
            self._release(channel)

    async def next_id(self) -> str:
        """One new ID."""
        return (await self._take(1))[0]

    async def next_ids(self, count: int) -> List[str]:
        """``count`` new IDs, all distinct."""
        check_count(count)
        if count == 0:
            if self._closed:
                raise ClientClosed()
            return []
        return await self._take(count)

    async def close(self) -> None:
        """Closes every socket; calls waiting for a channel, and later
        calls, raise ClientClosed."""
        self._closed = True
        for channel in self._all:
            channel.close()
        self._all.clear()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ClientClosed())
        await asyncio.sleep(0)  # let the transports finish closing

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<tradeid.AsyncClient {', '.join(self._servers)} ({state})>"
