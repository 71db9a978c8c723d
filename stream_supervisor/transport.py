"""The WebSocket seam: what the connection actor needs from a socket, and the real one.

The connection actor is written against `Connector` so the deterministic simulation can
hand it an in-memory transport; production uses `websocket_connector` (trio-websocket).
All transport failures surface as `TransportClosed` or `UpgradeRejected`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio
import trio_websocket

#: trio-websocket closes the connection on a frame over its limit; we accept up to this
#: and dead-letter what exceeds the decoder's own (smaller) limit, so one oversized frame
#: costs a dead-letter row, not a reconnect.
TRANSPORT_MAX_MESSAGE: int = 16 * 1024 * 1024


class TransportClosed(Exception):
    """The connection is gone (peer closed, reset, or failed to open)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpgradeRejected(Exception):
    """The server refused the WebSocket upgrade with an HTTP status (429: one connection
    per account, the broker still holds our previous one)."""

    def __init__(self, status_code: int, body: str = "") -> None:
        super().__init__(f"upgrade rejected with HTTP {status_code}")
        self.status_code = status_code
        self.body = body


class WebSocket(Protocol):
    async def get_message(self) -> str | bytes: ...

    async def send_message(self, data: str | bytes) -> None: ...

    async def ping(self) -> None:
        """Send a ping and return when its pong arrives."""
        ...


Connector = Callable[[str], AbstractAsyncContextManager[WebSocket]]


class _TrioWebSocket:
    def __init__(self, conn: trio_websocket.WebSocketConnection) -> None:
        self._conn = conn

    async def get_message(self) -> str | bytes:
        try:
            return await self._conn.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(_close_reason(exc)) from None

    async def send_message(self, data: str | bytes) -> None:
        try:
            await self._conn.send_message(data)
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(_close_reason(exc)) from None

    async def ping(self) -> None:
        try:
            await self._conn.ping()
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(_close_reason(exc)) from None


def _close_reason(exc: trio_websocket.ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "closed"
    text = f"closed {reason.code}"
    if reason.reason:
        text += f" {reason.reason}"
    return text


def websocket_connector(
    *, connect_timeout: float = 10.0, disconnect_timeout: float = 2.0
) -> Connector:
    """A `Connector` over trio-websocket; TLS for wss:// comes from the system store."""

    @asynccontextmanager
    async def connect(url: str) -> AsyncIterator[WebSocket]:
        try:
            async with trio_websocket.open_websocket_url(
                url,
                connect_timeout=connect_timeout,
                disconnect_timeout=disconnect_timeout,
                max_message_size=TRANSPORT_MAX_MESSAGE,
                message_queue_size=64,
            ) as conn:
                yield _TrioWebSocket(conn)
        except trio_websocket.ConnectionRejected as exc:
            body = exc.body.decode("utf-8", "replace")[:200] if exc.body else ""
            raise UpgradeRejected(exc.status_code, body) from None
        except trio_websocket.ConnectionTimeout:
            raise TransportClosed("connect timeout") from None
        except trio_websocket.DisconnectionTimeout:
            raise TransportClosed("disconnect timeout") from None
        except trio_websocket.HandshakeError as exc:
            raise TransportClosed(f"handshake failed: {exc}") from None
        except trio_websocket.ConnectionClosed as exc:
            raise TransportClosed(_close_reason(exc)) from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise TransportClosed(f"{type(exc).__name__}: {exc}") from None

    return connect
