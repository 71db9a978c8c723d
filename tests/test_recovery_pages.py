"""Backfill pages that advance and orders read in bulk (`recovery.py`), counted on the
simulated broker over the real HTTP client in virtual time: every FILL activity forwarded
once, at least 90% of each full page new, and requests growing with fills/100 +
orders/500, not with orders."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import trio
import trio.testing

from stream_supervisor import recovery as recovery_module
from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.ledger import Cursor
from stream_supervisor.messages import Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.recovery import (
    BEHIND_HIGH,
    BEHIND_LOW,
    LIVE_OVERLAP_NS,
    GapRecovery,
    LiveHeld,
    RecoverySettings,
    StreamEdge,
    activity_time,
    backfill_start,
    judge_pace,
)
from stream_supervisor.rest_http import HttpBrokerRest, RestSettings
from stream_supervisor.state import SupervisorState
from stream_supervisor.testing.broker import SimConfig, SimulatedBroker
from stream_supervisor.testing.worlds.transport import BrokerTransport

START = datetime(2026, 11, 24, 15, 0, tzinfo=UTC)


def played(orders: int, rate: float, seed: int = 8, rest_rate_limit: int = 0
           ) -> SimulatedBroker:
    broker = SimulatedBroker(SimConfig(seed=seed, orders=orders, rate=rate, start_time=START,
                                       rest_rate_limit=rest_rate_limit))
    while broker.step() is not None:
        pass
    return broker


async def recover(broker: SimulatedBroker, state: SupervisorState | None = None,
                  lookback: float = 3600.0, live_from_ns: int | None = None,
                  live_held: LiveHeld = lambda: None,
                  metrics: Metrics | None = None) -> tuple[GapRecovery, list[Item]]:
    forwarded: list[Item] = []

    async def forward(item: Item) -> None:
        forwarded.append(item)

    end = datetime.fromtimestamp(broker.market.now_ns / 1e9, UTC) + timedelta(seconds=1)
    rest = HttpBrokerRest(RestSettings(base_url="http://sim", key_id="SIMKEY",
                                       secret_key="SIMSECRET", budget_share=1.0),
                          transport=BrokerTransport(broker))
    async with rest:
        recovery = GapRecovery(
            RecoverySettings(backfill_overlap=300.0, first_start_lookback=lookback,
                             order_refresh_interval=0.0),
            rest, forward, metrics or Metrics(), state or SupervisorState(),
            wallclock=lambda: end)
        await recovery.backfill(lambda: live_from_ns, live_held)
    return recovery, forwarded


async def test_pages_advance_and_every_activity_comes_once(
        autojump_clock: trio.testing.MockClock) -> None:
    broker = played(orders=1_500, rate=1_000.0)
    recovery, forwarded = await recover(broker)
    truth = broker.ground_truth()
    fills = [it for it in forwarded if isinstance(it, Event) and it.is_fill]
    assert not [it for it in forwarded if isinstance(it, DeadLetter)]
    ids = [ev.activity_id for ev in fills]
    assert len(ids) == len(set(ids)) == truth["fills_total"]
    assert set(ids) == set(broker.market.activity_ids)
    # Each order's fills in cumulative order, and time never goes back between pages.
    per_order: dict[str, list[object]] = {}
    for ev in fills:
        per_order.setdefault(ev.order_id, []).append(ev.cum_qty)
    assert all(cums == sorted(cums) for cums in per_order.values())  # type: ignore[type-var]
    assert [ev.ts_ns for ev in fills] == sorted(ev.ts_ns for ev in fills)
    full = [(read, new) for read, new in recovery.recent_pages if read == 100]
    assert len(full) >= truth["fills_total"] // 100 - 1
    assert all(new >= 90 for _, new in full), full


async def test_requests_grow_with_fills_and_orders_in_bulk(
        autojump_clock: trio.testing.MockClock) -> None:
    broker = played(orders=1_500, rate=1_000.0)
    _, forwarded = await recover(broker)
    truth = broker.ground_truth()
    requests = broker.rate_limiter.requests
    pages = math.ceil(truth["fills_total"] / 100)
    assert requests["activities"] <= pages + 3
    # The order list, 500 a request, read for the pricing and again for the refresh
    # (plus the open orders), not one request per order.
    assert requests["orders"] <= 2 * (math.ceil(len(broker.market.orders) / 500) + 1) + 1
    assert requests.get("order", 0) == 0
    refreshed = [it for it in forwarded if isinstance(it, Event) and it.event == "refresh"]
    assert len(forwarded) - len(refreshed) == truth["fills_total"]


async def test_gap_pricing_reads_only_orders_with_a_gap(
        autojump_clock: trio.testing.MockClock) -> None:
    """Every order's fills in range and in sequence: nothing to price, no order read for
    it. A first start whose lookback begins mid-market: the orders filling across that
    instant have fills before it, priced from the order's cumulative average, read alone
    (a few) rather than listing every order from two minutes before the start."""
    broker = played(orders=1_500, rate=1_000.0)
    recovery, forwarded = await recover(broker)
    assert recovery.pricing_reads == 0
    assert not [it for it in forwarded if isinstance(it, Event) and it.cum_avg_price is not None
                and it.is_fill]

    broker = played(orders=1_500, rate=1_000.0)
    market = broker.market
    # Mid-market, just before the second fill of an order that filled in pieces.
    fill_ns: dict[str, list[int]] = {}
    for activity in market.activities:
        fill_ns.setdefault(activity["order_id"], []).append(market.activity_ns[activity["id"]])
    half = (market.epoch_ns + market.now_ns) // 2
    split_ns = min(times[1] for times in fill_ns.values()
                   if len(times) > 1 and times[0] >= half and times[1] - times[0] > 2_000_000)
    # `recover` stands 1 s past the market's end.
    lookback = (market.now_ns - split_ns + 1_000_000) / 1e9 + 1.0
    recovery, forwarded = await recover(broker, lookback=lookback)
    fills = [it for it in forwarded if isinstance(it, Event) and it.is_fill]
    first_cum: dict[str, object] = {}
    for ev in fills:
        first_cum.setdefault(ev.order_id, ev.cum_qty - (ev.fill_qty or 0))
    straddling = {oid for oid, before in first_cum.items() if before}
    assert straddling, "no order filled across the lookback's start"
    assert recovery.pricing_reads == len(straddling)
    orders = market.orders
    priced = {ev.order_id: ev for ev in fills if ev.cum_avg_price is not None}
    assert priced and set(priced) <= straddling
    for oid, ev in priced.items():
        assert ev.cum_avg_price == Decimal(orders[oid].snapshot()["filled_avg_price"])
    if len(straddling) <= 10:
        assert broker.rate_limiter.requests.get("order", 0) >= len(straddling)


def test_backfill_starts_after_what_rest_already_committed() -> None:
    fill_time = datetime(2026, 11, 24, 15, 10, tzinfo=UTC)
    now = fill_time + timedelta(minutes=1)
    # The newest activity a backfill committed: 15:08:00.250 UTC is 10:08:00.250 Eastern.
    cursor = Cursor(fill_time, "20261124100800250::0a1b")
    assert activity_time(cursor.activity_id or "") == datetime(
        2026, 11, 24, 15, 8, 0, 250_000, tzinfo=UTC)
    assert backfill_start(cursor, now, 300.0, None) == datetime(
        2026, 11, 24, 15, 7, 55, 250_000, tzinfo=UTC)
    # Older than the overlap reaches, or unreadable, or none: the overlap decides.
    old = Cursor(fill_time, "20261124090000000::0a1b")
    assert backfill_start(old, now, 300.0, None) == fill_time - timedelta(seconds=300)
    for unreadable in ("not-an-id", "2026112410080025x::0a1b", None):
        assert backfill_start(Cursor(fill_time, unreadable), now, 300.0, None) == (
            fill_time - timedelta(seconds=300))


def test_a_reconnect_reads_from_where_the_stream_brought_every_fill() -> None:
    """After a stream that streamed in this life, a reconnect re-reads only the disorder
    the stream has shown (doubled, at least 5 s, at most the overlap) before its newest
    live fill, not the whole overlap before the cursor."""
    fill_time = datetime(2026, 11, 24, 15, 10, tzinfo=UTC)
    ns = int(fill_time.timestamp()) * 1_000_000_000
    now = fill_time + timedelta(minutes=1)
    cursor = Cursor(fill_time, None)
    edge = StreamEdge(ns - 2_000_000_000)  # live fills to 2 s before the cursor
    assert edge.allowance(300.0) == timedelta(seconds=5)
    assert backfill_start(cursor, now, 300.0, None, edge) == fill_time - timedelta(seconds=7)
    # A fill 3 s behind one stamped later: 6 s of disorder are re-read.
    edge.note(ns - 1_000_000_000, ns)
    edge.note(ns - 4_000_000_000, ns)
    assert edge.disorder_ns == 3_000_000_000
    assert backfill_start(cursor, now, 300.0, None, edge) == fill_time - timedelta(seconds=7)
    # Never more than the overlap. Past the cursor when the stream brought fills the
    # writer has not committed yet: they reach it ahead of the backfill's pages.
    edge.note(ns - 200_000_000_000, ns)
    assert edge.allowance(300.0) == timedelta(seconds=300)
    assert backfill_start(cursor, now, 300.0, None, StreamEdge(ns + 60_000_000_000)) == (
        fill_time + timedelta(seconds=55))
    # A fill stamped ahead of the wall clock moves the edge no further than when it came
    # (plus the 5 s clock margin): the fills after it are still read.
    ahead = StreamEdge(ns - 10_000_000_000)
    ahead.note(ns + 100_000_000_000, received_wall_ns=ns - 9_000_000_000)
    assert ahead.reached_ns == ns - 4_000_000_000
    # Without an edge (the first recovery of a life) the overlap decides, as before.
    assert backfill_start(cursor, now, 300.0, None, None) == fill_time - timedelta(seconds=300)


async def test_a_second_recovery_reads_on_from_the_first(
        autojump_clock: trio.testing.MockClock) -> None:
    broker = played(orders=3_000, rate=500.0)
    first, forwarded = await recover(broker)
    newest = max((ev for ev in forwarded if isinstance(ev, Event) and ev.is_fill),
                 key=lambda ev: ev.activity_id or "")
    state = SupervisorState(committed_cursor=Cursor(newest.timestamp, newest.activity_id))
    before = broker.rate_limiter.requests["activities"]
    second, _ = await recover(broker, state)
    # Only the last five seconds are read again, not the 300 s overlap (the whole day).
    assert broker.rate_limiter.requests["activities"] - before <= math.ceil(
        5 * broker.fills_total / (broker.market.now_ns - broker.market.epoch_ns) * 1e9
        / 100) + 2
    assert second.activities_read < first.activities_read / 2


async def test_the_page_that_reaches_the_live_range_leaves_its_last_millisecond_to_it(
        autojump_clock: trio.testing.MockClock) -> None:
    """Two fills of one order in one millisecond, the higher one's id sorting first, and
    a page that ends between them as it passes where the live socket's range begins.
    Handed out, the higher fill would reach the ledger alone, past a gap priced at its
    own price, and the lower one, live, would be stale: quantities right, the symbol's
    P&L path wrong (the two-minute soak's TSLA, 0.73 off). The page's last millisecond
    is the live buffer's, whole."""
    broker = played(orders=400, rate=10.0)  # 100 ms between updates: a page spans 10 s
    market = broker.market
    acts = market.activities  # in id order, as REST pages them
    ms = [market.activity_ns[a["id"]] // 1_000_000 for a in acts]
    # A pair whose higher fill sorts first, 100th of a page starting at an update's ms.
    k = next(k for k in range(100, len(acts) - 1)
             if ms[k] == ms[k + 1] and acts[k]["order_id"] == acts[k + 1]["order_id"]
             and Decimal(acts[k]["cum_qty"]) > Decimal(acts[k + 1]["cum_qty"])
             and ms[k - 99] != ms[k - 100] and ms[k - 1] != ms[k])
    start_ns = ms[k - 99] * 1_000_000 - 500_000
    end_ns = market.now_ns + 1_000_000_000  # where `recover` stands
    live_from = ms[k] * 1_000_000 - LIVE_OVERLAP_NS - 1_000_000
    _, forwarded = await recover(broker, lookback=(end_ns - start_ns) / 1e9,
                                 live_from_ns=live_from)
    fills = [ev for ev in forwarded if isinstance(ev, Event) and ev.is_fill]
    # Every fill continues from its order's fill forwarded before it, or from one
    # before the backfill's start.
    at_ns = {(a["order_id"], Decimal(a["cum_qty"])): market.activity_ns[a["id"]]
             for a in acts}
    reached: dict[str, Decimal] = {}
    for ev in fills:
        assert ev.fill_qty is not None
        before = ev.cum_qty - ev.fill_qty
        assert before == reached.get(ev.order_id, Decimal(0)) or (
            ev.order_id not in reached and at_ns[(ev.order_id, before)] < start_ns), ev
        reached[ev.order_id] = ev.cum_qty
    # The page's millisecond before the last, and nothing of the last.
    assert {ev.activity_id for ev in fills} == {a["id"] for a in acts[k - 99:k]}



# --- can recovery keep up? (recovery_over_budget) ------------------------------------------


class _Warnings:
    """Stands in for the recovery module's logger: keeps its warnings."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.warnings.append((event, kw))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_judging_the_pace_by_what_the_live_buffer_can_hold() -> None:
    """The soak's case: the account fills at 272/s, REST reads 150/s, yet a reconnect
    covers a fixed range (the outage and its margins) while the live buffer holds the
    rest: it keeps up. Behind only when the buffer would overflow before REST gets
    there, or, with no live fill to bound the range, when the account outruns REST."""
    second = 1_000_000_000
    common: dict[str, Any] = {"first_ns": 0, "sustainable": 150.0, "was_behind": False}
    # 30 s in: 4,500 fills read (of 272/s), 15 s of the market left before the live
    # stream's first fill; 15,000 frames buffered.
    kept = judge_pace(fills=4_500, last_ns=int(4_500 / 272 * second), took=30.0,
                      live_from_ns=int(4_500 / 272 * second) + 10 * second,
                      live=(15_000, 100_000), **common)
    assert kept is not None and not kept.behind
    assert kept.fills_per_s > kept.read_fills_per_s  # the old judgement's "behind"
    assert kept.projected_s == pytest.approx(272 * 15 / 150, rel=0.01)
    assert kept.buffer_projected == pytest.approx(15_000 + 500 * 272 * 15 / 150, rel=0.01)
    # The same with a buffer of 30,000: it would overflow before REST gets there.
    full = judge_pace(fills=4_500, last_ns=int(4_500 / 272 * second), took=30.0,
                      live_from_ns=int(4_500 / 272 * second) + 10 * second,
                      live=(15_000, 30_000), **common)
    assert full is not None and full.behind and full.load > BEHIND_HIGH
    # Nothing bounds the range (no live fill yet): the fill rate against REST's pace.
    open_ended = judge_pace(fills=4_500, last_ns=int(4_500 / 272 * second), took=30.0,
                            live_from_ns=None, live=(0, 100_000), **common)
    assert open_ended is not None and open_ended.behind
    slow = judge_pace(fills=1_500, last_ns=int(1_500 / 100 * second), took=10.0,
                      live_from_ns=None, live=None, **common)
    assert slow is not None and not slow.behind
    # Hysteresis: between the two marks, a recovery stays as the one before it was.
    between = (BEHIND_LOW + BEHIND_HIGH) / 2
    for was in (False, True):
        verdict = judge_pace(fills=100, first_ns=0, last_ns=second, took=1.0,
                             sustainable=150.0, live_from_ns=second - LIVE_OVERLAP_NS,
                             live=(round(between * 10_000), 10_000), was_behind=was)
        assert verdict is not None and verdict.behind is was
    assert judge_pace(fills=0, first_ns=None, last_ns=None, took=1.0, sustainable=150.0,
                      live_from_ns=None, live=None, was_behind=False) is None


async def test_a_recovery_that_completes_within_the_buffer_says_nothing_and_one_that_cannot_warns(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through `backfill` on the simulated broker in virtual time: the account filled
    faster than the budget reads (the old judgement warned at every recovery), the live
    stream's first fill at the market's end, frames arriving at 500/s. A buffer of
    100,000 holds them: no warning, the gauge 0. One of 3,000 cannot: the warning with
    its figures, the gauge 1."""
    warnings = _Warnings(recovery_module.log)
    monkeypatch.setattr(recovery_module, "log", warnings)
    outcomes = []
    for capacity in (100_000, 3_000):
        broker = played(orders=1_500, rate=1_000.0, rest_rate_limit=200)
        began = trio.current_time()

        def held(capacity: int = capacity, began: float = began) -> tuple[int, int]:
            return min(capacity, round(500 * (trio.current_time() - began))), capacity

        metrics = Metrics()
        recovery, _ = await recover(broker, live_from_ns=broker.market.now_ns,
                                    live_held=held, metrics=metrics)
        fill_rate = broker.fills_total / ((broker.market.now_ns - broker.market.epoch_ns) / 1e9)
        budget = recovery.rest.budget  # type: ignore[attr-defined]
        assert fill_rate > budget.sustainable_fills_per_second(100)  # outruns REST
        outcomes.append((len(warnings.warnings),
                         metrics.recovery_behind._value.get()))
    assert outcomes[0] == (0, 0), warnings.warnings
    assert outcomes[1] == (1, 1), warnings.warnings
    event, figures = warnings.warnings[0]
    assert event == "recovery_over_budget"
    assert figures["live_buffer_size"] == 3_000
    assert figures["live_buffer_projected"] > 0.9 * 3_000
    assert figures["fills_per_s"] > figures["sustainable_fills_per_s"]
