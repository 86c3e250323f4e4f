"""What the client does, written once for both :class:`tradeid.Client` and
:class:`tradeid.AsyncClient`.

The logic is a generator that *yields* I/O requests (:class:`Send`,
:class:`Recv`, :class:`Sleep`, :class:`Forget`) and is resumed with their
results; a driver performs them with blocking sockets (``_sync``) or
asyncio endpoints (``_async``). A host name that does not resolve is
thrown into the generator as :class:`~tradeid.ResolveError` at the
:class:`Send` that needed it, and the engine moves on to the next server;
after a server's turn ends without a reply the engine yields
:class:`Forget`, so its name is looked up again (it may have moved). So retries, failover, error handling and the duplicate
filter behave identically in both clients, and can be tested without a
network.

Semantics follow the Rust client (core/src/client.rs). As there,
``!ERR413`` lowers the batch size to half of what was asked, for good, and
asks again from the *same* server without counting a lost attempt. (The
reply does not say the server's limit: it is a fixed 7-byte ``!ERR413``.
Probing upward again after a halving could home in on it, but replies carry
no tag, so with requests of several sizes in flight a reply cannot be tied
to the size it answers; halving settles between half the limit and the
limit, after at most log2(max_batch) refusals per client, and a caller who
knows the limit passes it as ``max_batch``.) Two deliberate differences
fix ways the Rust client gives up while the server is healthy:

* ``!ERR503`` is retried with exponential backoff (1 ms doubling, capped at
  50 ms) without using up attempts. Only a run of 503s with no ID in between
  for longer than :func:`unavailable_budget` (4 x attempts x timeout, at
  least 1 s: 3 s by default) moves on to the next server, and if no server
  gets past it the error is :class:`~tradeid.Unavailable`, not a timeout.
  A 503 means the server is alive and waiting for its disk; several callers
  racing for each new block can see 503s for a while.
* Bulk requests are pipelined: up to ``window`` requests are in flight at
  once (the Rust loadgen does the same), each for at most the current
  batch size. IDs are counted as they arrive, so a short or lost reply is
  simply asked for again.

As in Rust, replies carry no request tag: any reply with fresh IDs is used,
even one that arrives after its request timed out (the server never repeats
an ID); IDs that arrive beyond what a call needs are kept for the next call
on the same channel; and copies of recent replies (covering at least the
last 65,536 IDs) are dropped as network duplicates (see
:class:`RecentReplies` for why whole datagrams are compared).
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Deque, Dict, Generator, List, Optional, Sequence, Set, TypeVar, Union

from ._errors import Rejected, ResolveError, SpaceExhausted, Timeout, Unavailable
from ._protocol import ErrorCode, decode_reply, encode_request

T = TypeVar("T")

#: How many recent IDs the duplicate filter covers (as in Rust).
RECENT_WINDOW = 1 << 16
#: Pause after a send failed with ECONNREFUSED (capped by the timeout).
REFUSED_PAUSE = 0.020
#: First and largest wait after a ``!ERR503``.
BACKOFF_START = 0.001
BACKOFF_MAX = 0.050
#: Requests in flight at once for a bulk call.
DEFAULT_WINDOW = 32


class Send:
    """Send ``payload`` to server ``server``. Resumed with ``b""`` when sent,
    ``None`` when the OS reports the port closed (ECONNREFUSED). If the
    server's host name does not resolve, the driver throws the
    :class:`~tradeid.ResolveError` into the engine instead."""

    __slots__ = ("server", "payload")

    def __init__(self, server: int, payload: bytes) -> None:
        self.server = server
        self.payload = payload


class Recv:
    """Wait up to ``timeout`` seconds for a datagram from server ``server``.
    Resumed with the datagram, or ``None`` on a timeout or a closed port."""

    __slots__ = ("server", "timeout")

    def __init__(self, server: int, timeout: float) -> None:
        self.server = server
        self.timeout = timeout


class Sleep:
    """Pause for ``seconds``. Resumed with ``None``."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class Forget:
    """Server ``server`` failed (no reply, a closed port, no address): close
    the socket to it and look its name up again when it is next used, so a
    server that moved to a new address is found. Resumed with ``None``."""

    __slots__ = ("server",)

    def __init__(self, server: int) -> None:
        self.server = server


class Prior:
    """A request a driver made itself before running the engine (its fast
    path for the common case), and what came of it, so the engine carries on
    exactly where that left off: ``sent`` is False if the send was refused;
    otherwise ``reply`` is the datagram received, or None if the wait timed
    out."""

    __slots__ = ("server", "asked", "sent", "reply")

    def __init__(self, server: int, asked: int, sent: bool, reply: Optional[bytes]) -> None:
        self.server = server
        self.asked = asked
        self.sent = sent
        self.reply = reply


Action = Union[Send, Recv, Sleep, Forget]
#: A generator of actions, resumed with their results, returning a ``T``.
Steps = Generator[Action, Optional[bytes], T]


def unavailable_budget(attempts: int, timeout: float) -> float:
    """How long a server may keep answering ``!ERR503`` (with no ID in
    between) before the client moves on: four times what a silent server
    costs, and at least a second (a flush on a slow disk can take that
    long)."""
    return max(1.0, 4 * attempts * timeout)


class Settings:
    """A client's fixed configuration."""

    __slots__ = ("servers", "timeout", "attempts", "window", "unavailable_budget", "clock")

    def __init__(
        self,
        servers: Sequence[str],
        timeout: float,
        attempts: int,
        window: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.servers = tuple(servers)
        self.clock = clock  # replaceable in tests
        self.timeout = timeout
        self.attempts = attempts
        self.window = window
        self.unavailable_budget = unavailable_budget(attempts, timeout)


class Shared:
    """A client's mutable state shared by all its channels (threads, tasks).

    No lock guards it. ``max_batch`` only goes down and ``exhausted`` flags
    only go up, each by a single store: the worst a race does is lower the
    batch size once more, or mark a server exhausted a moment later in
    another thread (which then gets its own ``!ERR507``). ``received`` is a
    running count that racing ``+=`` can only undercount, which only makes
    the duplicate filters remember longer (see :class:`RecentReplies`).
    """

    __slots__ = ("max_batch", "exhausted", "received")

    def __init__(self, max_batch: int, servers: int) -> None:
        self.max_batch = max_batch
        self.exhausted = [False] * servers
        self.received = 0  # IDs received by all channels (a lower bound)


class RecentReplies:
    """One channel's memory of the reply datagrams it used, to drop network
    duplicates.

    *Datagrams, not IDs.* The server never hands out an ID twice, so the
    only way an ID can reach a socket twice is inside a copy of the datagram
    that carried it (a network duplicate, or a replay): byte for byte the
    same datagram. Remembering the datagrams is therefore exactly as good as
    remembering their IDs, and much cheaper: one hash and one lookup per
    datagram, instead of hashing every ID and looking it up in tables too
    big for the CPU caches (in CPython that was over half the cost of a
    bulk call).

    *The window is the client's, not the channel's.* As in the Rust client,
    what is covered is the last ``capacity`` IDs received by the *client*
    (counted in ``Shared.received`` by all its channels): every datagram
    this channel used while the client received them is remembered. So the
    memory of all channels together stays around that of one filter, however
    many threads share the client, while each channel only ever looks at its
    own sockets' datagrams (which is all a copy can be; see ``_sync``).

    Datagrams go into ``current``; once the client has received
    ``capacity`` IDs since ``current`` was started, it becomes ``previous``
    (which still covers everything since then) and the older generation is
    dropped whole.
    """

    __slots__ = ("_shared", "_current", "_previous", "_started", "_last", "_capacity")

    def __init__(self, shared: Shared, capacity: int = RECENT_WINDOW) -> None:
        self._shared = shared
        self._current: Set[bytes] = set()
        self._previous: Set[bytes] = set()
        # Client-wide counts: when `current` began, and at its latest datagram.
        self._started = self._last = shared.received
        self._capacity = capacity

    def __contains__(self, datagram: bytes) -> bool:
        return datagram in self._current or datagram in self._previous

    def add(self, datagram: bytes, ids: int) -> None:
        """Remembers a datagram of ``ids`` IDs that was used."""
        shared = self._shared
        shared.received += ids
        now = shared.received
        if now - self._started >= self._capacity:
            # `current` covers [started, now), which holds the last
            # `capacity` IDs; everything in `previous` is older. And if even
            # the newest datagram in `current` is that old (this channel sat
            # idle while others worked), `current` can go too.
            self._previous = self._current if now - self._last < self._capacity else set()
            self._current = set()
            self._started = now
        self._current.add(datagram)
        self._last = now


class Session:
    """One channel's state: its duplicate filter, the IDs it received beyond
    what callers took, and the server it is using."""

    __slots__ = ("recent", "spare", "current")

    def __init__(self, shared: Shared) -> None:
        self.recent = RecentReplies(shared)
        self.spare: Deque[str] = collections.deque()
        self.current = 0


def take(
    settings: Settings, shared: Shared, session: Session, count: int, prior: Optional[Prior] = None
) -> Steps[List[str]]:
    """``count`` IDs never returned before by this channel."""
    spare = session.spare
    if len(spare) >= count:
        return [spare.popleft() for _ in range(count)]
    out = list(spare)
    spare.clear()
    try:
        yield from _fill(settings, shared, session, out, count, prior)
    except BaseException:
        # A failed or cancelled call loses no IDs: the next call gets them.
        spare.extend(out)
        raise
    if len(out) > count:
        spare.extend(out[count:])
        del out[count:]
    return out


# How one server's turn ended.
_DONE, _NO_REPLY, _UNAVAILABLE, _EXHAUSTED, _UNRESOLVED = range(5)


def _fill(
    settings: Settings, shared: Shared, session: Session, out: List[str], count: int, prior: Optional[Prior]
) -> Steps[None]:
    """Appends fresh IDs to ``out`` until it holds ``count``, failing over
    across the servers in order, starting at the one used last."""
    servers = len(settings.servers)
    fruitless = 0  # servers tried in a row without getting an ID
    # How those failed: one kept answering !ERR503, one did not answer, the
    # names that did not resolve.
    unavailable = silent = False
    unresolved: Dict[str, OSError] = {}
    while len(out) < count:
        if all(shared.exhausted):
            raise SpaceExhausted(settings.servers)
        if fruitless >= servers:
            if unavailable:
                raise Unavailable(settings.servers, settings.unavailable_budget, unresolved)
            if unresolved and not silent:
                raise ResolveError(unresolved) from next(iter(unresolved.values()))
            raise Timeout(settings.servers, settings.attempts, settings.timeout, unresolved)
        index = session.current
        if not shared.exhausted[index]:
            before = len(out)
            if prior is not None and prior.server != index:
                prior = None
            outcome = yield from _fill_from(settings, shared, session, index, out, count, unresolved, prior)
            prior = None
            if outcome == _DONE:
                return
            if len(out) > before:
                fruitless, unavailable, silent = 0, False, False
                unresolved.clear()
            if outcome == _EXHAUSTED:
                shared.exhausted[index] = True
            elif outcome == _UNAVAILABLE:
                unavailable = True
            else:  # no reply, or no address: it may have moved
                silent = silent or outcome == _NO_REPLY
                yield Forget(index)
        session.current = (index + 1) % servers
        fruitless += 1


def _fill_from(
    settings: Settings,
    shared: Shared,
    session: Session,
    index: int,
    out: List[str],
    count: int,
    unresolved: Dict[str, OSError],
    prior: Optional[Prior] = None,
) -> Steps[int]:
    """Fills ``out`` from server ``index`` until done or the server fails
    (a name that does not resolve goes into ``unresolved``).

    An *attempt* is a wait of ``timeout`` with no useful reply; ``attempts``
    of them in a row (any reply with fresh IDs starts the count again) end
    this server's turn. Requests in flight when an attempt times out are
    presumed lost and asked for again; if their replies turn up later they
    are used all the same.
    """
    timeout = settings.timeout
    attempts_left = settings.attempts
    backoff = BACKOFF_START
    streak_start: Optional[float] = None  # when the current run of !ERR503 began
    inflight: Deque[int] = collections.deque()  # sizes asked for, oldest first
    pending = 0  # sum(inflight)
    recent = session.recent
    monotonic = settings.clock
    while True:
        refused = False
        if prior is not None:
            # The driver's own request stands in for the first one here.
            refused = not prior.sent
            if prior.sent:
                inflight.append(prior.asked)
                pending += prior.asked
        # Keep up to `window` requests in flight for the IDs still missing.
        while not refused and len(inflight) < settings.window:
            missing = count - len(out) - pending
            if missing <= 0:
                break
            size = min(missing, shared.max_batch)
            try:
                sent = yield Send(index, encode_request(size))
            except ResolveError as e:
                unresolved.update(e.errors)
                return _UNRESOLVED
            if sent is None:
                refused = True
                break
            inflight.append(size)
            pending += size
        if refused:
            # ECONNREFUSED (an earlier ICMP "port unreachable"): the server
            # is down. A lost attempt, after a short pause.
            prior = None
            attempts_left -= 1
            inflight.clear()
            pending = 0
            if attempts_left <= 0:
                return _NO_REPLY
            yield Sleep(min(timeout, REFUSED_PAUSE))
            continue

        deadline = monotonic() + timeout
        while True:  # until a reply that changes something, or the deadline
            if prior is not None:
                data, prior = prior.reply, None
            else:
                left = deadline - monotonic()
                data = (yield Recv(index, left)) if left > 0 else None
            if data is None:
                attempts_left -= 1
                inflight.clear()
                pending = 0
                if attempts_left <= 0:
                    return _NO_REPLY
                break  # ask again
            if data in recent:
                continue  # a copy of a reply already used: keep waiting
            reply = decode_reply(data)
            if isinstance(reply, tuple):
                recent.add(data, len(reply))
                out.extend(reply)
                if inflight:
                    pending -= inflight.popleft()
                attempts_left = settings.attempts
                backoff = BACKOFF_START
                streak_start = None
                if len(out) >= count:
                    return _DONE
                break  # top the window up
            if reply is None:
                continue  # not a tradeid reply: ignore, keep waiting
            # An error reply answers one request (the oldest, as far as we
            # can tell: replies carry no tag).
            asked = inflight.popleft() if inflight else 0
            pending -= asked
            if reply is ErrorCode.UNAVAILABLE:
                now = monotonic()
                if streak_start is None:
                    streak_start = now
                elif now - streak_start >= settings.unavailable_budget:
                    return _UNAVAILABLE
                yield Sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                break
            if reply is ErrorCode.TOO_MANY:
                # The server's max-batch is below ours: ask for less.
                if asked > 1:
                    lower = asked // 2
                elif shared.max_batch > 1:
                    lower = shared.max_batch // 2
                else:
                    raise Rejected(settings.servers[index], int(reply))
                shared.max_batch = min(shared.max_batch, lower)
                break
            if reply is ErrorCode.EXHAUSTED:
                return _EXHAUSTED
            # !ERR400 or !ERR505: this client and that server disagree on
            # the protocol; no retry can help.
            raise Rejected(settings.servers[index], int(reply))
