"""The REST views (`rest.py`), called directly: paging like Alpaca's, following the market.

Over HTTP, with the REST chaos knobs: `test_server.py`."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest

from stream_supervisor.testing.broker import SimulatedBroker

from .helpers import all_activities, config, play_all


def test_activities_paging_and_the_same_millisecond_quirk() -> None:
    broker = SimulatedBroker(config(seed=21, orders=150))
    play_all(broker)
    truth = broker.ground_truth()
    everything = all_activities(broker)
    assert len(everything) == truth["fills_total"]
    ids = [a["id"] for a in everything]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all_activities(broker, page_size=7) == everything
    assert len(broker.fill_activities(after=None, page_size=500)) == 100  # max page size

    desc = all_activities(broker, direction="desc")
    assert desc == everything[::-1]

    pivot = everything[40]["transaction_time"]
    later = broker.fill_activities(after=pivot, page_size=100)
    assert later and all(a["transaction_time"] > pivot for a in later)
    assert later[0] == next(a for a in everything if a["transaction_time"] > pivot)
    until = everything[10]["transaction_time"]
    assert all(a["transaction_time"] < until for a in all_activities(broker, until=until))

    # Same-ms fills sort by uuid: some come back out of cum_qty order, but sorting one
    # order's activities by cum_qty gives exactly the ground truth.
    per_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in everything:
        per_order[a["order_id"]].append(a)
    inversions = 0
    for order_id, acts in per_order.items():
        cums = [Decimal(a["cum_qty"]) for a in acts]
        for earlier, later_act in pairwise(acts):
            if Decimal(later_act["cum_qty"]) < Decimal(earlier["cum_qty"]):
                inversions += 1
                assert later_act["id"][:17] == earlier["id"][:17]
        truth_fills = truth["orders"][order_id]["fills"]
        assert sorted(cums) == [Decimal(f["cum_qty"]) for f in truth_fills]
        assert {a["id"] for a in acts} == {f["activity_id"] for f in truth_fills}
    assert inversions > 0

    with pytest.raises(ValueError):
        broker.fill_activities(after="yesterday")


def test_rest_views_follow_the_market() -> None:
    broker = SimulatedBroker(config(seed=2, orders=40))
    for _ in range(25):
        broker.step()
    open_orders = broker.orders(status="open")
    assert open_orders and all(
        o["status"] not in ("filled", "canceled", "expired") for o in open_orders
    )
    created = [o["created_at"] for o in open_orders]
    assert created == sorted(created, reverse=True)
    one = open_orders[0]
    assert broker.order(one["id"]) == one
    assert broker.order("00000000-0000-4000-8000-000000000000") is None
    play_all(broker)
    assert broker.orders(status="open") == []
    assert len(broker.orders(status="all", limit=500)) == 40
    truth = broker.ground_truth()["positions"]
    positions = broker.positions()
    assert {p["symbol"]: p["qty"] for p in positions} == {
        s: p["qty"] for s, p in truth.items() if p["qty"] != "0"
    }
    for p in positions:
        assert p["side"] == ("long" if Decimal(p["qty"]) > 0 else "short")
        assert p["avg_entry_price"] == truth[p["symbol"]]["avg_entry_price"]
    account = broker.account()
    assert account["id"] == broker.account_id and account["status"] == "ACTIVE"
    assert account["currency"] == "USD" and account["account_number"]


def test_after_and_until_by_bisection_answer_as_a_scan_would() -> None:
    """The indexes (activity ids by millisecond, orders by submission) that keep a long
    soak's REST answers cheap give what reading every record would: the records whose
    time passes the filters, in the same order, from any `after`, `until`, page token
    and direction."""
    import random

    from stream_supervisor.testing.broker.rest import _OPEN_STATUSES
    from stream_supervisor.testing.broker.wire import utc_us

    broker = SimulatedBroker(config(seed=22, orders=400))
    rest = broker._rest
    market = broker.market
    rng = random.Random(5)
    steps = 0
    while broker.step() is not None:
        steps += 1
        if steps % 97:
            continue
        times = sorted(market.activity_ns.values()) or [market.now_ns]
        for _ in range(3):
            after_ns = rng.choice(times) + rng.choice((-1_000, 0, 1_000, 500_000))
            until_ns = after_ns + rng.randint(0, 3 * 10**9)
            ids = market.activity_ids
            token = rng.choice(ids) if ids and rng.random() < 0.3 else None
            for direction in ("asc", "desc"):
                for until in (None, utc_us(until_ns)):
                    got = rest.fill_activities(after=utc_us(after_ns), until=until,
                                               direction=direction, page_token=token,
                                               page_size=100)
                    order = range(len(ids)) if direction == "asc" else range(
                        len(ids) - 1, -1, -1)
                    want = [market.activities[i] for i in order
                            if (token is None or (ids[i] > token if direction == "asc"
                                                  else ids[i] < token))
                            and market.activity_ns[ids[i]] > after_ns - after_ns % 1000
                            and (until is None
                                 or market.activity_ns[ids[i]] < until_ns - until_ns % 1000)
                            ][:100]
                    assert got == want
            for status in ("all", "open", "closed"):
                for direction in ("asc", "desc"):
                    for after in (None, utc_us(after_ns)):
                        got_orders = rest.orders(status=status, after=after,
                                                 direction=direction, limit=50)
                        listed = sorted(
                            (o for o in market.orders.values() if o.parent_id is None
                             and (status == "all"
                                  or (o.status in _OPEN_STATUSES) == (status == "open"))
                             and (after is None
                                  or o.created_ns > after_ns - after_ns % 1000)),
                            key=lambda o: o.created_ns, reverse=direction == "desc")
                        assert got_orders == [o.snapshot() for o in listed[:50]]
