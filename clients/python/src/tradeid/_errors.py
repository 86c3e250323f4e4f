"""The exceptions the client raises. Every one derives from TradeIdError."""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence


class TradeIdError(Exception):
    """Base class of every error this package raises."""


class InvalidId(TradeIdError, ValueError):
    """Text that is not an ID (raised by :func:`tradeid.parse`).

    ``reason`` is a stable token, the same one the shared test vectors use:

    * ``"invalid_char"``: ``char`` at ``position`` (counted in characters
      from 0) is not an ID character, an alias or a separator;
    * ``"length"``: the text holds ``digits`` ID characters instead of 7;
    * ``"check_mismatch"`` (``mode="check"`` only): seven valid characters
      whose last is not the check character of the first six, a typo.
    """

    def __init__(
        self,
        message: str,
        *,
        text: str,
        reason: str,
        char: Optional[str] = None,
        position: Optional[int] = None,
        digits: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.text = text
        self.reason = reason
        self.char = char
        self.position = position
        self.digits = digits


class ConfigError(TradeIdError, ValueError):
    """A bad argument to a client: a malformed server address (not
    ``HOST:PORT``, a bad port, an invalid host name), a non-positive
    timeout, a batch size out of range. Raised when the client is created;
    a host name that does not resolve is :class:`ResolveError`, at use."""


def _unresolved_note(unresolved: Mapping[str, OSError]) -> str:
    if not unresolved:
        return ""
    return " (" + "; ".join(f"{server} did not resolve: {e}" for server, e in unresolved.items()) + ")"


class ResolveError(TradeIdError):
    """No server could be used because their host names did not resolve
    (a DNS failure, or a name with no IPv4 or IPv6 address).

    ``errors`` maps each such server, as configured, to the resolver's
    ``OSError`` (usually a ``socket.gaierror``); ``servers`` lists them.
    The first error is also the ``__cause__``.

    Transient, like :class:`Timeout`: a name is looked up when a server is
    first used and again after it fails, so the next call tries again. A
    server whose name does not resolve is skipped for the next one, like a
    server that does not answer; this is raised only when no server at all
    could be reached that way.
    """

    def __init__(self, errors: Mapping[str, OSError]) -> None:
        self.errors: Dict[str, OSError] = dict(errors)
        self.servers = list(self.errors)
        names = "; ".join(f"{server} ({e})" for server, e in self.errors.items())
        super().__init__(
            f"cannot look up the host name of {names}: check the name (the servers "
            "argument or TRADEID_SERVERS) and this host's DNS; it is looked up again "
            "on the next call"
        )


class Timeout(TradeIdError):
    """No server answered in time (every attempt on every server was lost).
    ``unresolved`` maps the servers whose names did not resolve, if any, to
    the resolver's error, as in :class:`ResolveError`."""

    def __init__(
        self,
        servers: Sequence[str],
        attempts: int,
        timeout: float,
        unresolved: Optional[Mapping[str, OSError]] = None,
    ) -> None:
        self.servers = list(servers)
        self.attempts = attempts
        self.timeout = timeout
        self.unresolved: Dict[str, OSError] = dict(unresolved or {})
        super().__init__(
            f"no reply from {', '.join(self.servers)} after {attempts} attempt(s) each "
            f"of {timeout * 1000:g} ms{_unresolved_note(self.unresolved)}; are they "
            "running and reachable, and is this host in their --allow list?"
        )


class Unavailable(TradeIdError):
    """Every server that answered kept saying ``!ERR503`` (no block of IDs
    ready yet, or shutting down) for longer than the retry budget.
    ``unresolved`` is as in :class:`Timeout`.

    Transient, like :class:`Timeout`: retrying later is reasonable.
    """

    def __init__(
        self, servers: Sequence[str], budget: float, unresolved: Optional[Mapping[str, OSError]] = None
    ) -> None:
        self.servers = list(servers)
        self.budget = budget
        self.unresolved: Dict[str, OSError] = dict(unresolved or {})
        super().__init__(
            f"{', '.join(self.servers)} kept answering !ERR503 (no block of IDs ready, "
            f"or shutting down) for over {budget * 1000:g} ms each"
            f"{_unresolved_note(self.unresolved)}; the server may be "
            "stopping, overloaded or waiting on a slow disk"
        )


class SpaceExhausted(TradeIdError):
    """Every server answered ``!ERR507``: its ID space is used up. Final:
    retrying the same servers will not help."""

    def __init__(self, servers: Sequence[str]) -> None:
        self.servers = list(servers)
        super().__init__(
            f"every server reports its ID space exhausted (!ERR507): {', '.join(self.servers)}"
        )


class Rejected(TradeIdError):
    """A server rejected the request itself (``!ERR400`` unknown opcode,
    ``!ERR505`` unsupported version, or ``!ERR413`` even for one ID): this
    client and that server do not speak the same protocol."""

    def __init__(self, server: str, code: int) -> None:
        self.server = server
        self.code = code
        super().__init__(f"server {server} rejected the request: !ERR{code}")


class TransportError(TradeIdError):
    """A socket error other than a timeout or a refused port (for example
    no route to the host). The OS error is the ``__cause__``."""

    def __init__(self, server: str, error: OSError) -> None:
        self.server = server
        self.error = error
        super().__init__(f"socket error talking to {server}: {error}")


class ClientClosed(TradeIdError):
    """The client was used after :meth:`close`."""

    def __init__(self) -> None:
        super().__init__("this tradeid client is closed")
