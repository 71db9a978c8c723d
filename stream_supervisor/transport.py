"""The WebSocket seam: what the connection actor needs from a socket, and the real one.

The connection actor is written against `Connector` so the deterministic simulation can
hand it an in-memory transport; production uses `websocket_connector` (trio-websocket).
All transport failures surface as `TransportClosed` or `UpgradeRejected`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol
from urllib.parse import urlsplit

import trio
import trio_websocket

from .errors import collapse

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
    """A `Connector` over trio-websocket; TLS for wss:// comes from the system store.

    It opens (and always closes) the TCP or TLS stream itself and hands it to
    `wrap_client_stream`: when the server closes first, trio-websocket's own
    `open_websocket_url` leaves the socket open, which leaks one per reconnect.
    """

    @asynccontextmanager
    async def connect(url: str) -> AsyncIterator[WebSocket]:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise TransportClosed(f"not a WebSocket URL: {url!r}")
        host = parts.hostname
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        stream: trio.abc.Stream
        try:
            with trio.fail_after(connect_timeout):
                if secure:
                    stream = await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=ssl.create_default_context(),
                        https_compatible=True)
                else:
                    stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise TransportClosed("connect timeout") from None
        except OSError as exc:
            raise TransportClosed(f"connect failed: {type(exc).__name__}: {exc}") from None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(connect_timeout):
                        conn = await trio_websocket.wrap_client_stream(
                            nursery, stream, host if parts.port is None else f"{host}:{port}",
                            resource, message_queue_size=64,
                            max_message_size=TRANSPORT_MAX_MESSAGE)
                except trio.TooSlowError:
                    raise TransportClosed("handshake timeout") from None
                try:
                    yield _TrioWebSocket(conn)
                finally:
                    with trio.move_on_after(disconnect_timeout) as scope:
                        scope.shield = True
                        await conn.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _transport_error(collapse(group)) from None
        except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed,
                OSError, trio.BrokenResourceError) as exc:
            raise _transport_error(exc) from None
        finally:
            with trio.move_on_after(disconnect_timeout) as scope:
                scope.shield = True
                await stream.aclose()

    return connect


def _transport_error(exc: BaseException) -> BaseException:
    """Map trio-websocket's and the OS's errors onto ours; anything else passes through."""
    if isinstance(exc, trio_websocket.ConnectionRejected):
        body = exc.body.decode("utf-8", "replace")[:200] if exc.body else ""
        return UpgradeRejected(exc.status_code, body)
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return TransportClosed("connect timeout")
    if isinstance(exc, trio_websocket.DisconnectionTimeout):
        return TransportClosed("disconnect timeout")
    if isinstance(exc, trio_websocket.HandshakeError):
        return TransportClosed(f"handshake failed: {exc}")
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return TransportClosed(_close_reason(exc))
    if isinstance(exc, OSError | trio.BrokenResourceError):
        return TransportClosed(f"{type(exc).__name__}: {exc}")
    return exc
