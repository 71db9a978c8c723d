"""The WebSocket client: wsproto's protocol state machine, read in batches on Trio.

Why not trio-websocket's client: it runs a reader task per connection and hands every
message to the caller through a memory channel, two task switches per trade update,
which cost more than decoding the update (benchmarks/, BENCHMARKS.md). Here the caller's
own task reads: one `receive_some` of up to 64 KiB, every message it completes returned
at once by `get_messages`. wsproto (the sans-I/O library trio-websocket is built on)
does the upgrade, the close-code rules and every frame that is not an ordinary message,
so this module is mostly the I/O around it: pings and pongs, the close handshake,
fragment assembly with a size limit (a longer message is cut, not a reason to close: the
decoder dead-letters it). The simulated broker's server side still uses trio-websocket.

One exception, for speed: the frames a broker sends nearly always (one unmasked text or
binary frame per message, no extension bits, at most `FAST_FRAME_BYTES`) are split out
of the read here, a header and a slice each, instead of passing through wsproto's frame
parser, which costs five times as much a frame (BENCHMARKS.md, "Fifth session"). Any
other frame, and any frame while a fragmented message is open, goes to wsproto whole and
at a frame boundary, so wsproto still judges everything unusual (masking from a server,
reserved bits, bad opcodes, lengths not minimally encoded, control frames, fragments,
invalid UTF-8) and closes with the code it always did. One difference is timing only:
wsproto may refuse a frame from its first two bytes, while here a frame waits for its
whole header (and an ordinary-looking one for all of itself, at most 64 KiB) before it
is judged; from a peer that then goes quiet the recorded reason is the ping timeout.
`tests/test_wsclient.py` holds the client to what wsproto alone makes of the same bytes,
over any reads, and through a pong held back, a failed pong and the close handshake.

Control replies (pongs, the reply to a close) never hold a read up: they are queued and
sent once every message read before them has been returned, so a reader cancelled while
a peer that stopped reading leaves a pong unsent has lost nothing it read. Once the
connection is over (the peer's close, or a frame wsproto refuses: then our close frame
with its code, RFC 6455 7.1.7) what is owed goes out in `aclose`, within its deadline.

`websocket_connector` is the production `transport.Connector`: it opens the TCP or TLS
stream, runs the upgrade, and always closes both. Contract, as for the whole transport
seam: failures surface as `TransportClosed` (or `UpgradeRejected` for a refused
upgrade); messages already read are returned before the failure is.
"""

from __future__ import annotations

import re
import ssl
from base64 import b64encode
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import getproxies, proxy_bypass

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
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
from wsproto.utilities import ProtocolError

from .bounds import TRANSPORT_MAX_MESSAGE
from .errors import TransportClosed, UpgradeRejected
from .logs import get_logger
from .transport import Connector, WebSocket

log = get_logger("stream_supervisor.wsclient")

#: Bytes asked of the socket per read: about sixty trade updates.
RECEIVE_BYTES = 64 * 1024
#: The longest frame (header included) split out here; a longer one is read by wsproto,
#: its payload handed over as it arrives, so at most this much of a frame is held.
FAST_FRAME_BYTES = 64 * 1024
#: First header bytes of the frames split out here: FIN set, no reserved bits, text (1)
#: or binary (2). Their second byte must not have the mask bit.
_FAST_TEXT = 0x81
_FAST_BINARY = 0x82
#: The end of an HTTP head, as h11 (wsproto's HTTP parser) finds it: a blank line, with or
#: without its CR.
_HEAD_END = re.compile(rb"\n\r?\n")
#: What is kept of the body of a refused upgrade, for the error message.
REJECT_BODY_BYTES = 200
#: The most a proxy's answer to CONNECT may hold before its blank line.
PROXY_ANSWER_BYTES = 16_384
#: Close codes (RFC 6455 section 7.4.1).
NORMAL_CLOSURE = 1000

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: What fixes a certificate the system store does not trust: `ssl.create_default_context`
#: reads OpenSSL's default paths, which these variables override. REST (httpx) trusts
#: certifi's bundle unless they are set, so it may work where the stream does not.
TLS_UNTRUSTED_HINT = (
    "the system CA store does not trust the stream's certificate: install the system CA "
    "certificates (ca-certificates), or set SSL_CERT_FILE (or SSL_CERT_DIR) to a CA "
    "bundle: `python -m certifi` prints the one REST uses; behind a TLS-inspecting proxy, "
    "one that holds the proxy's CA")


def _describe(exc: BaseException) -> str:
    """An exception for a reason: Trio wraps a TLS failure in `BrokenResourceError`
    with an empty message, the cause (`SSLCertVerificationError`, ...) saying why."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        text += f" ({type(cause).__name__}: {cause})"
    return text


class WebSocketClient:
    """One open client connection. Reads happen in the task that calls `get_messages`
    (the connection actor's reader); `send_message` and `ping` may run in other tasks."""

    def __init__(self, stream: trio.abc.Stream, protocol: WSConnection, *,
                 max_message_size: int) -> None:
        self._stream = stream
        self._ws = protocol
        self._max_message_size = max_message_size
        self._send_lock = trio.StrictFIFOLock()
        self._ready: deque[str | bytes] = deque()  # complete messages not yet returned
        self._pending = b""  # the start of a frame not yet complete (split out here)
        self._owed = 0  # bytes of a frame wsproto is reading, not yet given to it
        self._fragmented = False  # wsproto holds an open fragmented message
        self._replies: list[bytes] = []  # control frames owed to the peer, not yet sent
        self._parts: list[str | bytes] = []  # fragments of the message being assembled
        self._part_bytes = 0
        self._cut = False  # the message being assembled is over the limit: rest discarded
        self._closed: str | None = None  # why, once the connection is over
        self._pings: dict[int, trio.Event] = {}  # ping number -> set when its pong comes
        self._ping_number = 0

    @property
    def closed_reason(self) -> str | None:
        return self._closed

    # -- receiving ---------------------------------------------------------------------

    async def get_messages(self) -> list[str | bytes]:
        """Every complete message available after at most one socket read; at least one.
        Raises `TransportClosed` only once nothing read before the failure is left.
        Cancelled, it holds no message: it waits (on the socket, or on sending the
        control replies it owes) only while it has none to return."""
        await self._until_ready()
        messages = list(self._ready)
        self._ready.clear()
        return messages

    async def get_message(self) -> str | bytes:
        await self._until_ready()
        return self._ready.popleft()

    async def _until_ready(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._ready:
            if self._closed is not None:
                # What is still owed (the reply to a close) goes out in `aclose`, within
                # the caller's close deadline: a peer that stopped reading must not
                # hold the reader here with nothing left to guard it.
                raise TransportClosed(self._closed)
            if self._replies:
                # Sent now that nothing read is held: a reader cancelled here (the
                # pinger giving up on a peer that stopped reading) loses no message.
                await self._send_replies()
            else:
                await self._receive()

    async def _receive(self) -> None:
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except _STREAM_ERRORS as exc:
            self._lost(_describe(exc))
            return
        if not data:
            # End of stream without a close frame is wsproto's 1006 (abnormal closure)
            # event. A frame cut short here goes to wsproto first: what it says of a
            # header it would refuse comes before that, as without the fast path.
            pending, self._pending = self._pending, b""
            if pending and self._to_wsproto(pending):
                return
            self._ws.receive_data(None)
            self._handle_events()
            return
        self._split(bytes(data))

    def _split(self, data: bytes) -> None:
        """Split a read into frames: ordinary messages straight into `_ready`, every other
        frame to wsproto, whole and in order, so that wsproto always starts at a frame
        boundary. The start of an ordinary frame still to come is kept for the next read;
        a longer frame, or one whose header wsproto must judge, goes to wsproto as it
        arrives (`_owed`).

        Whenever `_pending` holds bytes, wsproto stands at the frame boundary they start
        with. Nothing here waits (control replies are queued), so a read is split whole
        or not at all. Only a close that wsproto reports ends the splitting; a send that
        failed (`_closed` set by another task) does not, so that messages already read
        are still returned before the failure is (as the module's contract says)."""
        buf = self._pending + data if self._pending else data
        self._pending = b""
        end = len(buf)
        i = 0
        ready = self._ready
        limit = self._max_message_size
        while i < end:
            if self._owed:
                take = min(self._owed, end - i)
                self._owed -= take
                chunk = buf[i:i + take]
                i += take
                if self._to_wsproto(chunk):
                    return  # the connection is over: nothing after the close counts
                continue
            if end - i < 2:
                break
            b0 = buf[i]
            b1 = buf[i + 1]
            length = b1 & 0x7F
            minimal = True
            if length < 126:
                head = 2
            elif length == 126:
                if end - i < 4:
                    break
                length = (buf[i + 2] << 8) | buf[i + 3]
                head = 4
                minimal = length >= 126
            else:
                if end - i < 10:
                    break
                length = int.from_bytes(buf[i + 2:i + 10], "big")
                head = 10
                minimal = 0xFFFF < length < 1 << 63
            if b1 & 0x80:
                head += 4  # masked: wsproto refuses it from a server
            size = head + length
            if ((b0 == _FAST_BINARY or b0 == _FAST_TEXT) and b1 < 0x80 and minimal
                    and size <= FAST_FRAME_BYTES and not self._fragmented):
                if size > end - i:
                    break  # the rest of this frame comes with a later read
                payload = buf[i + head:i + size]
                piece: str | bytes = payload
                if b0 == _FAST_TEXT:
                    try:
                        piece = payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self._owed = size  # wsproto closes with 1007
                        continue
                i += size
                if size - head > limit:  # bytes, not characters
                    self._message_part(piece, True)
                else:
                    ready.append(piece)
                continue
            # wsproto reads this frame, from what has come of it: a control frame, a
            # fragment, anything unusual, or one longer than is held here.
            if (b0 & 0x0F) < 8:  # a data frame: FIN says whether a message stays open
                self._fragmented = not (b0 & 0x80)
            self._owed = size
        self._pending = buf[i:]

    def _to_wsproto(self, data: bytes) -> bool:
        """Hand wsproto bytes and act on its events; True once it has reported the end
        of the connection."""
        self._ws.receive_data(data)
        return self._handle_events()

    def _handle_events(self) -> bool:
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._message_part(event.data, event.message_finished)
            elif isinstance(event, Ping):
                # Answered as soon as the messages read with it are returned (a broker
                # that pings us drops us without pongs).
                self._replies.append(self._ws.send(event.response()))
            elif isinstance(event, Pong):
                self._pong(event.payload)
            elif isinstance(event, CloseConnection):
                self._lost(f"closed {event.code}"
                           + (f" {event.reason}" if event.reason else ""))
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._replies.append(self._ws.send(event.response()))
                elif self._ws.state is ConnectionState.OPEN:
                    # wsproto refused what the peer sent (1002, 1007, ...): we fail the
                    # connection, and say why in a close frame (RFC 6455, 7.1.7).
                    self._replies.append(self._ws.send(CloseConnection(
                        code=event.code, reason=(event.reason or "")[:100])))
                return True
        return False

    def _message_part(self, data: str | bytes | bytearray, finished: bool) -> None:
        """Assemble fragments. A message over the limit keeps only its first limit + 1
        bytes (the rest is read and dropped as it arrives): the decoder sees it is over
        and dead-letters it, the connection and the memory it holds stay bounded. The
        limit is in bytes, as the decoder's is: a text message over it is cut as its
        UTF-8 bytes (maybe inside a character) and returned as bytes."""
        piece: str | bytes = data if isinstance(data, str) else bytes(data)
        if self._cut:
            piece = piece[:0]
        else:
            keep = self._max_message_size + 1 - self._part_bytes
            size = len(piece) if not isinstance(piece, str) or piece.isascii() \
                else len(piece.encode())
            if size >= keep:
                raw = piece.encode() if isinstance(piece, str) else piece
                piece, self._cut, size = raw[:keep], True, keep
            self._part_bytes += size
        if finished and not self._parts:
            self._ready.append(piece)
        else:
            self._parts.append(piece)
            if finished:
                joined: str | bytes = (
                    "".join(p for p in self._parts if isinstance(p, str))
                    if all(isinstance(p, str) for p in self._parts)
                    # Binary, or text cut at the limit: its bytes.
                    else b"".join(p.encode() if isinstance(p, str) else p
                                  for p in self._parts)
                )
                self._ready.append(joined)
                self._parts.clear()
        if finished:
            self._part_bytes = 0
            self._cut = False

    def _pong(self, payload: bytes | bytearray) -> None:
        # A pong answers its ping and every earlier one (RFC 6455 lets a peer answer only
        # the most recent); anything else is unsolicited and ignored.
        if len(payload) != 8:
            return
        number = int.from_bytes(payload, "big")
        for n in [n for n in self._pings if n <= number]:
            self._pings.pop(n).set()

    def _lost(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        for waiter in self._pings.values():
            waiter.set()  # a pinger wakes and finds the connection closed
        self._pings.clear()

    # -- sending -----------------------------------------------------------------------

    async def send_message(self, data: str | bytes) -> None:
        self._check_open()
        event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        await self._send(self._ws.send(event))

    async def ping(self) -> None:
        """Send a ping; return when it (or a later one) is answered."""
        self._check_open()
        self._ping_number += 1
        number = self._ping_number
        answered = self._pings[number] = trio.Event()
        try:
            await self._send(self._ws.send(Ping(payload=number.to_bytes(8, "big"))))
            await answered.wait()
        finally:
            self._pings.pop(number, None)
        if self._closed is not None:
            raise TransportClosed(self._closed)

    def _check_open(self) -> None:
        if self._closed is not None:
            raise TransportClosed(self._closed)
        if self._ws.state is not ConnectionState.OPEN:
            raise TransportClosed("closing")

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except _STREAM_ERRORS as exc:
                self._lost(_describe(exc))
                raise TransportClosed(self._closed or "closed") from None

    async def _send_quietly(self, data: bytes) -> None:
        """Control replies: a failure here shows up on the next read anyway."""
        try:
            await self._send(data)
        except TransportClosed:
            pass

    async def _send_replies(self) -> None:
        replies, self._replies = self._replies, []
        await self._send_quietly(b"".join(replies))

    async def _send_close(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            await self._send_quietly(self._ws.send(CloseConnection(code=code,
                                                                   reason=reason[:100])))

    # -- closing -----------------------------------------------------------------------

    def _peer_closed(self) -> bool:
        return self._ws.state is ConnectionState.CLOSED

    async def aclose(self) -> None:
        """The close handshake: send our close frame and read (discarding messages) until
        the peer's reply or the end of the stream. The caller bounds the wait; closing
        the stream itself is the caller's (it opened it). Control replies still owed
        (the reply to the peer's close) go first."""
        if self._replies:
            await self._send_replies()
        if self._pending and self._ws.state in (ConnectionState.OPEN,
                                                ConnectionState.LOCAL_CLOSING):
            # wsproto reads on from where the splitting stopped: a frame boundary.
            self._ws.receive_data(self._pending)
            self._pending = b""
        if self._closed is None and self._ws.state is ConnectionState.OPEN:
            await self._send_close(NORMAL_CLOSURE, "client closing")
            self._closed = "closed by client"
            while not self._peer_closed():
                try:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                except _STREAM_ERRORS:
                    break
                self._ws.receive_data(bytes(data) if data else None)
                for _event in self._ws.events():
                    pass  # wsproto moves to CLOSED on the peer's close frame
                if not data:
                    break
        self._lost("closed by client")


async def open_websocket(stream: trio.abc.Stream, host: str, resource: str, *,
                         max_message_size: int) -> WebSocketClient:
    """The HTTP upgrade over an open stream. Messages that arrive in the same read as the
    101 response are kept for the first `get_messages`.

    wsproto is given the response's head only (up to the blank line that ends it, found
    as h11 finds it, bare LFs included): what follows a 101 is frames, split by the client
    like every later read, so that wsproto never holds part of one. After any other status
    what follows is the body, wsproto's."""
    protocol = WSConnection(ConnectionType.CLIENT)
    client = WebSocketClient(stream, protocol, max_message_size=max_message_size)
    try:
        # Over TLS, the TLS handshake happens here.
        await stream.send_all(protocol.send(Request(host=host, target=resource)))
    except _STREAM_ERRORS as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            log.warning("tls_certificate_untrusted", host=host,
                        error=str(exc.__cause__), hint=TLS_UNTRUSTED_HINT)
        raise TransportClosed(f"handshake failed: {_describe(exc)}") from None
    rejected: RejectConnection | None = None
    body = b""
    seen = b""  # the last bytes of the head given to wsproto: its end may span two reads
    frames = b""  # what followed the head in the read that ended it
    while True:
        try:
            data = await stream.receive_some(RECEIVE_BYTES)
        except _STREAM_ERRORS as exc:
            raise TransportClosed(f"handshake failed: {_describe(exc)}") from None
        if not data:
            if rejected is not None:
                raise UpgradeRejected(rejected.status_code,
                                      body[:REJECT_BODY_BYTES].decode("utf-8", "replace"))
            raise TransportClosed("handshake failed: connection closed during the upgrade")
        data = bytes(data)
        if rejected is None:
            blank = _HEAD_END.search(seen + data)
            if blank is not None:
                cut = blank.end() - len(seen)
                data, frames = data[:cut], data[cut:]
            seen = (seen + data)[-2:]
        try:
            protocol.receive_data(data)
            events = list(protocol.handshake.events())
            if frames and rejected is None and not any(
                    isinstance(e, AcceptConnection) for e in events):
                # Not a 101: what followed the head is the body of the refusal.
                protocol.receive_data(frames)
                events += protocol.handshake.events()
                frames = b""
        except ProtocolError as exc:
            raise TransportClosed(f"handshake failed: {exc}") from None
        for event in events:
            if isinstance(event, AcceptConnection):
                if frames:
                    client._split(frames)  # frames that came with the 101
                return client
            if isinstance(event, RejectConnection):
                rejected = event
                if not event.has_body:
                    raise UpgradeRejected(event.status_code)
            elif isinstance(event, RejectData):
                body += event.data
                if rejected is not None and (event.body_finished
                                             or len(body) >= REJECT_BODY_BYTES):
                    raise UpgradeRejected(
                        rejected.status_code,
                        body[:REJECT_BODY_BYTES].decode("utf-8", "replace"))


def stream_proxy(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTPS_PROXY for wss://, HTTP_PROXY for
    ws://, unless NO_PROXY covers its host), credentials included; None if none. The
    stream goes through it as REST (httpx) does: an HTTP CONNECT tunnel."""
    parts = urlsplit(url)
    proxy = getproxies().get("https" if parts.scheme == "wss" else "http")
    if not proxy or not parts.hostname or proxy_bypass(parts.hostname):
        return None
    return proxy


def shown_proxy(proxy: str) -> str:
    """`proxy` without its credentials, for logs and reasons."""
    shown = urlsplit(proxy)
    return urlunsplit(shown._replace(netloc=shown.netloc.rpartition("@")[2]))


async def _tunnel(proxy: str, host: str, port: int) -> trio.SocketStream:
    """A TCP stream to `host:port` through the HTTP proxy `proxy` (`CONNECT`, with Basic
    credentials when its URL holds them). The proxy's refusal is a `TransportClosed`
    naming the proxy (never its credentials) and what it answered."""
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    name = shown_proxy(proxy)
    if parts.scheme != "http" or not parts.hostname:
        raise TransportClosed(f"proxy {name}: only an http:// proxy can carry the stream")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port or 80)
    try:
        target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            request += f"Proxy-Authorization: Basic {b64encode(pair.encode()).decode()}\r\n"
        await stream.send_all((request + "\r\n").encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise TransportClosed(f"proxy {name} closed the connection before answering "
                                      "CONNECT")
            head += chunk
            if len(head) > PROXY_ANSWER_BYTES:
                raise TransportClosed(f"proxy {name} answered CONNECT with more than "
                                      f"{PROXY_ANSWER_BYTES} bytes of head")
        status, _, after = head.partition(b"\r\n\r\n")
        line = status.split(b"\r\n", 1)[0]
        fields = line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or fields[1] != b"200":
            raise TransportClosed(f"proxy {name} refused CONNECT {target}: "
                                  f"{line[:120].decode('latin-1')}")
        if after:  # nothing may come before our side speaks (TLS, or the upgrade)
            raise TransportClosed(f"proxy {name} sent data ahead of the tunnel")
    except BaseException:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
        raise
    return stream


def websocket_connector(
    *,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 2.0,
    max_message_size: int = TRANSPORT_MAX_MESSAGE,
) -> Connector:
    """A `Connector` over `wsclient`; TLS for wss:// comes from the system store.
    `max_message_size` is the decoder's frame limit (`STREAM_SUPERVISOR_MAX_FRAME_BYTES`):
    a longer message reaches the decoder cut to that plus one byte.

    On leaving, the close handshake gets `disconnect_timeout` (a tenth of it when the
    caller is already cancelled: a drain should not wait on a peer that went quiet),
    then the stream is closed whatever happened.
    """

    @asynccontextmanager
    async def connect(url: str) -> AsyncIterator[WebSocket]:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise TransportClosed(f"not a WebSocket URL: {url!r}")
        host = parts.hostname
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        stream: trio.abc.Stream
        proxy = stream_proxy(url)
        try:
            with trio.fail_after(connect_timeout):
                if proxy is not None:
                    # Through the proxy the environment names, as REST goes (httpx).
                    stream = await _tunnel(proxy, host, port)
                    if secure:  # the TLS handshake happens with the upgrade, as direct
                        stream = trio.SSLStream(stream, ssl.create_default_context(),
                                                server_hostname=host, https_compatible=True)
                elif secure:
                    stream = await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=ssl.create_default_context(),
                        https_compatible=True)
                else:
                    stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise TransportClosed("connect timeout" + (
                f" (through proxy {shown_proxy(proxy)})" if proxy else "")) from None
        except (OSError, trio.BrokenResourceError) as exc:
            via = f" (through proxy {shown_proxy(proxy)})" if proxy else ""
            raise TransportClosed(f"connect failed{via}: {_describe(exc)}") from None
        try:
            try:
                with trio.fail_after(connect_timeout):
                    client = await open_websocket(
                        stream, host if parts.port is None else f"{host}:{port}", resource,
                        max_message_size=max_message_size)
            except trio.TooSlowError:
                raise TransportClosed("handshake timeout") from None
            try:
                yield client
            finally:
                cancelled = trio.current_effective_deadline() == float("-inf")
                with trio.move_on_after(
                        disconnect_timeout / 10 if cancelled else disconnect_timeout,
                        shield=True):
                    await client.aclose()
        finally:
            with trio.move_on_after(disconnect_timeout, shield=True):
                await stream.aclose()

    return connect
