"""The broker's word as a starting state, property-tested (docs/design.md, section 9):
whatever moment a baseline is taken at, and whatever of the fills before it arrive again
afterwards (stream replays, the first backfill), the position ends at the broker's: no
fill counted twice, none lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_supervisor.adjustments import (
    BASELINE,
    RECONCILE,
    BrokerPosition,
    baseline_order,
    broker_position,
    compare,
    plan_adjustments,
)
from stream_supervisor.events import Event, fill_key
from stream_supervisor.orders import OrderState
from stream_supervisor.positions import Position
from stream_supervisor.store import Batch, BrokerWord
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore

ACCOUNT = "acct-prop"
T0 = datetime(2026, 11, 30, 14, 30, tzinfo=UTC)
D = Decimal


def _fill(order: str, side: str, cum: Decimal, qty: Decimal, price: Decimal, avg: Decimal,
          i: int) -> Event:
    ts = T0 + timedelta(seconds=i)
    return Event(key=fill_key(order, cum), event="partial_fill", source="stream",
                 order_id=order, symbol="AAPL", side=side, status="partially_filled",
                 cum_qty=cum, timestamp=ts, ts_ns=int(ts.timestamp()) * 10**9,
                 cum_avg_price=avg, fill_qty=qty, fill_price=price)


fills_strategy = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 50), st.integers(90, 110)),
    min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(fills=fills_strategy, held=st.integers(-200, 200), cut=st.integers(0, 25),
       replay=st.lists(st.integers(0, 24), max_size=10), data=st.data())
def test_any_snapshot_moment_ends_at_the_broker_position(
        fills: list[tuple[int, int, int]], held: int, cut: int, replay: list[int],
        data: st.DataObject) -> None:
    sides = {n: data.draw(st.sampled_from(["buy", "sell"]), label=f"side{n}") for n in range(4)}
    # The broker's books: every fill, in order, each order's cumulative and average.
    events: list[Event] = []
    cum: dict[str, Decimal] = {}
    paid: dict[str, Decimal] = {}
    for i, (n, qty, price) in enumerate(fills):
        oid = f"o{n}"
        cum[oid] = cum.get(oid, D(0)) + qty
        paid[oid] = paid.get(oid, D(0)) + qty * price
        events.append(_fill(oid, sides[n], cum[oid], D(qty), D(price), paid[oid] / cum[oid], i))
    cut = min(cut, len(events))
    before, after = events[:cut], events[cut:]
    net_at_cut = D(held) + sum((e.fill_qty or 0) * (1 if e.side == "buy" else -1)
                               for e in before)
    final = net_at_cut + sum((e.fill_qty or 0) * (1 if e.side == "buy" else -1) for e in after)
    # Orders the snapshot knows: their filled_qty at that moment.
    marks: dict[str, Event] = {}
    for e in before:
        marks[e.order_id] = e
    orders = [OrderState(oid, "AAPL", e.side, "partially_filled", e.cum_qty, e.cum_avg_price)
              for oid, e in marks.items()]
    resent = [before[i] for i in replay if i < len(before)]

    async def run() -> Decimal:
        store = MemoryStore(MemoryDatabase())
        await store.apply_broker_word(BrokerWord(
            ACCOUNT, BASELINE, T0,
            [BrokerPosition("AAPL", net_at_cut, D(100))] if net_at_cut else [],
            orders=orders))
        # Fills of before the snapshot come again, mixed into those after it.
        mixed = list(after)
        for k, e in enumerate(resent):
            mixed.insert(min(k * 2, len(mixed)), e)
        for k in range(0, len(mixed), 3):
            await store.commit_batch(Batch(ACCOUNT, mixed[k:k + 3]))
        await store.commit_batch(Batch(ACCOUNT, list(before)))  # a full backfill, too
        return (await store.snapshot(ACCOUNT)).net_position("AAPL")

    assert trio.run(run) == final


def test_a_symbol_already_equal_is_not_adjusted() -> None:
    row = Position(ACCOUNT, "AAPL", D(5), D(10), "o1", None, T0, peak_qty=D(5), position_id=1)
    same = [BrokerPosition("AAPL", D(5), D("10.0000000000004"))]
    assert plan_adjustments(ACCOUNT, {"AAPL": row}, same, reason=BASELINE, taken_at=T0) == []
    # reconcile compares quantities; a baseline takes the broker's average too (fills we
    # never saw can move it and leave the quantity as it was).
    moved = [BrokerPosition("AAPL", D(5), D(11))]
    assert plan_adjustments(ACCOUNT, {"AAPL": row}, moved, reason=RECONCILE,
                            taken_at=T0) == []
    (change,) = plan_adjustments(ACCOUNT, {"AAPL": row}, moved, reason=BASELINE, taken_at=T0)
    assert (change.adjustment.qty_before, change.adjustment.qty_after) == (D(5), D(5))
    assert change.opened is not None and change.opened.avg_entry_price == D(11)


def test_a_known_order_raises_mark_and_filled_by_the_same_amount() -> None:
    stored = OrderState("o1", "AAPL", "buy", "pending_cancel", D(4), D(10),
                        updated_at=T0)
    broker = OrderState("o1", "AAPL", "buy", "partially_filled", D(9), D(11),
                        updated_at=T0 + timedelta(minutes=1))
    state, mark = baseline_order(stored, D(1), broker)
    assert (state.filled_qty, state.filled_avg_price, state.status, mark) == (
        D(9), D(11), "partially_filled", D(6))
    # A broker snapshot older than what we hold changes neither fills nor status.
    old = OrderState("o1", "AAPL", "buy", "new", D(2), D(10), updated_at=T0 - timedelta(1))
    state, mark = baseline_order(stored, D(1), old)
    assert (state.filled_qty, state.status, mark) == (D(4), "pending_cancel", D(1))


def test_crypto_and_shorts_from_the_positions_endpoint() -> None:
    btc = broker_position({"symbol": "BTCUSD", "qty": "0.25", "side": "long",
                           "avg_entry_price": "60000", "asset_class": "crypto",
                           "asset_id": "a-1"})
    short = broker_position({"symbol": "TSLA", "qty": "7", "side": "short",
                             "avg_entry_price": "200"})
    assert (btc.symbol, btc.qty, btc.asset_id) == ("BTC/USD", D("0.25"), "a-1")
    assert short.qty == D(-7)
    ours = [Position(ACCOUNT, "BTC/USD", D("0.25"), D(1), "o", None, T0, peak_qty=D("0.25"))]
    assert compare(ours, [btc])[1] == []
    # A renamed symbol whose asset id we know is the same position.
    renamed = BrokerPosition("META", D(3), D(1), asset_id="fb-id")
    fb = [Position(ACCOUNT, "FB", D(3), D(1), "o", None, T0, peak_qty=D(3))]
    assert compare(fb, [renamed], {"fb-id": "FB"})[1] == []
    assert [d.symbol for d in compare(fb, [renamed])[1]] == ["FB", "META"]


def test_a_baselined_option_is_worth_its_contract_multiplier() -> None:
    # An option held before the first start: 2 contracts bought at 1.50 a share. Its
    # cost basis is 300 dollars, and a row closed by the baseline keeps its own terms.
    call = "AAPL261218C00190000"
    theirs = [broker_position({"symbol": call, "qty": "2", "side": "long",
                               "avg_entry_price": "1.50", "asset_class": "us_option"})]
    (change,) = plan_adjustments(ACCOUNT, {}, theirs, reason=BASELINE, taken_at=T0)
    assert change.opened is not None
    assert (change.opened.multiplier, change.opened.asset_class) == (D(100), "us_option")
    assert change.opened.cost_basis == D(300)
    # Without the broker's class the OCC symbol still says it is an option.
    (change,) = plan_adjustments(ACCOUNT, {}, [BrokerPosition(call, D(1), D(2))],
                                 reason=BASELINE, taken_at=T0)
    assert change.opened is not None and change.opened.multiplier == D(100)
    held = Position(ACCOUNT, call, D(3), D(2), "o1", None, T0, peak_qty=D(3),
                    position_id=7, multiplier=D(100), asset_class="us_option")
    (change,) = plan_adjustments(ACCOUNT, {call: held}, [], reason=RECONCILE, taken_at=T0)
    assert change.closed is not None
    assert (change.closed.multiplier, change.closed.asset_class) == (D(100), "us_option")
