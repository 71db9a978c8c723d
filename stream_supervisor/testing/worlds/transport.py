"""In-memory WebSocket and REST between the real supervisor and the simulated broker.

No sockets and no threads: everything runs in one Trio run on a virtual clock, so one
seed replays bit for bit. The broker side is the simulated broker's own session logic
and REST dispatch; the supervisor side is the real connection actor and the real REST
client (through an httpx transport), so retries, timeouts and close handling run as in
production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from ...errors import TransportClosed, UpgradeRejected
from ...transport import Connector, WebSocket
from ..broker import SessionClosed, SimulatedBroker

#: Frames buffered in each direction: the in-memory stand-in for socket buffers.
LINK_BUFFER = 256


class _Link:
    def __init__(self) -> None:
        self.to_server_send, self.to_server_recv = trio.open_memory_channel[str | bytes](
            LINK_BUFFER)
        self.to_client_send, self.to_client_recv = trio.open_memory_channel[str | bytes](
            LINK_BUFFER)
        self.reset = False  # an abrupt close: buffered frames are lost, like a TCP RST
        self.closed = trio.Event()
        self.paused = False  # the server stopped reading: pings go unanswered
        self.close_reason = "closed 1000"

    def close(self, reason: str, *, abrupt: bool = False) -> None:
        if self.closed.is_set():
            return
        self.reset = abrupt
        self.close_reason = reason
        self.closed.set()
        self.to_client_send.close()
        self.to_server_send.close()


class _ClientSide:
    """The supervisor's end: the `transport.WebSocket` protocol."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    async def get_message(self) -> str | bytes:
        if self.link.reset:
            raise TransportClosed(self.link.close_reason)
        try:
            message = await self.link.to_client_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed(self.link.close_reason) from None
        if self.link.reset:
            raise TransportClosed(self.link.close_reason)
        return message

    async def get_messages(self) -> list[str | bytes]:
        """Like a socket read: the next message and whatever else is already buffered."""
        messages = [await self.get_message()]
        while True:
            try:
                messages.append(self.link.to_client_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        if self.link.reset:
            raise TransportClosed(self.link.close_reason)
        return messages

    async def send_message(self, data: str | bytes) -> None:
        if self.link.closed.is_set():
            raise TransportClosed(self.link.close_reason)
        try:
            await self.link.to_server_send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed(self.link.close_reason) from None

    async def ping(self) -> None:
        if self.link.closed.is_set():
            raise TransportClosed(self.link.close_reason)
        if self.link.paused:
            await self.link.closed.wait()  # a half-open peer never pongs
            raise TransportClosed(self.link.close_reason)
        await trio.lowlevel.checkpoint()


class _ServerSide:
    """The broker's end: the simulated broker's `SessionTransport` (and pausable)."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    async def get_message(self) -> str | bytes:
        try:
            return await self.link.to_server_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SessionClosed("client went away") from None

    async def send_message(self, data: str | bytes) -> None:
        if self.link.closed.is_set():
            raise SessionClosed("closed")
        try:
            await self.link.to_client_send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SessionClosed("closed") from None

    async def aclose(self, *, abrupt: bool = False) -> None:
        self.link.close("connection reset" if abrupt else "closed 1000", abrupt=abrupt)
        await trio.lowlevel.checkpoint()

    def pause_reading(self) -> None:
        self.link.paused = True


def memory_connector(broker: SimulatedBroker, nursery: trio.Nursery) -> Connector:
    """Connect to `broker` in memory; sessions run in `nursery` (the world's)."""

    @asynccontextmanager
    async def connect(url: str) -> AsyncIterator[WebSocket]:
        await trio.lowlevel.checkpoint()
        status = broker.admit()
        if status is not None:
            raise UpgradeRejected(status)
        link = _Link()
        nursery.start_soon(broker.handle_session, _ServerSide(link))
        try:
            yield _ClientSide(link)
        finally:
            link.close("closed by client")

    return connect


class BrokerTransport(httpx.AsyncBaseTransport):
    """An httpx transport answering from the simulated broker's REST, in virtual time."""

    def __init__(self, broker: SimulatedBroker) -> None:
        self.broker = broker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        target = request.url.raw_path.decode("ascii")
        headers = {k.lower(): v for k, v in request.headers.items()}
        answer = self.broker.rest(request.method, target, headers)
        if answer.delay:
            await trio.sleep(answer.delay)
        else:
            await trio.lowlevel.checkpoint()
        return httpx.Response(answer.status, headers=list(answer.headers), content=answer.body,
                              request=request)
