"""The simulated market (`market.py`, `records.py`): deterministic order flow shaped like
the recording, and the broker-side position math."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal, localcontext

import pytest
import trio

from stream_supervisor.events import parse_timestamp
from stream_supervisor.testing.broker import ChaosConfig, SimulatedBroker

from ...fixtures import RECORDING
from .helpers import all_activities, config, fixture_lines, play_all

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|-05:00)$")
ORDER_TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_same_seed_same_frames_and_truth() -> None:
    a, b = SimulatedBroker(config(seed=7, orders=60)), SimulatedBroker(config(seed=7, orders=60))
    assert play_all(a) == play_all(b)
    assert a.ground_truth() == b.ground_truth()
    assert all_activities(a) == all_activities(b)
    other = SimulatedBroker(config(seed=8, orders=60))
    assert play_all(other) != play_all(SimulatedBroker(config(seed=7, orders=60)))


def test_chaos_knobs_do_not_change_the_market() -> None:
    calm = SimulatedBroker(config(seed=3, orders=30))
    noisy = SimulatedBroker(config(seed=3, orders=30, chaos=ChaosConfig(duplicate_prob=0.5)))
    assert play_all(calm) == play_all(noisy)


def test_position_math_matches_design_section_4() -> None:
    """Replaying the fills with the DESIGN math reproduces avg price and realized P&L."""
    broker = SimulatedBroker(config(seed=9, orders=120))
    updates = play_all(broker)
    book: dict[str, tuple[Decimal, Decimal | None, Decimal]] = {}
    with localcontext() as ctx:
        ctx.prec = 50
        for u in updates:
            if u["event"] not in ("fill", "partial_fill"):
                continue
            sym, price = u["order"]["symbol"], Decimal(u["price"])
            dq = Decimal(u["qty"]) * (1 if u["order"]["side"] == "buy" else -1)
            q, a, r = book.get(sym, (Decimal(0), None, Decimal(0)))
            if q == 0:
                q, a = dq, price
            elif (q > 0) == (dq > 0):
                assert a is not None
                a, q = (q * a + dq * price) / (q + dq), q + dq
            else:
                assert a is not None
                r += min(abs(q), abs(dq)) * (price - a) * (1 if q > 0 else -1)
                after = q + dq
                a = None if after == 0 else (price if (after > 0) != (q > 0) else a)
                q = after
            book[sym] = (q, a, r)
        truth = broker.ground_truth()["positions"]
        for sym, (q, a, r) in book.items():
            assert Decimal(truth[sym]["qty"]) == q
            assert Decimal(truth[sym]["realized_pnl"]) == r
            if a is None:
                assert truth[sym]["avg_entry_price"] is None
            else:
                assert Decimal(truth[sym]["avg_entry_price"]) == a.quantize(Decimal("1e-12"))


def test_shapes_match_the_recording() -> None:
    recorded = fixture_lines()
    broker = SimulatedBroker(config(seed=4242, orders=150))
    updates = play_all(broker)

    recorded_shapes = {(d["data"]["event"], tuple(d["data"])) for d in recorded[2:]}
    assert {(u["event"], tuple(u)) for u in updates} <= recorded_shapes
    assert {u["event"] for u in updates} >= {
        "pending_new",
        "new",
        "partial_fill",
        "fill",
        "pending_cancel",
        "canceled",
        "expired",
    }
    order_keys = tuple(recorded[2]["data"]["order"])
    for u in updates:
        assert tuple(u["order"]) == order_keys
        assert TS_RE.match(u["timestamp"]), u["timestamp"]
        for key in ("created_at", "updated_at", "submitted_at", "filled_at", "canceled_at"):
            assert u["order"][key] is None or ORDER_TS_RE.match(u["order"][key])
        for key in ("qty", "filled_qty", "price", "position_qty"):
            value = u.get(key, u["order"].get(key))
            assert value is None or (isinstance(value, str) and "E" not in value)
    styles = {u["timestamp"][-1] for u in updates}
    assert styles == {"Z", "0"}  # both `Z` and `-05:00`
    assert any(u["timestamp"].endswith("000000Z") for u in updates)  # whole-ms stamps
    # timestamps never go backwards, whatever their offset
    stamps = [parse_timestamp(u["timestamp"])[1] for u in updates]
    assert stamps == sorted(stamps)

    recorded_acts = json.loads((RECORDING / "fill_activities.json").read_text())
    acts = all_activities(broker)
    assert all(tuple(a) == tuple(recorded_acts[0]) for a in acts)
    assert all(re.match(r"^\d{17}::[0-9a-f-]{36}$", a["id"]) for a in acts)

    recorded_truth = json.loads((RECORDING / "ground_truth.json").read_text())
    truth = broker.ground_truth()
    assert set(truth) == set(recorded_truth)
    assert set(truth["stats"]) >= set(recorded_truth["stats"])
    # The recording predates the poison kinds (issue 13): every kind it has, and more.
    assert set(truth["injected"]) >= set(recorded_truth["injected"])
    sample_order = next(iter(recorded_truth["orders"].values()))
    for o in truth["orders"].values():
        assert set(o) == set(sample_order)
        assert all(set(f) == set(sample_order["fills"][0]) for f in o["fills"])
    assert all(
        set(p) == {"qty", "avg_entry_price", "realized_pnl"} for p in truth["positions"].values()
    )


def test_account_id_defaults_to_a_seeded_uuid() -> None:
    assert SimulatedBroker(config(seed=1)).account_id == SimulatedBroker(config(seed=1)).account_id
    assert SimulatedBroker(config(seed=1)).account_id != SimulatedBroker(config(seed=2)).account_id
    assert SimulatedBroker(config(account_id="acct-x")).account_id == "acct-x"


def test_strategy_tags_and_account_salt_leave_the_market_as_it_was() -> None:
    """Tagging client order ids with strategies and giving the session an account of its
    own change ids only: the same orders, quantities and prices; a bare seed keeps the
    recorded shape (uuid client order ids)."""
    plain = play_all(SimulatedBroker(config(seed=4, orders=40)))
    tagged_broker = SimulatedBroker(config(seed=4, orders=40, account_id="acct-1",
                                           strategies=("alpha", "beta")))
    tagged = play_all(tagged_broker)
    assert len(plain) == len(tagged)
    for a, b in zip(plain, tagged, strict=True):
        assert (a["event"], a["order"]["symbol"], a["order"]["qty"], a.get("price")) == (
            b["event"], b["order"]["symbol"], b["order"]["qty"], b.get("price"))
    assert {u["order"]["client_order_id"].split("-")[0] for u in tagged} == {"alpha", "beta"}
    assert all(re.fullmatch(r"[0-9a-f-]{36}", u["order"]["client_order_id"]) for u in plain)
    # Another account: other order ids from the same seed (event keys never collide).
    other = play_all(SimulatedBroker(config(seed=4, orders=40, account_id="acct-2")))
    ids = {u["order"]["id"] for u in tagged}
    assert ids.isdisjoint({u["order"]["id"] for u in other})
    assert ids == {u["order"]["id"] for u in play_all(SimulatedBroker(
        config(seed=4, orders=40, account_id="acct-1")))}


async def test_a_burst_plays_its_updates_without_pacing(autojump_clock: object) -> None:
    """In virtual time: the burst's 100 updates take none; the others go out when their
    market time is due (1/50 s apart on average), so the market's clock keeps to the
    wall clock's."""
    broker = SimulatedBroker(config(seed=5, orders=60, rate=50.0, burst=(20, 100)))
    market_from = broker.market.now_ns
    started = trio.current_time()
    await broker.run_market()
    times = [parse_timestamp(u["timestamp"])[1] for u in broker.market.updates]
    burst = (times[119] - times[19]) / 1e9  # the burst's span of market time
    market = (broker.market.now_ns - market_from) / 1e9
    assert abs((trio.current_time() - started) - (market - burst)) <= 2 / 50.0
    assert abs(market - burst - (broker.updates_total - 100) / 50.0) <= 0.1 * market


def test_replaced_orders_keep_their_fills_and_the_replacement_fills_the_rest() -> None:
    """docs/design.md, section 9: `replaced` on the old order (`replaced_by`), `new` with
    `replaces` on the replacing one, partial fills before and after; positions count
    each fill once."""
    broker = SimulatedBroker(config(seed=3, orders=40, replace_prob=1.0))
    updates = play_all(broker)
    truth = broker.ground_truth()
    replaced = {oid: o for oid, o in truth["orders"].items() if o["status"] == "replaced"}
    assert replaced
    for oid, old in replaced.items():
        final = [u for u in updates if u["order"]["id"] == oid][-1]
        assert final["event"] == "replaced" and final["order"]["replaced_by"]
        successor = next(u["order"] for u in updates
                         if u["order"].get("replaces") == oid)
        first = next(u for u in updates if u["order"]["id"] == successor["id"])
        assert first["event"] == "new"
        assert Decimal(old["filled_qty"]) > 0
        after = truth["orders"][successor["id"]]
        assert Decimal(after["filled_qty"]) > 0
        assert Decimal(old["filled_qty"]) + Decimal(after["qty"]) == Decimal(old["qty"])
    # Net positions are the signed sum of every order's fills, each counted once.
    for symbol, pos in truth["positions"].items():
        net = sum((Decimal(o["filled_qty"]) * (1 if o["side"] == "buy" else -1)
                   for o in truth["orders"].values() if o["symbol"] == symbol), Decimal(0))
        assert net == Decimal(pos["qty"])


def test_replacements_leave_sessions_without_them_as_they_were() -> None:
    assert play_all(SimulatedBroker(config(seed=5, orders=30))) == play_all(
        SimulatedBroker(config(seed=5, orders=30, replace_prob=0.0)))


def test_positions_held_before_the_session_are_the_broker_positions() -> None:
    broker = SimulatedBroker(config(seed=5, orders=0, preexisting=(("AAPL", "-40", "190"),)))
    assert [(p["symbol"], p["qty"], p["side"]) for p in broker.positions()] == [
        ("AAPL", "-40", "short")]


def test_the_market_clock_can_start_when_trading_starts() -> None:
    broker = SimulatedBroker(config(seed=4, orders=5))
    moment = datetime(2026, 11, 30, 14, 0, 0, 250_000, tzinfo=UTC)
    broker.market.start_clock(moment)
    first = broker.step()
    assert first is not None
    stamp = broker.market.activity_ns.get(broker.market.activity_ids[0]) if (
        broker.market.activity_ids) else broker.market.now_ns
    assert stamp is not None and stamp >= int(moment.timestamp() * 1e9)
    with pytest.raises(RuntimeError):
        broker.market.start_clock(moment)
