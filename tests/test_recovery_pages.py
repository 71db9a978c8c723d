"""Backfill pages that advance and orders read in bulk (`recovery.py`), counted on the
simulated broker over the real HTTP client in virtual time: every FILL activity forwarded
once, at least 90% of each full page new, and requests growing with fills/100 +
orders/500, not with orders."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import trio
import trio.testing

from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.ledger import Cursor
from stream_supervisor.messages import Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.recovery import (
    GapRecovery,
    RecoverySettings,
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
                  ) -> tuple[GapRecovery, list[Item]]:
    forwarded: list[Item] = []

    async def forward(item: Item) -> None:
        forwarded.append(item)

    end = datetime.fromtimestamp(broker.market.now_ns / 1e9, UTC) + timedelta(seconds=1)
    rest = HttpBrokerRest(RestSettings(base_url="http://sim", key_id="SIMKEY",
                                       secret_key="SIMSECRET", budget_share=1.0),
                          transport=BrokerTransport(broker))
    async with rest:
        recovery = GapRecovery(
            RecoverySettings(backfill_overlap=300.0, first_start_lookback=3600.0,
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
    priced = [it for it in forwarded if isinstance(it, Event) and it.is_fill
              and it.cum_avg_price is not None]
    assert priced  # gap pricing found its orders in the list
    assert len(forwarded) - len(refreshed) == truth["fills_total"]


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
