"""Gap recovery over REST: what the stream missed while we were away.

The stream has no sequence numbers and no resume, so after every (re)connect the
connection actor hands control here while live frames wait in its buffer: backfill pages
the broker's FILL activities from the durable cursor minus an overlap window, prices
fills whose predecessors fell outside the window from the order's cumulative average,
and refreshes orders that changed state while we were gone. While streaming, orders held
as not terminal are re-checked periodically. Everything found is forwarded into the same
dedupe/writer path as live frames: event keys make overlap harmless (docs/design.md,
section 4).

Backfill is incremental: each page goes to the writer as soon as it is read, in time
order, so the durable cursor advances page by page and a second disconnect or a kill
mid-recovery loses no progress; it stops once it reaches what the live socket already
holds. Orders come from the list endpoint, 500 a request (docs/design.md, section 12).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import msgspec
import trio

from .bounds import not_after_ns, price_ok, qty_ok
from .errors import BrokerUnavailable, DecodeError
from .events import FILL_EVENTS, DeadLetter, Event, format_timestamp, parse_timestamp
from .ledger import Cursor, order_fills_by_cum_qty
from .logs import get_logger
from .messages import Item
from .metrics import Metrics
from .nontrade import ActivityRecovery, AssetBook
from .orders import TERMINAL_STATUSES, merge_status
from .protocol import WireActivity, WireOrder, activity_json, activity_to_event, snapshot_to_event
from .rest import MAX_ORDERS_PAGE, MAX_PAGE_SIZE, BrokerRest
from .settings import DEFAULT_FUTURE_TOLERANCE, Settings
from .state import SupervisorState

log = get_logger("stream_supervisor.recovery")

EASTERN = ZoneInfo("America/New_York")
#: REST pages fetched per backfill at most (100 fills each): a runaway guard, not a limit
#: any real day reaches.
MAX_BACKFILL_PAGES = 10_000
#: Orders whose latest forwarded status is remembered for the reconnect refresh.
SEEN_ORDERS = 50_000
#: Orders whose highest forwarded cumulative fill is remembered, the most recently
#: filled kept: a backfilled fill that continues from it has no gap to price.
FORWARDED_ORDERS = 20_000
#: Orders listed for a backfill start this long before its first fill: an order is
#: submitted before it fills. Older orders with fills in the range are read one by one.
ORDER_LOOKBACK = timedelta(seconds=120)
#: Backfill stops once it has forwarded fills this far past where the live socket's
#: range begins (its first fill, never before `listening` by our clock): the live buffer
#: holds everything after that. The margin absorbs clock skew and late stores
#: (docs/design.md, section 12).
LIVE_OVERLAP_NS = 5 * 1_000_000_000
NS_PER_MS = 1_000_000
#: A backfill re-reads this much before the newest activity an earlier one committed:
#: activities the broker stores late, within this, are still found.
REST_REREAD = timedelta(seconds=5)
#: A reconnect's backfill trusts the stream's disorder up to this multiple of the most it
#: has shown in this life, never less than `REST_REREAD` and never more than the
#: configured overlap (docs/design.md, section 12).
DISORDER_FACTOR = 2
#: Seconds into a backfill when it first judges whether it can keep up, and between
#: judgements after that (`judge_pace`).
JUDGE_PACE_AFTER = 30.0
JUDGE_PACE_EVERY = 10.0
#: A recovery is behind when it would use more than `BEHIND_HIGH` of what holds it up:
#: the live buffer by the time REST reaches the stream, or REST's pace when nothing
#: bounds the range. Once behind, it is caught up again only below `BEHIND_LOW`, so a
#: recovery near the line does not flap the gauge and the warning.
BEHIND_HIGH = 0.9
BEHIND_LOW = 0.7
#: The refresh reads this many orders (or fewer) one by one rather than list them: a
#: few orders a busy account has in flight cost less than its list of minutes.
FEW_ORDERS = 10
#: Seconds before an order list that reached its end is read on again for an order it
#: did not hold.
RELIST_AFTER = 1.0

Forward = Callable[[Item], Awaitable[None]]
#: The live buffer's frames held and its capacity, while a recovery runs.
LiveHeld = Callable[[], tuple[int, int] | None]


@dataclass(frozen=True, slots=True)
class PaceVerdict:
    """Whether a recovery keeps up, with the figures the warning gives."""

    behind: bool
    load: float
    """The share of what holds the recovery up that it is projected to use."""
    fills_per_s: float
    """The account's fills a second over the range read so far (broker time)."""
    read_fills_per_s: float
    """Fills this recovery reads a second (wall time), at most the sustainable."""
    projected_s: float | None
    """Seconds until REST reaches the live stream, None when nothing bounds the range."""
    buffer_projected: int | None
    """Frames the live buffer is projected to hold by then."""


def judge_pace(*, fills: int, first_ns: int | None, last_ns: int | None, took: float,
               sustainable: float, live_from_ns: int | None,
               live: tuple[int, int] | None, was_behind: bool) -> PaceVerdict | None:
    """Can this recovery keep up? (docs/design.md, section 12, when the account
    outruns the budget.)

    REST has a bounded range to read when the live stream holds fills (`live_from_ns`):
    it reads up to there, while the live buffer fills at the rate it has so far. The
    recovery keeps up if the buffer can hold what arrives until REST gets there: the
    range left (broker time) times the account's fill rate over what was read, at the
    pace this recovery reads, against the buffer's capacity. That the account fills
    faster than REST can read (the old test) does not matter then: the range is fixed.
    When the stream holds no fill, nothing bounds the range and REST must outrun the
    account: the fill rate against the pace. None until something was read."""
    if (first_ns is None or last_ns is None or last_ns <= first_ns or fills <= 0
            or took <= 0):
        return None
    rate = fills / ((last_ns - first_ns) / 1e9)
    read = min(fills / took, sustainable) if sustainable > 0 else fills / took
    if live_from_ns is None or live is None or live[1] <= 0:
        load = rate / read
        projected_s = buffer_projected = None
    else:
        held, capacity = live
        left_ns = max(0, live_from_ns + LIVE_OVERLAP_NS - last_ns)
        projected_s = rate * left_ns / 1e9 / read
        buffer_projected = round(held + held / took * projected_s)
        load = buffer_projected / capacity
    behind = load > (BEHIND_LOW if was_behind else BEHIND_HIGH)
    return PaceVerdict(behind, load, rate, read, projected_s, buffer_projected)


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


def activity_time(activity_id: str) -> datetime | None:
    """The time an activity id begins with (`YYYYMMDDhhmmssmmm`, US/Eastern, as the
    broker writes it), or None if it does not. In the hour a fall-back repeats, the
    earlier reading."""
    head = activity_id[:17]
    if len(head) != 17 or not head.isdigit():
        return None
    try:
        local = datetime.strptime(head[:14], "%Y%m%d%H%M%S").replace(
            microsecond=int(head[14:]) * 1000, tzinfo=EASTERN)
    except ValueError:
        return None
    return local.astimezone(UTC)


@dataclass(slots=True)
class StreamEdge:
    """How far the live stream has brought the fills, in this life of the pipeline: the
    newest live fill forwarded after a completed recovery (its time never past when it
    came, plus the clock margin: a fill stamped ahead moves it no further), and the most
    a live fill came behind one stamped later (the disorder the stream has shown)."""

    reached_ns: int
    disorder_ns: int = 0

    def note(self, ts_ns: int, received_wall_ns: int) -> None:
        bounded = min(ts_ns, received_wall_ns + LIVE_OVERLAP_NS)
        if bounded < self.reached_ns:
            self.disorder_ns = max(self.disorder_ns, self.reached_ns - bounded)
        else:
            self.reached_ns = bounded

    def allowance(self, overlap: float) -> timedelta:
        """What a reconnect re-reads before the edge: the disorder shown, doubled, at
        least `REST_REREAD`, at most the configured overlap."""
        trusted = max(REST_REREAD.total_seconds(), DISORDER_FACTOR * self.disorder_ns / 1e9)
        return timedelta(seconds=min(overlap, trusted))


def backfill_start(
    cursor: Cursor | None,
    now: datetime,
    overlap: float,
    first_start_lookback: float | None,
    edge: StreamEdge | None = None,
) -> datetime:
    """Where REST backfill begins: the cursor minus the overlap, or the first-start lookback.

    Not before the newest activity REST already brought back, less `REST_REREAD`: backfill
    pages are committed in id order (docs/design.md, section 12), so every activity before
    it is stored, and a second disconnect soon after a recovery re-reads only what came
    since, not the whole overlap. Nor, after the stream has streamed in this life, before
    where it brought every fill (`edge`), less the disorder it has shown.
    """
    if cursor is not None and cursor.fill_time is not None:
        start = cursor.fill_time - timedelta(seconds=overlap)
        if edge is not None:
            # Not bounded by the cursor: a fill forwarded but not yet committed reaches
            # the writer ahead of every page this backfill forwards (section 12), and a
            # writer that lags must not make REST read what the stream brought.
            reached = datetime.fromtimestamp(edge.reached_ns / 1e9, UTC)
            start = max(start, reached - edge.allowance(overlap))
        verified = activity_time(cursor.activity_id) if cursor.activity_id else None
        if verified is not None:
            start = max(start, min(verified - REST_REREAD, cursor.fill_time))
        return start
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
        # Orders a stale update (one older than the connection) left not terminal, and
        # the oldest such update's time: the stream does not resend what followed it.
        self._stale: set[str] = set()
        self._stale_since_ns: int | None = None
        #: Where the live stream has brought every fill, once a recovery completed.
        self.edge: StreamEdge | None = None
        # Highest cumulative quantity of every order's fills forwarded in this life.
        self._forwarded_cum: OrderedDict[str, Decimal] = OrderedDict()
        #: Orders gap pricing read (listed or alone), over this life.
        self.pricing_reads = 0
        #: Pages read and activities they held, new and re-read, over this life (tests
        #: and benchmarks read these).
        self.pages_read = 0
        self.activities_read = 0
        self.activities_new = 0
        #: (activities read, of which new) of the latest pages.
        self.recent_pages: deque[tuple[int, int]] = deque(maxlen=1_000)
        #: The latest judgement of whether recovery keeps up (`judge_pace`): kept across
        #: recoveries for its hysteresis.
        self.behind = False
        self.order_list_requests = 0  # the refresh's order list, over this life

    def observe(self, event: Event) -> None:
        """Remember an update's order status (every forwarded update passes here). Only
        orders not yet terminal are kept: the refresh asks about no other, and memory
        then follows the orders in flight, not every order of the day."""
        # Every update of the stream passes here, on the event loop: kept tight.
        order_id = event.order_id
        if event.event in FILL_EVENTS:
            reached = self._forwarded_cum
            before = reached.get(order_id)
            if before is None or event.cum_qty > before:
                reached[order_id] = event.cum_qty
            reached.move_to_end(order_id)
            if len(reached) > FORWARDED_ORDERS:
                reached.popitem(last=False)
        seen = self._seen_status
        status = event.status
        old = seen.get(order_id)
        if old is not None and old != status:  # the same status again needs no merge
            status = merge_status(old, status)
        if status in TERMINAL_STATUSES:
            if old is not None:
                del seen[order_id]
            return
        seen[order_id] = status
        seen.move_to_end(order_id)
        if len(seen) > SEEN_ORDERS:
            seen.popitem(last=False)

    def observe_live(self, event: Event, received_wall_ns: int) -> None:
        """`observe` for a live update forwarded after a completed recovery, newer than
        the connection: a fill moves the stream's edge (`StreamEdge`)."""
        self.observe(event)
        if event.event in FILL_EVENTS:
            if self.edge is None:
                self.edge = StreamEdge(min(event.ts_ns, received_wall_ns + LIVE_OVERLAP_NS))
            else:
                self.edge.note(event.ts_ns, received_wall_ns)

    def observe_stale(self, event: Event) -> None:
        """`observe` for an update forwarded after a recovery's refresh although it is
        older than the connection (a replay, or one stamped within the clock margin of
        `listening`). The broker does not resend the updates that followed it, so if it
        leaves its order not terminal, only REST can tell how the order went on:
        `recheck_stale` reads it (docs/design.md, section 12)."""
        self.observe(event)
        if event.order_id in self._seen_status:
            self._stale.add(event.order_id)
            if self._stale_since_ns is None or event.ts_ns < self._stale_since_ns:
                self._stale_since_ns = event.ts_ns

    async def recheck_stale(self) -> int:
        """Read again the orders stale updates left not terminal (`observe_stale`), in
        bulk when there are many; returns the snapshots forwarded. On a failed read the
        orders stay with the periodic refresh and the next reconnect's, which ask about
        every order held as not terminal."""
        wanted = [oid for oid in self._stale if oid in self._seen_status]
        since_ns = self._stale_since_ns
        self._stale = set()
        self._stale_since_ns = None
        if not wanted or since_ns is None:
            return 0
        since = datetime.fromtimestamp(since_ns / 1e9, UTC) - ORDER_LOOKBACK
        try:
            count = await self._read_orders(wanted, since)
        except (BrokerUnavailable, DecodeError) as exc:
            log.warning("stale_orders_recheck_failed", orders=len(wanted),
                        error=str(exc)[:300])
            return 0
        log.info("stale_orders_rechecked", orders=len(wanted), forwarded=count,
                 connection_id=self.state.connection_id)
        return count

    async def _forward(self, item: Item) -> None:
        if isinstance(item, Event):
            self.observe(item)
        await self._send(item)

    async def backfill(self, live_from_ns: Callable[[], int | None] = lambda: None,
                       live_held: LiveHeld = lambda: None) -> None:
        """Fills since the durable cursor (minus the overlap), page by page, then the
        order refresh. `live_from_ns` gives the broker time of the first fill the live
        socket holds (None while it holds none): backfill stops once past it.
        `live_held` gives the live buffer's frames and capacity, for `judge_pace`."""
        s = self.settings
        start = backfill_start(
            self.state.committed_cursor, self.wallclock(), s.backfill_overlap,
            s.first_start_lookback, self.edge,
        )
        log.info("backfill_started", after=format_timestamp(start),
                 connection_id=self.state.connection_id)
        book = OrderBook(self.rest, start - ORDER_LOOKBACK)
        began = trio.current_time()
        fills = pages = first_fills = 0
        first_ns = last_ns = None
        judge_at = began + JUDGE_PACE_AFTER
        warned = [False]  # this recovery said so already
        # Closed on the way out, also when a closed socket cancels the recovery.
        async with aclosing(self._pages(start, live_from_ns)) as paged:
            try:
                async for page in paged:
                    pages += 1
                    events = await self._decode(page)
                    if self.assets is not None:
                        events = await self.assets.spelled(events)
                    if not events:
                        continue
                    priced = await self._price_gaps(sort_backfill(events), book)
                    received: dict[str, int] = {}
                    for ev in priced:
                        received[ev.event] = received.get(ev.event, 0) + 1
                        await self._forward(ev)
                    for event, amount in received.items():
                        self.metrics.events_received.labels(event, "rest").inc(amount)
                    self.metrics.backfill_fills.inc(len(priced))
                    fills += len(priced)
                    first_fills += sum(1 for ev in priced
                                       if ev.is_fill and ev.fill_qty == ev.cum_qty)
                    first_ns = priced[0].ts_ns if first_ns is None else first_ns
                    last_ns = priced[-1].ts_ns
                    if trio.current_time() >= judge_at:
                        # Said while it runs: a recovery this long may never finish.
                        judge_at = trio.current_time() + JUDGE_PACE_EVERY
                        self._judge_pace(fills, first_ns, last_ns, trio.current_time() - began,
                                         live_from_ns(), live_held(), warned)
            except trio.Cancelled:
                held = live_held()
                if held is not None and held[0] >= held[1]:
                    # Cut short by a full live buffer: it could not keep up, whatever was
                    # projected.
                    self._judge_pace(fills, first_ns, last_ns, trio.current_time() - began,
                                     live_from_ns(), held, warned, overflowed=True)
                raise
        self._judge_pace(fills, first_ns, last_ns, trio.current_time() - began,
                         live_from_ns(), live_held(), warned)
        # The refresh lists afresh: the list that priced the pages is as old as they.
        listed = self.order_list_requests
        refreshed = await self.refresh_orders(
            book.since, list_cost=_list_cost(first_fills, first_ns, last_ns, _ns(book.since)))
        if self.activities is not None:
            # After every fill before them: when the live socket holds fills this
            # backfill left to it, the next scheduled pass brings the activities instead.
            self.activities.note_start(start)
            if live_from_ns() is None:
                await self.activities.backfill(start)
        log.info("backfill_done", fills=fills, pages=pages, orders_refreshed=refreshed,
                 order_requests=book.requests + self.order_list_requests - listed,
                 connection_id=self.state.connection_id)

    def _judge_pace(self, fills: int, first_ns: int | None, last_ns: int | None,
                    took: float, live_from_ns: int | None, live: tuple[int, int] | None,
                    warned: list[bool], *, overflowed: bool = False) -> None:
        """`judge_pace`, kept in `behind` and the gauges, and said once a recovery when
        it cannot keep up, with the figures (docs/design.md, section 12)."""
        budget = getattr(self.rest, "budget", None)
        if budget is None:
            return
        sustainable = float(budget.sustainable_fills_per_second(MAX_PAGE_SIZE))
        verdict = judge_pace(fills=fills, first_ns=first_ns, last_ns=last_ns, took=took,
                             sustainable=sustainable, live_from_ns=live_from_ns, live=live,
                             was_behind=self.behind)
        if verdict is None and not overflowed:
            return
        self.behind = overflowed or (verdict is not None and verdict.behind)
        if verdict is not None:
            self.metrics.recovery_fill_rate.set(verdict.fills_per_s)
        self.metrics.recovery_behind.set(1 if self.behind else 0)
        if self.behind and not warned[0]:
            warned[0] = True
            log.warning(
                "recovery_over_budget",
                fills_per_s=None if verdict is None else round(verdict.fills_per_s, 1),
                read_fills_per_s=(None if verdict is None
                                  else round(verdict.read_fills_per_s, 1)),
                sustainable_fills_per_s=round(sustainable, 1),
                requests_per_window=budget.per_window, fills=fills, took_s=round(took, 1),
                projected_s=(None if verdict is None or verdict.projected_s is None
                             else round(verdict.projected_s, 1)),
                live_buffer_held=None if live is None else live[0],
                live_buffer_projected=None if verdict is None else verdict.buffer_projected,
                live_buffer_size=None if live is None else live[1],
                overflowed=overflowed)

    async def _decode(self, page: Sequence[WireActivity]) -> list[Event]:
        latest = not_after_ns(self.wallclock(), self.settings.future_tolerance)
        events: list[Event] = []
        for activity in page:
            try:
                events.append(activity_to_event(activity, not_after_ns=latest))
            except (DecodeError, ValueError) as exc:
                # Its JSON, which `dead-letters --replay` decodes again.
                await self._forward(DeadLetter(
                    reason=f"invalid FILL activity {activity.id[:128]}: {exc}"[:500],
                    payload=activity_json(activity)[:64_000], source="rest"))
        return events

    async def _pages(
        self, start: datetime, live_from_ns: Callable[[], int | None]
    ) -> AsyncGenerator[list[WireActivity], None]:
        """FILL activities after `start`, in id order, each exactly once, a page at a time.

        Each request starts at the first instant of the millisecond of the previous
        page's last activity, and the activities of that millisecond wait for the next
        page: an activity the broker stores late within a millisecond gets an id that can
        sort before one already read (ids are time + random uuid), and would be skipped
        for good by a page token; re-reading one millisecond finds it, at the cost of a
        few activities a page, not a window of them. Only a page that lies wholly in one
        millisecond pages on by id. The page that passes where the live socket's range
        begins (plus `LIVE_OVERLAP_NS`) ends the backfill without its last millisecond:
        the live buffer holds that one whole.
        """
        after_ns = _ns(start)
        token: str | None = None
        done: set[str] = set()  # handed out from the millisecond `after_ns` begins
        held: set[str] = set()  # read, and held back for the next page
        for _ in range(MAX_BACKFILL_PAGES):
            page = await self.rest.fill_activities(
                after=_format_ns(after_ns), page_token=token, page_size=MAX_PAGE_SIZE)
            self.pages_read += 1
            self.activities_read += len(page)
            fresh = [a for a in page if a.id not in done]
            new = sum(1 for a in fresh if a.id not in held)
            self.activities_new += new
            self.recent_pages.append((len(page), new))
            if not page:
                return
            last_ms = _ms(page[-1])
            ready = [a for a in fresh if last_ms is None or (_ms(a) or 0) < last_ms]
            live = live_from_ns()
            if live is not None and last_ms is not None and (
                    last_ms * NS_PER_MS > live + LIVE_OVERLAP_NS):
                # The live socket holds the rest, this page's last millisecond too: a
                # page can end inside a millisecond, and an order's fills in it must
                # not straddle REST and the live buffer. The fill REST left out may be
                # the lower of the two, its id sorting after the higher one's: the
                # higher, forwarded alone, would land as one fill at its own price,
                # and the lower, live, be stale (the soak's TSLA P&L, 0.73 off).
                if ready:
                    yield ready
                log.info("backfill_reached_live", pages=self.pages_read)
                return
            if last_ms is None or not ready:
                # One millisecond fills the page (or a time we cannot read): hand out
                # everything and page on by id.
                done.update(a.id for a in fresh)
                held = set()
                yield fresh
                token = page[-1].id
                continue
            yield ready
            held = {a.id for a in fresh if _ms(a) == last_ms}
            after_ns = last_ms * NS_PER_MS - 1
            token = None
            done = {i for i in done if i[:17] >= page[-1].id[:17]}

    async def _price_gaps(self, fills: list[Event], book: OrderBook) -> list[Event]:
        """Give a backfilled fill the order's cumulative average price when it is the
        order's latest fill.

        A FILL activity carries its own price but not the order's average; if an earlier
        fill of the order is missing (it fell before the backfill window, say), the
        quantity still lands through the cumulative guard but could only be priced at this
        fill's price. The order snapshot's `filled_avg_price` prices the gap exactly when
        its `filled_qty` is this fill's cumulative quantity. Snapshots come from the
        order list, 500 a request (`OrderBook`).
        """
        last: dict[str, int] = {}
        # An order whose every fill here continues from what was forwarded before it (in
        # this life, live or backfilled, or earlier on this page) has no gap: each fill
        # lands at its own price (docs/design.md, section 12).
        reached: dict[str, Decimal] = {}
        gap: set[str] = set()
        for i, ev in enumerate(fills):
            if ev.is_fill:
                oid = ev.order_id
                last[oid] = i
                before = reached.get(oid)
                if before is None:
                    before = self._forwarded_cum.get(oid, Decimal(0))
                if ev.fill_qty is None or ev.cum_qty - ev.fill_qty > before:
                    gap.add(oid)
                reached[oid] = max(before, ev.cum_qty)
        out = list(fills)
        # A few orders are read alone: listing from before the backfill to reach them
        # costs a request per 500 orders submitted since.
        alone = len(gap) <= FEW_ORDERS
        for order_id, i in last.items():
            if order_id not in gap:
                continue
            ev = fills[i]
            self.pricing_reads += 1
            listed = await book.get(order_id, ev.ts_ns, alone=alone)
            if listed is not None and listed[1] is not None and listed[0] == ev.cum_qty:
                out[i] = msgspec.structs.replace(ev, cum_avg_price=listed[1])
        return out

    async def refresh_periodically(self) -> None:
        """While streaming: re-check the orders held as not terminal, every interval."""
        while True:
            await trio.sleep(self.settings.order_refresh_interval)
            since = self.wallclock() - timedelta(
                seconds=self.settings.order_refresh_interval) - ORDER_LOOKBACK
            try:
                refreshed = await self.refresh_orders(since)
            except (BrokerUnavailable, DecodeError) as exc:
                log.warning("order_refresh_failed", error=str(exc)[:300])
                continue
            log.debug("orders_refreshed", orders=refreshed)

    async def refresh_orders(self, since: datetime, *, list_cost: int | None = None) -> int:
        """Order state that changed while away: open orders, and every order we hold or
        just forwarded as not terminal that is no longer open (canceled or expired while
        we were gone, or filled with its last fill only on REST). Orders submitted after
        `since` come from the list endpoint in bulk; older ones one by one, all of
        them (each is an order we hold as live that is no longer open); a few
        (`FEW_ORDERS`) are read one by one without listing, and so are as many as the
        list would cost requests (`list_cost`, estimated from the backfill)."""
        count = 0
        open_ids: set[str] = set()
        for order in await self.rest.open_orders():
            open_ids.add(order.id)
            count += await self._forward_snapshot(order)
        stored = await self.open_order_ids() if self.open_order_ids is not None else ()
        recent = [oid for oid, st in self._seen_status.items() if st not in TERMINAL_STATUSES]
        wanted = [oid for oid in dict.fromkeys([*stored, *recent]) if oid not in open_ids]
        return count + await self._read_orders(wanted, since, list_cost=list_cost)

    async def _read_orders(self, wanted: Sequence[str], since: datetime, *,
                           list_cost: int | None = None) -> int:
        """Forward the broker's snapshot of each order in `wanted`: from the order list
        since `since` when they are more than it costs requests (`list_cost`, at least
        `FEW_ORDERS`), else (and for any the list lacks) one by one."""
        count = 0
        book: OrderBook | None = None
        if len(wanted) > max(FEW_ORDERS, list_cost or 0):
            book = OrderBook(self.rest, since, keep=wanted)
            await book.load_all()
            self.order_list_requests += book.requests
        singles = 0
        for order_id in wanted:
            found = book.known(order_id) if book is not None else None
            if found is None:
                singles += 1
                found = await self.rest.order(order_id)
            if found is not None:
                count += await self._forward_snapshot(found)
        if singles > FEW_ORDERS:
            log.info("orders_refreshed_one_by_one", orders=singles,
                     listed_since=format_timestamp(since))
        return count

    async def _forward_snapshot(self, order: WireOrder) -> int:
        try:
            ev = snapshot_to_event(order)
        except (DecodeError, ValueError):
            return 0
        await self._forward(ev)
        return 1


class OrderBook:
    """Order snapshots from `GET /v2/orders?status=all&after=…&direction=asc`, read a
    page of 500 at a time as far as needed (an order is submitted before it fills), for
    one recovery. An order submitted before `since` is read on its own. Memory: per
    listed order its id and cumulative fill (what pricing needs), and whole snapshots
    only of the orders in `keep` (what the refresh forwards)."""

    def __init__(self, rest: BrokerRest, since: datetime, *,
                 keep: Collection[str] = ()) -> None:
        self.rest = rest
        self.since = since
        self._after = since
        self._loaded_to_ns = _ns(since)
        self._complete = False
        self._listed_at = -math.inf
        self._keep = set(keep)
        self._fills: dict[str, tuple[Decimal, Decimal | None]] = {}
        self._kept: dict[str, WireOrder] = {}
        self.requests = 0

    def known(self, order_id: str) -> WireOrder | None:
        """The snapshot of an order in `keep`, if listed."""
        return self._kept.get(order_id)

    async def get(self, order_id: str, filled_ns: int, *,
                  alone: bool = False) -> tuple[Decimal, Decimal | None] | None:
        """The order's (filled_qty, filled_avg_price) as listed, for a fill at `filled_ns`
        (`alone`: read on its own unless already listed)."""
        looked_again = False
        while (not alone and order_id not in self._fills
               and self._loaded_to_ns <= filled_ns):
            if self._complete:
                # Filled after the newest order listed: it may have been submitted since
                # the list ended (the market goes on during recovery). One more page from
                # where it ended costs what reading this order alone would, and brings
                # every order submitted since.
                if looked_again:
                    break
                looked_again = True
                self._complete = False
            await self._next_page()
        found = self._fills.get(order_id)
        if found is None:
            self.requests += 1
            order = await self.rest.order(order_id)
            if order is not None:
                found = self._fills[order_id] = _listed_fill(order)
        return found

    async def load_all(self) -> None:
        """List on to the end, or until every order in `keep` is found: orders submitted
        while recovery reads are in the live buffer, not wanted."""
        if self._complete and trio.current_time() - self._listed_at >= RELIST_AFTER:
            self._complete = False
        while not self._complete and not (self._keep and len(self._kept) == len(self._keep)):
            await self._next_page()

    async def _next_page(self) -> None:
        self.requests += 1
        self._listed_at = trio.current_time()
        page = await self.rest.orders_since(after=format_timestamp(self._after),
                                            limit=MAX_ORDERS_PAGE)
        new = [o for o in page if o.id not in self._fills]
        for order in page:
            self._fills[order.id] = _listed_fill(order)
            if order.id in self._keep:
                self._kept[order.id] = order
        if not new:
            self._complete = True
            return
        last = page[-1].created_at
        try:
            last_dt, last_ns = parse_timestamp(last) if last else (None, None)
        except ValueError:
            last_dt = last_ns = None
        if last_dt is None or last_ns is None:
            self._complete = True
            return
        # Orders submitted in the same instant as the page's last come back again; ids
        # already held are kept once.
        self._after = last_dt - timedelta(microseconds=1)
        self._loaded_to_ns = last_ns
        # A page less orders that did not decode (`OrderList.skipped`) is still full.
        if len(page) + len(getattr(page, "skipped", ())) < MAX_ORDERS_PAGE:
            self._complete = True


def _listed_fill(order: WireOrder) -> tuple[Decimal, Decimal | None]:
    """What pricing keeps of a listed order: its `filled_qty`, and its `filled_avg_price`
    only where both are within the bounds (docs/design.md, section 4). An average of NaN,
    Infinity or 1e400 would become the fill's price; it is as if absent instead, and the
    gap lands at the fill's own price with a `fill_gap` warning."""
    avg = order.filled_avg_price
    if avg is not None and not (price_ok(avg) and qty_ok(order.filled_qty)):
        avg = None
    return order.filled_qty, avg


def _list_cost(first_fills: int, first_ns: int | None, last_ns: int | None,
               since_ns: int) -> int | None:
    """About the requests the order list takes from `since` to a backfill's last fill:
    orders submitted at the rate they began filling in the backfill, 500 a request, plus
    one. None when the backfill read too little to tell."""
    if first_ns is None or last_ns is None or last_ns <= first_ns or first_fills == 0:
        return None
    per_ns = first_fills / (last_ns - first_ns)
    # Orders submitted long before the fills (a first start's lookback) are not counted.
    since_ns = max(since_ns, first_ns - int(ORDER_LOOKBACK.total_seconds() * 1e9))
    return math.ceil(per_ns * max(0, last_ns - since_ns) / MAX_ORDERS_PAGE) + 1


def _ns(moment: datetime) -> int:
    return parse_timestamp(format_timestamp(moment))[1]


def _format_ns(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{rest:09d}Z"


def _ms(activity: WireActivity) -> int | None:
    """The activity's millisecond (epoch), from its transaction time."""
    try:
        return parse_timestamp(activity.transaction_time)[1] // NS_PER_MS
    except ValueError:
        return None
