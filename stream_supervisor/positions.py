"""Symbol level of exactly-once (docs/design.md, section 4, layer 3): position math, pure.

A position is the signed net quantity Q and average entry price A of one symbol in one
account, opened by the order whose fill opened it. Same-direction fills re-average;
opposite fills realize `closed_qty * (price - A) * sign(Q)`; reaching zero closes the
row; crossing zero closes it and opens a new one for the remainder at the fill price.
Decimal arithmetic only.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import msgspec

from .orders import FillDelta

ZERO = Decimal(0)
ONE = Decimal(1)


class Position(msgspec.Struct, frozen=True, gc=False):
    """One row of `active_positions`. `qty` is signed here; the table stores side + |qty|."""

    account_id: str
    symbol: str
    qty: Decimal
    avg_entry_price: Decimal
    opened_by_order_id: str
    opened_by_client_order_id: str | None
    opened_at: datetime
    realized_pnl: Decimal = ZERO
    closed_at: datetime | None = None
    # Largest quantity the position reached, signed like the position: it keeps the
    # direction of a closed row and tells statistics how big the trade got.
    peak_qty: Decimal = ZERO
    position_id: int | None = None  # assigned by the store once the row exists
    #: Money per unit of price per unit of quantity: 100 for a standard option contract,
    #: 1 for shares and coins (docs/design.md, section 10). P&L, cost basis and exposure
    #: are quantities times prices times this.
    multiplier: Decimal = ONE
    asset_class: str | None = None
    #: The non-trade activity that closed the row (an expiry, an assignment), if one did.
    closing_activity_id: str | None = None

    @property
    def cost_basis(self) -> Decimal:
        return abs(self.qty) * self.avg_entry_price * self.multiplier

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    @property
    def side(self) -> str:
        """`long` or `short`: fixed when the row opens (a flip opens a new row), so a
        closed row, whose qty is zero, still says which way it was."""
        return "long" if self.peak_qty > 0 else "short"


class PositionStep(msgspec.Struct, frozen=True, gc=False):
    """The effect of one fill on a symbol: the row it leaves open (if any), and the row
    it closed (if any). A flip yields both: `closed` is the old row, `open` the new one."""

    open: Position | None
    closed: Position | None
    realized: Decimal


def _sign(x: Decimal) -> int:
    return (x > 0) - (x < 0)


def _moved(row: Position, qty: Decimal, avg: Decimal, pnl: Decimal, peak: Decimal,
           closed_at: datetime | None) -> Position:
    """`row` with new quantities, in one positional constructor call (once per fill)."""
    return Position(row.account_id, row.symbol, qty, avg, row.opened_by_order_id,
                    row.opened_by_client_order_id, row.opened_at, pnl, closed_at, peak,
                    row.position_id, row.multiplier, row.asset_class, row.closing_activity_id)


def apply_fill(current: Position | None, account_id: str, fill: FillDelta,
               multiplier: Decimal = ONE, asset_class: str | None = None) -> PositionStep:
    """Apply one signed fill to the open position of its symbol (None when flat).

    `multiplier` and `asset_class` describe the symbol (a row that is open keeps its own)."""
    q, p = fill.qty, fill.price
    if q == 0:
        return PositionStep(current, None, ZERO)
    if current is None or current.qty == 0:
        opened = Position(
            account_id=account_id,
            symbol=fill.symbol,
            qty=q,
            avg_entry_price=p,
            opened_by_order_id=fill.order_id,
            opened_by_client_order_id=fill.client_order_id,
            opened_at=fill.timestamp,
            peak_qty=q,
            multiplier=multiplier,
            asset_class=asset_class,
        )
        return PositionStep(opened, None, ZERO)

    qty, avg = current.qty, current.avg_entry_price
    if _sign(q) == _sign(qty):
        total = abs(qty) + abs(q)
        new_avg = (abs(qty) * avg + abs(q) * p) / total
        grown = qty + q
        peak = grown if abs(grown) > abs(current.peak_qty) else current.peak_qty
        return PositionStep(
            _moved(current, grown, new_avg, current.realized_pnl, peak, current.closed_at),
            None, ZERO)

    closed_qty = min(abs(qty), abs(q))
    realized = closed_qty * (p - avg) * _sign(qty) * current.multiplier
    remaining = qty + q
    pnl = current.realized_pnl + realized
    if remaining == 0:
        closed = _moved(current, ZERO, avg, pnl, current.peak_qty, fill.timestamp)
        return PositionStep(None, closed, realized)
    if _sign(remaining) == _sign(qty):
        return PositionStep(
            _moved(current, remaining, avg, pnl, current.peak_qty, current.closed_at),
            None, realized)
    # Crossed zero: the old row closes whole, the remainder opens a new row at this price.
    closed = _moved(current, ZERO, avg, pnl, current.peak_qty, fill.timestamp)
    flipped = Position(
        account_id=account_id,
        symbol=fill.symbol,
        qty=remaining,
        avg_entry_price=p,
        opened_by_order_id=fill.order_id,
        opened_by_client_order_id=fill.client_order_id,
        opened_at=fill.timestamp,
        peak_qty=remaining,
        multiplier=current.multiplier,
        asset_class=current.asset_class,
    )
    return PositionStep(flipped, closed, realized)
