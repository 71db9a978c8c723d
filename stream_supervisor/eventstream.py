"""The Broker API events stream seam (docs/design.md, section 11): what the events
source needs from a Server-Sent Events connection to `GET /v2/events/trades`.

`sse_http.sse_connector` is the implementation (httpx and httpx-sse). A connection
yields messages (one `data:` payload each) and comments (`:heartbeat`, `: you are reading
too slowly, dropped N messages`); failures surface as `errors.TransportClosed`, refused
credentials as `errors.Unauthorized`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import NamedTuple


class SseMessage(NamedTuple):
    data: bytes
    id: str = ""


class SseComment(NamedTuple):
    text: str


SseItem = SseMessage | SseComment

#: since_id (None: the whole history the broker keeps) -> a connection's items.
EventStreamConnector = Callable[[str | None], AbstractAsyncContextManager[AsyncIterator[SseItem]]]


__all__ = ["EventStreamConnector", "SseComment", "SseItem", "SseMessage"]
