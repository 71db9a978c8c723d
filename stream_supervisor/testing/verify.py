"""The invariant checker: a store's contents against a broker's ground truth.

Shared by `demo`, the chaos suite and the deterministic simulation. It reports every
difference precisely (which order or symbol, expected and found) for the invariants of
docs/design.md, section 6, and never stops at the first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from ..orders import TERMINAL_STATUSES
from ..store import StoreSnapshot

AVG_PRICE_TOLERANCE: Final = Decimal("1e-9")  # the broker reports averages to 12 places
PNL_TOLERANCE: Final = Decimal("1e-6")


@dataclass(frozen=True, slots=True)
class Mismatch:
    invariant: str  # order_fill, order_status, position, open_rows, dedupe, cursor, ...
    subject: str  # order id or symbol
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.invariant} {self.subject}: expected {self.expected}, found {self.found}"


def _dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def verify_against_truth(
    snapshot: StoreSnapshot, truth: dict[str, Any], *, strict_prices: bool = True,
    history: bool = False,
) -> list[Mismatch]:
    """Every difference between the store and the broker's final state.

    `strict_prices=False` skips per-symbol average entry price and realized P&L: those
    depend on the order fills of *different* orders were applied in, which a broker
    that reorders its stream (a chaos knob, not something Alpaca documents) changes.
    Quantities are always exact. `history`: the account held positions before the
    service's first start, which took them from the broker (docs/design.md, section 9):
    the P&L realized before that is the broker's alone, and is not compared.
    """
    out: list[Mismatch] = []
    orders: dict[str, Any] = truth["orders"]

    # Per order: cumulative fills and average price equal the broker's final values.
    for order_id, expected in orders.items():
        want_qty = _dec(expected["filled_qty"]) or Decimal(0)
        stored = snapshot.orders.get(order_id)
        if stored is None:
            # With history, an order that came and went before a baseline (or while the
            # service was down past the activities window) is in the broker's positions,
            # not in our orders; the positions below still count its fills.
            # A multi-leg parent moves no position, and only its own updates or a refresh
            # of it tell of it: when every one was missed, its legs (orders of their own,
            # filled through their FILL activities) are what must be exact.
            if want_qty > 0 and not history and expected.get("order_class") != "mleg":
                out.append(Mismatch("order_fill", order_id, f"filled_qty {want_qty}", "missing"))
            continue
        if stored.filled_qty != want_qty:
            out.append(Mismatch("order_fill", order_id, f"filled_qty {want_qty}",
                                f"filled_qty {stored.filled_qty}"))
        want_avg = _dec(expected.get("filled_avg_price"))
        if want_avg is not None and (
            stored.filled_avg_price is None
            or abs(stored.filled_avg_price - want_avg) > AVG_PRICE_TOLERANCE
        ):
            out.append(Mismatch("order_fill", order_id, f"filled_avg_price {want_avg}",
                                f"filled_avg_price {stored.filled_avg_price}"))
        want_status = expected.get("status")
        if want_status in TERMINAL_STATUSES and stored.status != want_status:
            out.append(Mismatch("order_status", order_id, want_status, stored.status))
    for order_id in snapshot.orders.keys() - orders.keys():
        out.append(Mismatch("order_unknown", order_id, "no such order at the broker", "stored"))

    # Per symbol: one open row at most, net quantity and P&L equal the broker's.
    open_rows = Counter(p.symbol for p in snapshot.positions if p.is_open)
    for symbol, n in open_rows.items():
        if n > 1:
            out.append(Mismatch("open_rows", symbol, "at most 1 open position", f"{n} open"))
    symbols = set(truth.get("positions", {})) | {p.symbol for p in snapshot.positions}
    for symbol in sorted(symbols):
        expected = truth.get("positions", {}).get(symbol, {"qty": "0"})
        want = _dec(expected.get("qty")) or Decimal(0)
        found = snapshot.net_position(symbol)
        if found != want:
            out.append(Mismatch("position", symbol, f"net qty {want}", f"net qty {found}"))
            continue
        if not strict_prices or expected.get("prices_exact") is False:
            continue
        want_avg = _dec(expected.get("avg_entry_price"))
        if want != 0 and want_avg is not None:
            rows = [p for p in snapshot.positions if p.symbol == symbol and p.is_open]
            got = rows[0].avg_entry_price if rows else None
            if got is None or abs(got - want_avg) > AVG_PRICE_TOLERANCE:
                out.append(Mismatch("position_avg", symbol, f"avg_entry_price {want_avg}",
                                    f"avg_entry_price {got}"))
        want_pnl = _dec(expected.get("realized_pnl"))
        if want_pnl is not None and not history:
            got_pnl = snapshot.realized_pnl(symbol)
            if abs(got_pnl - want_pnl) > PNL_TOLERANCE:
                out.append(Mismatch("position_pnl", symbol, f"realized_pnl {want_pnl}",
                                    f"realized_pnl {got_pnl}"))

    # One dedupe row per distinct fill: exactly the broker's fills, none twice.
    want_fill_keys = {
        (order_id, Decimal(f["cum_qty"]))
        for order_id, o in orders.items()
        for f in o.get("fills", [])
    }
    seen_fill_keys: Counter[tuple[str, Decimal]] = Counter()
    for key in snapshot.event_keys:
        if key.startswith("fill:"):
            _, order_id, cum = key.split(":", 2)
            seen_fill_keys[(order_id, Decimal(cum))] += 1
    for fill, n in seen_fill_keys.items():
        if n > 1:
            out.append(Mismatch("dedupe", f"{fill[0]}@{fill[1]}", "1 dedupe row", f"{n} rows"))
        if fill not in want_fill_keys:
            out.append(Mismatch("dedupe", f"{fill[0]}@{fill[1]}", "no such fill", "stored"))
    # Every fill was seen and counted, by the stream or by backfill (the cumulative guard
    # means a skipped intermediate fill can still be absent from the keys: check qty above).
    # History: every closed row is in position_history once.
    history_ids = Counter(p.position_id for p in snapshot.history)
    for pos in snapshot.positions:
        if not pos.is_open and history_ids.get(pos.position_id, 0) != 1:
            out.append(Mismatch("history", f"{pos.symbol}#{pos.position_id}",
                                "1 position_history row", f"{history_ids.get(pos.position_id, 0)}"))
    total_fills = truth.get("fills_total")
    if total_fills and snapshot.cursor is None:
        out.append(Mismatch("cursor", "account", "a cursor after fills", "none"))
    return out


def summarize(mismatches: list[Mismatch], limit: int = 20) -> str:
    if not mismatches:
        return "0 mismatches"
    lines = [f"{len(mismatches)} mismatches:"]
    lines += [f"  {m}" for m in mismatches[:limit]]
    if len(mismatches) > limit:
        lines.append(f"  ... and {len(mismatches) - limit} more")
    return "\n".join(lines)
