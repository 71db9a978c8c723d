"""Options, multi-leg orders, crypto and the non-trade activities, through both stores.

Every update is a real frame (or REST body) decoded by `protocol`/`activities`, committed
by `commit_batch` on MemoryStore and PgStore alike (docs/design.md, section 10).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import msgspec
import pytest
import trio

from stream_supervisor import protocol
from stream_supervisor.activities import (
    APPLIED,
    MORE_THAN_HELD,
    NOT_UNDERSTOOD,
    WireNonTrade,
    decode_non_trade,
    non_trade_to_event,
)
from stream_supervisor.check import run_checks
from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.pgstore import PgStore
from stream_supervisor.reconcile import compare_positions, unapplied_activities
from stream_supervisor.store import Batch, Store, StoreSnapshot
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore

ACCOUNT = "acct-assets"
CALL = "AAPL240119C00190000"
PUT = "AAPL240119P00190000"
D = Decimal
_ids = itertools.count(1)


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    made: Store
    if request.param == "memory":
        made = MemoryStore(MemoryDatabase())
    else:
        made = PgStore(request.getfixturevalue("database_url"), statement_timeout_ms=5_000)
    await made.open()
    yield made
    await made.aclose()


def _ts(n: int) -> str:
    return f"2024-01-19T15:{n // 60:02d}:{n % 60:02d}.000000Z"


def order(oid: str, symbol: str, side: str, qty: str, filled: str, avg: str | None,
          status: str, asset_class: str, **extra: Any) -> dict[str, Any]:
    return {"id": oid, "client_order_id": f"c-{oid}", "symbol": symbol, "side": side,
            "qty": qty, "filled_qty": filled, "filled_avg_price": avg, "status": status,
            "asset_class": asset_class, "order_type": "limit", "type": "limit",
            "created_at": _ts(0), "updated_at": _ts(0), **extra}


def frame(event: str, data_order: dict[str, Any], n: int, *, qty: str | None = None,
          price: str | None = None, position_qty: str | None = None) -> Event:
    data: dict[str, Any] = {"event": event, "order": data_order, "timestamp": _ts(n)}
    if qty is not None:
        data.update(qty=qty, price=price, position_qty=position_qty)
    decoded = protocol.decode_frame(msgspec.json.encode({"stream": "trade_updates",
                                                         "data": data}))
    assert isinstance(decoded, Event), decoded
    return decoded


def fills(oid: str, symbol: str, side: str, steps: Sequence[tuple[str, str]], start: int,
          asset_class: str = "us_equity", total: str | None = None) -> list[Event]:
    """An order filled by (qty, price) steps, as the stream shows each fill."""
    total_qty = total or str(sum(D(q) for q, _ in steps))
    cum, paid, out = D(0), D(0), []
    for i, (q, p) in enumerate(steps):
        cum += D(q)
        paid += D(q) * D(p)
        status = "filled" if cum == D(total_qty) else "partially_filled"
        out.append(frame("fill" if status == "filled" else "partial_fill",
                         order(oid, symbol, side, total_qty, str(cum), str(paid / cum), status,
                               asset_class), start + i, qty=q, price=p))
    return out


def activity(activity_type: str, symbol: str, qty: str, n: int, price: str | None = None,
             ) -> Event:
    body: dict[str, Any] = {"id": f"20240119{n:09d}::{next(_ids):08d}-act",
                            "activity_type": activity_type, "date": "2024-01-19",
                            "transaction_time": _ts(n), "symbol": symbol, "qty": qty,
                            "status": "executed"}
    if price is not None:
        body["price"] = price
    [wire] = decode_non_trade(msgspec.json.encode([body]))
    return non_trade_to_event(wire)


async def commit(store: Store, *batches: Sequence[Event]) -> StoreSnapshot:
    with trio.fail_after(30):
        for events in batches:
            await store.commit_batch(Batch(ACCOUNT, list(events)))
        return await store.snapshot(ACCOUNT)


def open_row(snap: StoreSnapshot, symbol: str) -> Any:
    rows = [p for p in snap.positions if p.symbol == symbol and p.is_open]
    assert len(rows) <= 1
    return rows[0] if rows else None


# --- options -------------------------------------------------------------------------


async def test_one_option_contract_bought_at_1_50_and_sold_at_2_50_realizes_100(
        store: Store) -> None:
    events = [*fills("o-buy", CALL, "buy", [("1", "1.50")], 1, "us_option"),
              *fills("o-sell", CALL, "sell", [("1", "2.50")], 2, "us_option")]
    snap = await commit(store, events[:1], events[1:])
    [row] = [p for p in snap.positions if p.symbol == CALL]
    assert (row.closed_at is not None, row.realized_pnl, row.multiplier, row.asset_class) \
        == (True, D(100), D(100), "us_option")
    assert [h.realized_pnl for h in snap.history] == [D(100)]


async def test_an_open_option_costs_its_premium_times_100(store: Store) -> None:
    snap = await commit(store, fills("o-buy", CALL, "buy", [("3", "1.50")], 1, "us_option"))
    assert open_row(snap, CALL).cost_basis == D(450)


async def test_an_expired_option_closes_with_its_premium_lost_once(store: Store) -> None:
    expiry = activity("OPEXP", CALL, "-2", 50)
    snap = await commit(store, fills("o-buy", CALL, "buy", [("2", "1.50")], 1, "us_option"),
                        [expiry], [expiry])
    [row] = [p for p in snap.positions if p.symbol == CALL]
    assert (row.closed_at is not None, row.realized_pnl, row.closing_activity_id) \
        == (True, D(-300), expiry.activity_id)
    assert [(a.activity_type, a.outcome) for a in snap.activities] == [("OPEXP", APPLIED)]


async def test_an_assigned_short_put_becomes_100_shares_at_the_strike(store: Store) -> None:
    assignment = activity("OPASN", PUT, "1", 50)
    snap = await commit(store, fills("o-sell", PUT, "sell", [("1", "3.00")], 1, "us_option"),
                        [assignment])
    [put] = [p for p in snap.positions if p.symbol == PUT]
    assert (put.closed_at is not None, put.realized_pnl) == (True, D(300))
    shares = open_row(snap, "AAPL")
    assert (shares.qty, shares.avg_entry_price, shares.multiplier) == (D(100), D(190), D(1))


async def test_an_expiry_or_assignment_of_more_contracts_than_held_changes_nothing(
        store: Store) -> None:
    """Behind the broker already (a contract it holds we never saw): closing more than
    the row holds would open the other side at price 0, and the stock's move would
    count contracts we never had. Stored, not applied, and reported."""
    expiry = activity("OPEXP", CALL, "-2", 50)
    assignment = activity("OPASN", PUT, "2", 51)
    snap = await commit(store, fills("o-buy", CALL, "buy", [("1", "1.50")], 1, "us_option"),
                        fills("o-sell", PUT, "sell", [("1", "3.00")], 2, "us_option"),
                        [expiry, assignment])
    assert open_row(snap, CALL).qty == D(1) and open_row(snap, PUT).qty == D(-1)
    assert open_row(snap, "AAPL") is None
    assert [(a.activity_type, a.outcome) for a in snap.activities] == [
        ("OPEXP", MORE_THAN_HELD), ("OPASN", MORE_THAN_HELD)]
    assert len(unapplied_activities(snap.activities)) == 2


async def test_an_exercised_long_call_adds_shares_to_a_position_held(store: Store) -> None:
    snap = await commit(store, fills("s-buy", "AAPL", "buy", [("50", "180")], 1),
                        fills("o-buy", CALL, "buy", [("1", "2.00")], 2, "us_option"),
                        [activity("OPEXC", CALL, "1", 50)])
    shares = open_row(snap, "AAPL")
    assert (shares.qty, shares.avg_entry_price) == (D(150), (50 * D(180) + 100 * D(190)) / 150)


# --- multi-leg orders ----------------------------------------------------------------


def mleg(status: str, event: str, n: int, filled: str, legs: Sequence[tuple[str, str | None]],
         ) -> Event:
    """A two-leg call spread: buy 2 of CALL, sell 2 of the 200 call."""
    leg_orders = [
        order("leg-1", CALL, "buy", "2", legs[0][0], legs[0][1],
              "filled" if legs[0][0] == "2" else "partially_filled", "us_option"),
        order("leg-2", "AAPL240119C00200000", "sell", "2", legs[1][0], legs[1][1],
              "filled" if legs[1][0] == "2" else "partially_filled", "us_option"),
    ]
    parent = order("mleg-1", "", "", "2", filled, None, status, "", order_class="mleg",
                   legs=leg_orders)
    return frame(event, parent, n, qty="1", price="0.80", position_qty="0")


MLEG_UPDATES = [
    mleg("partially_filled", "partial_fill", 1, "0", [("1", "2.10"), ("0", None)]),
    mleg("partially_filled", "partial_fill", 2, "1", [("1", "2.10"), ("1", "1.30")]),
    mleg("partially_filled", "partial_fill", 3, "1", [("2", "2.05"), ("1", "1.30")]),
    mleg("filled", "fill", 4, "2", [("2", "2.05"), ("2", "1.25")]),
]


async def test_each_leg_of_a_multi_leg_order_reaches_its_own_symbol_once(
        store: Store, request: pytest.FixtureRequest) -> None:
    u = MLEG_UPDATES
    refresh = protocol.snapshot_to_event(protocol.decode_order(u[3].raw[u[3].raw.index(
        b'"order":') + 8:u[3].raw.rindex(b',"timestamp"')]))
    leg_fills = [protocol.activity_to_event(protocol.WireActivity(
        id=f"2024011915000{i}::leg", order_id=oid, symbol=sym, side=side, price=D(p),
        qty=D(q), cum_qty=D(c), transaction_time=_ts(i)))
        for i, (oid, sym, side, p, q, c) in enumerate([
            ("leg-1", CALL, "buy", "2.10", "1", "1"), ("leg-2", "AAPL240119C00200000", "sell",
                                                       "1.30", "1", "1"),
            ("leg-1", CALL, "buy", "2.00", "1", "2"), ("leg-2", "AAPL240119C00200000", "sell",
                                                       "1.20", "1", "2")], 1)]
    # Partially filled, duplicated, out of order, replayed after the end, refreshed over
    # REST and backfilled leg by leg.
    snap = await commit(store, [u[0], u[0]], [u[2], u[1]], [u[1], u[3]], list(u), [refresh],
                        leg_fills, list(reversed(u)))
    long_leg, short_leg = open_row(snap, CALL), open_row(snap, "AAPL240119C00200000")
    assert (long_leg.qty, long_leg.avg_entry_price, long_leg.multiplier) == (D(2), D("2.05"),
                                                                            D(100))
    assert (short_leg.qty, short_leg.avg_entry_price) == (D(-2), D("1.25"))
    assert {o.order_id: (o.filled_qty, o.parent_order_id, o.order_class)
            for o in snap.orders.values()} == {
        "mleg-1": (D(2), None, "mleg"), "leg-1": (D(2), "mleg-1", None),
        "leg-2": (D(2), "mleg-1", None)}
    assert not [p for p in snap.positions if p.symbol == ""]
    if isinstance(store, PgStore):
        assert run_checks(request.getfixturevalue("database_url"), ACCOUNT) == []


async def test_a_leg_filled_without_an_average_price_is_a_dead_letter_not_a_crash(
        store: Store) -> None:
    """Nothing could price such a leg's fill: the update is refused with the reason (the
    writer never sees it), and the order's next update, priced, applies the fill."""
    parent = order("mleg-1", "", "", "2", "1", None, "partially_filled", "",
                   order_class="mleg", legs=[
                       order("leg-1", CALL, "buy", "2", "1", None, "partially_filled",
                             "us_option")])
    raw = msgspec.json.encode({"stream": "trade_updates", "data": {
        "event": "partial_fill", "order": parent, "timestamp": _ts(1)}})
    letter = protocol.decode_frame(raw)
    assert isinstance(letter, DeadLetter)
    assert "order.legs[0] has filled_qty 1 but no filled_avg_price" in letter.reason
    snap = await commit(store, [mleg("partially_filled", "partial_fill", 2, "1",
                                     [("1", "2.10"), ("1", "1.30")])])
    assert open_row(snap, CALL).qty == D(1)


# --- crypto --------------------------------------------------------------------------


async def test_a_day_of_fractional_crypto_and_its_fees_matches_the_broker_exactly(
        store: Store) -> None:
    buys = [("0.123456789", "42000.10"), ("0.000000001", "42001"), ("1.5", "41999.99")]
    sells = [("0.6", "42100"), ("0.023456790", "42050.5")]
    fees = [activity("CFEE", "BTCUSD", "-0.000308642", 100, "42000.10"),
            activity("CFEE", "BTCUSD", "-0.00375", 101, "41999.99")]
    snap = await commit(
        store,
        fills("c-1", "BTC/USD", "buy", buys[:1], 1, "crypto"),
        fills("c-2", "BTC/USD", "buy", buys[1:2], 2, "crypto"),
        fills("c-3", "BTC/USD", "buy", buys[2:], 3, "crypto"),
        fills("c-4", "BTC/USD", "sell", sells, 4, "crypto"),
        fees, fees)
    expected = sum(D(q) for q, _ in buys) - sum(D(q) for q, _ in sells) + D("-0.004058642")
    assert open_row(snap, "BTC/USD").qty == expected == D("0.995941358")
    broker = [{"symbol": "BTCUSD", "asset_class": "crypto", "qty": str(expected),
               "side": "long"}]
    stored = {p.symbol: p.qty for p in snap.positions if p.is_open}
    assert compare_positions(stored, broker) == []
    # Sell the rest: the position closes at exactly zero.
    snap = await commit(store, fills("c-5", "BTC/USD", "sell", [(str(expected), "42200")], 9,
                                     "crypto"))
    assert open_row(snap, "BTC/USD") is None
    assert [a.outcome for a in snap.activities] == [APPLIED, APPLIED]


# --- splits and activities not understood --------------------------------------------


async def test_a_4_for_1_split_between_two_fills(store: Store) -> None:
    snap = await commit(store, fills("s-1", "NVDA", "buy", [("10", "400")], 1),
                        [activity("SPLIT", "NVDA", "30", 50)],
                        fills("s-2", "NVDA", "buy", [("10", "101")], 60))
    row = open_row(snap, "NVDA")
    assert (row.qty, row.avg_entry_price) == (D(50), (D(4000) + D(1010)) / 50)
    snap = await commit(store, fills("s-3", "NVDA", "sell", [("50", "110")], 70))
    [closed] = [p for p in snap.positions if p.symbol == "NVDA"]
    assert closed.realized_pnl == 50 * D(110) - D(5010)


async def test_an_activity_not_understood_is_stored_and_reported_not_guessed(
        store: Store) -> None:
    snap = await commit(store, fills("s-1", "ABC", "buy", [("10", "5")], 1),
                        [activity("REORG", "ABC", "-10", 50)])
    assert open_row(snap, "ABC").qty == D(10)
    [record] = snap.activities
    assert record.outcome == NOT_UNDERSTOOD
    assert unapplied_activities(snap.activities) == [
        f"activity {record.activity_id} REORG ABC qty -10: not understood"]
    assert await store.load_activity_cursor(ACCOUNT) == record.activity_id


def test_a_non_trade_activity_has_a_key_of_its_own() -> None:
    wire = WireNonTrade(id="20240119000000000::x", activity_type="OPEXP", date="2024-01-19",
                        symbol=CALL, qty=D(-1))
    ev = non_trade_to_event(wire)
    assert (ev.key, ev.timestamp.isoformat()) == ("activity:20240119000000000::x",
                                                  "2024-01-19T21:00:00+00:00")
