"""The blocking client: one channel (connected sockets + state) per thread."""

from __future__ import annotations

import math
import os
import socket
import struct
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import Dict, List, Optional, Sequence, Type, TypeVar, Union

from . import _engine
from ._address import Resolved, Targets, split_servers
from ._codec import ID_LEN
from ._errors import ClientClosed, ConfigError, ResolveError, TransportError
from ._protocol import DEFAULT_MAX_BATCH, MAX_BATCH_LIMIT, decode_reply, encode_request

T = TypeVar("T")


# Bumped in a forked child, so that it opens sockets of its own instead of
# sharing (and stealing replies from) its parent's.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_settings(timeout: float, attempts: int, max_batch: int, window: int) -> None:
    """Validates the numeric arguments shared by both clients."""
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(attempts, int) or attempts < 1:
        raise ConfigError(f"attempts must be a whole number >= 1, got {attempts!r}")
    if not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ConfigError(f"max_batch must be 1..={MAX_BATCH_LIMIT}, got {max_batch!r}")
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be a whole number >= 1, got {window!r}")


def check_count(count: int) -> None:
    if not isinstance(count, int) or isinstance(count, bool):
        raise TypeError(f"count must be an int, got {type(count).__name__}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")


class _Socket:
    """A UDP socket connected to one server.

    On Linux the socket stays in blocking mode with a kernel receive timeout
    (SO_RCVTIMEO), so a request costs two system calls (send, recv) instead
    of four (Python's own timeouts poll before each send and recv).
    Elsewhere it uses Python's ``settimeout``.
    """

    __slots__ = ("sock", "target", "_rcvtimeo", "_recv_size")

    _KERNEL_TIMEOUT = sys.platform.startswith("linux") and hasattr(socket, "SO_RCVTIMEO")
    _TIMEVAL = struct.Struct("@ll")

    def __init__(self, target: Resolved, recv_size: int) -> None:
        # Replies are never longer than the largest request asked for: a
        # small buffer is cheaper to allocate than a 64 KiB one per datagram.
        self._recv_size = recv_size
        self.target = target
        self.sock = socket.socket(target.family, socket.SOCK_DGRAM)
        try:
            self.sock.connect(target.sockaddr)
        except BaseException:
            self.sock.close()
            raise
        self._rcvtimeo = -1.0

    def send(self, payload: bytes) -> bool:
        """False if the port is known closed (ECONNREFUSED)."""
        try:
            self.sock.send(payload)
        except ConnectionRefusedError:
            return False
        return True

    def recv(self, timeout: float) -> Optional[bytes]:
        """A datagram, or None on a timeout or a closed port."""
        sock = self.sock
        try:
            if self._KERNEL_TIMEOUT:
                # A setsockopt per wait would cost as much as the recv; reuse
                # the timeout set last unless it is off by a millisecond or
                # more (a wait that long past the engine's deadline is harmless).
                if not 0.0 <= self._rcvtimeo - timeout < 0.001:
                    # Rounded up to a whole microsecond: 0 would mean "forever".
                    micros = max(1, math.ceil(timeout * 1e6))
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._TIMEVAL.pack(*divmod(micros, 1_000_000))
                    )
                    self._rcvtimeo = timeout
                return sock.recv(self._recv_size)
            sock.settimeout(timeout)
            return sock.recv(self._recv_size)
        except (BlockingIOError, socket.timeout, ConnectionRefusedError):
            return None

    def close(self) -> None:
        self.sock.close()


def _close_sockets(sockets: List[Optional[_Socket]]) -> None:
    for i, s in enumerate(sockets):
        if s is not None:
            s.close()
            sockets[i] = None


class _Channel:
    """One thread's sockets (one per server, opened on first use) and state.

    Closed when :meth:`close` is called or when the channel is garbage
    collected (its thread ended), whichever comes first.
    """

    # Why each channel has its own duplicate filter (session.recent) and
    # the client as a whole still never returns one ID twice, with no lock:
    #
    # * The server never hands out an ID twice, to anyone. So the only way
    #   an ID reaches this client twice is the network delivering one reply
    #   datagram twice (or replaying it late): the very same bytes, which is
    #   also why the filter compares whole datagrams (_engine.RecentReplies).
    # * Each channel's sockets are its own, each with its own ephemeral
    #   port and connected to one server. The server sends a reply to the
    #   address the request came from, so a reply, any copy of it, and any
    #   late arrival can only be received by the socket that sent the
    #   request (the kernel drops datagrams from other sources on a
    #   connected socket). A copy therefore meets the very filter that saw
    #   the original.
    # * A shared filter would need a lock on every reply and could catch
    #   nothing more. The one residual case - a copy delayed beyond the
    #   socket's life and delivered to a new socket that reused its port -
    #   exists for any UDP client, in separate processes too, and a shared
    #   filter would not cover other processes either.
    #
    # Spare IDs (received beyond what a call took) stay in the channel and
    # are returned by its next calls, so they too are returned only once.

    __slots__ = ("session", "generation", "_targets", "_servers", "_recv_size", "_sockets", "_finalizer", "__weakref__")

    def __init__(self, shared: _engine.Shared, targets: Targets, recv_size: int) -> None:
        self.session = _engine.Session(shared)
        self._recv_size = recv_size
        self.generation = _fork_generation
        self._targets = targets
        self._servers = targets.servers
        self._sockets: List[Optional[_Socket]] = [None] * len(targets.servers)
        self._finalizer = weakref.finalize(self, _close_sockets, self._sockets)

    def close(self) -> None:
        self._finalizer()

    def _socket(self, index: int) -> _Socket:
        """The socket to server ``index``, opened (and the name looked up)
        if need be; :class:`ResolveError` if the name does not resolve."""
        s = self._sockets[index]
        if s is None:
            if not self._finalizer.alive:
                raise ClientClosed()
            target = self._targets.get(index)
            try:
                s = _Socket(target, self._recv_size)
            except OSError as e:
                raise TransportError(self._servers[index], e) from e
            self._sockets[index] = s
        return s

    def _forget(self, index: int) -> None:
        """Closes the socket to a server that failed; its name is looked up
        again when next used."""
        s = self._sockets[index]
        if s is not None:
            self._sockets[index] = None
            s.close()
            self._targets.forget(index, s.target)

    def take(self, settings: _engine.Settings, shared: _engine.Shared, count: int) -> List[str]:
        """``count`` new IDs.

        The common case (one request answered at once by a fresh reply) is
        done inline, without the engine's generator machinery: a single ID
        costs little more than the two system calls. Anything else (a
        timeout, an error reply, a duplicate, a short reply, a bulk call)
        goes to the engine, which carries on from where this left off, so
        behaviour is the same either way.
        """
        session = self.session
        index = session.current
        sock = self._sockets[index]
        if sock is None or count > shared.max_batch or shared.exhausted[index]:
            # (A first call opens its socket through the engine, which
            # handles a name that does not resolve.)
            return self.run(_engine.take(settings, shared, session, count))
        try:
            if not sock.send(encode_request(count)):
                prior = _engine.Prior(index, count, False, None)
            else:
                data = sock.recv(settings.timeout)
                prior = _engine.Prior(index, count, True, data)
                if data is not None and data not in session.recent:
                    ids = decode_reply(data)
                    if type(ids) is tuple and len(ids) >= count:
                        session.recent.add(data, len(ids))
                        if len(ids) > count:
                            session.spare.extend(ids[count:])
                        return list(ids[:count])
        except OSError as e:
            if not self._finalizer.alive:
                raise ClientClosed() from e
            raise TransportError(self._servers[index], e) from e
        return self.run(_engine.take(settings, shared, session, count, prior))

    def run(self, steps: _engine.Steps[T]) -> T:
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
                if isinstance(action, _engine.Sleep):
                    time.sleep(action.seconds)
                    continue
                if isinstance(action, _engine.Forget):
                    self._forget(action.server)
                    continue
                try:
                    sock = self._sockets[action.server] or self._socket(action.server)
                except ResolveError as e:
                    unresolved = e  # the engine moves on to the next server
                    continue
                try:
                    if isinstance(action, _engine.Recv):
                        result = sock.recv(action.timeout)
                    else:
                        result = b"" if sock.send(action.payload) else None
                except OSError as e:
                    if not self._finalizer.alive:
                        raise ClientClosed() from e
                    raise TransportError(self._servers[action.server], e) from e
        except StopIteration as stop:
            value: T = stop.value
            return value
        finally:
            steps.close()  # on an error: lets the engine keep its IDs


class Client:
    """A blocking client for tradeid servers; safe to share between threads.

    ``servers`` are tried in order, failing over to the next one when a
    server does not answer ``attempts`` times in a row (each wait lasting
    ``timeout`` seconds) or reports its space exhausted. ``max_batch`` is the
    most IDs asked for in one request (lowered automatically if a server's
    ``--max-batch`` is smaller); ``window`` is how many requests a bulk call
    keeps in flight at once.

    Each thread gets its own sockets and state (a *channel*), so calls from
    different threads never wait for each other: there is no lock on the
    request path. The comment in ``_Channel`` explains why the duplicate
    filter can be per channel.
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str]],
        timeout: float = 0.25,
        attempts: int = 3,
        max_batch: int = DEFAULT_MAX_BATCH,
        *,
        window: int = _engine.DEFAULT_WINDOW,
    ) -> None:
        check_settings(timeout, attempts, max_batch, window)
        # Addresses are parsed now (ConfigError); names are looked up when
        # first used, and again after a server fails (see Targets).
        self._targets = Targets(split_servers(servers))
        self._settings = _engine.Settings(self._targets.servers, float(timeout), attempts, window)
        self._shared = _engine.Shared(max_batch, len(self._targets.servers))
        self._recv_size = max(64, max_batch * ID_LEN)
        self._local = threading.local()
        # Every open channel, so close() can reach other threads' sockets.
        # Plain dict operations are atomic, so registering needs no lock.
        self._channels: Dict[int, "weakref.ref[_Channel]"] = {}
        self._closed = False

    @property
    def servers(self) -> List[str]:
        """The servers, as given."""
        return list(self._settings.servers)

    def _channel(self) -> _Channel:
        channel: Optional[_Channel] = getattr(self._local, "channel", None)
        if channel is not None and channel.generation == _fork_generation:
            return channel
        if self._closed:
            raise ClientClosed()
        channel = _Channel(self._shared, self._targets, self._recv_size)
        key = id(channel)
        channels = self._channels
        channels[key] = weakref.ref(channel, lambda _ref: channels.pop(key, None))
        if self._closed:  # close() ran meanwhile and may have missed it
            channel.close()
            raise ClientClosed()
        self._local.channel = channel
        return channel

    def next_id(self) -> str:
        """One new ID, e.g. ``"B762F00"``."""
        if self._closed:
            raise ClientClosed()
        channel = self._channel()
        spare = channel.session.spare
        if spare:
            return spare.popleft()
        return channel.take(self._settings, self._shared, 1)[0]

    def next_ids(self, count: int) -> List[str]:
        """``count`` new IDs, all distinct, in as many requests as needed."""
        check_count(count)
        if self._closed:
            raise ClientClosed()
        if count == 0:
            return []
        channel = self._channel()
        spare = channel.session.spare
        if len(spare) >= count:
            return [spare.popleft() for _ in range(count)]
        return channel.take(self._settings, self._shared, count)

    def close(self) -> None:
        """Closes every thread's sockets. Later calls raise ClientClosed.
        Call it when no other thread is using the client."""
        self._closed = True
        for ref in list(self._channels.values()):
            channel = ref()
            if channel is not None:
                channel.close()
        self._channels.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<tradeid.Client {', '.join(self._settings.servers)} ({state})>"
