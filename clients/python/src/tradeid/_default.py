"""``tradeid.generate()``: a process-wide client configured from the
environment, created on first use."""

from __future__ import annotations

import os
import threading
from typing import List, Optional

from ._address import DEFAULT_SERVER
from ._sync import Client

#: The environment variable naming the servers (comma-separated HOST:PORT).
SERVERS_ENV = "TRADEID_SERVERS"

_client: Optional[Client] = None
_lock = threading.Lock()


def default_servers() -> str:
    """``$TRADEID_SERVERS``, or ``127.0.0.1:7070`` when unset or blank."""
    return os.environ.get(SERVERS_ENV, "").strip() or DEFAULT_SERVER


def default_client() -> Client:
    """The shared client behind :func:`generate`, created on first use from
    ``$TRADEID_SERVERS``. Thread-safe; a forked child gets a new one."""
    global _client
    client = _client
    if client is None:
        with _lock:
            client = _client
            if client is None:
                client = _client = Client(default_servers())
    return client


def generate() -> str:
    """One new ID from the default client."""
    return default_client().next_id()


def generate_bulk(count: int) -> List[str]:
    """``count`` new, distinct IDs from the default client."""
    return default_client().next_ids(count)


def reset_default_client() -> None:
    """Closes the default client; the next :func:`generate` creates a new
    one, reading ``$TRADEID_SERVERS`` again."""
    global _client
    with _lock:
        client, _client = _client, None
    if client is not None:
        client.close()


def _after_fork_in_child() -> None:
    # The parent's sockets stay with the parent; the lock may have been held
    # by a thread that does not exist in the child.
    global _client, _lock
    _client = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
