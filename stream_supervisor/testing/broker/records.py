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
    #: us_equity, us_option or crypto (docs/design.md, section 10); options are priced
    #: per share and move `multiplier` shares a contract.
    asset_class: str = "us_equity"
    multiplier: Decimal = Decimal(1)

    @property
    def compact(self) -> str:
        """The spelling of positions and activities: a crypto pair without its slash."""
        return self.name.replace("/", "")


@dataclass(slots=True)
class Position:
    qty: Decimal = ZERO
    avg: Decimal | None = None
    realized: Decimal = ZERO

    def apply(self, signed_qty: Decimal, price: Decimal, multiplier: Decimal = Decimal(1)) -> None:
        """docs/design.md, section 4 position math; caller holds the 50-digit context.
        Realized P&L is in money: per-share prices times the contract multiplier."""
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
        self.realized += closed * (price - self.avg) * (1 if q > 0 else -1) * multiplier
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
    #: A multi-leg order (`mleg`): its legs are orders of their own, one symbol each, and
    #: `leg_plan` says which leg each planned fill fills (docs/design.md, section 10).
    order_class: str = ""
    legs: list[Order] = field(default_factory=list)
    leg_plan: list[int] = field(default_factory=list)
    parent_id: str | None = None

    def avg_price(self) -> Decimal | None:
        if self.filled_qty == 0:
            return None
        with decimal.localcontext(CTX):
            if self.legs:
                # The strategy's net price a unit: what buying legs cost less what
                # selling legs bring (negative for a net credit).
                return sum(((leg.avg_price() or ZERO) * (1 if leg.side == "buy" else -1)
                            for leg in self.legs), ZERO).quantize(TWELVE)
            return (self.notional / self.filled_qty).quantize(TWELVE)

    def snapshot(self) -> dict[str, Any]:
        """The order object, keys in the order the real broker sends them."""
        avg = self.avg_price()
        if self.legs:
            # A multi-leg parent has no symbol, side or asset of its own: its legs do.
            return {**self._snapshot(avg), "asset_id": None, "symbol": "", "asset_class": None,
                    "side": None, "position_intent": None, "order_class": "mleg",
                    "legs": [leg.snapshot() for leg in self.legs]}
        return self._snapshot(avg)

    def _snapshot(self, avg: Decimal | None) -> dict[str, Any]:
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
            "asset_class": self.symbol.asset_class,
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
