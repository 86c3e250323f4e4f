"""Client for tradeid, the UDP service that hands out unique 7-character
trade IDs such as ``B762F00``.

Quick start::

    import tradeid

    trade_id = tradeid.generate()            # servers from $TRADEID_SERVERS
    ids = tradeid.generate_bulk(10_000)

    with tradeid.Client(["10.0.0.5:7070", "10.0.0.6:7070"]) as client:
        client.next_id()

    async with tradeid.AsyncClient("10.0.0.5:7070") as client:
        await client.next_id()

    tradeid.parse("b76-2fo0")                # 'B762F00'
"""

from ._async import AsyncClient
from ._codec import ALPHABET, ID_LEN, Mode, is_valid, parse
from ._default import default_client, generate, generate_bulk, reset_default_client
from ._errors import (
    ClientClosed,
    ConfigError,
    InvalidId,
    Rejected,
    ResolveError,
    SpaceExhausted,
    Timeout,
    TradeIdError,
    TransportError,
    Unavailable,
)
from ._sync import Client

__version__ = "0.1.0"

__all__ = [
    "ALPHABET",
    "ID_LEN",
    "AsyncClient",
    "Client",
    "ClientClosed",
    "ConfigError",
    "InvalidId",
    "Mode",
    "Rejected",
    "ResolveError",
    "SpaceExhausted",
    "Timeout",
    "TradeIdError",
    "TransportError",
    "Unavailable",
    "default_client",
    "generate",
    "generate_bulk",
    "is_valid",
    "parse",
    "reset_default_client",
]
