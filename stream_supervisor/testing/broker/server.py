"""Loopback servers for the simulated broker: the WebSocket stream and the REST API.

The stream runs trio-websocket over our own TCP listener so a fault can reach the
socket itself: stop reading (no pongs) or reset it. REST is HTTP/1.1 on h11.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Final

import h11
import structlog
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)
from wsproto.utilities import LocalProtocolError

from .rest import RestResponse
from .sessions import CLOSE_TIMEOUT, SessionClosed
from .simulated import SimulatedBroker

log = structlog.get_logger("stream_supervisor.testing.broker")

STREAM_PATH: Final = "/stream"
CONNECT_TIMEOUT: Final = 10.0
"""Seconds a client has to finish the WebSocket upgrade."""
MAX_MESSAGE_SIZE: Final = 1 << 20
"""Largest client message we accept; the protocol's are tiny."""
HTTP_IDLE_TIMEOUT: Final = 60.0
"""Keep-alive: close an HTTP connection idle for this long."""
HTTP_IO_TIMEOUT: Final = 30.0
HTTP_MAX_REQUEST: Final = 64 * 1024
_READ_SIZE: Final = 16 * 1024


@dataclass(frozen=True)
class SimServer:
    """Where a running simulated broker listens."""

    ws_url: str
    rest_url: str
    ws_port: int
    rest_port: int


async def serve(
    broker: SimulatedBroker,
    *,
    host: str = "127.0.0.1",
    ws_port: int = 0,
    rest_port: int = 0,
    task_status: trio.TaskStatus[SimServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the stream and REST on `host` until cancelled (port 0 = any free port)."""
    ws_listeners = await trio.open_tcp_listeners(ws_port, host=host)
    rest_listeners = await trio.open_tcp_listeners(rest_port, host=host)
    ws_bound = _port(ws_listeners[0])
    rest_bound = _port(rest_listeners[0])
    url_host = f"[{host}]" if ":" in host else host
    info = SimServer(
        ws_url=f"ws://{url_host}:{ws_bound}{STREAM_PATH}",
        rest_url=f"http://{url_host}:{rest_bound}",
        ws_port=ws_bound,
        rest_port=rest_bound,
    )
    broker.mark_server_started(trio.current_time())
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, _WsHandler(broker), ws_listeners)
        await nursery.start(trio.serve_listeners, _RestHandler(broker), rest_listeners)
        log.info("sim_serving", ws_url=info.ws_url, rest_url=info.rest_url)
        task_status.started(info)


def _port(listener: trio.SocketListener) -> int:
    port = listener.socket.getsockname()[1]
    assert isinstance(port, int)
    return port


# ---------------------------------------------------------------------- the stream


class _FaultableStream(trio.abc.Stream):
    """A TCP stream a fault can pause (a half-open peer) or reset (RST, not FIN)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self._inner = inner
        self._paused = False
        self._closed = trio.Event()

    def pause(self) -> None:
        self._paused = True

    async def reset(self) -> None:
        # SO_LINGER 0 makes close() send a RST and discard unsent data: the peer sees
        # "connection reset", not an orderly end of stream.
        try:
            self._inner.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass  # already gone
        await self.aclose()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            if self._paused:
                # Read nothing more (so WebSocket pings go unanswered) until closed.
                await self._closed.wait()
                raise trio.ClosedResourceError("stream closed while paused")
            data = await self._inner.receive_some(max_bytes)
            if not self._paused:
                return data

    async def aclose(self) -> None:
        self._closed.set()
        await self._inner.aclose()


class _WsTransport:
    """`SessionTransport` over one trio-websocket server connection."""

    def __init__(self, ws: WebSocketConnection, stream: _FaultableStream) -> None:
        self._ws = ws
        self._stream = stream

    async def get_message(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except ConnectionClosed:
            raise SessionClosed from None

    async def send_message(self, data: str | bytes) -> None:
        try:
            await self._ws.send_message(data)
        except ConnectionClosed:
            raise SessionClosed from None

    async def aclose(self, *, abrupt: bool = False) -> None:
        if not abrupt:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose()
                return
        await self._stream.reset()

    def pause_reading(self) -> None:
        self._stream.pause()


class _WsHandler:
    def __init__(self, broker: SimulatedBroker) -> None:
        self._broker = broker

    async def __call__(self, tcp: trio.SocketStream) -> None:
        stream = _FaultableStream(tcp)
        try:
            try:
                async with trio.open_nursery() as nursery:
                    request: WebSocketRequest | None = None
                    with trio.move_on_after(CONNECT_TIMEOUT):
                        request = await wrap_server_stream(
                            nursery, stream, max_message_size=MAX_MESSAGE_SIZE
                        )
                    if request is not None:
                        await self._serve(request, stream)
                    nursery.cancel_scope.cancel()  # the connection's reader task
            except* LocalProtocolError:
                # trio-websocket's reader answers a client's ping that raced our close
                # (a chaos disconnect) and wsproto refuses the pong: the connection is
                # over either way, and one client's race must not stop the server.
                log.debug("sim_ping_raced_close")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer vanished mid-handshake
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await stream.aclose()

    async def _serve(self, request: WebSocketRequest, stream: _FaultableStream) -> None:
        broker = self._broker
        if request.path.split("?", 1)[0] != STREAM_PATH:
            with trio.move_on_after(CONNECT_TIMEOUT):
                await request.reject(404, body=b'{"code":40410000,"message":"not found"}')
            return
        if broker.admit() is not None:
            log.info("sim_upgrade_rejected", status=429)
            with trio.move_on_after(CONNECT_TIMEOUT):
                await request.reject(
                    429,
                    extra_headers=[(b"Content-Type", b"application/json")],
                    body=b'{"code":42910000,"message":"too many connections"}',
                )
            return
        ws: WebSocketConnection | None = None
        try:
            with trio.move_on_after(CONNECT_TIMEOUT):
                ws = await request.accept()
        except ConnectionClosed:
            pass
        finally:
            if ws is None:
                broker.cancel_admission()
        if ws is not None:
            await broker.handle_session(_WsTransport(ws, stream))


# ---------------------------------------------------------------------- REST


class _RestHandler:
    def __init__(self, broker: SimulatedBroker) -> None:
        self._broker = broker

    async def __call__(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HTTP_MAX_REQUEST)
        try:
            while True:
                with trio.move_on_after(HTTP_IDLE_TIMEOUT) as idle:
                    request = await _next_request(conn, stream)
                if idle.cancelled_caught or request is None:
                    return
                response = self._answer(request)
                if response.delay > 0:
                    await trio.sleep(response.delay)
                with trio.fail_after(HTTP_IO_TIMEOUT):
                    await _send_response(conn, stream, response)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                bad = RestResponse(exc.error_status_hint, b"", (("Connection", "close"),))
                with trio.move_on_after(HTTP_IO_TIMEOUT):
                    try:
                        await _send_response(conn, stream, bad)
                    except (trio.BrokenResourceError, h11.LocalProtocolError):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await stream.aclose()

    def _answer(self, request: h11.Request) -> RestResponse:
        try:
            return self._broker.rest(
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"),
                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers},
            )
        except Exception:
            # A bug of ours must not take the listener down; the client sees a 500.
            log.exception("sim_rest_bug", path=request.target[:100].decode("ascii", "replace"))
            return RestResponse(500, b'{"code":50010000,"message":"internal server error"}')


async def _next_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request, its body read and dropped; None when the client closed."""
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_READ_SIZE))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _send_response(
    conn: h11.Connection, stream: trio.SocketStream, response: RestResponse
) -> None:
    headers = [(name.encode(), value.encode()) for name, value in response.headers]
    headers.append((b"Content-Length", str(len(response.body)).encode()))
    headers.append((b"Server", b"stream-supervisor-sim"))
    out = conn.send(h11.Response(status_code=response.status, headers=headers))
    body = conn.send(h11.Data(data=response.body)) if response.body else b""
    end = conn.send(h11.EndOfMessage())
    await stream.send_all(b"".join(x for x in (out, body, end) if x))
