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
from stream_supervisor.messages import Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.recovery import GapRecovery, RecoverySettings
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


async def recover(broker: SimulatedBroker) -> tuple[GapRecovery, list[Item]]:
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
            rest, forward, Metrics(), SupervisorState(), wallclock=lambda: end)
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
