"""What the simulated broker keeps for its account: symbols and their prices, orders with
their fills, positions with the broker-side position math, and the order object as the
stream and REST show it. The market writes these; REST and the ground truth read them.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from .wire import CTX, TWELVE, ZERO, decimal_text, utc_us, utc_us_opt

Step = Literal["pending_new", "new", "fill", "pending_cancel", "canceled", "expired",
               "replace"]
"""One step of an order's planned life; each becomes one update on the stream."""


@dataclass(slots=True)
class Symbol:
    name: str
    asset_id: str
    price: Decimal
    fractional: bool


@dataclass(slots=True)
class Position:
    qty: Decimal = ZERO
    avg: Decimal | None = None
    realized: Decimal = ZERO

    def apply(self, signed_qty: Decimal, price: Decimal) -> None:
        """docs/design.md, section 4 position math; caller holds the 50-digit context."""
        q = self.qty
        if q == 0:
            self.qty, self.avg = signed_qty, price
            return
        assert self.avg is not None
        if (q > 0) == (signed_qty > 0):
            self.avg = (q * self.avg + signed_qty * price) / (q + signed_qty)
            self.qty = q + signed_qty
            return
        closed = min(abs(q), abs(signed_qty))
        self.realized += closed * (price - self.avg) * (1 if q > 0 else -1)
        after = q + signed_qty
        if after == 0:
            self.avg = None
        elif (after > 0) != (q > 0):
            self.avg = price  # flipped: the remainder opens at the fill price
        self.qty = after


@dataclass(slots=True)
class Fill:
    qty: Decimal
    price: Decimal
    cum_qty: Decimal
    activity_id: str
    update_index: int
    """The update that carried this fill: whether it was streamed is the feeds' record."""


@dataclass(slots=True)
class Order:
    id: str
    client_order_id: str
    symbol: Symbol
    side: str
    qty: Decimal
    order_type: str
    time_in_force: str
    limit_price: Decimal | None
    position_intent: str
    plan: list[tuple[Step, Decimal]]
    status: str = "pending_new"
    created_ns: int = 0
    updated_ns: int = 0
    filled_ns: int | None = None
    canceled_ns: int | None = None
    expired_ns: int | None = None
    replaced_ns: int | None = None
    replaced_by: str | None = None
    replaces: str | None = None
    filled_qty: Decimal = ZERO
    notional: Decimal = ZERO
    fills: list[Fill] = field(default_factory=list)

    def avg_price(self) -> Decimal | None:
        if self.filled_qty == 0:
            return None
        with decimal.localcontext(CTX):
            return (self.notional / self.filled_qty).quantize(TWELVE)

    def snapshot(self) -> dict[str, Any]:
        """The order object, keys in the order the real broker sends them."""
        avg = self.avg_price()
        return {
            "id": self.id,
            "client_order_id": self.client_order_id,
            "created_at": utc_us(self.created_ns),
            "updated_at": utc_us(self.updated_ns),
            "submitted_at": utc_us(self.created_ns),
            "filled_at": utc_us_opt(self.filled_ns),
            "expired_at": utc_us_opt(self.expired_ns),
            "expires_at": None,
            "canceled_at": utc_us_opt(self.canceled_ns),
            "failed_at": None,
            "replaced_at": utc_us_opt(self.replaced_ns),
            "replaced_by": self.replaced_by,
            "replaces": self.replaces,
            "asset_id": self.symbol.asset_id,
            "symbol": self.symbol.name,
            "asset_class": "us_equity",
            "notional": None,
            "qty": decimal_text(self.qty),
            "filled_qty": decimal_text(self.filled_qty),
            "filled_avg_price": None if avg is None else decimal_text(avg),
            "order_class": "",
            "order_type": self.order_type,
            "type": self.order_type,
            "side": self.side,
            "position_intent": self.position_intent,
            "time_in_force": self.time_in_force,
            "limit_price": None if self.limit_price is None else decimal_text(self.limit_price),
            "stop_price": None,
            "status": self.status,
            "extended_hours": False,
            "legs": None,
            "trail_percent": None,
            "trail_price": None,
            "hwm": None,
            "subtag": None,
            "source": None,
        }
