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
from typing import Final

import httpx
from httpx_sse import aconnect_sse
from httpx_sse._decoders import SSEDecoder  # the decoder; its public iterator drops comments

from .bounds import TRANSPORT_MAX_MESSAGE
from .errors import TransportClosed, Unauthorized
from .eventstream import EventStreamConnector, SseComment, SseItem, SseMessage

EVENTS_PATH = "/v2/events/trades"
#: The most bytes one event (its lines up to the blank line ending it) may hold: the
#: largest frame limit the settings allow, and room for the field names. An event over
#: `max_frame_bytes` but within this is dead-lettered by the decoder; one over this (or
#: a line that never ends) is read no further: the connection ends.
MAX_EVENT_BYTES: Final = TRANSPORT_MAX_MESSAGE + 64 * 1024


def sse_connector(base_url: str, key_id: str, secret_key: str, *, connect_timeout: float,
                  read_timeout: float, credentials_hint: str = "the broker-events account's "
                  "key_id and secret_key",
                  max_event_bytes: int = MAX_EVENT_BYTES) -> EventStreamConnector:
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
                async with aclosing(_items(response, max_event_bytes)) as items:
                    yield items
        except httpx.TimeoutException as exc:
            raise TransportClosed(f"events stream timed out ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise TransportClosed(f"events stream failed: {type(exc).__name__}: {exc}"[:300]) \
                from None

    return connect


async def _items(response: httpx.Response, max_event_bytes: int = MAX_EVENT_BYTES
                 ) -> AsyncGenerator[SseItem, None]:
    """The stream's comments and messages. Lines are split here, not by httpx, whose
    line reader (like the SSE decoder's data) holds a line, and an event, however long:
    an event (its lines up to a blank one) or a line over `max_event_bytes` ends the
    connection instead (`TransportClosed`)."""
    decoder = SSEDecoder()
    buffer = bytearray()
    pending = 0  # bytes of the event being read: its lines since the last blank one
    chunks = response.aiter_bytes()
    async with aclosing(chunks):  # type: ignore[type-var]  # typed as an AsyncIterator
        async for chunk in chunks:
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", start)) >= 0:
                raw = bytes(buffer[start:end])
                start = end + 1
                pending = 0 if raw in (b"", b"\r") else pending + len(raw)
                if pending > max_event_bytes:
                    break
                line = raw.decode("utf-8", errors="replace").rstrip("\r")
                if line.startswith(":"):
                    yield SseComment(line[1:].strip())
                    continue
                sse = decoder.decode(line)
                if sse is not None and sse.data:
                    yield SseMessage(sse.data.encode(), sse.id)
            del buffer[:start]
            if pending + len(buffer) > max_event_bytes:
                raise TransportClosed(f"events stream sent an event over {max_event_bytes} "
                                      "bytes without its end")


__all__ = ["EVENTS_PATH", "MAX_EVENT_BYTES", "sse_connector"]
