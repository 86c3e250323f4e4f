"""The client's logic without a network: the engine driven against scripted
servers on a virtual clock. (The same logic runs against the real server in
test_client.py and test_faults.py.)"""

from __future__ import annotations

import collections
import itertools
import socket
from typing import Callable, Deque, Iterator, List, Optional, Sequence

import pytest
from support import assert_ids

import tradeid
from tradeid import _engine, _protocol

Behaviour = Callable[[int], List[bytes]]  # request count -> reply datagrams


def id_source() -> Iterator[bytes]:
    """Distinct canonical IDs, as a server would make them."""
    for n in itertools.count(12345):
        text = ""
        for _ in range(7):
            text = tradeid.ALPHABET[n % 32] + text
            n //= 32
        yield text.encode()


class FakeNet:
    """Runs engine steps against scripted servers; time is virtual. Servers
    in ``unresolved`` have a name that does not resolve."""

    def __init__(self, *servers: Behaviour, unresolved: Sequence[int] = ()) -> None:
        self.servers = servers
        self.unresolved = set(unresolved)
        self.queues: List[Deque[bytes]] = [collections.deque() for _ in servers]
        self.requests: List[List[int]] = [[] for _ in servers]  # counts asked, per server
        self.lengths: List[int] = []  # request datagram lengths
        self.sleeps: List[float] = []
        self.forgotten: List[int] = []  # servers the engine said to look up again
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def run(self, steps: _engine.Steps[List[str]]) -> List[str]:
        result: Optional[bytes] = None
        try:
            while True:
                action = steps.send(result)
                while isinstance(action, _engine.Send) and action.server in self.unresolved:
                    name = f"10.0.0.{action.server + 1}:7070"
                    action = steps.throw(tradeid.ResolveError({name: socket.gaierror(-2, "Name or service not known")}))
                if isinstance(action, _engine.Forget):
                    self.forgotten.append(action.server)
                    self.queues[action.server].clear()  # its socket is closed
                    result = None
                elif isinstance(action, _engine.Send):
                    count = int.from_bytes(action.payload[4:6], "big")
                    self.requests[action.server].append(count)
                    self.lengths.append(len(action.payload))
                    self.queues[action.server].extend(self.servers[action.server](count))
                    result = b""
                elif isinstance(action, _engine.Recv):
                    queue = self.queues[action.server]
                    if queue:
                        result = queue.popleft()
                    else:
                        self.now += action.timeout
                        result = None
                else:
                    self.sleeps.append(action.seconds)
                    self.now += action.seconds
                    result = None
        except StopIteration as stop:
            ids: List[str] = stop.value
            return ids
        finally:
            steps.close()


class Client:
    """An engine 'client' over a FakeNet."""

    def __init__(self, net: FakeNet, *, max_batch: int = 175, attempts: int = 3, timeout: float = 0.25) -> None:
        names = [f"10.0.0.{i + 1}:7070" for i in range(len(net.servers))]
        self.net = net
        self.settings = _engine.Settings(names, timeout, attempts, 8, clock=net.clock)
        self.shared = _engine.Shared(max_batch, len(names))
        self.session = _engine.Session(self.shared)

    def take(self, count: int) -> List[str]:
        return self.net.run(_engine.take(self.settings, self.shared, self.session, count))


def serving(ids: Optional[Iterator[bytes]] = None, *, max_batch: int = 175, copies: int = 1) -> Behaviour:
    source = ids or id_source()

    def behave(count: int) -> List[bytes]:
        if count > max_batch:
            return [b"!ERR413"]
        reply = b"".join(next(source) for _ in range(count))
        return [reply] * copies

    return behave


def constant(*replies: bytes) -> Behaviour:
    return lambda count: list(replies)


def silent(count: int) -> List[bytes]:
    return []


def test_request_padding() -> None:
    for count, length in [(1, 8), (3, 8), (4, 10), (16, 38), (175, 409), (9358, 21836)]:
        request = _protocol.encode_request(count)
        assert len(request) == length == _protocol.padded_len(count)
        assert request[:8] == b"ID\x01\x01" + count.to_bytes(2, "big") + b"\x00\x00"
        assert not any(request[8:])


def test_reply_decoding() -> None:
    assert _protocol.decode_reply(b"B762F00") == ("B762F00",)
    assert _protocol.decode_reply(b"B762F00ZZZZZZZ") == ("B762F00", "ZZZZZZZ")
    for count in [175, 1024, 1025, 9358]:  # both ways of splitting
        assert _protocol.decode_reply(b"B762F00" * count) == ("B762F00",) * count
    assert _protocol.decode_reply(b"!ERR503") is _protocol.ErrorCode.UNAVAILABLE
    assert _protocol.decode_reply(b"!ERR507") is _protocol.ErrorCode.EXHAUSTED
    for junk in [b"", b"B762F0", b"b762f00", b"B762FO0", b"B762FU0", b"!ERR999", b"!ERR503B762F00", b"\xff" * 7]:
        assert _protocol.decode_reply(junk) is None, junk


def test_many_ids_in_batches_and_a_window() -> None:
    net = FakeNet(serving())
    client = Client(net)
    assert_ids(client.take(10_000), 10_000)
    assert max(net.requests[0]) == 175
    assert sum(net.requests[0]) == 10_000  # nothing asked twice on a clean link
    assert set(net.lengths) <= {_protocol.padded_len(n) for n in net.requests[0]}


def test_too_many_lowers_the_batch_and_stays_on_the_same_server() -> None:
    net = FakeNet(serving(max_batch=50), serving())
    client = Client(net)
    assert_ids(client.take(175) + client.take(1000), 1175)
    assert net.requests[1] == [], "a !ERR413 must not fail over"
    assert client.shared.max_batch <= 50
    assert net.sleeps == []
    # Once lowered, every request fits.
    first_fit = next(i for i, n in enumerate(net.requests[0]) if n <= 50)
    assert all(n <= 50 for n in net.requests[0][first_fit:])


def test_too_many_for_a_single_id_is_a_rejection() -> None:
    client = Client(FakeNet(constant(b"!ERR413")))
    with pytest.raises(tradeid.Rejected) as info:
        client.take(5)
    assert info.value.code == 413


def test_unavailable_backs_off_exponentially_without_failing_over() -> None:
    ok = serving()
    answers = itertools.chain([[b"!ERR503"]] * 10, iter(lambda: None, 0))

    def flaky(count: int) -> List[bytes]:
        reply = next(answers)
        return reply if reply is not None else ok(count)

    net = FakeNet(flaky, serving())
    client = Client(net)
    assert_ids(client.take(3), 3)
    assert net.sleeps == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05, 0.05, 0.05]
    assert net.requests[1] == []


def test_endless_unavailable_fails_over_then_raises_unavailable() -> None:
    net = FakeNet(constant(b"!ERR503"), constant(b"!ERR503"))
    client = Client(net, attempts=2, timeout=0.25)
    with pytest.raises(tradeid.Unavailable) as info:
        client.take(1)
    assert info.value.servers == ["10.0.0.1:7070", "10.0.0.2:7070"]
    assert net.requests[0] and net.requests[1]
    # Each server got its budget: 4 x attempts x timeout, at least 1 s.
    assert _engine.unavailable_budget(2, 0.25) == 2.0
    assert _engine.unavailable_budget(2, 0.05) == 1.0
    assert 2 * 2.0 <= net.now < 2 * 2.0 + 0.2


def test_exhausted_server_is_skipped_and_all_exhausted_is_final() -> None:
    net = FakeNet(constant(b"!ERR507"), serving())
    client = Client(net)
    assert_ids(client.take(10), 10)
    assert client.shared.exhausted == [True, False]
    client.take(10)
    assert len(net.requests[0]) == 1, "an exhausted server is not asked again"

    net = FakeNet(constant(b"!ERR507"), constant(b"!ERR507"))
    client = Client(net)
    with pytest.raises(tradeid.SpaceExhausted):
        client.take(1)
    with pytest.raises(tradeid.SpaceExhausted):
        client.take(1)
    assert [len(r) for r in net.requests] == [1, 1]


@pytest.mark.parametrize("code", [400, 505])
def test_protocol_mismatch_is_rejected(code: int) -> None:
    client = Client(FakeNet(constant(b"!ERR%d" % code), serving()))
    with pytest.raises(tradeid.Rejected) as info:
        client.take(1)
    assert (info.value.code, info.value.server) == (code, "10.0.0.1:7070")
    assert f"!ERR{code}" in str(info.value)


def test_silence_times_out_with_a_helpful_message() -> None:
    net = FakeNet(silent, silent)
    client = Client(net, attempts=2)
    with pytest.raises(tradeid.Timeout) as info:
        client.take(1)
    message = str(info.value)
    assert "10.0.0.1:7070" in message and "10.0.0.2:7070" in message
    assert "running" in message and "--allow" in message
    assert [len(r) for r in net.requests] == [2, 2]  # attempts per server


def test_network_duplicates_are_never_returned() -> None:
    net = FakeNet(serving(copies=3))
    client = Client(net)
    ids = client.take(500) + [client.take(1)[0] for _ in range(300)] + client.take(2000)
    assert_ids(ids, 2800)


def test_replayed_old_datagrams_are_dropped() -> None:
    sent: List[bytes] = []
    fresh = serving()

    def replaying(count: int) -> List[bytes]:
        reply = fresh(count)
        sent.extend(reply)
        return sent[-3:-1] + reply  # two old datagrams, then the real one

    client = Client(FakeNet(replaying))
    assert_ids([client.take(1)[0] for _ in range(500)] + client.take(1000), 1500)


def test_a_late_reply_is_used() -> None:
    issued: List[str] = []
    source = id_source()
    held: List[bytes] = []

    def late(count: int) -> List[bytes]:
        # Each reply is delivered only when the next request arrives.
        reply = b"".join(next(source) for _ in range(count))
        issued.extend(reply[i : i + 7].decode() for i in range(0, len(reply), 7))
        held.append(reply)
        return [held.pop(0)] if len(held) > 1 else []

    net = FakeNet(late)
    client = Client(net)
    first = client.take(1)
    assert first == issued[:1], "the reply to the timed-out request is the answer"
    ids = first + [client.take(1)[0] for _ in range(20)]
    assert_ids(ids, 21)
    assert set(ids) <= set(issued)


def test_a_failed_call_keeps_its_ids_for_the_next_call() -> None:
    ok = serving()
    calls = itertools.count()

    def dies(count: int) -> List[bytes]:
        return ok(count) if next(calls) < 2 else []

    net = FakeNet(dies)
    client = Client(net, max_batch=50)
    with pytest.raises(tradeid.Timeout):
        client.take(175)  # gets 100 IDs, then the server goes silent
    assert len(client.session.spare) == 100
    kept = client.take(100)
    assert_ids(kept, 100)


def test_recent_replies_cover_at_least_the_window() -> None:
    recent = _engine.RecentReplies(_engine.Shared(175, 1), capacity=4)
    datagrams = [f"{i:07d}".encode() for i in range(10)]
    for d in datagrams:
        assert d not in recent
        recent.add(d, 1)
    for d in datagrams[-4:]:
        assert d in recent, f"{d!r} is within the window"
    assert datagrams[0] not in recent, "the oldest fell out"
    # The window counts IDs, not datagrams.
    recent = _engine.RecentReplies(_engine.Shared(175, 1), capacity=350)
    bulk = [bytes([65 + i]) * 7 * 175 for i in range(5)]
    for d in bulk:
        recent.add(d, 175)
    assert bulk[3] in recent and bulk[4] in recent  # the last 350 IDs
    assert bulk[0] not in recent


def test_the_window_is_the_clients() -> None:
    """Channels of one client each remember their own datagrams, but age
    them by what the whole client received: every datagram among the
    client's last `capacity` IDs stays remembered, and a busy client does not
    keep a full window per thread."""
    shared = _engine.Shared(175, 1)
    a = _engine.RecentReplies(shared, capacity=10)
    b = _engine.RecentReplies(shared, capacity=10)
    a.add(b"A000000", 1)
    for i in range(9):  # the client's last 10 IDs include A's
        b.add(f"B{i:06d}".encode(), 1)
    assert b"A000000" in a
    for i in range(9, 40):  # far more than a window, all through B
        b.add(f"B{i:06d}".encode(), 1)
    a.add(b"A000001", 1)  # A ages its generations on its next use
    a.add(b"A000002", 1)
    assert b"A000001" in a and b"A000002" in a
    assert b"A000000" not in a, "A forgot what fell out of the client's window"
    assert sum(1 for i in range(40) if f"B{i:06d}".encode() in b) <= 20


def test_a_name_that_does_not_resolve_is_skipped_for_the_next_server() -> None:
    net = FakeNet(serving(), serving(), unresolved=[0])
    client = Client(net)
    assert_ids(client.take(10) + client.take(500), 510)
    assert net.requests[0] == [] and sum(net.requests[1]) == 510
    assert net.forgotten == [0]  # looked up again next time, not cached as failed
    assert net.sleeps == [], "a failed lookup is not waited on"


def test_no_name_resolves_is_a_resolve_error_naming_each() -> None:
    net = FakeNet(serving(), serving(), unresolved=[0, 1])
    client = Client(net)
    with pytest.raises(tradeid.ResolveError) as info:
        client.take(1)
    assert info.value.servers == ["10.0.0.1:7070", "10.0.0.2:7070"]
    assert isinstance(info.value.__cause__, socket.gaierror)
    assert "10.0.0.1:7070 ([Errno -2] Name or service not known)" in str(info.value)
    assert "TRADEID_SERVERS" in str(info.value)
    assert not isinstance(info.value, tradeid.ConfigError)
    # The next call looks both up again (and here finds the first).
    net.unresolved = {1}
    assert_ids(client.take(3), 3)


def test_unresolved_and_silent_is_a_timeout_that_names_the_unresolved() -> None:
    net = FakeNet(silent, serving(), unresolved=[1])
    client = Client(net)
    with pytest.raises(tradeid.Timeout) as info:
        client.take(1)
    assert list(info.value.unresolved) == ["10.0.0.2:7070"]
    assert "10.0.0.2:7070 did not resolve" in str(info.value)
    assert net.forgotten == [0, 1]


def test_a_silent_server_is_looked_up_again() -> None:
    net = FakeNet(silent, serving())
    client = Client(net)
    assert_ids(client.take(5), 5)
    assert net.forgotten == [0]
    assert_ids(client.take(5), 5)
    assert net.forgotten == [0], "a server that answers is not looked up again"
