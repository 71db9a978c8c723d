"""The ground truth (`truth.py`): consistent with every update the market streamed."""

from __future__ import annotations

from collections import defaultdict
from decimal import ROUND_HALF_EVEN, Decimal, localcontext

from stream_supervisor.testing.broker import SimulatedBroker

from .helpers import config, play_all


def test_ground_truth_is_consistent_with_the_updates() -> None:
    broker = SimulatedBroker(config(seed=5, orders=150))
    updates = play_all(broker)
    truth = broker.ground_truth()
    assert broker.finished and truth["finished"]
    assert truth["updates_total"] == len(updates)

    net: dict[str, Decimal] = defaultdict(Decimal)
    seen_flip = seen_fraction = False
    with localcontext() as ctx:
        ctx.prec = 50
        for u in updates:
            if u["event"] not in ("fill", "partial_fill"):
                continue
            o = u["order"]
            signed = Decimal(u["qty"]) * (1 if o["side"] == "buy" else -1)
            before = net[o["symbol"]]
            net[o["symbol"]] += signed
            assert Decimal(u["position_qty"]) == net[o["symbol"]]
            seen_flip |= before * net[o["symbol"]] < 0
            seen_fraction |= Decimal(u["qty"]) != Decimal(u["qty"]).to_integral_value()
    assert seen_flip and seen_fraction

    fills_total = 0
    for order_id, o in truth["orders"].items():
        fills = o["fills"]
        fills_total += len(fills)
        assert sum(Decimal(f["qty"]) for f in fills) == Decimal(o["filled_qty"])
        cum = Decimal(0)
        for f in fills:
            cum += Decimal(f["qty"])
            assert Decimal(f["cum_qty"]) == cum
        assert o["status"] in ("filled", "canceled", "expired")
        if o["status"] == "filled":
            assert o["filled_qty"] == o["qty"]
        if fills:
            with localcontext() as ctx:
                ctx.prec = 50
                avg = sum(Decimal(f["qty"]) * Decimal(f["price"]) for f in fills) / cum
                expected = avg.quantize(Decimal("1e-12"), rounding=ROUND_HALF_EVEN).normalize()
            assert Decimal(o["filled_avg_price"]) == expected
        else:
            assert o["filled_avg_price"] is None
        assert order_id in {u["order"]["id"] for u in updates}
    assert fills_total == truth["fills_total"]
    for symbol, p in truth["positions"].items():
        assert Decimal(p["qty"]) == net[symbol]
        assert (p["avg_entry_price"] is None) == (net[symbol] == 0)

    statuses = {o["status"] for o in truth["orders"].values()}
    assert {"filled", "canceled"} <= statuses
    partially_canceled = [
        o for o in truth["orders"].values() if o["status"] == "canceled" and o["fills"]
    ]
    assert partially_canceled
