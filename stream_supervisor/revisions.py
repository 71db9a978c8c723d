"""Busts and corrections (`trade_bust`, `trade_correct`, docs/design.md, section 11):
fills the broker takes back or changes after reporting them. Pure, no I/O.

A revision carries the order as it stands afterwards: its cumulative `filled_qty` C and
`filled_avg_price` P_C. Against the stored c0 at p0 (layer 2), the revision moves
`C - c0` (negative for a bust) worth `C*P_C - c0*p0` in money, so the busted fill's
quantity and price come back out of the order and the position once, however the
revision reached us; a correction of the price alone moves money and no quantity. The
revision's time is kept (`OrderState.revised_at`): a fill stamped no later than it is
already inside C and counts as stale (`orders.apply_order_event`).
"""

from __future__ import annotations

from decimal import Decimal

from .events import Event
from .orders import FillDelta, OrderOutcome, OrderState, merge_status, new_order_state
from .positions import ONE, ZERO, Position, PositionStep, apply_fill


def apply_revision(prev: OrderState | None, event: Event) -> OrderOutcome:
    """A bust or correction applied to an order: the new cumulative figures, and what
    they move (a signed quantity at a price, or money alone)."""
    state = prev if prev is not None else new_order_state(event)
    if state.revised_at is not None and event.timestamp <= state.revised_at:
        # An older revision than one already applied: its figures are outdated.
        return OrderOutcome(state, None, False)
    c0, p0 = state.filled_qty, state.filled_avg_price
    cum = event.cum_qty
    cum_avg = event.cum_avg_price if cum > 0 else None
    paid_before = c0 * p0 if (c0 and p0 is not None) else Decimal(0)
    paid_now = cum * cum_avg if cum_avg is not None else Decimal(0)
    status = merge_status(state.status, event.status)
    updated_at = (event.timestamp if state.updated_at is None
                  or event.timestamp > state.updated_at else state.updated_at)
    new_state = OrderState(
        state.order_id, state.symbol, state.side, status, cum, cum_avg,
        state.client_order_id or event.client_order_id, state.order_qty or event.order_qty,
        state.order_type or event.order_type, state.asset_class or event.asset_class,
        state.created_at or event.created_at, updated_at, event.timestamp,
        state.order_class, state.parent_order_id)
    moved = cum - c0
    money = paid_now - paid_before
    if moved == 0 and money == 0:
        return OrderOutcome(new_state, None, False)
    if moved != 0:
        price = money / moved
    else:
        # A correction of the price alone: the money moves, carried on the order's own
        # quantity (qty 0 would be lost; `revise_position` reads `price` as money).
        price = money
    sign = 1 if event.side == "buy" else -1
    delta = FillDelta(
        order_id=event.order_id,
        client_order_id=new_state.client_order_id,
        symbol=event.symbol,
        qty=moved * sign,
        price=price,
        timestamp=event.timestamp,
        position_qty=event.position_qty,
        exact=True,
    )
    return OrderOutcome(new_state, delta, False)


def _sign(x: Decimal) -> int:
    return (x > 0) - (x < 0)


def revise_position(current: Position | None, account_id: str, delta: FillDelta,
                    side: str, multiplier: Decimal = ONE,
                    asset_class: str | None = None) -> PositionStep:
    """A revision's effect on its symbol's open position (`multiplier` and `asset_class`
    describe the symbol, for a row it opens where none is open: `positions.apply_fill`).

    More quantity (a correction upwards, or a bust reporting fills we never saw) is an
    ordinary fill. Less quantity undoes a fill: on a position in the order's direction it
    leaves at the busted price, so the average entry returns to what the remaining fills
    paid, with nothing realized; on a position the order was reducing (a sell against a
    long) the quantity comes back at the average entry and the P&L it realized is taken
    back. Money alone (a price correction) moves the average entry of a position in the
    order's direction, or the realized P&L of one the order was reducing.
    """
    side_sign = 1 if side == "buy" else -1
    q, p = delta.qty, delta.price
    if q != 0 and _sign(q) == side_sign:
        return apply_fill(current, account_id, delta, multiplier, asset_class)
    if current is None or current.qty == 0:
        if q == 0:
            return PositionStep(current, None, ZERO)
        # Flat, and the revision takes quantity back: the busted fill had closed the
        # position (or this order opened and closed it); it reopens at the busted price.
        return apply_fill(None, account_id, delta, multiplier, asset_class)
    qty, avg = current.qty, current.avg_entry_price
    if q == 0:
        if _sign(qty) == side_sign:
            # Same direction: the cost basis changes by the money moved.
            new_avg = avg + p / abs(qty)
            return PositionStep(_with(current, qty, new_avg, current.realized_pnl), None, ZERO)
        # The order was reducing this position: a higher sell price realized more.
        change = -p * side_sign * current.multiplier  # money: per share x multiplier
        return PositionStep(_with(current, qty, avg, current.realized_pnl + change), None,
                            change)
    removed = abs(q)
    if _sign(qty) == side_sign:
        remaining = abs(qty) - removed
        if remaining > 0:
            new_avg = (abs(qty) * avg - removed * p) / remaining
            return PositionStep(_with(current, qty - side_sign * removed, new_avg,
                                      current.realized_pnl), None, ZERO)
        # Everything held came from the busted quantity: an ordinary closing fill at the
        # position's own average realizes nothing; anything beyond opens the other way.
        return apply_fill(current, account_id, FillDelta(
            delta.order_id, delta.client_order_id, delta.symbol, q, avg if remaining == 0
            else p, delta.timestamp, delta.position_qty, delta.exact))
    # The order was reducing the position: its quantity comes back at the average entry,
    # and the P&L that closing realized is taken back.
    taken_back = removed * (p - avg) * _sign(qty) * current.multiplier
    return PositionStep(_with(current, qty + _sign(qty) * removed, avg,
                              current.realized_pnl - taken_back), None, -taken_back)


def _with(row: Position, qty: Decimal, avg: Decimal, pnl: Decimal) -> Position:
    peak = qty if abs(qty) > abs(row.peak_qty) else row.peak_qty
    return Position(row.account_id, row.symbol, qty, avg, row.opened_by_order_id,
                    row.opened_by_client_order_id, row.opened_at, pnl, row.closed_at, peak,
                    row.position_id, row.multiplier, row.asset_class, row.closing_activity_id)


__all__ = ["apply_revision", "revise_position"]
