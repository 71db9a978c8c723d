"""Symbol level of exactly-once: position math per account and symbol, Decimal only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_supervisor.orders import FillDelta
from stream_supervisor.positions import Position, PositionStep, apply_fill

D = Decimal
T0 = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
ACCOUNT = "acct-1"


def fill(qty: str | Decimal, price: str | Decimal, *, order: str = "o1", t: int = 0) -> FillDelta:
    return FillDelta(
        order_id=order,
        client_order_id=f"c-{order}",
        symbol="AAPL",
        qty=D(qty),
        price=D(price),
        timestamp=T0 + timedelta(seconds=t),
        position_qty=None,
        exact=True,
    )


def apply_all(*fills: FillDelta) -> tuple[Position | None, list[PositionStep]]:
    current: Position | None = None
    steps = []
    for f in fills:
        step = apply_fill(current, ACCOUNT, f)
        steps.append(step)
        current = step.open
    return current, steps


def assert_decimals(pos: Position) -> None:
    for value in (pos.qty, pos.avg_entry_price, pos.realized_pnl, pos.peak_qty):
        assert type(value) is Decimal, value


def test_open_long() -> None:
    pos, (step,) = apply_all(fill("10", "100.5"))
    assert pos is not None and step.closed is None and step.realized == 0
    assert (pos.qty, pos.avg_entry_price, pos.side) == (D(10), D("100.5"), "long")
    assert pos.opened_by_order_id == "o1" and pos.opened_by_client_order_id == "c-o1"
    assert pos.opened_at == T0 and pos.is_open and pos.account_id == ACCOUNT
    assert_decimals(pos)


def test_open_short() -> None:
    pos, _ = apply_all(fill("-4", "50"))
    assert pos is not None
    assert (pos.qty, pos.avg_entry_price, pos.side) == (D(-4), D(50), "short")


def test_adding_re_averages() -> None:
    pos, steps = apply_all(fill("10", "100"), fill("30", "104", order="o2", t=1))
    assert pos is not None
    assert pos.qty == D(40)
    assert pos.avg_entry_price == D(103)  # (10*100 + 30*104) / 40
    assert pos.opened_by_order_id == "o1"  # the order that opened it
    assert pos.realized_pnl == 0 and steps[1].realized == 0


def test_adding_to_a_short_re_averages() -> None:
    pos, _ = apply_all(fill("-2", "10"), fill("-6", "14"))
    assert pos is not None and pos.qty == D(-8) and pos.avg_entry_price == D(13)


def test_reducing_a_long_realizes() -> None:
    pos, steps = apply_all(fill("10", "100"), fill("-4", "110", order="o2", t=1))
    assert pos is not None and pos.is_open
    assert pos.qty == D(6) and pos.avg_entry_price == D(100)  # avg unchanged on reduce
    assert steps[1].realized == D(40)  # 4 * (110 - 100) * +1
    assert pos.realized_pnl == D(40)
    assert steps[1].closed is None


def test_reducing_a_short_realizes_with_the_sign_of_the_position() -> None:
    pos, steps = apply_all(fill("-10", "100"), fill("3", "90", t=1))
    assert pos is not None
    assert pos.qty == D(-7)
    assert steps[1].realized == D(30)  # 3 * (90 - 100) * -1: buying back cheaper is a gain
    pos, steps = apply_all(fill("-10", "100"), fill("3", "105", t=1))
    assert steps[1].realized == D(-15)


def test_closing_at_zero_sets_closed_at_and_keeps_side() -> None:
    pos, steps = apply_all(fill("5", "10"), fill("-5", "12", order="o2", t=7))
    assert pos is None  # flat: no open row
    closed = steps[1].closed
    assert closed is not None
    assert closed.qty == 0 and closed.closed_at == T0 + timedelta(seconds=7)
    assert not closed.is_open
    assert closed.side == "long"  # a closed row still says which way it was
    assert closed.realized_pnl == D(10) and steps[1].realized == D(10)
    assert closed.opened_by_order_id == "o1"
    assert closed.avg_entry_price == D(10)
    _, steps = apply_all(fill("-5", "10"), fill("5", "12", t=1))
    assert steps[1].closed is not None and steps[1].closed.side == "short"


def test_a_fill_after_closing_opens_a_new_row() -> None:
    pos, _ = apply_all(fill("5", "10"), fill("-5", "12", t=1), fill("2", "20", order="o3", t=2))
    assert pos is not None
    assert (pos.qty, pos.avg_entry_price, pos.opened_by_order_id) == (D(2), D(20), "o3")
    assert pos.realized_pnl == 0


def test_flip_closes_the_old_row_whole_and_opens_the_remainder_at_the_fill_price() -> None:
    pos, steps = apply_all(fill("10", "100"), fill("-25", "90", order="flipper", t=3))
    step = steps[1]
    assert step.closed is not None and step.open is not None
    old, new = step.closed, step.open
    assert old.qty == 0 and old.closed_at == T0 + timedelta(seconds=3)
    assert old.side == "long" and old.opened_by_order_id == "o1"
    assert old.realized_pnl == D(-100)  # all 10 closed at 90 - 100
    assert step.realized == D(-100)
    assert new.qty == D(-15) and new.side == "short"
    assert new.avg_entry_price == D(90)
    assert new.opened_by_order_id == "flipper" and new.opened_by_client_order_id == "c-flipper"
    assert new.opened_at == T0 + timedelta(seconds=3)
    assert new.realized_pnl == 0 and new.is_open
    assert pos is new


def test_flip_short_to_long() -> None:
    _, steps = apply_all(fill("-3", "50"), fill("5", "40", order="o2", t=1))
    old, new = steps[1].closed, steps[1].open
    assert old is not None and new is not None
    assert old.realized_pnl == D(30)  # 3 * (40 - 50) * -1
    assert (new.qty, new.avg_entry_price, new.side) == (D(2), D(40), "long")


def test_fractional_quantities() -> None:
    pos, steps = apply_all(
        fill("0.974", "351.14"), fill("0.026", "352.54", t=1), fill("-0.5", "353", t=2)
    )
    assert pos is not None
    assert pos.qty == D("0.5")
    assert pos.avg_entry_price == (D("0.974") * D("351.14") + D("0.026") * D("352.54")) / D(1)
    assert steps[2].realized == D("0.5") * (D(353) - pos.avg_entry_price)
    assert_decimals(pos)


def test_zero_fill_changes_nothing() -> None:
    pos, _ = apply_all(fill("2", "10"))
    step = apply_fill(pos, ACCOUNT, fill("0", "11"))
    assert step.open is pos and step.closed is None and step.realized == 0


def test_peak_quantity_tracks_the_largest_size() -> None:
    pos, _ = apply_all(fill("2", "10"), fill("5", "10"), fill("-6", "10"))
    assert pos is not None and pos.qty == D(1) and pos.peak_qty == D(7)


# --- properties -----------------------------------------------------------------------

_qty = st.one_of(
    st.integers(min_value=1, max_value=500).map(D),
    st.integers(min_value=1, max_value=500_000).map(lambda n: D(n).scaleb(-3)),
)
_fills = st.lists(
    st.tuples(_qty, st.booleans(), st.integers(min_value=1, max_value=100_000)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(_fills)
def test_position_math_conserves_money_and_quantity(raw: list[tuple[Decimal, bool, int]]) -> None:
    """For any sequence of fills: the open quantity is their sum; at most one row is open;
    and realized P&L plus the open cost basis equals the cash paid (Q*A - sum q*p)."""
    current: Position | None = None
    rows: list[Position] = []
    net = D(0)
    cash = D(0)  # sum of signed qty * price: what was paid, net
    for i, (qty, buy, cents) in enumerate(raw):
        q = qty if buy else -qty
        p = D(cents).scaleb(-2)
        step = apply_fill(current, ACCOUNT, fill(q, p, order=f"o{i}", t=i))
        net += q
        cash += q * p
        if step.closed is not None:
            assert step.closed.qty == 0 and step.closed.closed_at is not None
            rows.append(step.closed)
        current = step.open
        assert (current.qty if current is not None else D(0)) == net
        if current is not None:
            assert current.is_open and current.qty != 0
            assert (current.qty > 0) == (current.side == "long")
            assert current.avg_entry_price > 0
            assert_decimals(current)
    realized = sum((r.realized_pnl for r in rows), D(0))
    open_basis = D(0)
    if current is not None:
        realized += current.realized_pnl
        open_basis = current.qty * current.avg_entry_price
    assert abs(realized - (open_basis - cash)) < D("1e-12")
    # Closed rows never change direction and never stay open.
    assert all(not r.is_open for r in rows)
