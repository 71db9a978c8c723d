"""A loopback WebSocket server that speaks the Alpaca `trade_updates` handshake and then
plays pre-encoded frames: as fast as the client reads, or at a fixed offered rate.

trio-websocket does the upgrade, the handshake messages and ping/pong; the update frames
are encoded once, before timing, and written straight to the TCP stream in large writes
(serialised with trio-websocket's own writes by a lock), so the server costs the
benchmark almost no CPU and the client, not the server, is what gets measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from .workload import KEY_ID, SECRET_KEY, chunks, ws_frame

HANDSHAKE_TIMEOUT = 30.0


class _LockedStream(trio.abc.Stream):
    """A TCP stream whose writes are serialised: our raw frame writes and trio-websocket's
    own (pongs, close) never interleave mid-frame."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self._inner = inner
        self._lock = trio.Lock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._lock:
            await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Plan:
    """What the next connection is sent. `rate` None: as fast as the client reads."""

    encoded: list[bytes]
    rate: float | None = None
    bulk: list[bytes] = field(default_factory=list)

    @classmethod
    def of(cls, frames: Sequence[bytes], rate: float | None = None) -> Plan:
        encoded = [ws_frame(f) for f in frames]
        return cls(encoded, rate, chunks(encoded) if rate is None else [])


@dataclass
class PlayReport:
    connections: int = 0
    frames_sent: int = 0
    first_send: float | None = None
    last_send: float | None = None
    finished: bool = False

    @property
    def offered_rate(self) -> float | None:
        if self.first_send is None or self.last_send is None or self.frames_sent < 2:
            return None
        span = self.last_send - self.first_send
        return (self.frames_sent - 1) / span if span > 0 else None


class FrameServer:
    def __init__(self) -> None:
        self.port = 0
        self._plan: Plan | None = None
        self.report = PlayReport()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/stream"

    def load(self, plan: Plan) -> None:
        self._plan = plan
        self.report = PlayReport()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, tcp: trio.SocketStream) -> None:
        stream = _LockedStream(tcp)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(HANDSHAKE_TIMEOUT):
                        request = await wrap_server_stream(
                            nursery, stream, max_message_size=1 << 20)
                        ws = await request.accept()
                        ok = await self._handshake(ws)
                    if ok:
                        await self._play(stream)
                        # Stay connected and quiet, as an idle account does, until the
                        # client leaves (the reader task answers its pings meanwhile).
                        while True:
                            await ws.get_message()
                except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.move_on_after(2, shield=True):
                await stream.aclose()

    async def _handshake(self, ws: WebSocketConnection) -> bool:
        auth = json.loads(await ws.get_message())
        data = auth.get("data") or {}
        ok = auth.get("action") == "authenticate" and data == {
            "key_id": KEY_ID, "secret_key": SECRET_KEY}
        await ws.send_message(json.dumps({"stream": "authorization", "data": {
            "status": "authorized" if ok else "unauthorized", "action": "authenticate"}}))
        if not ok:
            return False
        listen = json.loads(await ws.get_message())
        if listen.get("action") != "listen":
            return False
        await ws.send_message(json.dumps(
            {"stream": "listening", "data": {"streams": ["trade_updates"]}}))
        return True

    async def _play(self, stream: _LockedStream) -> None:
        plan, report = self._plan, self.report
        assert plan is not None, "load() a plan before the client connects"
        report.connections += 1
        if report.connections > 1:
            return  # a reconnect: the run is void anyway (the orchestrator checks this)
        report.first_send = trio.current_time()
        if plan.rate is None:
            for chunk in plan.bulk:
                await stream.send_all(chunk)
            report.frames_sent = len(plan.encoded)
        else:
            # Trio sleeps have about 1 ms resolution: frames due within the same
            # millisecond go out in one write, on schedule against an absolute clock.
            encoded, rate, total = plan.encoded, plan.rate, len(plan.encoded)
            start, sent = trio.current_time(), 0
            while sent < total:
                due = min(total, int((trio.current_time() - start) * rate) + 1)
                if due > sent:
                    await stream.send_all(b"".join(encoded[sent:due]))
                    sent = due
                    report.frames_sent = sent
                await trio.sleep_until(start + sent / rate)
        report.last_send = trio.current_time()
        report.finished = True
