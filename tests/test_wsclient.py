"""The WebSocket client against a scripted server on real loopback sockets.

The server side is wsproto's server state machine writing exact bytes, so each test
controls what arrives in which TCP write: frames glued to the 101 response, several
messages per read, fragments split across reads, pings, close frames, a bare EOF.
The frame fast path's tests (the last section) script the reads themselves, on an
in-memory stream, and hold the client to what wsproto alone makes of the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from stream_supervisor.errors import TransportClosed, UpgradeRejected
from stream_supervisor.events import DeadLetter
from stream_supervisor.protocol import decode_frame
from stream_supervisor.transport import WebSocket
from stream_supervisor.wsclient import (
    WebSocketClient,
    open_websocket,
    shown_proxy,
    stream_proxy,
    websocket_connector,
)

from .fixtures import TLS_CERT, TLS_KEY


class Peer:
    """The server's end of one connection: wsproto for the protocol, raw writes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.received: list[object] = []  # events the client sent after the upgrade

    async def upgrade_request(self) -> Request:
        while True:
            self.ws.receive_data(await self.stream.receive_some(65536))
            for event in self.ws.events():
                if isinstance(event, Request):
                    return event

    def accept(self) -> bytes:
        return self.ws.send(AcceptConnection())

    def message(self, data: str | bytes, *, finished: bool = True) -> bytes:
        event = TextMessage(data=data, message_finished=finished) if isinstance(data, str) \
            else BytesMessage(data=data, message_finished=finished)
        return self.ws.send(event)

    async def read_events(self) -> list[object]:
        """What the client sent since the last call (waits for at least one event)."""
        while True:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            events: list[object] = list(self.ws.events())
            self.received.extend(events)
            if events or not data:
                return events


Script = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def scripted(script: Script, *, tls: bool = False) -> AsyncIterator[str]:
    """A one-connection server running `script`; yields its ws:// URL (wss:// with
    `tls`: the self-signed certificate of `tests/fixtures/tls`)."""
    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = tcp[0].socket.getsockname()[1]
    listeners: list[trio.abc.Listener[Any]] = list(tcp)
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(TLS_CERT, TLS_KEY)
        listeners = [trio.SSLListener(t, context, https_compatible=True) for t in tcp]

    async def handler(stream: Any) -> None:
        async with stream:
            try:
                await script(Peer(stream))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/stream"
        nursery.cancel_scope.cancel()


async def hold_open(peer: Peer) -> None:
    """Keep reading (answering nothing but a close) until the client leaves."""
    while True:
        data = await peer.stream.receive_some(65536)
        if not data:
            return
        peer.ws.receive_data(data)
        for event in peer.ws.events():
            peer.received.append(event)
            if isinstance(event, CloseConnection):
                await peer.stream.send_all(peer.ws.send(event.response()))
                return


async def test_frames_glued_to_the_101_response_and_many_per_read_come_back_together() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        # One write: the 101 and three messages, text and binary.
        await peer.stream.send_all(
            peer.accept() + peer.message("one") + peer.message(b"two") + peer.message("three"))
        await hold_open(peer)

    async with scripted(script) as url, websocket_connector()(url) as ws:
        got: list[str | bytes] = []
        while len(got) < 3:
            got += await ws.get_messages()
        assert got == ["one", b"two", "three"]


async def test_a_fragmented_message_split_across_reads_is_assembled() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept())
        wire = peer.message(b"abc", finished=False) + peer.message(b"def", finished=False) \
            + peer.message(b"ghi") + peer.message("after")
        for i in range(0, len(wire), 3):  # three bytes per TCP write
            await peer.stream.send_all(wire[i:i + 3])
            await trio.sleep(0.001)
        await hold_open(peer)

    async with scripted(script) as url, websocket_connector()(url) as ws:
        assert await ws.get_message() == b"abcdefghi"
        assert await ws.get_message() == "after"


async def test_a_server_ping_is_answered_and_our_ping_returns_on_its_pong() -> None:
    pongs: list[bytes] = []

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + peer.ws.send(Ping(payload=b"are-you-there")))
        while True:
            for event in await peer.read_events():
                if isinstance(event, Pong):
                    pongs.append(bytes(event.payload))
                    await peer.stream.send_all(peer.message("pong seen"))
                if isinstance(event, Ping):
                    await peer.stream.send_all(peer.ws.send(event.response()))

    async with scripted(script) as url, websocket_connector()(url) as ws:
        assert await ws.get_message() == "pong seen"  # read: the ping was answered
        assert pongs == [b"are-you-there"]
        async with trio.open_nursery() as nursery:
            # Our ping's pong arrives on the read path, as in the connection actor.
            nursery.start_soon(ws.get_messages)
            with trio.fail_after(5):
                await ws.ping()
            nursery.cancel_scope.cancel()


async def test_messages_read_before_a_close_frame_come_first_then_the_reason() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + peer.message("last words")
                                   + peer.ws.send(CloseConnection(code=1001, reason="going away")))
        await peer.read_events()  # the client's close reply

    async with scripted(script) as url, websocket_connector()(url) as ws:
        assert await ws.get_messages() == ["last words"]
        with pytest.raises(TransportClosed, match="closed 1001 going away"):
            await ws.get_messages()
        with pytest.raises(TransportClosed):
            await ws.send_message("anyone?")


async def test_end_of_stream_without_a_close_frame_is_an_abnormal_closure() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + peer.message("x"))
        # Returning closes the socket: no close frame.

    async with scripted(script) as url, websocket_connector()(url) as ws:
        assert await ws.get_message() == "x"
        with pytest.raises(TransportClosed, match="closed 1006"):
            await ws.get_message()


async def test_a_ping_waiting_when_the_connection_drops_raises() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept())
        await peer.read_events()  # the client's ping, never answered; then EOF

    async with (scripted(script) as url, websocket_connector()(url) as ws,
                trio.open_nursery() as nursery):
        nursery.start_soon(_read_until_closed, ws)
        with trio.fail_after(5), pytest.raises(TransportClosed):
            await ws.ping()


async def _read_until_closed(ws: WebSocket) -> None:
    try:
        while True:
            await ws.get_messages()
    except TransportClosed:
        pass


async def test_an_oversized_message_is_cut_and_the_connection_stays() -> None:
    # Issue 13, observation 4: a message over the limit used to close the connection
    # (1009), so a frame the decoder would have dead-lettered cost a reconnect instead.
    # Now it arrives cut to limit + 1 bytes (the decoder's "oversized" dead letter), the
    # rest is dropped as it is read, and the messages after it come through.
    received: list[object] = []

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + peer.message("ok")
                                   + peer.message(b"a" * 600, finished=False)
                                   + peer.message(b"b" * 600, finished=False)
                                   + peer.message(b"c" * 600)
                                   + peer.message(b"d" * 1001) + peer.message(b"e" * 1000)
                                   + peer.message("after"))
        await hold_open(peer)
        received.extend(peer.received)

    async with scripted(script) as url, websocket_connector(max_message_size=1000)(url) as ws:
        got: list[str | bytes] = []
        with trio.fail_after(5):
            while len(got) < 5:
                got += await ws.get_messages()
    assert got == ["ok", b"a" * 600 + b"b" * 401, b"d" * 1001, b"e" * 1000, "after"]
    # The client closed normally when it left, never with 1009.
    assert [e.code for e in received if isinstance(e, CloseConnection)] == [1000]


async def test_the_size_limit_counts_a_text_messages_bytes_not_its_characters() -> None:
    """3,000 euro signs are 9,000 bytes of UTF-8: over a 1,000-byte limit, the message
    comes cut to 1,001 bytes (it was cut at 1,001 characters, 3,003 bytes, and the dead
    letter gave that as its size), and one just under it in bytes comes whole."""
    euros = "\u20ac" * 3000
    fits = "\u20ac" * 333  # 999 bytes

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + peer.message(euros) + peer.message(fits)
                                   + peer.message(euros[:50], finished=False)
                                   + peer.message(euros[50:]))
        await hold_open(peer)

    async with scripted(script) as url, websocket_connector(max_message_size=1000)(url) as ws:
        got: list[str | bytes] = []
        with trio.fail_after(5):
            while len(got) < 3:
                got += await ws.get_messages()
    cut = euros.encode()[:1001]
    assert got == [cut, fits, cut]
    letter = decode_frame(got[0], max_bytes=1000)
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "oversized frame: at least 1001 bytes > limit 1000"


async def test_invalid_utf8_in_a_text_frame_is_a_protocol_close() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        bad = b"\xff\xfe"
        await peer.stream.send_all(peer.accept() + struct.pack("!BB", 0x81, len(bad)) + bad)
        await hold_open(peer)

    async with scripted(script) as url, websocket_connector()(url) as ws:
        with pytest.raises(TransportClosed, match="closed 1007"):
            await ws.get_messages()


@pytest.mark.parametrize(("bad", "code"), [
    (b"\x81\x02\xff\xfe", 1007),  # a text frame of invalid UTF-8
    (b"\x82\x86\x01\x02\x03\x04masked", 1002),  # a masked frame, from a server
])
async def test_failing_the_connection_tells_the_peer_why(bad: bytes, code: int) -> None:
    """RFC 6455, 7.1.7: failing the connection, the client sends a close frame with the
    code (it sent none), when it leaves: within the close deadline."""
    received: list[object] = []

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + bad)
        while not any(isinstance(e, CloseConnection) for e in await peer.read_events()):
            pass
        received.extend(peer.received)

    async with scripted(script) as url:
        with trio.fail_after(5):
            async with websocket_connector()(url) as ws:
                with pytest.raises(TransportClosed, match=f"closed {code}"):
                    await ws.get_messages()
            while not received:
                await trio.sleep(0.01)
    assert [e.code for e in received if isinstance(e, CloseConnection)] == [code]


async def test_a_refused_upgrade_names_the_status_and_body() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(
            peer.ws.send(RejectConnection(status_code=429, has_body=True,
                                          headers=[(b"content-length", b"24")]))
            + peer.ws.send(RejectData(data=b"connection limit reached")))

    async with scripted(script) as url:
        with pytest.raises(UpgradeRejected) as rejected:
            async with websocket_connector()(url):
                pass
    assert rejected.value.status_code == 429
    assert rejected.value.body == "connection limit reached"


async def test_an_untrusted_certificate_is_named_with_the_way_to_fix_it() -> None:
    """Behind a TLS-inspecting proxy, or in an image without CA certificates, the TLS
    handshake fails: the reason says why (it was `BrokenResourceError: `, the cause
    dropped) and a warning names the variables that fix it."""
    async def script(peer: Peer) -> None:
        await peer.stream.receive_some(65536)

    async with scripted(script, tls=True) as url:
        with capture_logs() as logs, pytest.raises(TransportClosed) as closed:
            async with websocket_connector(connect_timeout=5)(url):
                pass
    assert "certificate verify failed" in closed.value.reason
    [warning] = [e for e in logs if e["event"] == "tls_certificate_untrusted"]
    assert "SSL_CERT_FILE" in warning["hint"]
    assert "certificate verify failed" in warning["error"]


async def test_ssl_cert_file_makes_a_certificate_trusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fix the hint names works: the client's context reads SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS_CERT))

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + peer.message("over TLS"))
        await hold_open(peer)

    async with scripted(script, tls=True) as url, websocket_connector()(url) as ws:
        assert await ws.get_message() == "over TLS"


async def test_a_server_that_is_not_websocket_fails_the_handshake() -> None:
    async def script(peer: Peer) -> None:
        await peer.stream.receive_some(65536)
        await peer.stream.send_all(b"SSH-2.0-OpenSSH_9.2\r\n")

    async with scripted(script) as url:
        with pytest.raises(TransportClosed, match="handshake failed"):
            async with websocket_connector()(url):
                pass


async def test_leaving_does_the_close_handshake() -> None:
    done = trio.Event()
    seen: list[object] = []

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept())
        while peer.ws.state is not ConnectionState.REMOTE_CLOSING:
            events = await peer.read_events()
            if not events:
                break
        seen.extend(peer.received)
        for event in peer.received:
            if isinstance(event, CloseConnection):
                await peer.stream.send_all(peer.ws.send(event.response()))
        done.set()

    async with scripted(script) as url:
        with trio.fail_after(5):
            async with websocket_connector()(url) as ws:
                await ws.send_message("bye")
            await done.wait()
    assert [type(e) for e in seen] == [TextMessage, CloseConnection]


async def test_a_cancelled_caller_does_not_wait_the_full_close_timeout() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept())
        await trio.sleep_forever()  # never reads, never answers the close frame

    async with scripted(script) as url:
        connector = websocket_connector(disconnect_timeout=10.0)
        started = trio.current_time()
        with trio.move_on_after(0.2):
            async with connector(url) as ws:
                await ws.get_messages()  # cancelled here
        # A tenth of the disconnect timeout, not all ten seconds.
        assert trio.current_time() - started < 5.0


async def test_open_websocket_reports_a_connection_closed_during_the_upgrade() -> None:
    async def script(peer: Peer) -> None:
        await peer.upgrade_request()  # then close without answering

    async with scripted(script) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with pytest.raises(TransportClosed, match="closed during the upgrade"):
                await open_websocket(stream, "127.0.0.1", "/stream", max_message_size=1000)


# --- property: any fragmentation, any TCP chunking, pings interleaved -----------------

_payloads = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.sampled_from([b"x" * 70_000, "y" * 200]),  # 64-bit and 16-bit extended lengths
)


@settings(max_examples=40, deadline=None)
@given(
    messages=st.lists(st.tuples(_payloads, st.integers(1, 4), st.booleans()),
                      min_size=1, max_size=12),
    cuts=st.lists(st.integers(0, 200_000), max_size=30),
)
def test_any_framing_and_chunking_yields_the_messages_in_order(
    messages: list[tuple[str | bytes, int, bool]], cuts: list[int]
) -> None:
    """Messages split into 1-4 fragments, a ping after some fragments, the bytes written
    in arbitrary pieces: `get_messages` returns exactly the messages, in order."""

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        wire = peer.accept()
        for payload, fragments, ping in messages:
            step = max(1, -(-len(payload) // fragments))
            pieces = [payload[i:i + step] for i in range(0, len(payload), step)] or [payload]
            for n, piece in enumerate(pieces):
                wire += peer.message(piece, finished=n == len(pieces) - 1)
                if ping:
                    wire += peer.ws.send(Ping(payload=b"p"))
        points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
        for start, end in itertools.pairwise(points):
            await peer.stream.send_all(wire[start:end])
        await hold_open(peer)

    async def main() -> list[str | bytes]:
        got: list[str | bytes] = []
        async with scripted(script) as url, websocket_connector()(url) as ws:
            with trio.fail_after(20):
                while len(got) < len(messages):
                    got += await ws.get_messages()
        return got

    assert trio.run(main) == [payload for payload, _, _ in messages]


# --- the frame fast path against wsproto alone -----------------------------------------
#
# Ordinary frames are split out of each read by the client itself; every other frame goes
# to wsproto whole. Whatever the server sends, valid or not, and however TCP cuts it, the
# client must see what wsproto alone would: the same messages, then the same close. These
# tests run over an in-memory stream that returns exactly the reads they script, so that
# every cut is the one asked for (loopback TCP merges small writes).

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _accept_head(request: bytes, eol: bytes = b"\r\n") -> bytes:
    """A 101 for the client's upgrade request; `eol` b"\\n" gives the bare-LF head h11
    also accepts."""
    found = re.search(rb"sec-websocket-key: *(\S+)", request, re.IGNORECASE)
    assert found is not None
    token = base64.b64encode(hashlib.sha1(found.group(1) + _GUID).digest())
    return eol.join([b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                     b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + token, b"", b""])


class Reads(trio.abc.Stream):
    """The server's side as a script of reads: `reads(request)` gives each read's bytes
    after the upgrade request (None: a peer that goes quiet), then the end of the
    stream. What the client sends after the request is kept in `sent`; `broken` makes
    every such send fail, as on a connection the peer reset."""

    def __init__(self, reads: Callable[[bytes], Sequence[bytes | None]], *,
                 broken: bool = False) -> None:
        self._script = reads
        self._reads: list[bytes | None] | None = None
        self.broken = broken
        self.sent: list[bytes] = []
        self.on_read: Callable[[], None] | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._reads is None:
            self._reads = list(self._script(bytes(data)))
            return
        if self.broken:
            raise trio.BrokenResourceError("peer reset")
        self.sent.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        assert self._reads is not None, "a read before the upgrade request"
        if not self._reads:
            return b""
        data = self._reads.pop(0)
        if data is None:
            await trio.sleep_forever()
            raise AssertionError("unreachable")
        if self.on_read is not None:
            self.on_read()
        return data

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _read_all(client: WebSocketClient) -> tuple[list[str | bytes], str]:
    got: list[str | bytes] = []
    with trio.fail_after(10):
        while True:
            try:
                got += await client.get_messages()
            except TransportClosed as exc:
                return got, exc.reason


def _frame(first: int, payload: bytes, *, masked: bool = False, wide: int = 0) -> bytes:
    """One frame's bytes, built by hand so that it may break any rule: `first` is the
    FIN, RSV and opcode byte; `wide` forces a 2- (126) or 8-byte (127) length field."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if wide == 127 or (not wide and n > 0xFFFF):
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    elif wide == 126 or (not wide and n > 125):
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BB", first, mask_bit | n)
    if masked:
        key = b"\x01\x02\x03\x04"
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        head += key
    return head + payload


def _text_fragments(text: str, cut: int) -> bytes:
    """A text message in two fragments, cut at byte `cut` of its UTF-8 (maybe inside a
    character, which only the whole message must complete)."""
    data = text.encode()
    cut = min(cut, len(data))
    return _frame(0x01, data[:cut]) + _frame(0x80, data[cut:])


_ordinary = st.one_of(
    st.builds(lambda b: _frame(0x82, b), st.binary(max_size=300)),
    st.builds(lambda t: _frame(0x81, t.encode()), st.text(max_size=200)),
    # Longer than the fast path holds; just under FAST_FRAME_BYTES with its header.
    st.builds(lambda n: _frame(0x82, b"z" * n), st.sampled_from([70_000, 65_520])),
    st.builds(lambda n: _frame(0x81, "\u00e9".encode() * n), st.sampled_from([35_000, 30])),
)
_unusual = st.one_of(
    st.builds(lambda b: _frame(0x02, b), st.binary(max_size=50)),  # a first fragment
    st.builds(lambda b: _frame(0x00, b), st.binary(max_size=50)),  # a continuation
    st.builds(lambda b: _frame(0x80, b), st.binary(max_size=50)),  # the last one
    st.builds(_text_fragments, st.text(min_size=1, max_size=40), st.integers(0, 80)),
    st.builds(lambda b: _frame(0x89, b), st.binary(max_size=20)),  # ping
    st.builds(lambda b: _frame(0x8A, b), st.binary(max_size=20)),  # unsolicited pong
    st.just(_frame(0x88, struct.pack("!H", 1000) + b"bye")),  # close
    st.just(_frame(0x88, b"\x03")),  # a close payload of one byte
    st.just(_frame(0x81, b"\xff\xfe")),  # invalid UTF-8
    st.builds(lambda n: _frame(0x81, b"a" * n + b"\xff"), st.sampled_from([10, 70_000])),
    st.just(_frame(0x82, b"masked", masked=True)),
    st.just(_frame(0xC2, b"rsv1")),
    st.just(_frame(0x83, b"opcode 3")),
    st.just(_frame(0x82, b"short", wide=126)),  # a length not minimally encoded
    st.just(_frame(0x82, b"x" * 200, wide=127)),
    st.just(_frame(0x09, b"a fragmented ping")),
    st.just(_frame(0x89, b"p" * 126)),  # a control frame over 125 bytes
    st.just(b"\x82\xff" + b"\xff" * 8),  # a 64-bit length with its top bit set
)


def _reference(wire: bytes, limit: int) -> tuple[list[str | bytes], str]:
    """What wsproto alone makes of `wire` then the end of the stream: the complete
    messages (cut to `limit` + 1 as the client cuts them) and the close, as the client
    words it."""
    conn = Connection(ConnectionType.CLIENT)  # what a WSConnection holds once open
    messages: list[str | bytes] = []
    parts: list[str | bytes] = []
    for data in (wire, None):
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, TextMessage | BytesMessage):
                parts.append(event.data if isinstance(event.data, str) else bytes(event.data))
                if event.message_finished:
                    whole = ("".join(p for p in parts if isinstance(p, str))
                             if isinstance(parts[0], str)
                             else b"".join(p for p in parts if isinstance(p, bytes)))
                    raw = whole.encode() if isinstance(whole, str) else whole
                    # The limit is in bytes: a longer text message comes cut, as bytes.
                    messages.append(whole if len(raw) <= limit else raw[:limit + 1])
                    parts = []
            elif isinstance(event, CloseConnection):
                return messages, f"closed {event.code}" + (
                    f" {event.reason}" if event.reason else "")
    raise AssertionError("wsproto reports every end of stream as a close")


def _same_close(reason: str) -> str:
    # Where in a text frame wsproto found bad UTF-8 is counted from the piece it was
    # given, which depends on the reads; the code and the error are what must agree.
    return re.sub(r"position \d+(-\d+)?", "position N", reason)


@settings(max_examples=80, deadline=None)
@given(
    frames=st.lists(st.one_of(_ordinary, _ordinary, _ordinary, _unusual),
                    min_size=1, max_size=14),
    cut_short=st.integers(0, 20),
    cuts=st.lists(st.integers(0, 300_000), max_size=20),
    glued=st.booleans(),
    bare_lf=st.booleans(),
    limit=st.sampled_from([7, 100, 16 * 1024 * 1024]),
)
def test_the_frame_fast_path_sees_what_wsproto_alone_sees(
    frames: list[bytes], cut_short: int, cuts: list[int], glued: bool, bare_lf: bool,
    limit: int,
) -> None:
    """Any mix of ordinary and unusual (also invalid) frames, the last possibly cut
    short by the end of the stream, read in arbitrary pieces, the first maybe glued to
    a 101 whose head ends its lines with CRLF or a bare LF."""
    wire = b"".join(frames)
    wire = wire[:max(0, len(wire) - cut_short)]
    messages, reason = _reference(wire, limit)

    def reads(request: bytes) -> list[bytes | None]:
        head = _accept_head(request, b"\n" if bare_lf else b"\r\n")
        sent = head + wire
        start = 0 if glued else len(head)
        points = sorted({start + c % (len(sent) - start + 1) for c in cuts}
                        | {start, len(sent)})
        pieces: list[bytes | None] = [] if glued else [head]
        return pieces + [sent[a:b] for a, b in itertools.pairwise(points) if a < b]

    async def main() -> tuple[list[str | bytes], str]:
        client = await open_websocket(Reads(reads), "bench", "/stream",
                                      max_message_size=limit)
        return await _read_all(client)

    got, got_reason = trio.run(main)
    assert got == messages
    assert _same_close(got_reason) == _same_close(reason)


async def test_ordinary_frames_do_not_pass_through_wsprotos_frame_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path is taken: of a read holding two messages and a ping, wsproto's
    connection is given only the ping's bytes (and the end of the stream)."""
    fed: list[bytes | None] = []
    original = WSConnection.receive_data

    def spy(self: WSConnection, data: bytes | None) -> None:
        if self.state is ConnectionState.OPEN:
            fed.append(data)
        original(self, data)

    monkeypatch.setattr(WSConnection, "receive_data", spy)
    ping = _frame(0x89, b"hi")
    stream = Reads(lambda request: [
        _accept_head(request) + _frame(0x82, b"one") + ping + _frame(0x81, b"two")])
    client = await open_websocket(stream, "bench", "/stream", max_message_size=1000)
    assert await _read_all(client) == ([b"one", "two"], "closed 1006")
    assert fed == [ping, None]
    server = Connection(ConnectionType.SERVER)
    server.receive_data(b"".join(stream.sent))
    assert list(server.events()) == [Pong(payload=b"hi")]


async def test_leaving_after_a_read_that_ended_inside_a_frame_still_sees_the_reply() -> None:
    """The close handshake reads on from where the splitting stopped: the start of a
    frame held back from the last read reaches wsproto before the rest of it, so the
    peer's close reply is found (not waited for until the peer hangs up)."""
    late = _frame(0x81, b"sixteen bytes..!")

    def reads(request: bytes) -> list[bytes | None]:
        return [_accept_head(request) + _frame(0x81, b"m1") + late[:5],
                late[5:] + _frame(0x88, struct.pack("!H", 1000)), None]

    client = await open_websocket(Reads(reads), "bench", "/stream", max_message_size=1000)
    assert await client.get_messages() == ["m1"]
    with trio.fail_after(5):  # a quiet peer after its reply: the wait must end at it
        await client.aclose()
    assert client.closed_reason == "closed by client"


async def test_a_failed_send_does_not_lose_the_messages_read_with_it() -> None:
    """A pong that cannot be sent (the peer reset) ends the connection, but what the
    same read brought after the ping is still returned first."""
    def reads(request: bytes) -> list[bytes | None]:
        return [_accept_head(request) + _frame(0x81, b"before") + _frame(0x89, b"hi")
                + _frame(0x81, b"after") + _frame(0x82, b"x")]

    stream = Reads(reads, broken=True)
    client = await open_websocket(stream, "bench", "/stream", max_message_size=1000)
    got, reason = await _read_all(client)
    assert got == ["before", "after", b"x"]
    assert reason == "BrokenResourceError: peer reset"


async def test_messages_read_with_a_ping_come_back_before_its_pong_is_sent() -> None:
    """A pong never holds up the messages read with its ping: they are returned first,
    and the pong goes out on the next call, before it reads. A reader cancelled while
    that pong cannot be sent (a peer that stopped reading) has lost nothing it read."""
    big = _frame(0x82, b"A" * 100)

    def reads(request: bytes) -> list[bytes | None]:
        return [_accept_head(request),
                _frame(0x81, b"before-ping") + _frame(0x89, b"hi") + _frame(0x81, b"after-ping")
                + big[:50],
                big[50:] + _frame(0x81, b"later")]

    stream = Reads(reads)
    client = await open_websocket(stream, "bench", "/stream", max_message_size=1000)
    assert await client.get_messages() == ["before-ping", "after-ping"]
    assert stream.sent == []  # the pong waits until nothing read is held
    assert await _read_all(client) == ([b"A" * 100, "later"], "closed 1006")
    server = Connection(ConnectionType.SERVER)
    server.receive_data(b"".join(stream.sent))
    assert list(server.events()) == [Pong(payload=b"hi")]


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY",
                    "no_proxy", "ALL_PROXY", "all_proxy")


def test_the_proxy_the_environment_names_for_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY for wss://, HTTP_PROXY for ws://, none where NO_PROXY covers the host;
    what logs and reasons show of it holds no credentials."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    stream = "wss://paper-api.alpaca.markets/stream"
    assert stream_proxy(stream) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.internal:3128")
    assert stream_proxy(stream) == "http://user:pw@proxy.internal:3128"
    assert shown_proxy("http://user:pw@proxy.internal:3128") == "http://proxy.internal:3128"
    assert stream_proxy("ws://paper-api.alpaca.markets/stream") is None
    monkeypatch.setenv("NO_PROXY", ".alpaca.markets")
    assert stream_proxy(stream) is None


@asynccontextmanager
async def connect_proxy(*, refuse: bytes | None = None,
                        ) -> AsyncIterator[tuple[int, list[bytes]]]:
    """An HTTP proxy on loopback: it answers CONNECT (or `refuse`s it) and pipes bytes
    both ways; yields its port and the CONNECT heads it received."""
    heads: list[bytes] = []

    async def pipe(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope,
                   ) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def handler(client: trio.SocketStream) -> None:
        async with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await client.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            heads.append(head)
            if refuse is not None:
                await client.send_all(refuse)
                return
            host, _, port = head.split(b" ")[1].decode().rpartition(":")
            upstream = await trio.open_tcp_stream(host, int(port))
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(pipe, client, upstream, nursery.cancel_scope)
                nursery.start_soon(pipe, upstream, client, nursery.cancel_scope)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        yield listeners[0].socket.getsockname()[1], heads
        nursery.cancel_scope.cancel()


async def test_the_stream_goes_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host whose only way out is the proxy: REST went through it, the stream dialled
    the broker directly and never connected. It goes in a CONNECT tunnel now, with Basic
    credentials from the proxy URL, TLS to the broker inside it."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS_CERT))

    async def script(peer: Peer) -> None:
        await peer.upgrade_request()
        await peer.stream.send_all(peer.accept() + peer.message("through the proxy"))
        await hold_open(peer)

    async with scripted(script, tls=True) as url, connect_proxy() as (port, heads):
        monkeypatch.setenv("HTTPS_PROXY", f"http://us%40er:p%3Ass@127.0.0.1:{port}")
        async with websocket_connector()(url) as ws:
            assert await ws.get_message() == "through the proxy"
    [head] = heads
    assert head.startswith(f"CONNECT 127.0.0.1:{urlsplit(url).port} HTTP/1.1".encode())
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"us@er:p:ss") in head


async def test_a_proxy_that_refuses_connect_is_named_without_its_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    async with connect_proxy(refuse=refusal) as (port, _):
        monkeypatch.setenv("HTTP_PROXY", f"http://user:s3cret@127.0.0.1:{port}")
        with pytest.raises(TransportClosed) as refused:
            async with websocket_connector()("ws://127.0.0.1:9/stream"):
                pass
    reason = str(refused.value)
    assert f"proxy http://127.0.0.1:{port} refused CONNECT 127.0.0.1:9" in reason
    assert "407 Proxy Authentication Required" in reason and "s3cret" not in reason
