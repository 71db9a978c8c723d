"""The connection actor over the real WebSocket client, against a scripted Alpaca-like
server on loopback sockets: what reaches the pipeline, and what the logs and the
disconnect reason say, when the broker misbehaves.

The server is wsproto's server state machine on a real socket; recovery is a stub that
returns at once (these tests are about the socket session, not REST).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.connection import ConnectionActor, ConnectionSettings
from stream_supervisor.errors import TransportClosed, Unauthorized
from stream_supervisor.events import Event
from stream_supervisor.messages import Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.recovery import GapRecovery
from stream_supervisor.state import SupervisorState
from stream_supervisor.transport import WebSocket
from stream_supervisor.wsclient import WebSocketClient, open_websocket, websocket_connector

AUTHORIZED = {"stream": "authorization",
              "data": {"status": "authorized", "action": "authenticate"}}
LISTENING = {"stream": "listening", "data": {"streams": ["trade_updates"]}}


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def update(order_id: str, at: datetime | None = None) -> bytes:
    """A `new` trade update, as Alpaca sends it (a binary frame's payload)."""
    at = at or datetime.now(UTC) - timedelta(seconds=1)
    order = {"id": order_id, "client_order_id": f"c-{order_id}", "symbol": "AAPL",
             "side": "buy", "qty": "1", "filled_qty": "0", "filled_avg_price": None,
             "status": "new", "order_type": "market", "type": "market",
             "asset_class": "us_equity", "created_at": _stamp(at), "updated_at": _stamp(at)}
    return json.dumps({"stream": "trade_updates", "data": {
        "event": "new", "order": order, "timestamp": _stamp(at)}}).encode()


class Broker:
    """The server's end of one connection: answers the upgrade, then `authenticate` and
    `listen` as the test's script says (`alpaca`)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)

    async def upgrade_request(self) -> None:
        """Read the upgrade request, to refuse it."""
        while True:
            self.ws.receive_data(await self.stream.receive_some(65536))
            if any(isinstance(event, Request) for event in self.ws.events()):
                return

    def message(self, payload: bytes) -> bytes:
        return self.ws.send(BytesMessage(data=payload))

    def close(self, code: int = 1000) -> bytes:
        return self.ws.send(CloseConnection(code=code))

    async def next_message(self) -> bytes | None:
        """The client's next message (None once it has gone)."""
        while True:
            for event in self.ws.events():
                if isinstance(event, Request):
                    await self.stream.send_all(self.ws.send(AcceptConnection()))
                elif isinstance(event, TextMessage | BytesMessage):
                    data = event.data
                    return data.encode() if isinstance(data, str) else bytes(data)
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.ws.receive_data(data)


Script = Callable[[Broker], Awaitable[None]]


async def alpaca(broker: Broker, *, before_listening: bytes = b"") -> None:
    """The handshake as Alpaca does it; `before_listening`, a message's payload, goes
    in the same write, before the `listening` reply."""
    await broker.next_message()  # authenticate
    await broker.stream.send_all(broker.message(json.dumps(AUTHORIZED).encode()))
    await broker.next_message()  # listen
    await broker.stream.send_all((broker.message(before_listening) if before_listening
                                  else b"") + broker.message(json.dumps(LISTENING).encode()))


@asynccontextmanager
async def serving(script: Script) -> AsyncIterator[str]:
    """A loopback server running `script` on every connection; yields its ws:// URL."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await script(Broker(stream))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield f"ws://127.0.0.1:{port}/stream"
        nursery.cancel_scope.cancel()


class Connected:
    """A connector like `websocket_connector`, over a socket whose send buffer is
    small (so that a peer that stops reading blocks our sends at once); keeps the
    clients it opened."""

    def __init__(self) -> None:
        self.clients: list[WebSocketClient] = []

    @asynccontextmanager
    async def __call__(self, url: str) -> AsyncIterator[WebSocket]:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        async with stream:
            client = await open_websocket(stream, f"127.0.0.1:{port}", "/stream",
                                          max_message_size=1_000_000)
            self.clients.append(client)
            try:
                yield client
            finally:
                with trio.move_on_after(0.5, shield=True):
                    await client.aclose()


class NoRecovery:
    """Recovery with nothing to bring back: streaming starts at once."""

    class settings:
        order_refresh_interval = 0.0

    def __init__(self) -> None:
        self.live: list[tuple[str, int]] = []  # (order id, wall ns it was received)

    async def backfill(self, *_: Any) -> None:
        await trio.lowlevel.checkpoint()

    def observe(self, event: Event) -> None:
        pass

    def observe_stale(self, event: Event) -> None:
        pass

    def observe_live(self, event: Event, received_ns: int) -> None:
        self.live.append((event.order_id, received_ns))

    async def recheck_stale(self) -> int:
        return 0

    async def refresh_periodically(self) -> None:
        pass


def actor(url: str, connector: Any, outbox: trio.MemorySendChannel[Item], *,
          recovery: NoRecovery | None = None, ping_interval: float = 100.0,
          ping_timeout: float = 10.0) -> ConnectionActor:
    settings = ConnectionSettings(
        stream_url=url, key_id="KEYID", secret_key="SECRET", ping_interval=ping_interval,
        ping_timeout=ping_timeout, handshake_timeout=5.0,
        backoff=BackoffPolicy(initial=0.1, cap=0.2), max_frame_bytes=1_000_000,
        future_tolerance=60.0)
    return ConnectionActor(settings, connector, cast(GapRecovery, recovery or NoRecovery()),
                           outbox, Metrics(), SupervisorState())


def _forwarded(receive: trio.MemoryReceiveChannel[Item]) -> list[str]:
    """The order ids of the updates on the pipeline so far."""
    out: list[str] = []
    while True:
        try:
            item = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return out
        if isinstance(item, Event):
            out.append(item.order_id)


async def _send_until_closed(client: WebSocketClient, data: bytes) -> None:
    try:
        await client.send_message(data)
    except TransportClosed:
        pass


async def test_updates_read_with_a_ping_the_peer_will_not_read_the_pong_of_are_forwarded(
) -> None:
    """Our send buffer is full (the broker stopped reading); then one read brings an
    update, a ping and another update. The pong cannot be sent, the pinger gives up and
    ends the connection: both updates, already read, still reach the pipeline
    (docs/design.md, section 8: frames already read are still forwarded)."""
    go = trio.Event()
    connections = 0

    async def script(broker: Broker) -> None:
        nonlocal connections
        connections += 1
        await alpaca(broker)
        if connections > 1:
            await trio.sleep_forever()  # the reconnect: nothing more to say
        await go.wait()
        await broker.stream.send_all(broker.message(update("order-A"))
                                     + broker.ws.send(Ping(payload=b"hi"))
                                     + broker.message(update("order-B")))
        await trio.sleep_forever()  # never reads again

    connector = Connected()
    send, receive = trio.open_memory_channel[Item](100)
    async with serving(script) as url, trio.open_nursery() as nursery:
        a = actor(url, connector, send, ping_interval=0.5, ping_timeout=0.5)
        with trio.fail_after(5):
            await nursery.start(a.run)
            while a.state.connection != "streaming":
                await trio.sleep(0.01)
        # Standing in for a send buffer filled over time: a send the peer never reads.
        nursery.start_soon(_send_until_closed, connector.clients[0], b"x" * 4_000_000)
        await trio.testing.wait_all_tasks_blocked(0.05)
        go.set()
        with trio.fail_after(10):
            while a.state.last_disconnect_reason is None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert _forwarded(receive) == ["order-A", "order-B"]
    assert a.state.last_disconnect_reason == "no pong within 0.5s"


async def _run_until_disconnected(a: ConnectionActor) -> None:
    """Run the actor until its first connection has ended."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        with trio.fail_after(10):
            while a.state.last_disconnect_reason is None:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def _backoff(logs: list[MutableMapping[str, Any]]) -> MutableMapping[str, Any]:
    return next(e for e in logs if e["event"] == "backoff")


@contextmanager
def every_log() -> Iterator[list[MutableMapping[str, Any]]]:
    """`capture_logs` at every level: an earlier test's `configure_logging` (a command
    run with `--log-level error`, say) leaves a level that filters info lines out before
    any processor, the capturing one included."""
    wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=wrapper)


async def test_an_error_in_another_shape_during_authentication_is_shown_and_waited_out(
) -> None:
    """The broker's connection-limit error in the market-data shape, then a normal
    close: the text reaches the log and the reason (it was `closed 1000`), and the
    backoff waits out the limit as for a 429."""
    async def script(broker: Broker) -> None:
        await broker.next_message()  # authenticate
        await broker.stream.send_all(broker.message(
            b'[{"T":"error","code":406,"msg":"connection limit exceeded"}]') + broker.close())
        await broker.next_message()

    send, _receive = trio.open_memory_channel[Item](100)
    async with serving(script) as url:
        a = actor(url, websocket_connector(), send)
        with every_log() as logs:
            await _run_until_disconnected(a)
    [said] = [e for e in logs if e["event"] == "broker_error"]
    assert said["phase"] == "authenticate"
    assert "connection limit exceeded" in said["message"]
    assert a.state.last_disconnect_reason is not None
    assert a.state.last_disconnect_reason.startswith("closed 1000 (broker said: ")
    assert "connection limit exceeded" in a.state.last_disconnect_reason
    assert _backoff(logs)["rate_limited"] is True


async def test_an_error_message_while_streaming_is_logged_and_named_in_the_reason() -> None:
    connections = 0

    async def script(broker: Broker) -> None:
        nonlocal connections
        connections += 1
        await alpaca(broker)
        if connections == 1:
            await broker.stream.send_all(broker.message(
                b'{"stream":"error","data":{"message":"connection limit exceeded"}}')
                + broker.close())
        await broker.next_message()

    send, _receive = trio.open_memory_channel[Item](100)
    async with serving(script) as url:
        a = actor(url, websocket_connector(), send)
        with every_log() as logs:
            await _run_until_disconnected(a)
    [said] = [e for e in logs if e["event"] == "broker_error"]
    assert (said["phase"], said["message"]) == ("streaming", "connection limit exceeded")
    assert a.state.last_disconnect_reason == (
        "closed 1000 (broker said: connection limit exceeded)")
    assert _backoff(logs)["rate_limited"] is True


async def test_a_refused_upgrade_names_what_the_broker_said_without_our_secrets() -> None:
    async def script(broker: Broker) -> None:
        await broker.upgrade_request()
        body = b"connection limit exceeded for key KEYID " + b"." * 300
        await broker.stream.send_all(
            broker.ws.send(RejectConnection(status_code=406, has_body=True, headers=[
                (b"content-length", str(len(body)).encode())]))
            + broker.ws.send(RejectData(data=body)))

    send, _receive = trio.open_memory_channel[Item](100)
    async with serving(script) as url:
        a = actor(url, websocket_connector(), send)
        with every_log() as logs:
            await _run_until_disconnected(a)
    reason = a.state.last_disconnect_reason
    assert reason is not None
    assert reason.startswith("upgrade rejected 406: connection limit exceeded for key "
                             "[REDACTED] ...")
    assert "KEYID" not in reason and len(reason) < 250
    assert _backoff(logs)["rate_limited"] is True


async def test_unauthorized_names_the_urls_as_well_as_the_keys() -> None:
    """Paper keys on the live URL are refused as `unauthorized`: the exit message
    names the URL variables, as REST's 401 does."""
    async def script(broker: Broker) -> None:
        await broker.next_message()
        await broker.stream.send_all(broker.message(
            b'{"stream":"authorization","data":{"status":"unauthorized",'
            b'"action":"authenticate"}}'))
        await broker.next_message()

    send, _receive = trio.open_memory_channel[Item](100)
    async with serving(script) as url:
        a = actor(url, websocket_connector(), send)
        with trio.fail_after(10), pytest.raises(Unauthorized) as refused:
            await a.run()
    assert "APCA_API_BASE_URL" in str(refused.value) and "APCA_API_STREAM_URL" in str(
        refused.value)


async def test_an_update_racing_listening_is_stamped_with_when_it_arrived() -> None:
    """An update that comes before `listening` (stamped 8 s ahead: a broker clock a little
    ahead of ours) is forwarded as live after recovery: recovery must be told it arrived
    now. It was told the epoch plus Trio's clock, hours ago, and the stream edge's
    disorder jumped to hours (docs/design.md, section 12)."""
    ahead = datetime.now(UTC) + timedelta(seconds=8)

    async def script(broker: Broker) -> None:
        await alpaca(broker, before_listening=update("early", at=ahead))
        await broker.next_message()

    send, receive = trio.open_memory_channel[Item](100)
    recovery = NoRecovery()
    async with serving(script) as url, trio.open_nursery() as nursery:
        a = actor(url, websocket_connector(), send, recovery=recovery)
        with trio.fail_after(5):
            await nursery.start(a.run)
            while not recovery.live:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    now_ns = int(datetime.now(UTC).timestamp() * 1e9)
    [(order_id, received_ns)] = recovery.live
    assert order_id == "early"
    assert abs(now_ns - received_ns) < 5e9
    assert _forwarded(receive) == ["early"]
