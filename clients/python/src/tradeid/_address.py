"""Server addresses: ``HOST:PORT``, ``[IPv6]:PORT``; hostnames resolved."""

from __future__ import annotations

import socket
from typing import Any, List, NamedTuple, Sequence, Tuple, Union

from ._errors import ConfigError

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
    return Endpoint(raw, host, int(port_text))


def _pick(endpoint: Endpoint, infos: Sequence[Tuple[Any, ...]]) -> Resolved:
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return Resolved(int(family), tuple(sockaddr))
    raise ConfigError(f"server {endpoint.text!r} resolves to no IPv4 or IPv6 address")


def resolve(endpoint: Endpoint) -> Resolved:
    """The first address ``endpoint`` resolves to (as the Rust client does)."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"server {endpoint.text!r} does not resolve: {e}") from e
    return _pick(endpoint, infos)


async def resolve_async(endpoint: Endpoint) -> Resolved:
    """:func:`resolve` without blocking the event loop."""
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"server {endpoint.text!r} does not resolve: {e}") from e
    return _pick(endpoint, infos)
