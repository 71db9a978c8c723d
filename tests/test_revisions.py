"""Busts and corrections (stream_supervisor/revisions.py) applied through `apply_events`:
a bust arriving before the fill it busts, a revision reporting more than we hold, a bust
and a correction against the broker's books, and (hypothesis) any delivery of a history
with revisions, duplicated and reordered, ending at the broker's figures, once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_supervisor.events import Event, broker_event_key
from stream_supervisor.ledger import apply_events
from stream_supervisor.orders import OrderState
from stream_supervisor.positions import Position

D = Decimal
T0 = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


def ev(event: str, cum: str, cum_avg: str, *, qty: str, price: str, at: int,
       order: str = "o1", side: str = "buy", symbol: str = "AAPL",
       execution: str | None = None) -> Event:
    """An event of the Broker API's stream about `order`, reporting cumulative `cum` at
    average `cum_avg`, at T0 + `at` s; keyed by its event id, as that source keys them."""
    ts = T0 + timedelta(seconds=at)
    ts_ns = int(ts.timestamp()) * 1_000_000_000
    return Event(
        key=broker_event_key(f"{order}-{execution or at}"),
        event=event, source="stream", order_id=order, symbol=symbol, side=side,
        status="filled" if event == "fill" else "partially_filled", cum_qty=D(cum),
        timestamp=ts, ts_ns=ts_ns, order_qty=D(100),
        cum_avg_price=D(cum_avg) if D(cum) > 0 else None, fill_qty=D(qty),
        fill_price=D(price))


class Book:
    """A store in miniature: applies batches through `apply_events`, keeping keys."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.orders: dict[str, OrderState] = {}
        self.open: dict[str, Position] = {}
        self.realized = D(0)

    def apply(self, batch: list[Event]) -> None:
        new = []
        for e in batch:
            if e.key not in self.keys:
                self.keys.add(e.key)
                new.append(e)
        result = apply_events("a", self.orders, self.open, new)
        self.orders.update(result.orders)
        for pos in result.positions:
            if pos.is_open:
                self.open[pos.symbol] = pos
            else:
                self.open.pop(pos.symbol, None)
                self.realized += pos.realized_pnl
        self.realized_open = sum((p.realized_pnl for p in self.open.values()), D(0))

    def net(self, symbol: str = "AAPL") -> Decimal:
        pos = self.open.get(symbol)
        return pos.qty if pos is not None else D(0)




def test_a_bust_that_arrives_before_its_fill_makes_the_fill_stale() -> None:
    # Read again after a loss, the stream can hand the bust over before the fill it
    # busts reached the store: the bust's cumulative quantity is the truth from then on.
    first = apply_events("a", {}, {}, [ev("partial_fill", "4", "10", qty="4", price="10", at=1)])
    bust = ev("trade_bust", "4", "10", qty="-6", price="12", at=3)
    late_fill = ev("fill", "10", "11.2", qty="6", price="12", at=2)
    result = apply_events("a", first.orders, {p.symbol: p for p in first.positions},
                          [bust, late_fill])
    assert result.orders["o1"].filled_qty == D(4)
    (pos,) = result.positions if result.positions else first.positions
    assert pos.qty == D(4) and result.stale_fills == 1


def test_a_revision_reporting_more_than_we_hold_applies_the_gap_once() -> None:
    first = apply_events("a", {}, {}, [ev("partial_fill", "4", "10", qty="4", price="10", at=1)])
    # fills to 10 missed; one of 6 busted... of 14 in all: the bust says 8 at 10.5 remain
    bust = ev("trade_bust", "8", "10.5", qty="-6", price="12", at=5)
    result = apply_events("a", first.orders, {p.symbol: p for p in first.positions}, [bust])
    assert result.orders["o1"].filled_qty == D(8)
    (pos,) = result.positions
    assert pos.qty == D(8) and pos.avg_entry_price == D("10.5")


def test_a_bust_takes_the_fill_back_out_of_the_order_and_the_position() -> None:
    book = Book()
    book.apply([ev("partial_fill", "4", "10", qty="4", price="10", at=1),
                ev("fill", "10", "11.2", qty="6", price="12", at=2)])
    book.apply([ev("trade_bust", "4", "10", qty="-6", price="12", at=3)])
    order = book.orders["o1"]
    assert (order.filled_qty, order.filled_avg_price) == (D(4), D(10))
    assert book.open["AAPL"].qty == D(4) and book.open["AAPL"].avg_entry_price == D(10)
    assert book.open["AAPL"].realized_pnl == 0
    # The same bust again, even with its key forgotten, changes nothing.
    again = apply_events("a", book.orders, book.open,
                         [ev("trade_bust", "4", "10", qty="-6", price="12", at=3)])
    assert again.positions == [] and again.fills_applied == 0


def test_a_correction_of_the_price_moves_the_average_not_the_quantity() -> None:
    book = Book()
    book.apply([ev("partial_fill", "4", "10", qty="4", price="10", at=1),
                ev("fill", "10", "11.2", qty="6", price="12", at=2)])
    # The second fill was really at 13: 40 + 78 = 118 for 10.
    book.apply([ev("trade_correct", "10", "11.8", qty="6", price="13", at=4)])
    assert book.orders["o1"].filled_avg_price == D("11.8")
    assert book.open["AAPL"].qty == D(10) and book.open["AAPL"].avg_entry_price == D("11.8")


def test_a_bust_of_a_sell_gives_back_the_quantity_and_the_pnl_it_realized() -> None:
    book = Book()
    book.apply([ev("fill", "10", "10", qty="10", price="10", at=1)])
    book.apply([ev("fill", "4", "12", qty="4", price="12", at=2, order="o2", side="sell")])
    assert book.open["AAPL"].qty == D(6) and book.open["AAPL"].realized_pnl == D(8)
    book.apply([ev("trade_bust", "0", "0", qty="-4", price="12", at=3, order="o2",
                   side="sell")])
    pos = book.open["AAPL"]
    assert (pos.qty, pos.avg_entry_price, pos.realized_pnl) == (D(10), D(10), D(0))
    assert book.orders["o2"].filled_qty == 0


# --- any delivery of a history with revisions ends at the broker's figures -------------

_fill = st.tuples(st.integers(1, 9), st.integers(90, 110))


@st.composite
def _histories(draw: st.DrawFn) -> tuple[list[Event], Decimal, Decimal | None]:
    """One buy order's fills with busts and corrections between them, as the broker
    reports them (each update carries the order's cumulative figures then), and the
    broker's final cumulative quantity and average."""
    fills: dict[str, tuple[int, int]] = {}
    out: list[Event] = []
    for step in range(draw(st.integers(1, 12))):
        at = step + 1
        live = sorted(fills)
        kind = draw(st.sampled_from(["fill", "fill", "bust", "correct"]) if live
                    else st.just("fill"))
        if kind == "fill":
            qty, price = draw(_fill)
            fills[f"e{step}"] = (qty, price)
            event, fq, fp = "partial_fill", str(qty), str(price)
        else:
            target = draw(st.sampled_from(live))
            old_qty, old_price = fills.pop(target)
            if kind == "correct":
                fills[target] = draw(_fill)
            event, fq, fp = f"trade_{kind}", str(-old_qty), str(old_price)
        cum = sum(q for q, _ in fills.values())
        money = sum(q * p for q, p in fills.values())
        now_avg = D(money) / D(cum) if cum else D(0)
        out.append(ev(event, str(cum), str(now_avg), qty=fq, price=fp, at=at,
                      execution=f"x{step}"))
    cum = sum(q for q, _ in fills.values())
    avg = D(sum(q * p for q, p in fills.values())) / D(cum) if cum else None
    return out, D(cum), avg


@settings(max_examples=300)
@given(history=_histories(), data=st.data(), keys_kept=st.booleans())
def test_any_delivery_with_revisions_ends_at_the_brokers_figures(
        history: tuple[list[Event], Decimal, Decimal | None], data: st.DataObject,
        keys_kept: bool) -> None:
    events, cum, avg = history
    # The events in order (one account's stream), with earlier ones delivered again at
    # any point (a resume from before the cursor), in batches of any size.
    delivery: list[Event] = []
    for i, e in enumerate(events):
        delivery.append(e)
        if data.draw(st.booleans()):
            back = data.draw(st.integers(0, i))
            delivery.extend(events[back:i + 1])
    book = Book()
    while delivery:
        size = data.draw(st.integers(1, len(delivery)))
        batch, delivery = delivery[:size], delivery[size:]
        if not keys_kept:
            book.keys.clear()  # keys pruned: layer 2 alone must hold
        book.apply(batch)
    order = book.orders["o1"]
    assert order.filled_qty == cum
    assert book.net() == cum
    if avg is not None:
        assert order.filled_avg_price is not None
        assert abs(order.filled_avg_price - avg) < D("1e-20")
        assert abs(book.open["AAPL"].avg_entry_price - avg) < D("1e-20")


def test_a_bust_that_reopens_an_option_position_reopens_it_as_contracts() -> None:
    """A bust of the sell that closed a long call: the row it reopens is the option's,
    100 shares a contract, not one of shares at the premium."""
    call = "AAPL240119C00190000"
    book = Book()
    book.apply([msgspec.structs.replace(
        ev("fill", "1", "1.50", qty="1", price="1.50", at=1, symbol=call),
        asset_class="us_option")])
    book.apply([msgspec.structs.replace(
        ev("fill", "1", "2.50", qty="1", price="2.50", at=2, order="o2", side="sell",
           symbol=call), asset_class="us_option")])
    assert book.net(call) == 0 and book.realized == D(100)
    book.apply([msgspec.structs.replace(
        ev("trade_bust", "0", "0", qty="-1", price="2.50", at=3, order="o2", side="sell",
           symbol=call), asset_class="us_option")])
    pos = book.open[call]
    assert (pos.qty, pos.multiplier, pos.asset_class) == (D(1), D(100), "us_option")
