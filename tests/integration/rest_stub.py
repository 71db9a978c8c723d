"""A broker REST stub on loopback HTTP, for tests that run the real `run` process.

It serves the calls the supervisor makes (`/v2/account`, FILL activities with `after` and
`page_token`, open orders, one order) from JSON the test gives verbatim, so an activity
can carry a value no typed struct would hold (`"qty": "1E-20000"`). h11 does the HTTP;
one request per connection keeps it small.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from ..fixtures import RECORDING


def fixture_activity_dicts() -> list[dict[str, Any]]:
    """The recorded FILL activities as plain JSON objects."""
    loaded: list[dict[str, Any]] = json.loads((RECORDING / "fill_activities.json").read_text())
    return loaded


class RestStub:
    def __init__(self, account_id: str, activities: Sequence[dict[str, Any]] = ()) -> None:
        self.account_id = account_id
        self.activities = list(activities)
        #: What GET /v2/positions and GET /v2/orders answer (JSON objects, verbatim).
        self.positions: list[dict[str, Any]] = []
        self.orders: list[dict[str, Any]] = []
        #: What GET /v2/account/activities (the non-trade types) answers, verbatim.
        self.nontrade: list[dict[str, Any]] = []
        #: Answers given verbatim by path (status, body), before any other: a body that
        #: is not what the endpoint should answer (HTML, nothing, a JSON null).
        self.answers: dict[str, tuple[int, bytes]] = {}
        #: Paths answered without a Content-Length (chunked, as a stream would be).
        self.unsized: set[str] = set()
        self.port = 0
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def answer(self, target: str) -> tuple[int, bytes]:
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        if path in self.answers:
            return self.answers[path]
        if path == "/v2/account":
            return 200, json.dumps({"id": self.account_id}).encode()
        if path == "/v2/account/activities/FILL":
            after = query.get("after")
            token = query.get("page_token")
            size = int(query.get("page_size", "100"))
            items = [a for a in self.activities
                     if after is None or str(a.get("transaction_time", "")) > after]
            if token is not None:
                items = [a for a in items if str(a.get("id", "")) > token]
            return 200, json.dumps(items[:size]).encode()
        if path == "/v2/account/activities":
            token = query.get("page_token")
            return 200, json.dumps([a for a in self.nontrade
                                    if token is None or str(a.get("id", "")) > token]).encode()
        if path == "/v2/positions":
            return 200, json.dumps(self.positions).encode()
        if path == "/v2/clock":
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            return 200, json.dumps({"timestamp": now, "is_open": True}).encode()
        if path == "/v2/orders":
            return 200, json.dumps(self.orders).encode()
        if path.startswith("/v2/orders/"):
            return 404, b'{"message": "order not found"}'
        return 404, b"{}"

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode()
                    self.requests.append(target)
                    status, body = self.answer(target)
                    headers = [("content-type", "application/json"), ("connection", "close")]
                    if status != 204 and urlsplit(target).path not in self.unsized:
                        headers.append(("content-length", str(len(body))))
                    await stream.send_all(conn.send(h11.Response(status_code=status,
                                                                 headers=headers)) or b"")
                    await stream.send_all(conn.send(h11.Data(data=body)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    return
                if isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return
        finally:
            await stream.aclose()
