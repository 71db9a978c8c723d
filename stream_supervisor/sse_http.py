"""`GET /v2/events/trades` over HTTP: the Broker API events stream through httpx and
httpx-sse (docs/design.md, section 11), as `eventstream.EventStreamConnector`.

httpx-sse opens the request (Accept, no caching) and decodes the event-stream format.
Its iterator drops comment lines, as the SSE specification says a browser should; but
the broker speaks through them (`:heartbeat`, and `: you are reading too slowly, dropped
N messages`, a gap), so lines are read here and handed to its decoder, comments kept.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager

import httpx
from httpx_sse import aconnect_sse
from httpx_sse._decoders import SSEDecoder  # the decoder; its public iterator drops comments

from .errors import TransportClosed, Unauthorized
from .eventstream import EventStreamConnector, SseComment, SseItem, SseMessage

EVENTS_PATH = "/v2/events/trades"


def sse_connector(base_url: str, key_id: str, secret_key: str, *, connect_timeout: float,
                  read_timeout: float, credentials_hint: str = "the broker-events account's "
                  "key_id and secret_key") -> EventStreamConnector:
    """A connector for `base_url`'s events stream. `read_timeout` is the heartbeat
    deadline: a connection silent that long is dead (the source also enforces it)."""
    url = base_url.rstrip("/") + EVENTS_PATH

    @asynccontextmanager
    async def connect(since_id: str | None) -> AsyncIterator[AsyncIterator[SseItem]]:
        params = {"since_id": since_id} if since_id else {}
        timeout = httpx.Timeout(connect_timeout, read=read_timeout)
        try:
            async with (httpx.AsyncClient(timeout=timeout, auth=(key_id, secret_key)) as client,
                        aconnect_sse(client, "GET", url, params=params) as source):
                response = source.response
                if response.status_code in (401, 403):
                    raise Unauthorized(f"the broker's events stream refused the credentials "
                                       f"(HTTP {response.status_code}): check {credentials_hint}")
                if response.status_code != 200:
                    raise TransportClosed(f"events stream answered HTTP {response.status_code}")
                kind = response.headers.get("content-type", "").partition(";")[0].strip()
                if kind != "text/event-stream":
                    raise TransportClosed(f"events stream answered {kind or 'no content type'}")
                # Closed here, not by the garbage collector: an async generator left
                # half-read would hold the connection (and warn under Trio).
                async with aclosing(_items(response)) as items:
                    yield items
        except httpx.TimeoutException as exc:
            raise TransportClosed(f"events stream timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise TransportClosed(f"events stream failed: {type(exc).__name__}: {exc}"[:300]) \
                from None

    return connect


async def _items(response: httpx.Response) -> AsyncGenerator[SseItem, None]:
    decoder = SSEDecoder()
    lines = response.aiter_lines()
    async with aclosing(lines):  # type: ignore[type-var]  # typed as an AsyncIterator
        async for line in lines:
            line = line.rstrip("\r\n")
            if line.startswith(":"):
                yield SseComment(line[1:].strip())
                continue
            sse = decoder.decode(line)
            if sse is not None and sse.data:
                yield SseMessage(sse.data.encode(), sse.id)


__all__ = ["EVENTS_PATH", "sse_connector"]
