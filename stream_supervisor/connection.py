"""The connection actor: connect, authenticate, listen, backfill, stream; forever.

On every (re)connect, once `listening` is confirmed, it pages the broker's FILL
activities from the durable cursor minus an overlap window (while live frames wait in a
bounded buffer), refreshes orders that changed while we were away, then forwards the
live stream. Socket failures are handled here with exponential backoff and full jitter;
they never restart the rest of the pipeline. `unauthorized` is fatal.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import msgspec
import trio
from prometheus_client import Counter

from .backoff import Backoff, BackoffPolicy
from .channels import drain, send_soon
from .errors import collapse
from .events import DeadLetter, Event, format_timestamp, parse_timestamp
from .ledger import Cursor, order_fills_by_cum_qty
from .logs import get_logger
from .metrics import Metrics
from .orders import TERMINAL_STATUSES, merge_status
from .protocol import (
    Authorization,
    DecodeError,
    ErrorReply,
    Listening,
    WireOrder,
    activity_to_event,
    authenticate_message,
    decode_frame,
    listen_message,
    snapshot_to_event,
)
from .rest import MAX_PAGE_SIZE, BrokerAuthError, BrokerRest, BrokerUnavailable
from .state import SupervisorState
from .transport import Connector, TransportClosed, UpgradeRejected, WebSocket

log = get_logger("stream_supervisor.connection")

Item = Event | DeadLetter
EASTERN = ZoneInfo("America/New_York")
#: Live frames held while backfill runs; beyond this the socket itself applies backpressure.
LIVE_BUFFER = 10_000
#: REST pages fetched per backfill at most (100 fills each): a runaway guard, not a limit
#: any real day reaches.
MAX_BACKFILL_PAGES = 10_000
#: Orders whose latest forwarded status the actor remembers for the reconnect refresh.
SEEN_ORDERS = 50_000
#: Each backfill page re-reads this much before the previous page's last activity.
PAGE_REREAD = timedelta(milliseconds=50)


class Unauthorized(Exception):
    """The broker refused our keys on the stream: a configuration error, never retried."""


class ProtocolViolation(Exception):
    """The server did not follow the handshake (treated like a dropped connection)."""


#: Errors that end the process instead of a reconnect: the operator must fix something.
FATAL: tuple[type[BaseException], ...] = (Unauthorized, BrokerAuthError)


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    stream_url: str
    key_id: str
    secret_key: str
    ping_interval: float = 15.0
    ping_timeout: float = 10.0
    handshake_timeout: float = 10.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    backfill_overlap: float = 300.0
    first_start_lookback: float | None = None  # None: start of today's US/Eastern session
    max_frame_bytes: int = 1_000_000
    backfill: bool = True
    #: While streaming, re-check orders we hold as not terminal this often: the stream
    #: can replay a stale update for an order that ended while we were away, and only
    #: REST tells us it ended.
    order_refresh_interval: float = 60.0


def trading_day_start(now: datetime) -> datetime:
    """Midnight US/Eastern of `now`'s Eastern date, in UTC: covers pre-market fills too."""
    local = now.astimezone(EASTERN)
    return datetime.combine(local.date(), time(0, 0), tzinfo=EASTERN).astimezone(UTC)


def backfill_start(
    cursor: Cursor | None,
    now: datetime,
    overlap: float,
    first_start_lookback: float | None,
) -> datetime:
    """Where REST backfill begins: the cursor minus the overlap, or the first-start lookback."""
    if cursor is not None and cursor.fill_time is not None:
        return cursor.fill_time - timedelta(seconds=overlap)
    if first_start_lookback is not None:
        return now - timedelta(seconds=first_start_lookback)
    return trading_day_start(now)


def sort_backfill(events: Sequence[Event]) -> list[Event]:
    """Distinct by key, in time order, each order's fills in cumulative order."""
    unique = {ev.key: ev for ev in events}
    by_time = sorted(unique.values(), key=lambda ev: (ev.ts_ns, ev.activity_id or ""))
    return order_fills_by_cum_qty(by_time)


class ConnectionActor:
    """One instance per pipeline; `run` is the actor. Collaborators are passed in."""

    def __init__(
        self,
        settings: ConnectionSettings,
        connector: Connector,
        rest: BrokerRest,
        outbox: trio.MemorySendChannel[Item],
        metrics: Metrics,
        state: SupervisorState,
        *,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        open_order_ids: Callable[[], Awaitable[Sequence[str]]] | None = None,
    ) -> None:
        self.settings = settings
        self.connector = connector
        self.rest = rest
        self.outbox = outbox
        self.metrics = metrics
        self.state = state
        self.wallclock = wallclock
        self.backoff = Backoff(settings.backoff, rng)
        self.open_order_ids = open_order_ids
        # Latest status of every order we forwarded in this life, so the refresh after a
        # reconnect also covers orders whose updates are still on their way to the store.
        self._seen_status: OrderedDict[str, str] = OrderedDict()
        self._end_reason: str | None = None  # why the current connection ended
        self._recv_scope: trio.CancelScope | None = None
        self._received: dict[tuple[str, str], Counter] = {}  # label children, looked up once

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
                try:
                    try:
                        async with self.connector(self.settings.stream_url) as ws:
                            await self._handshake(ws)
                            connected_at = trio.current_time()
                            mark_started()
                            await self._session(ws)
                    except BaseExceptionGroup as group:
                        raise collapse(group, prefer=FATAL) from None
                    reason = "closed by server"
                except UpgradeRejected as exc:
                    rate_limited = exc.status_code == 429
                    reason = f"upgrade rejected {exc.status_code}"
                except TransportClosed as exc:
                    reason = exc.reason
                except ProtocolViolation as exc:
                    reason = f"protocol: {exc}"
                except trio.TooSlowError:
                    reason = "handshake timeout"
                except (BrokerUnavailable, DecodeError) as exc:
                    reason = f"backfill failed: {exc}"[:300]
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

    async def _handshake(self, ws: WebSocket) -> None:
        s = self.settings
        with trio.fail_after(s.handshake_timeout):
            await ws.send_message(authenticate_message(s.key_id, s.secret_key))
            while True:
                reply = decode_frame(await ws.get_message(), max_bytes=s.max_frame_bytes)
                if isinstance(reply, Authorization):
                    if not reply.authorized:
                        raise Unauthorized(
                            "the broker stream refused the credentials (unauthorized"
                            + (f": {reply.message}" if reply.message else "")
                            + "): check APCA_API_KEY_ID and APCA_API_SECRET_KEY"
                        )
                    break
                if isinstance(reply, ErrorReply):
                    raise ProtocolViolation(f"error during authentication: {reply.message}")
            self.state.connection = "authorized"
            log.info("authorized", connection_id=self.state.connection_id)
            await ws.send_message(listen_message())
            while True:
                reply = decode_frame(await ws.get_message(), max_bytes=s.max_frame_bytes)
                if isinstance(reply, Listening):
                    if "trade_updates" not in reply.streams:
                        raise ProtocolViolation(f"listening to {reply.streams}, not trade_updates")
                    break
                if isinstance(reply, ErrorReply):
                    raise ProtocolViolation(f"error during listen: {reply.message}")
                if isinstance(reply, Event | DeadLetter):
                    # An update racing the listen reply: real data, keep it.
                    await self._forward(reply)
        self.state.connection = "listening"
        log.info("listening", connection_id=self.state.connection_id)

    async def _session(self, ws: WebSocket) -> None:
        """Read, ping and backfill until the connection fails.

        Frames already read are never dropped: when the socket fails, the reader stops
        and closes the live buffer, and everything in it is still forwarded before the
        session ends.
        """
        send_live, receive_live = trio.open_memory_channel[Item](LIVE_BUFFER)
        self._end_reason = None
        self._recv_scope = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, ws, send_live)
            nursery.start_soon(self._ping, ws)
            async with receive_live:
                if self.settings.backfill:
                    await self._backfill()
                self.state.caught_up = True
                self.state.connection = "streaming"
                if self.settings.order_refresh_interval > 0:
                    nursery.start_soon(self._periodic_refresh)
                async for first in receive_live:
                    # Whatever else is already buffered goes in the same turn.
                    for item in drain(first, receive_live):
                        await self._forward(item)
            # The reader closed the live channel: the connection is gone.
            nursery.cancel_scope.cancel()
        raise TransportClosed(self._end_reason or "closed by server")

    async def _read(self, ws: WebSocket, live: trio.MemorySendChannel[Item]) -> None:
        max_bytes = self.settings.max_frame_bytes
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
                received: dict[str, int] = {}  # per event type, counted once per read
                try:
                    for message in messages:
                        frame = decode_frame(message, received_at=now, max_bytes=max_bytes)
                        if isinstance(frame, Event):
                            received[frame.event] = received.get(frame.event, 0) + 1
                            await send_soon(live, frame)
                        elif isinstance(frame, DeadLetter):
                            log.warning("frame_dead_lettered", reason=frame.reason,
                                        bytes=len(frame.payload))
                            await send_soon(live, frame)
                        elif isinstance(frame, Authorization) and not frame.authorized:
                            raise Unauthorized(
                                "the broker revoked the stream's authorization")
                        # Other control messages (a repeated `listening`, other streams)
                        # are ignored.
                finally:
                    self._count_received_all(received, "stream")

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

    async def _forward(self, item: Item) -> None:
        if isinstance(item, Event):
            seen = self._seen_status
            seen[item.order_id] = merge_status(seen.get(item.order_id, item.status), item.status)
            seen.move_to_end(item.order_id)
            if len(seen) > SEEN_ORDERS:
                seen.popitem(last=False)
        await send_soon(self.outbox, item)

    def _count_received(self, event: str, source: str, amount: int = 1) -> None:
        counter = self._received.get((event, source))
        if counter is None:
            counter = self._received[(event, source)] = self.metrics.events_received.labels(
                event, source)
        counter.inc(amount)

    def _count_received_all(self, counts: dict[str, int], source: str) -> None:
        for event, amount in counts.items():
            self._count_received(event, source, amount)

    async def _backfill(self) -> None:
        """REST gap recovery from the durable cursor; feeds the same dedupe/writer path."""
        s = self.settings
        self.state.connection = "backfilling"
        start = backfill_start(
            self.state.committed_cursor, self.wallclock(), s.backfill_overlap,
            s.first_start_lookback,
        )
        log.info("backfill_started", after=format_timestamp(start),
                 connection_id=self.state.connection_id)
        events: list[Event] = []
        page_token: str | None = None
        pages = 0
        after = format_timestamp(start)
        seen: set[str] = set()
        while pages < MAX_BACKFILL_PAGES:
            page = await self.rest.fill_activities(
                after=after, page_token=page_token, page_size=MAX_PAGE_SIZE
            )
            pages += 1
            if not page:
                break
            fresh = [a for a in page if a.id not in seen]
            if not fresh:
                # Everything here was read already (the re-read window, or a short page):
                # step forward by id until something new or the end.
                page_token = page[-1].id
                continue
            for activity in fresh:
                seen.add(activity.id)
                try:
                    events.append(activity_to_event(activity))
                except (DecodeError, ValueError) as exc:
                    await self._forward(DeadLetter(
                        reason=f"invalid FILL activity {activity.id}: {exc}"[:500],
                        payload=repr(activity).encode()[:64_000], source="rest"))
            # The next page starts a little before the last activity's time rather than
            # at its id: an activity the broker stores late within that millisecond gets
            # an id that can sort before the token (ids are time + random uuid) and would
            # be skipped for good. Re-read activities are recognised by id.
            last = page[-1]
            try:
                last_time = parse_timestamp(last.transaction_time)[0]
            except ValueError:
                page_token = last.id
            else:
                after = format_timestamp(last_time - PAGE_REREAD)
                page_token = None
        fills = await self._price_gaps(sort_backfill(events))
        self.metrics.backfill_fills.inc(len(fills))
        for ev in fills:
            self._count_received(ev.event, "rest")
            await self._forward(ev)
        refreshed = await self._refresh_orders()
        log.info("backfill_done", fills=len(fills), pages=pages, orders_refreshed=refreshed,
                 connection_id=self.state.connection_id)

    async def _price_gaps(self, fills: list[Event]) -> list[Event]:
        """Give each order's last backfilled fill the order's cumulative average price.

        A FILL activity carries its own price but not the order's average; if an earlier
        fill of the order is missing (it fell before the backfill window, say), the
        quantity still lands through the cumulative guard but could only be priced at this
        fill's price. The order snapshot's `filled_avg_price` prices the gap exactly when
        its `filled_qty` is this fill's cumulative quantity.
        """
        last: dict[str, int] = {}
        for i, ev in enumerate(fills):
            if ev.is_fill:
                last[ev.order_id] = i
        out = list(fills)
        for order_id, i in last.items():
            ev = fills[i]
            if ev.fill_qty is not None and ev.fill_qty == ev.cum_qty:
                continue  # the order's first fill: no earlier quantity to price
            order = await self.rest.order(order_id)
            if (order is not None and order.filled_avg_price is not None
                    and order.filled_qty == ev.cum_qty):
                out[i] = msgspec.structs.replace(ev, cum_avg_price=order.filled_avg_price)
        return out

    async def _periodic_refresh(self) -> None:
        while True:
            await trio.sleep(self.settings.order_refresh_interval)
            try:
                refreshed = await self._refresh_orders()
            except (BrokerUnavailable, DecodeError) as exc:
                log.warning("order_refresh_failed", error=str(exc)[:300])
                continue
            log.debug("orders_refreshed", orders=refreshed)

    async def _refresh_orders(self) -> int:
        """Order state that changed while away: open orders, and every order we hold or
        just forwarded as not terminal that is no longer open (canceled or expired while
        we were gone, or filled with its last fill only on REST)."""
        count = 0
        open_ids: set[str] = set()
        for order in await self.rest.open_orders():
            open_ids.add(order.id)
            count += await self._forward_snapshot(order)
        stored = await self.open_order_ids() if self.open_order_ids is not None else ()
        recent = [oid for oid, st in self._seen_status.items() if st not in TERMINAL_STATUSES]
        for order_id in dict.fromkeys([*stored, *recent]):
            if order_id in open_ids:
                continue
            found = await self.rest.order(order_id)
            if found is not None:
                count += await self._forward_snapshot(found)
        return count

    async def _forward_snapshot(self, order: WireOrder) -> int:
        try:
            ev = snapshot_to_event(order)
        except (DecodeError, ValueError):
            return 0
        await self._forward(ev)
        return 1


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
