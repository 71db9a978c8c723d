"""One client's `trade_updates` session on the simulated broker, with stream faults.

Written against `SessionTransport`, three methods, so the same logic runs over a real
trio-websocket connection (`server.py`) or an in-memory pair in a deterministic test.
It reaches the broker only through its feeds (`feeds.py`), never the broker itself.
"""

from __future__ import annotations

import hmac
import itertools
import json
from typing import Any, Final, Protocol, runtime_checkable

import structlog
import trio

from .chaos import (
    POISON_KINDS,
    malformed_frame,
    oversized_frame,
    poison_frame,
    unknown_event_frame,
)
from .feeds import Feeds
from .wire import uuid4

log = structlog.get_logger("stream_supervisor.testing.broker")

AUTH_TIMEOUT: Final = 30.0
"""Seconds a client has to authenticate after the upgrade."""
SEND_TIMEOUT: Final = 30.0
"""A peer that accepts nothing for this long is reset as a slow consumer."""
CLOSE_TIMEOUT: Final = 2.0
"""Wait this long for a clean close handshake, then reset."""
REORDER_LINGER: Final = 0.05
"""With `reorder_window`, wait this long for a window to fill before shuffling it."""

_session_ids = itertools.count(1)


class SessionClosed(Exception):
    """The peer went away, or the transport is already closed."""


class SessionTransport(Protocol):
    """What a session needs from one client connection."""

    async def get_message(self) -> str | bytes:
        """The next message; raises `SessionClosed` when the peer went away."""
        ...

    async def send_message(self, data: str | bytes) -> None:
        """Send one message (bytes: a binary frame, str: a text frame)."""
        ...

    async def aclose(self, *, abrupt: bool = False) -> None:
        """Close cleanly, or with `abrupt=True` drop the connection as a TCP reset."""
        ...


@runtime_checkable
class PausableTransport(Protocol):
    """Optional: a transport that can stop reading at the socket, so pings go unanswered.

    Without it a stall still stops our reads and sends; with it the peer also sees no
    pongs, which is what a half-open connection looks like.
    """

    def pause_reading(self) -> None: ...


async def handle_session(
    conn: SessionTransport, feeds: Feeds, *, key_id: str, secret_key: str
) -> None:
    """Serve one client connection (after `feeds.admit()`, or directly on an in-memory
    transport): authenticate it with these keys, answer `listen`, stream live updates
    until either side goes away. A second concurrent session is refused: closed at once."""
    token = feeds.claim_slot()
    if token is None:
        await conn.aclose()
        return
    try:
        await _Session(conn, feeds, key_id, secret_key).run()
    finally:
        feeds.release_slot(token)


class _Session:
    def __init__(self, conn: SessionTransport, feeds: Feeds, key_id: str, secret_key: str) -> None:
        self.feeds = feeds
        self.market = feeds.market
        self.conn = conn
        self._key_id = key_id
        self._secret_key = secret_key
        self.chaos = feeds.chaos
        self.stats = feeds.stats
        self.id = next(_session_ids)
        self.log = log.bind(session=self.id)
        self._closing = False
        self._feed: trio.MemorySendChannel[int] | None = None
        self._feed_out: trio.MemoryReceiveChannel[int] | None = None
        self._feed_ready = trio.Event()
        self._replay: list[int] = []
        self._replayed = False
        self._nursery: trio.Nursery | None = None
        self._reader_scope = trio.CancelScope()

    async def run(self) -> None:
        self.stats["connections"] += 1
        self.log.debug("sim_session_open")
        try:
            if not await self._authenticate():
                return
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_loop)
                nursery.start_soon(self._send_loop)
        finally:
            self._unsubscribe()
            if not self._closing:
                self._closing = True
                # Our own cancellation (server shutdown) still closes the socket, briefly.
                with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await self.conn.aclose()
            self.log.debug("sim_session_closed")

    # --- control messages

    async def _authenticate(self) -> bool:
        raw: str | bytes | None = None
        with trio.move_on_after(AUTH_TIMEOUT):
            try:
                raw = await self.conn.get_message()
            except SessionClosed:
                self._peer_gone()
                return False
        if raw is None:
            await self._close()
            return False
        message = _parse(raw) or {}
        data = message.get("data")
        if not isinstance(data, dict):
            data = {}
        # Compare both secrets every time: no early exit to time which one was wrong.
        key_ok = _same(data.get("key_id"), self._key_id)
        secret_ok = _same(data.get("secret_key"), self._secret_key)
        ok = message.get("action") == "authenticate" and key_ok and secret_ok
        if not ok:
            self.stats["auth_failed"] += 1
            self.log.info("sim_auth_failed")  # never the offered key: it may be a real one
            reply = {
                "action": "authenticate",
                "message": "access key verification failed",
                "status": "unauthorized",
            }
            await self._control({"stream": "authorization", "data": reply})
            await self._close()
            return False
        self.stats["auth_ok"] += 1
        reply = {"status": "authorized", "action": "authenticate"}
        return await self._control({"stream": "authorization", "data": reply})

    async def _read_loop(self) -> None:
        with self._reader_scope:
            while True:
                try:
                    # No deadline: a listening client has nothing more to say, and the
                    # transport's ping/pong (or the peer's close) ends a dead session.
                    raw = await self.conn.get_message()
                except SessionClosed:
                    self._peer_gone()
                    return
                message = _parse(raw)
                if message is None or message.get("action") != "listen":
                    continue  # the real stream ignores what it does not understand
                data = message.get("data")
                streams = data.get("streams") if isinstance(data, dict) else None
                wanted = (
                    [s for s in streams if s == "trade_updates"]
                    if isinstance(streams, list)
                    else []
                )
                # Subscribe before replying, so an update the market makes while the
                # reply is in flight is queued, not lost; the send loop starts only
                # once the reply went out, so no update precedes "listening".
                if wanted:
                    self._subscribe()
                    if self.chaos.config.replay_before_listening and not await self._replay_now():
                        return
                else:
                    self._unsubscribe()
                if not await self._control({"stream": "listening", "data": {"streams": wanted}}):
                    return
                self.stats["listen"] += 1
                if wanted:
                    self._feed_ready.set()

    async def _replay_now(self) -> bool:
        """The replay, sent at once (ahead of the `listening` reply); False if the
        connection went meanwhile."""
        replay, self._replay = self._replay, []
        for index in replay:
            if not await self._send(self.market.frame(index)):
                return False
            self.feeds.mark_sent(index)
            self.stats["replay_frames"] += 1
            self.stats["frames_before_listening"] += 1
        return True

    def _subscribe(self) -> None:
        if self._feed is not None:
            return
        if not self._replayed and self.chaos.config.replay_on_connect > 0:
            self._replay = self.feeds.sent_indices(self.chaos.config.replay_on_connect)
        self._replayed = True
        self._feed, self._feed_out = self.feeds.open_feed()

    def _unsubscribe(self) -> None:
        if self._feed is not None:
            self.feeds.close_feed(self._feed)
            self._feed = None

    # --- updates

    async def _send_loop(self) -> None:
        await self._feed_ready.wait()
        for index in self._replay:
            if not await self._send(self.market.frame(index)):
                return
            self.feeds.mark_sent(index)
            self.stats["replay_frames"] += 1
        while True:
            feed = self._feed_out
            assert feed is not None
            batch = await self._gather(feed)
            if not batch:
                if feed is not self._feed_out:
                    continue  # the client listened again meanwhile: a fresh feed
                if self._feed is None:
                    # The client listened to nothing: wait for it to listen again.
                    self._feed_ready = trio.Event()
                    await self._feed_ready.wait()
                    continue
                self.log.info("sim_slow_consumer_reset")
                await self._drop(abrupt=True)
                return
            self.chaos.shuffle(batch)
            for index in batch:
                if not await self._send_update(index):
                    return

    async def _gather(self, feed: trio.MemoryReceiveChannel[int]) -> list[int]:
        """The next update, or with `reorder_window` a window of them; [] at end of feed."""
        try:
            batch = [await feed.receive()]
        except trio.EndOfChannel:
            return []
        window = self.chaos.config.reorder_window
        if window > 1:
            with trio.move_on_after(REORDER_LINGER):
                while len(batch) < window:
                    try:
                        batch.append(await feed.receive())
                    except trio.EndOfChannel:
                        break
        return batch

    async def _send_update(self, index: int) -> bool:
        """Send one update with its faults; False once the session is over."""
        market, chaos = self.market, self.chaos
        if market.update(index)["event"] == "partial_fill" and chaos.skip_partial():
            self.stats["skipped_partials"] += 1
            return True
        kind = chaos.injection()
        if kind is not None and not await self._inject(kind, index):
            return False
        if delay := chaos.delay():
            await trio.sleep(delay)
        if stall := chaos.stall():
            await self._stall(stall)
            return False
        frame = market.frame(index)
        copies = chaos.copies()
        if not await self._send(frame):
            return False
        self.feeds.mark_sent(index)
        self.stats["update_frames"] += 1
        frame_index = self.stats["update_frames"] - 1
        for _ in range(copies - 1):
            if not await self._send(frame):
                return False
            self.stats["dup_frames"] += 1
        if chaos.disconnect_after(frame_index):
            self.feeds.begin_outage()
            await self._drop(abrupt=chaos.abrupt())
            return False
        return True

    async def _inject(self, kind: str, index: int) -> bool:
        market, rng = self.market, self.chaos.stream_rng
        if kind in ("unknown_event", "oversized"):
            order = market.sample_order(rng) or market.update(index)["order"]
            now = market.current_time_text()
            if kind == "unknown_event":
                frame = unknown_event_frame(order, now, str(uuid4(rng)))
            else:
                frame = oversized_frame(order, now, self.chaos.config.oversized_bytes)
        elif kind in POISON_KINDS:
            frame = poison_frame(kind, rng, market.now_ns)
        else:
            frame = malformed_frame(kind, rng, market.frame(index))
        self.feeds.injected[kind] += 1
        self.stats["injected_frames"] += 1
        sent = await self._send(frame)
        if sent and kind in POISON_KINDS:
            self.feeds.poisons_sent.append((kind, frame))
        return sent

    async def _send(self, frame: bytes) -> bool:
        payload: str | bytes = frame
        text = self.chaos.as_text()
        if text:
            payload = frame.decode("utf-8", errors="replace")
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            try:
                await self.conn.send_message(payload)
            except SessionClosed:
                self._peer_gone()
                return False
        if scope.cancelled_caught:
            self.stats["slow_consumer_drops"] += 1
            await self._drop(abrupt=True)
            return False
        self.stats["frames_sent"] += 1
        if text:
            self.stats["text_frames"] += 1
        return True

    async def _control(self, message: dict[str, Any]) -> bool:
        """Send a protocol reply: binary, like every frame of the real stream."""
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                await self.conn.send_message(json.dumps(message, separators=(",", ":")).encode())
                return True
            except SessionClosed:
                self._peer_gone()
                return False
        await self._drop(abrupt=True)
        return False

    # --- endings

    async def _stall(self, seconds: float) -> None:
        """Play a half-open peer: no reads, no pongs, no sends; then reset."""
        self.stats["stalls"] += 1
        self.log.info("sim_stall", seconds=seconds)
        self._reader_scope.cancel()
        if isinstance(self.conn, PausableTransport):
            self.conn.pause_reading()
        await trio.sleep(seconds)
        await self._drop(abrupt=True)

    async def _drop(self, *, abrupt: bool) -> None:
        """Server-side disconnect (a fault, or a slow consumer)."""
        self.stats["disconnects"] += 1
        if abrupt:
            self.stats["abrupt_disconnects"] += 1
        self.log.info("sim_disconnect", abrupt=abrupt)
        await self._close(abrupt=abrupt)

    async def _close(self, *, abrupt: bool = False) -> None:
        self._closing = True
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.conn.aclose(abrupt=abrupt)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _peer_gone(self) -> None:
        if not self._closing:
            self._closing = True
            self.stats["client_disconnects"] += 1
            self.log.debug("sim_client_disconnected")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _parse(raw: str | bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _same(offered: object, expected: str) -> bool:
    if not isinstance(offered, str):
        return False
    return hmac.compare_digest(offered.encode(), expected.encode())

