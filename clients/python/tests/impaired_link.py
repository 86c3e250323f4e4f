"""A user-space UDP proxy that impairs the link between clients and a server.

Clients send to :attr:`ImpairedLink.address`; each client address gets its
own upstream socket connected to the server (so replies find their way
back, as through a NAT). Every datagram, in either direction, may be lost,
duplicated, or held back for a random delay (which reorders it, and when the
delay exceeds the client's timeout makes it a *late* reply). All randomness
comes from one seeded generator.
"""

from __future__ import annotations

import heapq
import random
import selectors
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

Addr = Tuple[str, int]


class ImpairedLink:
    def __init__(
        self,
        upstream: str,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.0,
        max_delay: float = 0.0,
        seed: int = 0,
    ) -> None:
        """``loss``, ``duplicate`` and ``delay`` are per-datagram
        probabilities; a delayed datagram (or copy) waits uniformly up to
        ``max_delay`` seconds."""
        host, _, port = upstream.rpartition(":")
        self._upstream: Addr = (host, int(port))
        self.loss, self.duplicate, self.delay, self.max_delay = loss, duplicate, delay, max_delay
        self._random = random.Random(seed)
        self._front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._front.bind(("127.0.0.1", 0))
        self._front.setblocking(False)
        self._clients: Dict[Addr, socket.socket] = {}
        self._client_of: Dict[socket.socket, Addr] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._front, selectors.EVENT_READ)
        # (due time, sequence, socket, payload, destination or None if connected)
        self._queue: List[Tuple[float, int, socket.socket, bytes, Optional[Addr]]] = []
        self._sequence = 0
        self._stop = threading.Event()
        self.counts = {"forwarded": 0, "lost": 0, "duplicated": 0, "delayed": 0}
        self._thread = threading.Thread(target=self._run, name="impaired-link", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._front.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the proxy thread did not stop"
        for s in [self._front, *self._clients.values()]:
            s.close()
        self._selector.close()

    def __enter__(self) -> "ImpairedLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _upstream_for(self, client: Addr) -> socket.socket:
        s = self._clients.get(client)
        if s is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(self._upstream)
            s.setblocking(False)
            self._clients[client] = s
            self._client_of[s] = client
            self._selector.register(s, selectors.EVENT_READ)
        return s

    def _impair(self, sock: socket.socket, payload: bytes, destination: Optional[Addr]) -> None:
        rnd = self._random
        if rnd.random() < self.loss:
            self.counts["lost"] += 1
            return
        copies = 1
        if rnd.random() < self.duplicate:
            copies = 2
            self.counts["duplicated"] += 1
        now = time.monotonic()
        for _ in range(copies):
            due = now
            if rnd.random() < self.delay:
                due += rnd.uniform(0, self.max_delay)
                self.counts["delayed"] += 1
            self._sequence += 1
            heapq.heappush(self._queue, (due, self._sequence, sock, payload, destination))

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = 0.01
            if self._queue:
                timeout = min(timeout, max(0.0, self._queue[0][0] - time.monotonic()))
            for key, _ in self._selector.select(timeout):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                for _ in range(64):  # drain what is there
                    try:
                        payload, source = sock.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # e.g. ECONNREFUSED while the server is down
                    if sock is self._front:
                        self._impair(self._upstream_for(source), payload, None)
                    else:
                        self._impair(self._front, payload, self._client_of[sock])
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, sock, payload, destination = heapq.heappop(self._queue)
                try:
                    if destination is None:
                        sock.send(payload)
                    else:
                        sock.sendto(payload, destination)
                    self.counts["forwarded"] += 1
                except OSError:
                    pass  # a full buffer or a closed port: the datagram is lost
