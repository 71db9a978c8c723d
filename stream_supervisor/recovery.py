"""Gap recovery over REST: what the stream missed while we were away.

The stream has no sequence numbers and no resume, so after every (re)connect the
connection actor hands control here while live frames wait in its buffer: backfill pages
the broker's FILL activities from the durable cursor minus an overlap window, prices
fills whose predecessors fell outside the window from the order's cumulative average,
and refreshes orders that changed state while we were gone. While streaming, orders held
as not terminal are re-checked periodically. Everything found is forwarded into the same
dedupe/writer path as live frames: event keys make overlap harmless (docs/design.md,
section 4).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import msgspec
import trio

from .bounds import not_after_ns
from .errors import BrokerUnavailable, DecodeError
from .events import DeadLetter, Event, format_timestamp, parse_timestamp
from .ledger import Cursor, order_fills_by_cum_qty
from .logs import get_logger
from .messages import Item
from .metrics import Metrics
from .nontrade import ActivityRecovery, AssetBook
from .orders import TERMINAL_STATUSES, merge_status
from .protocol import WireOrder, activity_json, activity_to_event, snapshot_to_event
from .rest import MAX_PAGE_SIZE, BrokerRest
from .settings import DEFAULT_FUTURE_TOLERANCE, Settings
from .state import SupervisorState

log = get_logger("stream_supervisor.recovery")

EASTERN = ZoneInfo("America/New_York")
#: REST pages fetched per backfill at most (100 fills each): a runaway guard, not a limit
#: any real day reaches.
MAX_BACKFILL_PAGES = 10_000
#: Orders whose latest forwarded status is remembered for the reconnect refresh.
SEEN_ORDERS = 50_000
#: Each backfill page re-reads this much before the previous page's last activity.
PAGE_REREAD = timedelta(milliseconds=50)

Forward = Callable[[Item], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    backfill_overlap: float
    #: First start without a cursor: seconds to look back, or None for the start of the
    #: current US/Eastern trading day.
    first_start_lookback: float | None
    #: While streaming, re-check orders we hold as not terminal this often (0: never):
    #: the stream can replay a stale update for an order that ended while we were away,
    #: and only REST tells us it ended.
    order_refresh_interval: float
    #: FILL activities stamped more than this ahead of the wall clock are dead-lettered.
    future_tolerance: float = DEFAULT_FUTURE_TOLERANCE

    @classmethod
    def from_settings(cls, s: Settings) -> RecoverySettings:
        return cls(
            backfill_overlap=s.backfill_overlap,
            first_start_lookback=s.first_start_lookback,
            order_refresh_interval=s.order_refresh_interval,
            future_tolerance=s.future_tolerance,
        )


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


class GapRecovery:
    """REST recovery for one pipeline. `forward` puts an item on the pipeline (the same
    path live frames take); `observe` must see every update the live path forwards too,
    so the reconnect refresh covers orders whose updates are still on their way."""

    def __init__(
        self,
        settings: RecoverySettings,
        rest: BrokerRest,
        forward: Forward,
        metrics: Metrics,
        state: SupervisorState,
        *,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
        open_order_ids: Callable[[], Awaitable[Sequence[str]]] | None = None,
        activities: ActivityRecovery | None = None,
        assets: AssetBook | None = None,
    ) -> None:
        self.settings = settings
        self.rest = rest
        self._send = forward
        self.metrics = metrics
        self.state = state
        self.wallclock = wallclock
        self.open_order_ids = open_order_ids
        #: Non-trade activities and crypto spellings (docs/design.md, section 10).
        self.activities = activities
        self.assets = assets
        # Latest status of every order forwarded in this life (live or recovered).
        self._seen_status: OrderedDict[str, str] = OrderedDict()

    def observe(self, event: Event) -> None:
        """Remember an update's order status (every forwarded update passes here)."""
        seen = self._seen_status
        seen[event.order_id] = merge_status(seen.get(event.order_id, event.status), event.status)
        seen.move_to_end(event.order_id)
        if len(seen) > SEEN_ORDERS:
            seen.popitem(last=False)

    async def _forward(self, item: Item) -> None:
        if isinstance(item, Event):
            self.observe(item)
        await self._send(item)

    async def backfill(self) -> None:
        """Fills since the durable cursor (minus the overlap), then the order refresh."""
        s = self.settings
        start = backfill_start(
            self.state.committed_cursor, self.wallclock(), s.backfill_overlap,
            s.first_start_lookback,
        )
        log.info("backfill_started", after=format_timestamp(start),
                 connection_id=self.state.connection_id)
        events, pages = await self._fill_events(start)
        if self.assets is not None:
            events = await self.assets.spelled(events)
        fills = await self._price_gaps(sort_backfill(events))
        self.metrics.backfill_fills.inc(len(fills))
        received: dict[str, int] = {}
        for ev in fills:
            received[ev.event] = received.get(ev.event, 0) + 1
            await self._forward(ev)
        for event, amount in received.items():
            self.metrics.events_received.labels(event, "rest").inc(amount)
        refreshed = await self.refresh_orders()
        if self.activities is not None:
            await self.activities.backfill(start)
        log.info("backfill_done", fills=len(fills), pages=pages, orders_refreshed=refreshed,
                 connection_id=self.state.connection_id)

    async def _fill_events(self, start: datetime) -> tuple[list[Event], int]:
        """Every FILL activity after `start`, as events; undecodable ones dead-lettered."""
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
            latest = not_after_ns(self.wallclock(), self.settings.future_tolerance)
            for activity in fresh:
                seen.add(activity.id)
                try:
                    events.append(activity_to_event(activity, not_after_ns=latest))
                except (DecodeError, ValueError) as exc:
                    # Its JSON, which `dead-letters --replay` decodes again.
                    await self._forward(DeadLetter(
                        reason=f"invalid FILL activity {activity.id[:128]}: {exc}"[:500],
                        payload=activity_json(activity)[:64_000], source="rest"))
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
        return events, pages

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

    async def refresh_periodically(self) -> None:
        """While streaming: re-check the orders held as not terminal, every interval."""
        while True:
            await trio.sleep(self.settings.order_refresh_interval)
            try:
                refreshed = await self.refresh_orders()
            except (BrokerUnavailable, DecodeError) as exc:
                log.warning("order_refresh_failed", error=str(exc)[:300])
                continue
            log.debug("orders_refreshed", orders=refreshed)

    async def refresh_orders(self) -> int:
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
