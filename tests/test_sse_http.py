"""The events stream's reader (`sse_http.py`) against a server on loopback that never ends
a line or an event: memory stays bounded, and the connection ends with a reason the
events source reconnects on (docs/design.md, section 11)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import h11
import pytest
import trio

from stream_supervisor.bounds import DEAD_LETTER_KEEP_BYTES
from stream_supervisor.errors import TransportClosed
from stream_supervisor.events import DeadLetter
from stream_supervisor.eventstream import SseComment, SseItem, SseMessage
from stream_supervisor.protocol import decode_broker_event
from stream_supervisor.sse_http import sse_connector

LIMIT = 64 * 1024


async def serve_sse(chunks: Sequence[bytes], *, task_status: trio.TaskStatus[int]) -> None:
    """Answers every request 200 text/event-stream with `chunks`, then holds it open."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while not isinstance(conn.next_event(), h11.Request):
            conn.receive_data(await stream.receive_some(65536))
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("content-type", "text/event-stream"), ("connection", "close")])) or b"")
        for chunk in chunks:
            await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def shown(items: list[SseItem]) -> list[str | bytes]:
    return [i.text if isinstance(i, SseComment) else i.data for i in items]


async def read_all(chunks: Sequence[bytes]) -> tuple[list[SseItem], str]:
    """Every item the reader yields, and how the connection ended."""
    got: list[SseItem] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_sse, chunks)
        connect = sse_connector(f"http://127.0.0.1:{port}", "k", "s", connect_timeout=5,
                                read_timeout=1, max_event_bytes=LIMIT)
        with trio.fail_after(10):
            try:
                async with connect(None) as items:
                    await _collect(items, got)
                ended = "closed"
            except TransportClosed as exc:
                ended = exc.reason
        nursery.cancel_scope.cancel()
    return got, ended


async def _collect(items: AsyncIterator[SseItem], got: list[SseItem]) -> None:
    async for item in items:
        got.append(item)


EVENT = b'data: {"a": 1}\n\n'


@pytest.mark.parametrize("endless", [
    [b": hi\n", EVENT, b"data: " + b"B" * (4 * LIMIT)],  # a line that never ends
    [b": hi\n", EVENT, *[b"data: " + b"B" * 1000 + b"\n"] * 300],  # an event that never ends
], ids=["line", "event"])
async def test_a_line_or_event_without_end_ends_the_connection(endless: list[bytes]) -> None:
    """Both used to be held whole, however long (httpx's line reader, the SSE decoder's
    data): the events stream's memory grew without bound. Now what came before is
    yielded and the connection ends, past the limit, with the reason."""
    got, ended = await read_all(endless)
    assert shown(got) == ["hi", b'{"a": 1}']
    assert f"over {LIMIT} bytes" in ended


async def test_events_within_the_limit_are_read_whole() -> None:
    data = b'{"x": "' + b"C" * (LIMIT - 100) + b'"}'
    got, ended = await read_all([EVENT, b"id: 7\r\ndata: " + data[:1000], data[1000:] + b"\r\n",
                                 b"\r\n", b":heartbeat\n", EVENT])
    assert shown(got) == [b'{"a": 1}', data, "heartbeat", b'{"a": 1}']
    assert isinstance(got[1], SseMessage) and got[1].id == "7"
    assert ended == "closed" or "timed out" in ended


def test_an_oversized_broker_event_is_a_letter_of_its_first_bytes() -> None:
    """An event over the frame limit was decoded for its ids, whole, and kept whole in
    its letter. Now its size is checked first and the letter keeps its first bytes."""
    big = (b'{"account_id": "a1", "event_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "x": "'
           + b"A" * 2_000_000 + b'"}')
    account, letter = decode_broker_event(big, max_bytes=1_000_000)
    assert isinstance(letter, DeadLetter)
    assert account is None and letter.reason == (
        f"oversized event: {len(big)} bytes > limit 1000000")
    assert letter.payload == big[:DEAD_LETTER_KEEP_BYTES]
    # Within the limit but no trade update: its letter keeps no more either.
    account, letter = decode_broker_event(big, max_bytes=4_000_000)
    assert isinstance(letter, DeadLetter)
    assert account == "a1" and len(letter.payload) == DEAD_LETTER_KEEP_BYTES
