"""The WebSocket seam: what the connection actor needs from a stream socket.

The connection actor is written against `Connector` and `WebSocket` only. Production uses
`wsclient.websocket_connector` (wsproto on a TCP or TLS stream); the deterministic
simulation hands it an in-memory transport (`testing`). Every implementation reports
failures as `errors.TransportClosed` or `errors.UpgradeRejected`, and returns messages
already read before it reports a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class WebSocket(Protocol):
    async def get_message(self) -> str | bytes: ...

    async def get_messages(self) -> list[str | bytes]:
        """At least one message, and every other one already received: the reader
        handles a socket read's worth of updates in one turn. Cancelled, it has lost
        nothing it read (it waits only while it holds no message)."""
        ...

    async def send_message(self, data: str | bytes) -> None: ...

    async def ping(self) -> None:
        """Send a ping and return when its pong arrives."""
        ...


Connector = Callable[[str], AbstractAsyncContextManager[WebSocket]]


__all__ = ["Connector", "WebSocket"]
