"""A scripted Alpaca-protocol WebSocket server on loopback, for integration tests.

It plays a fixed list of frames (the recorded session, or frames a test builds) to each
connection, with a script of what to do: send some frames twice, drop the connection
after a given frame, re-send an overlap on the next connection. Unlike the simulator it
replays recorded bytes exactly, so the decoder and pipeline meet the independent
broker's frames on a real socket.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from stream_supervisor.activities import WireNonTrade
from stream_supervisor.metrics import Metrics
from stream_supervisor.pgstore import PgStore
from stream_supervisor.protocol import WireActivity, WireOrder, decode_activities
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import StoreSnapshot
from stream_supervisor.supervisor import Supervisor
from stream_supervisor.wiring import open_supervisor

from ..fixtures import RECORDING

KEY_ID = "TESTKEYID0001"
SECRET_KEY = "TESTSECRETKEY-very-secret-0001"


def fixture_frames() -> list[bytes]:
    """The recorded trade_updates frames (without the two control replies)."""
    lines = (RECORDING / "trade_updates.jsonl").read_bytes().splitlines()
    return [line for line in lines[2:] if line.strip()]


def fixture_truth() -> dict[str, Any]:
    truth: dict[str, Any] = json.loads((RECORDING / "ground_truth.json").read_text())
    return truth


def fixture_activities() -> list[WireActivity]:
    return decode_activities((RECORDING / "fill_activities.json").read_bytes())


@dataclass
class Script:
    """What the server does on each connection (index = connection number from 0)."""

    frames: Sequence[bytes]
    duplicate_every_frame: bool = False
    #: connection number -> index of the frame after which that connection is dropped
    drop_after: dict[int, int] = field(default_factory=dict)
    #: frames re-sent at the start of a reconnect (an overlap the broker might send)
    resend_overlap: int = 0
    text_frames: bool = False
    reject_first_with_429: int = 0
    authorize: bool = True
    #: if given, frames wait for it after `listening` (a test sets it when it is ready)
    start: trio.Event | None = None
    #: if given, awaited after `listening` on every connection (its number from 0)
    #: before the first frame of that connection
    before_frames: Callable[[int], Awaitable[None]] | None = None
    #: frame index -> awaited after that frame is sent (on every connection)
    pause_after: dict[int, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    #: connection number -> frames sent after its `listen` and before the `listening`
    #: reply (updates racing the reply, which Alpaca does not promise never to send)
    before_listening: dict[int, Sequence[bytes]] = field(default_factory=dict)


class ReplayServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.position = 0  # next frame index to send
        self.sent = 0
        self.done = trio.Event()
        self.port = 0
        self.upgrade_attempts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/stream"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", 0, None)
            self.port = server.port
            task_status.started()

    async def _handle(self, request: WebSocketRequest) -> None:
        self.upgrade_attempts += 1
        if self.upgrade_attempts <= self.script.reject_first_with_429:
            await request.reject(429, body=b"connection limit exceeded")
            return
        ws = await request.accept()
        number = self.connections
        self.connections += 1
        try:
            auth = json.loads(await ws.get_message())
            assert auth["action"] == "authenticate"
            ok = self.script.authorize and auth["data"] == {
                "key_id": KEY_ID, "secret_key": SECRET_KEY}
            await ws.send_message(json.dumps({"stream": "authorization", "data": {
                "status": "authorized" if ok else "unauthorized", "action": "authenticate"}}))
            if not ok:
                await ws.aclose()
                return
            listen = json.loads(await ws.get_message())
            assert listen["action"] == "listen"
            for early in self.script.before_listening.get(number, ()):
                await ws.send_message(early)
                self.sent += 1
            await ws.send_message(json.dumps(
                {"stream": "listening", "data": {"streams": ["trade_updates"]}}))
            if self.script.start is not None:
                await self.script.start.wait()
            if self.script.before_frames is not None:
                await self.script.before_frames(number)
            start = max(0, self.position - (self.script.resend_overlap if number else 0))
            frames = self.script.frames
            for i in range(start, len(frames)):
                frame: str | bytes = frames[i]
                if self.script.text_frames:
                    frame = frames[i].decode()
                copies = 2 if self.script.duplicate_every_frame else 1
                for _ in range(copies):
                    await ws.send_message(frame)
                    self.sent += 1
                self.position = max(self.position, i + 1)
                pause = self.script.pause_after.get(i)
                if pause is not None:
                    await pause()
                if self.script.drop_after.get(number) == i:
                    await ws.aclose(code=1011, reason="simulated drop")
                    return
            self.done.set()
            # Stay connected and quiet, as a real idle account does.
            await trio.sleep_forever()
        except ConnectionClosed:
            return


class FixtureRest:
    """The REST side of the recorded session, from fill_activities.json (in memory:
    these tests are about the socket and the database, not HTTP)."""

    def __init__(self, account_id: str, activities: Sequence[WireActivity] = ()) -> None:
        self._account_id = account_id
        self.activities = list(activities)
        self.calls = 0

    async def account_id(self) -> str:
        return self._account_id

    async def fill_activities(
        self, *, after: str | None, page_token: str | None, page_size: int = 100
    ) -> list[WireActivity]:
        self.calls += 1
        items = [a for a in self.activities if after is None or a.transaction_time > after]
        if page_token is not None:
            items = [a for a in items if a.id > page_token]
        return items[:page_size]

    async def open_orders(self) -> list[WireOrder]:
        return []

    async def orders_since(self, *, after: str, limit: int = 500) -> list[WireOrder]:
        return []

    async def order(self, order_id: str) -> WireOrder | None:
        return None

    async def positions(self) -> list[dict[str, Any]]:
        return []

    async def non_trade_activities(self, **_: Any) -> list[WireNonTrade]:
        return []  # the recorded session has none

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        return None
    async def clock(self) -> dict[str, Any]:
        return {"is_open": False}


@asynccontextmanager
async def supervising(settings: Settings, rest: Any) -> AsyncIterator[Supervisor]:
    """The real supervisor running on `settings`, `rest` as the broker's REST side;
    drained on leaving."""
    async with (
        open_supervisor(settings, metrics=Metrics(), state=SupervisorState(), rest=rest,
                        rng=random.Random(7), install_signal_handlers=False) as sup,
        trio.open_nursery() as inner,
    ):
        inner.start_soon(sup.run)
        yield sup
        sup.request_drain("test")


async def stored(database_url: str, account_id: str) -> StoreSnapshot:
    """What the database holds for the account now, read by a store of its own."""
    store = PgStore(database_url)
    await store.open()
    try:
        return await store.snapshot(account_id)
    finally:
        await store.aclose()
