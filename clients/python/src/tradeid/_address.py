"""Server addresses: ``HOST:PORT``, ``[IPv6]:PORT``, parsed when a client
is created; host names looked up when first used and again after a
failure (:class:`Targets`)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple, Union

from ._errors import ConfigError, ResolveError

#: The server used when neither an argument nor TRADEID_SERVERS names one.
DEFAULT_SERVER = "127.0.0.1:7070"


class Endpoint(NamedTuple):
    """A server as configured (``text``) and split into host and port."""

    text: str
    host: str
    port: int


class Resolved(NamedTuple):
    """What a socket needs: the address family and the socket address."""

    family: int
    sockaddr: Tuple[Any, ...]


def split_servers(servers: Union[str, Sequence[str]]) -> List[Endpoint]:
    """Parses a list of servers, or one string of comma-separated servers."""
    if isinstance(servers, str):
        items = servers.split(",")
    else:
        items = list(servers)
    endpoints = [parse_endpoint(item) for item in items if item.strip()]
    if not endpoints:
        raise ConfigError("no server address given (want HOST:PORT, e.g. 127.0.0.1:7070)")
    return endpoints


def parse_endpoint(text: str) -> Endpoint:
    """``"10.0.0.5:7070"``, ``"ids.internal:7070"`` or ``"[::1]:7070"``."""
    if not isinstance(text, str):
        raise ConfigError(f"a server address is a str like '127.0.0.1:7070', not {text!r}")
    raw = text.strip()
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"server {text!r} is not [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"server {text!r} is not HOST:PORT")
        if ":" in host:
            raise ConfigError(f"server {text!r}: write an IPv6 address in brackets, [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"server {text!r}: port {port_text!r} is not 1..65535")
    _check_host(text, host)
    return Endpoint(raw, host, int(port_text))


def _check_host(text: str, host: str) -> None:
    """Refuses, up front, what no lookup could ever resolve."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if any(c.isspace() for c in host):
        raise ConfigError(f"server {text!r}: the host name {host!r} contains a space")
    try:
        host.encode("idna")
    except UnicodeError as e:
        raise ConfigError(f"server {text!r}: {host!r} is not a valid host name ({e})") from e


def _pick(endpoint: Endpoint, infos: Sequence[Tuple[Any, ...]]) -> Resolved:
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return Resolved(int(family), tuple(sockaddr))
    error = OSError(f"{endpoint.host} has no IPv4 or IPv6 address")
    raise ResolveError({endpoint.text: error}) from error


def resolve(endpoint: Endpoint) -> Resolved:
    """The first address ``endpoint`` resolves to (as the Rust client does),
    or :class:`ResolveError`."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        error = e if isinstance(e, OSError) else OSError(str(e))
        raise ResolveError({endpoint.text: error}) from e
    return _pick(endpoint, infos)


async def resolve_async(endpoint: Endpoint) -> Resolved:
    """:func:`resolve` without blocking the event loop."""
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        error = e if isinstance(e, OSError) else OSError(str(e))
        raise ResolveError({endpoint.text: error}) from e
    return _pick(endpoint, infos)


class Targets:
    """A client's servers and their addresses, shared by all its channels.

    A host name is looked up when a channel first needs the server, and the
    result is kept until a channel reports the server failed (no reply, a
    closed port): then the next use looks it up again, so a server moved to
    a new address (DNS changed) is found after its old address fails. A
    failed lookup is not kept either: every call that needs the server tries
    again. A healthy server is not looked up again: its old address still
    reaches a tradeid server, and a lookup per call would put DNS on the
    request path.

    No lock: a slot holds either nothing or one lookup's result, and two
    channels racing to look up the same name only do it twice.
    """

    __slots__ = ("endpoints", "servers", "_cache")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)
        self.servers = tuple(e.text for e in endpoints)
        self._cache: List[Optional[Resolved]] = [None] * len(endpoints)

    def get(self, index: int) -> Resolved:
        """Server ``index``'s address, looked up if need be (may block on
        DNS); :class:`ResolveError` if the name does not resolve."""
        target = self._cache[index]
        if target is None:
            target = self._cache[index] = resolve(self.endpoints[index])
        return target

    async def get_async(self, index: int) -> Resolved:
        """:meth:`get` without blocking the event loop."""
        target = self._cache[index]
        if target is None:
            target = self._cache[index] = await resolve_async(self.endpoints[index])
        return target

    def forget(self, index: int, failed: Resolved) -> None:
        """Server ``index`` failed at address ``failed``: look it up again
        next time (unless another channel already did and got a different
        address)."""
        if self._cache[index] == failed:
            self._cache[index] = None
