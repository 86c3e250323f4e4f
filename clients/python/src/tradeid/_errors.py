"""The exceptions the client raises. Every one derives from TradeIdError."""

from __future__ import annotations

from typing import Optional, Sequence


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
    """A bad argument to a client: an unparsable or unresolvable server
    address, a non-positive timeout, a batch size out of range."""


class Timeout(TradeIdError):
    """No server answered in time (every attempt on every server was lost)."""

    def __init__(self, servers: Sequence[str], attempts: int, timeout: float) -> None:
        self.servers = list(servers)
        self.attempts = attempts
        self.timeout = timeout
        super().__init__(
            f"no reply from {', '.join(self.servers)} after {attempts} attempt(s) each "
            f"of {timeout * 1000:g} ms; are they running and reachable, and is this host "
            "in their --allow list?"
        )


class Unavailable(TradeIdError):
    """Every server that answered kept saying ``!ERR503`` (no block of IDs
    ready yet, or shutting down) for longer than the retry budget.

    Transient, like :class:`Timeout`: retrying later is reasonable.
    """

    def __init__(self, servers: Sequence[str], budget: float) -> None:
        self.servers = list(servers)
        self.budget = budget
        super().__init__(
            f"{', '.join(self.servers)} kept answering !ERR503 (no block of IDs ready, "
            f"or shutting down) for over {budget * 1000:g} ms each; the server may be "
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
