"""The connection actor: connect, authenticate, listen, recover, stream; forever.

It owns the socket session only. On every (re)connect, once `listening` is confirmed,
live frames start filling a bounded buffer while gap recovery (`recovery.py`) brings
back over REST what the stream missed; then the buffer and the live stream are
forwarded. Socket failures are handled here with exponential backoff and full jitter;
they never restart the rest of the pipeline. `unauthorized` is fatal.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import trio
from prometheus_client import Counter

from .backoff import Backoff, BackoffPolicy
from .bounds import not_after_ns
from .channels import drain, send_soon
from .dedupe import FrameMemo
from .errors import (
    FATAL,
    BrokerUnavailable,
    DecodeError,
    ProtocolViolation,
    TransportClosed,
    Unauthorized,
    UpgradeRejected,
    collapse,
)
from .events import DeadLetter, Event
from .heap import release_after_settling
from .logs import get_logger
from .messages import Item
from .metrics import Metrics
from .protocol import (
    Authorization,
    ErrorReply,
    Listening,
    authenticate_message,
    decode_frame,
    listen_message,
)
from .recovery import LIVE_OVERLAP_NS, GapRecovery
from .settings import DEFAULT_CHANNEL_SIZE, DEFAULT_LIVE_BUFFER, Settings
from .state import SupervisorState
from .transport import Connector, WebSocket

log = get_logger("stream_supervisor.connection")

#: Live frames held while recovery runs, by default (`Settings.live_buffer`). If
#: recovery is still running when it is full, the connection is dropped on purpose and
#: REST covers the range on the next one (docs/design.md, section 12).
LIVE_BUFFER = DEFAULT_LIVE_BUFFER
#: Frames read ahead of the pipeline once streaming, in channels' worth
#: (`Settings.channel_size` each); full, the reader waits (backpressure). Not the live
#: buffer: a stream faster than the writer would otherwise keep up to `live_buffer`
#: decoded updates in memory for as long as it lasts (about 60 MB at the default). Five
#: channels (10,000 frames, ~5 MB): decoding that far ahead while the writer waits for
#: the database made a duplicate-heavy stream 5-11% faster than one channel did
#: (BENCHMARKS.md).
STREAM_BUFFER_CHANNELS = 5
STREAM_BUFFER = STREAM_BUFFER_CHANNELS * DEFAULT_CHANNEL_SIZE
#: What is kept of a message in which the broker says why it refuses or drops us.
BROKER_TEXT_BYTES = 200
#: The broker's words for "one connection per account, and you have one": waited out
#: like an upgrade refused with 429 (the rate-limit floor), whatever shape they come in.
_CONNECTION_LIMIT = "connection limit exceeded"


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    stream_url: str
    key_id: str
    secret_key: str
    ping_interval: float
    ping_timeout: float
    handshake_timeout: float
    backoff: BackoffPolicy
    max_frame_bytes: int
    #: Updates stamped more than this ahead of the wall clock are dead-lettered.
    future_tolerance: float
    live_buffer: int = LIVE_BUFFER
    stream_buffer: int = STREAM_BUFFER

    @classmethod
    def from_settings(cls, s: Settings) -> ConnectionSettings:
        return cls(
            stream_url=s.stream_url,
            key_id=s.key_id,
            secret_key=s.secret_key,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            handshake_timeout=s.connect_timeout,
            backoff=s.backoff,
            max_frame_bytes=s.max_frame_bytes,
            future_tolerance=s.future_tolerance,
            live_buffer=s.live_buffer,
            stream_buffer=STREAM_BUFFER_CHANNELS * s.channel_size,
        )


class ConnectionActor:
    """One instance per pipeline; `run` is the actor. Collaborators are passed in."""

    def __init__(
        self,
        settings: ConnectionSettings,
        connector: Connector,
        recovery: GapRecovery,
        outbox: trio.MemorySendChannel[Item],
        metrics: Metrics,
        state: SupervisorState,
        *,
        rng: random.Random | None = None,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
        frames: FrameMemo | None = None,
    ) -> None:
        self.settings = settings
        self.wallclock = wallclock
        self.connector = connector
        self.recovery = recovery
        self.outbox = outbox
        self.metrics = metrics
        self.state = state
        self.backoff = Backoff(settings.backoff, rng)
        self._end_reason: str | None = None  # why the current connection ended
        self._broker_said: str | None = None  # the broker's last error text, this connection
        self._recv_scope: trio.CancelScope | None = None
        self._recovery_scope: trio.CancelScope | None = None
        self._listening_ns = 0  # wall clock at `listening`, epoch ns
        self._early: list[Item] = []  # updates that came before `listening`
        self._live_from_ns: int | None = None  # broker time of the first live fill
        # Set once recovery is done: from then on the reader queues on the stream buffer.
        self._stream: trio.MemorySendChannel[Item] | None = None
        self._received: dict[str, Counter] = {}  # label children, looked up once
        self._wall_offset_ns = 0  # wall clock minus Trio's, epoch ns
        #: Frames already decoded, by their bytes: once streaming, a byte-identical copy
        #: of one whose key the dedupe actor holds is dropped undecoded (dedupe.FrameMemo).
        self.frames = frames
        self._dropped: dict[str, Counter] = {}  # duplicates_dropped children, by layer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect forever. `task_status.started()` fires on the first `listening`."""
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        async with self.outbox:
            while True:
                self.state.connection_id += 1
                self.state.connection = "connecting"
                self.state.caught_up = False
                log.info("connecting", url=self.settings.stream_url,
                         connection_id=self.state.connection_id)
                connected_at: float | None = None
                rate_limited = False
                self._broker_said = None
                try:
                    try:
                        async with self.connector(self.settings.stream_url) as ws:
                            await self._handshake(ws)
                            connected_at = trio.current_time()
                            mark_started()
                            try:
                                await self._session(ws)
                            finally:
                                if self.frames is not None:
                                    self.frames.session_ended()
                    except BaseExceptionGroup as group:
                        raise collapse(group, prefer=FATAL) from None
                    reason = "closed by server"
                except UpgradeRejected as exc:
                    rate_limited = exc.status_code == 429
                    reason = f"upgrade rejected {exc.status_code}"
                    if exc.body.strip():
                        self._broker_said = self._broker_text(exc.body)
                except TransportClosed as exc:
                    reason = exc.reason
                except ProtocolViolation as exc:
                    reason = f"protocol: {exc}"
                except trio.TooSlowError:
                    reason = "handshake timeout"
                except (BrokerUnavailable, DecodeError) as exc:
                    reason = f"backfill failed: {exc}"[:300]
                said = self._broker_said
                if said is not None:
                    # What the broker said before it refused or dropped us: often the
                    # only word on why (a close frame's reason is usually empty).
                    if said not in reason:
                        reason = f"{reason}: {said}" if reason.startswith(
                            "upgrade rejected") else f"{reason} (broker said: {said})"
                    rate_limited = rate_limited or _CONNECTION_LIMIT in said.lower()
                self.state.connection = "backoff"
                self.state.caught_up = False
                self.state.last_disconnect_reason = reason
                label = "rate_limited" if rate_limited else _reason_label(reason)
                self.metrics.reconnects.labels(label).inc()
                if connected_at is not None:
                    self.backoff.connection_ended(trio.current_time() - connected_at)
                delay = self.backoff.next_delay(rate_limited=rate_limited)
                log.warning("disconnected", reason=reason, connection_id=self.state.connection_id)
                log.info("backoff", delay=round(delay, 3), attempt=self.backoff.attempt,
                         rate_limited=rate_limited)
                await trio.sleep(delay)

    def _not_after_ns(self) -> int:
        """The latest update timestamp accepted now (wall clock plus the tolerance)."""
        return not_after_ns(self.wallclock(), self.settings.future_tolerance)

    async def _handshake(self, ws: WebSocket) -> None:
        s = self.settings
        self._early = []
        with trio.fail_after(s.handshake_timeout):
            await ws.send_message(authenticate_message(s.key_id, s.secret_key))
            while True:
                message = await ws.get_message()
                reply = decode_frame(message, max_bytes=s.max_frame_bytes)
                if isinstance(reply, Authorization):
                    if not reply.authorized:
                        raise Unauthorized(
                            "the broker stream refused the credentials (unauthorized"
                            + (f": {reply.message}" if reply.message else "")
                            + "): check APCA_API_KEY_ID and APCA_API_SECRET_KEY, and that "
                            "APCA_API_BASE_URL (or APCA_API_STREAM_URL) is the broker "
                            "they are for (paper keys on the live URL are refused)"
                        )
                    break
                if isinstance(reply, ErrorReply):
                    self._broker_error(reply.message, "authenticate")
                    raise ProtocolViolation(f"error during authentication: {reply.message}")
                # Anything else before the authorization is the broker's (in another
                # shape: `[{"T":"error","code":406,"msg":"connection limit exceeded"}]`),
                # the only word on why it closes next.
                self._broker_error(message, "authenticate")
            self.state.connection = "authorized"
            log.info("authorized", connection_id=self.state.connection_id)
            await ws.send_message(listen_message())
            while True:
                # Received now, as the reader stamps what it reads (`_read_into`): an
                # update kept for the live buffer tells recovery when it arrived.
                reply = decode_frame(await ws.get_message(), received_at=trio.current_time(),
                                     max_bytes=s.max_frame_bytes,
                                     not_after_ns=self._not_after_ns())
                if isinstance(reply, Listening):
                    if "trade_updates" not in reply.streams:
                        raise ProtocolViolation(f"listening to {reply.streams}, not trade_updates")
                    break
                if isinstance(reply, ErrorReply):
                    self._broker_error(reply.message, "listen")
                    raise ProtocolViolation(f"error during listen: {reply.message}")
                if isinstance(reply, Event | DeadLetter):
                    # An update racing the listen reply: real data, kept for the live
                    # buffer (`_session`), where it waits for recovery like any update
                    # read while recovery runs. Forwarded now, ahead of the backfill,
                    # its fill could be committed first and move the cursor past the
                    # fills REST has not brought back yet.
                    self._early.append(reply)
        self.state.connection = "listening"
        self._listening_ns = int(self.wallclock().timestamp() * 1e9)
        self._live_from_ns = None
        log.info("listening", connection_id=self.state.connection_id)

    async def _session(self, ws: WebSocket) -> None:
        """Read, ping and recover until the connection fails.

        Frames read while recovery runs wait in the live buffer (`live_buffer` of them at
        most), behind any update that came before `listening`; once it is done they are
        forwarded, then what the reader queues on the
        stream buffer (`stream_buffer`, a channel's size: the reader waits when it is full).
        Frames already read are never dropped once recovery is done: when the socket
        fails, the reader stops and closes both buffers, and everything in them is still
        forwarded before the session ends. If the socket fails (or the buffer overflows)
        while recovery runs, recovery stops at once with what it committed so far, and
        buffered updates are let go: forwarding them would move the cursor past fills REST
        has not brought back yet, and the next recovery reads them (docs/design.md,
        section 12).
        """
        send_live, receive_live = trio.open_memory_channel[Item](self.settings.live_buffer)
        send_stream, receive_stream = trio.open_memory_channel[Item](
            min(self.settings.stream_buffer, self.settings.live_buffer))
        self._end_reason = None
        self._recv_scope = None
        self._stream = None
        # What came before `listening` is first in the live buffer, ahead of everything
        # read after it (a handshake's worth: beyond a full buffer, an update would be
        # one older than the connection, which recovery reads from REST anyway).
        early, self._early = self._early, []
        for item in early[:self.settings.live_buffer]:
            send_live.send_nowait(item)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, ws, send_live, send_stream)
            nursery.start_soon(self._ping, ws)
            async with receive_live, receive_stream:
                self.state.connection = "backfilling"
                recovered = False
                with trio.CancelScope() as scope:
                    self._recovery_scope = scope
                    try:
                        if self._end_reason is None:
                            await self.recovery.backfill(
                                lambda: self._live_from_ns,
                                lambda: (receive_live.statistics().current_buffer_used,
                                         self.settings.live_buffer))
                            recovered = True
                    finally:
                        self._recovery_scope = None
                if not recovered:
                    await self._let_go_of_updates(receive_live)
                else:
                    # No checkpoint between the end of recovery and this switch: every
                    # frame read before it is in the live buffer, every one after it on
                    # the stream buffer, and the live buffer is forwarded first.
                    self._stream = send_stream
                    self.state.caught_up = True
                    self.state.connection = "streaming"
                    if self.recovery.settings.order_refresh_interval > 0:
                        nursery.start_soon(self.recovery.refresh_periodically)
                    # Replays come on connect, into the live buffer while recovery reads:
                    # an update there stamped before `listening` (plus the clock margin)
                    # is older than the connection. What comes on the stream buffer is
                    # live, whatever its stamp says: a broker clock behind ours must not
                    # make every update a REST read.
                    stale_before = self._listening_ns + LIVE_OVERLAP_NS
                    self._note_wall_offset()
                    while True:  # nothing joins the live buffer any more
                        try:
                            item = receive_live.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        await self._forward(item, stale_before=stale_before)
                    # The orders replays left not terminal are read in the background,
                    # as the periodic refresh reads: live updates flow meanwhile, and the
                    # snapshots land among them, which `merge_status` orders. Waiting for
                    # the reads held every live update behind them, a REST request each
                    # at the recovery's paced share of the budget (BENCHMARKS.md, "Many
                    # accounts").
                    nursery.start_soon(self.recovery.recheck_stale)
                    # The live buffer is freed: give its memory back (heap.py).
                    nursery.start_soon(release_after_settling)
                    outbox = self.outbox
                    observe = self.recovery.observe_live
                    async for first in receive_stream:
                        self._note_wall_offset()
                        offset = self._wall_offset_ns
                        # Whatever else is already buffered goes in the same turn, and
                        # without a coroutine per item while the outbox has room
                        # (`_observe_live`, inlined: every update passes here).
                        for item in drain(first, receive_stream):
                            if isinstance(item, Event):
                                observe(item, int(item.received_at * 1e9) + offset)
                            try:
                                outbox.send_nowait(item)
                            except trio.WouldBlock:
                                await outbox.send(item)
            # The reader closed both channels: the connection is gone.
            nursery.cancel_scope.cancel()
        raise TransportClosed(self._end_reason or "closed by server")

    async def _let_go_of_updates(self, live: trio.MemoryReceiveChannel[Item]) -> None:
        """Recovery was cut short: keep the dead letters, let the updates go. Not only
        fills: a `canceled` carrying a cumulative quantity above ours applies the fills it
        implies, and applied ahead of the fills REST has yet to bring back for the same
        symbol it would reorder the position's history."""
        dropped = 0
        async for item in live:
            if isinstance(item, Event):
                dropped += 1
                continue
            await self._forward(item)
        log.warning("recovery_interrupted", reason=self._end_reason,
                    live_updates_left_to_rest=dropped, connection_id=self.state.connection_id)

    def _end(self, reason: str) -> None:
        """The connection is over: say why, and stop a recovery in progress at once."""
        if self._end_reason is None:
            self._end_reason = reason
        if self._recovery_scope is not None:
            self._recovery_scope.cancel()

    async def _read(self, ws: WebSocket, live: trio.MemorySendChannel[Item],
                    stream: trio.MemorySendChannel[Item]) -> None:
        max_bytes = self.settings.max_frame_bytes
        try:
            async with stream:
                await self._read_into(ws, live, max_bytes)
        finally:
            # Closure noticed at once, also by a recovery in progress.
            self._end(self._end_reason or "closed by server")

    async def _read_into(self, ws: WebSocket, live: trio.MemorySendChannel[Item],
                         max_bytes: int) -> None:
        async with live:
            while self._end_reason is None:
                # Only the wait for the next read is cancellable (by the pinger giving
                # up on a silent peer); a frame once read always reaches the buffer.
                with trio.CancelScope() as self._recv_scope:
                    try:
                        messages = await ws.get_messages()
                    except TransportClosed as exc:
                        self._end_reason = exc.reason
                        return
                if self._recv_scope.cancelled_caught:
                    return
                now = trio.current_time()
                self.state.beat("connection", now)
                latest = self._not_after_ns()  # once per read, not per frame
                received: dict[str, int] = {}  # per event type, counted once per read
                # Frames that decode to an update are remembered by their bytes, also
                # while recovery runs; once streaming (recovery done: from here on only
                # the pipeline reads an update), a duplicate known by its bytes is
                # dropped. Only while duplicates come: remembering costs fresh frames.
                remember = self.frames
                if remember is not None and not remember.active(len(messages)):
                    remember = None
                memo = remember if self._stream is not None else None
                dropped: dict[str, int] = {}  # by layer, counted once per read
                try:
                    for message in messages:
                        if memo is not None and isinstance(message, bytes):
                            known = memo.duplicate(message)
                            if known is not None:
                                layer, event = known
                                dropped[layer] = dropped.get(layer, 0) + 1
                                received[event] = received.get(event, 0) + 1
                                continue
                        frame = decode_frame(message, received_at=now, max_bytes=max_bytes,
                                             not_after_ns=latest)
                        if isinstance(frame, Event):
                            received[frame.event] = received.get(frame.event, 0) + 1
                            if remember is not None:
                                remember.remember(frame.raw, frame.key, frame.event)
                            if self._live_from_ns is None and frame.is_fill:
                                # Never before `listening`: the first fill may be a
                                # replay of an older one.
                                self._live_from_ns = max(frame.ts_ns, self._listening_ns)
                            stream = self._stream
                            if stream is not None:
                                if memo is not None:
                                    # A copy read before the dedupe actor has it is then
                                    # dropped by its bytes, not decoded (dedupe.FrameMemo).
                                    memo.forwarded(frame.key)
                                # Streaming, with room: no coroutine per frame.
                                try:
                                    stream.send_nowait(frame)
                                    continue
                                except trio.WouldBlock:
                                    pass
                            if not await self._buffer(live, frame):
                                return
                        elif isinstance(frame, DeadLetter):
                            log.warning("frame_dead_lettered", reason=frame.reason,
                                        bytes=len(frame.payload))
                            if not await self._buffer(live, frame):
                                return
                        elif isinstance(frame, Authorization) and not frame.authorized:
                            raise Unauthorized(
                                "the broker revoked the stream's authorization")
                        elif isinstance(frame, ErrorReply):
                            # Usually followed by a close: its reason will say this too.
                            self._broker_error(frame.message, "streaming")
                        # Other control messages (a repeated `listening`, other streams)
                        # are ignored.
                finally:
                    self._count_received(received)
                    if dropped:
                        self._count_dropped(dropped)

    async def _buffer(self, live: trio.MemorySendChannel[Item], item: Item) -> bool:
        """Into the live buffer, or once streaming into the stream buffer. While recovery
        runs a full buffer ends the connection on purpose (False): waiting would stall the
        socket until the broker drops us anyway, and REST covers the range next time.
        While streaming, a full stream buffer is backpressure."""
        stream = self._stream
        if stream is not None:
            await send_soon(stream, item)
            return True
        if self._recovery_scope is None:
            await send_soon(live, item)
            return True
        try:
            live.send_nowait(item)
        except trio.WouldBlock:
            self._end(f"live buffer full ({self.settings.live_buffer}) during recovery")
            return False
        return True

    async def _ping(self, ws: WebSocket) -> None:
        """Half-open detection: a quiet stream is fine, a peer that ignores pings is not."""
        s = self.settings
        while self._end_reason is None:
            await trio.sleep(s.ping_interval)
            try:
                with trio.fail_after(s.ping_timeout):
                    await ws.ping()
            except trio.TooSlowError:
                self._end_reason = f"no pong within {s.ping_timeout}s"
                if self._recv_scope is not None:
                    self._recv_scope.cancel()
                return
            except TransportClosed:
                return  # the reader sees it too, and records why
            self.state.beat("connection", trio.current_time())

    def _broker_text(self, text: str | bytes) -> str:
        """The first `BROKER_TEXT_BYTES` of what the broker said, on one line, without
        our credentials (a broker may echo what it was sent)."""
        raw = text.encode("utf-8", "replace") if isinstance(text, str) else text
        said = " ".join(raw[:BROKER_TEXT_BYTES].decode("utf-8", "replace").split())
        for secret in (self.settings.key_id, self.settings.secret_key):
            if secret:
                said = said.replace(secret, "[REDACTED]")
        return said

    def _broker_error(self, text: str | bytes, phase: str) -> None:
        """The broker says why it refuses or drops us: logged, and kept for the reason
        the connection ends with."""
        said = self._broker_said = self._broker_text(text)
        log.warning("broker_error", message=said, phase=phase,
                    connection_id=self.state.connection_id)

    def _note_wall_offset(self) -> None:
        """Wall clock minus Trio's, once a turn: when each update of the turn came."""
        self._wall_offset_ns = (int(self.wallclock().timestamp() * 1e9)
                                - int(trio.current_time() * 1e9))

    def _observe(self, event: Event, stale_before: int) -> None:
        """Tell recovery about an update on its way to the pipeline. One from the live
        buffer stamped before `stale_before` (the connection's `listening` plus the clock
        margin) is older than the connection: its order is read again over REST if it
        leaves it not terminal (`recheck_stale`)."""
        if not stale_before:
            self.recovery.observe(event)
        elif event.ts_ns < stale_before:
            self.recovery.observe_stale(event)
        else:
            self._observe_live(event)

    def _observe_live(self, event: Event) -> None:
        """A live update after a completed recovery: it moves the stream's edge."""
        self.recovery.observe_live(event, int(event.received_at * 1e9) + self._wall_offset_ns)

    async def _forward(self, item: Item, *, stale_before: int = 0) -> None:
        """Put an item on the pipeline (`_observe` first if it is an update)."""
        if isinstance(item, Event):
            self._observe(item, stale_before)
        await send_soon(self.outbox, item)

    def _count_received(self, counts: dict[str, int]) -> None:
        for event, amount in counts.items():
            counter = self._received.get(event)
            if counter is None:
                counter = self._received[event] = self.metrics.events_received.labels(
                    event, "stream")
            counter.inc(amount)

    def _count_dropped(self, counts: dict[str, int]) -> None:
        """Duplicates dropped undecoded: in `duplicates_dropped` under the layer that
        knew their key, as the dedupe actor counts them, and in their own counter."""
        for layer, amount in counts.items():
            counter = self._dropped.get(layer)
            if counter is None:
                counter = self._dropped[layer] = self.metrics.duplicates_dropped.labels(layer)
            counter.inc(amount)
        self.metrics.duplicates_undecoded.inc(sum(counts.values()))


def _reason_label(reason: str) -> str:
    """Low-cardinality label for the reconnect metric."""
    if "pong" in reason:
        return "ping_timeout"
    if reason.startswith("upgrade rejected"):
        return "rejected"
    if "timeout" in reason:
        return "timeout"
    if reason.startswith("closed") or "closed by server" in reason:
        return "closed"
    return "error"
