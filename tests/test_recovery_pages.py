"""Backfill pages that advance and orders read in bulk (`recovery.py`), counted on the
simulated broker over the real HTTP client in virtual time: every FILL activity forwarded
once, at least 90% of each full page new, and requests growing with fills/100 +
orders/500, not with orders."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import trio
import trio.testing

from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.ledger import Cursor
from stream_supervisor.messages import Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.recovery import (
    GapRecovery,
    RecoverySettings,
    StreamEdge,
    activity_time,
    backfill_start,
)
from stream_supervisor.rest_http import HttpBrokerRest, RestSettings
from stream_supervisor.state import SupervisorState
from stream_supervisor.testing.broker import SimConfig, SimulatedBroker
from stream_supervisor.testing.worlds.transport import BrokerTransport

START = datetime(2026, 11, 24, 15, 0, tzinfo=UTC)


def played(orders: int, rate: float, seed: int = 8) -> SimulatedBroker:
    broker = SimulatedBroker(SimConfig(seed=seed, orders=orders, rate=rate, start_time=START,
                                       rest_rate_limit=0))
    while broker.step() is not None:
        pass
    return broker


async def recover(broker: SimulatedBroker, state: SupervisorState | None = None,
                  lookback: float = 3600.0) -> tuple[GapRecovery, list[Item]]:
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
            rest, forward, Metrics(), state or SupervisorState(), wallclock=lambda: end)
        await recovery.backfill()
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

