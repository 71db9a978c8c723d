"""The WebSocket seam: what the connection actor needs from a socket, and the real one.

The connection actor is written against `Connector` so the deterministic simulation can
hand it an in-memory transport; production uses `websocket_connector` (`wsclient`:
wsproto on a TCP or TLS stream this module opens and always closes). All transport
failures surface as `TransportClosed` or `UpgradeRejected`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol
from urllib.parse import urlsplit

import trio

from .errors import TransportClosed, UpgradeRejected
from .wsclient import open_websocket

#: The largest message the transport assembles; beyond it the connection is closed
#: (1009). Frames over the decoder's own, smaller limit are dead-lettered, so one
#: oversized frame costs a dead-letter row, not a reconnect.
TRANSPORT_MAX_MESSAGE: int = 16 * 1024 * 1024


class WebSocket(Protocol):
    async def get_message(self) -> str | bytes: ...

    async def get_messages(self) -> list[str | bytes]:
        """At least one message, and every other one already received: the reader
        handles a socket read's worth of updates in one turn."""
        ...

    async def send_message(self, data: str | bytes) -> None: ...

    async def ping(self) -> None:
        """Send a ping and return when its pong arrives."""
        ...


Connector = Callable[[str], AbstractAsyncContextManager[WebSocket]]


def websocket_connector(
    *, connect_timeout: float = 10.0, disconnect_timeout: float = 2.0
) -> Connector:
    """A `Connector` over `wsclient`; TLS for wss:// comes from the system store.

    On leaving, the close handshake gets `disconnect_timeout` (a tenth of it when the
    caller is already cancelled: a drain should not wait on a peer that went quiet),
    then the stream is closed whatever happened.
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
            try:
                with trio.fail_after(connect_timeout):
                    client = await open_websocket(
                        stream, host if parts.port is None else f"{host}:{port}", resource,
                        max_message_size=TRANSPORT_MAX_MESSAGE)
            except trio.TooSlowError:
                raise TransportClosed("handshake timeout") from None
            try:
                yield client
            finally:
                cancelled = trio.current_effective_deadline() == float("-inf")
                with trio.move_on_after(
                        disconnect_timeout / 10 if cancelled else disconnect_timeout,
                        shield=True):
                    await client.aclose()
        finally:
            with trio.move_on_after(disconnect_timeout, shield=True):
                await stream.aclose()

    return connect


__all__ = [
    "TRANSPORT_MAX_MESSAGE",
    "Connector",
    "TransportClosed",
    "UpgradeRejected",
    "WebSocket",
    "websocket_connector",
]
