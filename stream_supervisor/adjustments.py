"""Positions set to the broker's word, explicitly (docs/design.md, section 9): pure, no I/O.

A baseline (the first start, `rebaseline`) and `reconcile --apply` change positions by
something other than a fill. Each change is planned here as an `Adjustment` (our signed
quantity before, the broker's after) plus the open row it closes and the row it opens
with the broker's quantity and average entry; the stores write all three in one
transaction. Orders known to the broker at a baseline get their `filled_qty` at that
moment as a high-water mark (`baseline_qty`): only fills beyond it move a position.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import msgspec

from .bounds import (
    DEFAULT_FUTURE_TOLERANCE,
    MAX_ID_CHARS,
    MAX_LABEL_CHARS,
    MAX_SYMBOL_CHARS,
    check_price,
    check_qty,
    check_text,
    check_time,
    not_after_ns,
)
from .errors import DecodeError, OutOfBounds
from .events import parse_timestamp
from .orders import OrderState, merge_status
from .positions import Position
from .symbols import asset_class_of, canonical_symbol, multiplier

ZERO: Final = Decimal(0)
#: Averages closer than this are the same (the broker rounds its to 12 places).
PRICE_TOLERANCE: Final = Decimal("1e-9")
#: Why a position was set to the broker's word (`position_adjustments.reason`,
#: `active_positions.origin` of the row opened, `close_reason` of the row closed).
BASELINE: Final = "baseline"
REBASELINE: Final = "rebaseline"
RECONCILE: Final = "reconcile"


def broker_clock(body: Mapping[str, Any], fallback: datetime, *,
                 tolerance: float = DEFAULT_FUTURE_TOLERANCE) -> datetime:
    """The `timestamp` of a `GET /v2/clock` body: the broker's time, which stamps the
    moments positions are read at (docs/design.md, section 10); `fallback` (our clock)
    when the broker gives none that parses and lies within the bounds
    (`broker_clock_reading`, against `fallback`)."""
    reading = broker_clock_reading(body, now=fallback, tolerance=tolerance)
    return fallback if reading is None else reading


def broker_clock_reading(body: Mapping[str, Any], *, now: datetime | None = None,
                         tolerance: float = DEFAULT_FUTURE_TOLERANCE) -> datetime | None:
    """`broker_clock` without a fallback: None when the broker gives no time that parses,
    or one before 2000 or, with `now` (our clock), beyond it plus `tolerance`: the bounds
    every broker timestamp meets (section 4, "Bounds at the edge"). A clock read as 2099
    would become a cursor that skips every fill until then, and a reconcile's moment
    that takes every later fill as already held. A reconcile adjusts nothing without a
    reading: its moment decides which fills reaching us later it already holds, and only
    the broker's clock stamps them (section 9)."""
    stamp = body.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        at, at_ns = parse_timestamp(stamp)
        check_time("the broker's clock", at_ns,
                   None if now is None else not_after_ns(now, tolerance))
    except ValueError:  # TimestampError, OutOfBounds
        return None
    return at


def origin_of(reason: str) -> str:
    """`active_positions.origin` of a row an adjustment opens: a rebaseline is a baseline
    (statistics put both under the strategy "baseline"); a reconcile says so."""
    return BASELINE if reason in (BASELINE, REBASELINE) else reason


class BrokerPosition(msgspec.Struct, frozen=True, gc=False):
    """One row of `GET /v2/positions`: canonical symbol, signed quantity (shorts negative)."""

    symbol: str
    qty: Decimal
    avg_entry_price: Decimal
    asset_id: str | None = None
    asset_class: str | None = None


def broker_position(row: Mapping[str, Any]) -> BrokerPosition:
    """A `GET /v2/positions` row in our terms: `BTCUSD` becomes `BTC/USD`, a short is
    negative whether or not the broker wrote its quantity negative.

    Held to the bounds of every broker value (section 4, "Bounds at the edge"): a row
    that breaks them (no symbol, a quantity that is no number, NaN, Infinity, beyond
    10**15 or with more than 12 places, a side other than long or short) raises
    `DecodeError` naming it, since set as a position it would be stored as such and
    corrupt every later fill of it. An asset class we do not know yet is not one."""
    symbol = row.get("symbol")
    if not isinstance(symbol, str) or not symbol.strip() or not symbol.isprintable():
        raise DecodeError(f"position row without a usable symbol: {str(symbol)[:40]!r}")
    check_text("position symbol", symbol, MAX_SYMBOL_CHARS)
    qty = _row_decimal(row, "qty", symbol, required=True)
    check_qty(f"{symbol} qty", qty)
    side = row.get("side", "long")
    if side not in ("long", "short"):
        raise DecodeError(f"{symbol}: position side {str(side)[:20]!r} is neither long nor "
                          "short")
    if side == "short" and qty > 0:
        qty = -qty
    avg = _row_decimal(row, "avg_entry_price", symbol, required=False)
    check_price(f"{symbol} avg_entry_price", avg)
    asset_class = row.get("asset_class")
    cls = str(asset_class) if asset_class else None
    asset_id = row.get("asset_id")
    try:
        canonical = canonical_symbol(symbol, cls)
    except ValueError:  # a class the service does not know yet: the symbol's shape
        canonical = canonical_symbol(symbol)
    return BrokerPosition(
        symbol=canonical,
        qty=qty,
        avg_entry_price=avg,
        asset_id=str(asset_id)[:MAX_ID_CHARS] if asset_id else None,
        asset_class=cls[:MAX_LABEL_CHARS] if cls else None,
    )


def _row_decimal(row: Mapping[str, Any], name: str, symbol: str, *, required: bool) -> Decimal:
    """A number of a positions row (JSON text or number): absent or empty is 0 unless
    `required`; anything else that is no finite number raises DecodeError."""
    value = row.get(name)
    if value is None or value == "":
        if required:
            raise DecodeError(f"{symbol}: position {name} missing")
        return ZERO
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DecodeError(f"{symbol}: position {name} is not a number: {str(value)[:40]!r}")
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise DecodeError(f"{symbol}: position {name} is not a number: "
                          f"{str(value)[:40]!r}") from None
    if not number.is_finite():
        raise OutOfBounds(f"{symbol}: position {name} is not a finite number: "
                          f"{str(value)[:40]!r}")
    return number


def broker_positions(rows: Iterable[Mapping[str, Any]],
                     ) -> tuple[list[BrokerPosition], list[str]]:
    """`GET /v2/positions` in our terms (`broker_position`), and one line per row that
    breaks the bounds. A reconcile that meets one adjusts nothing that run (the broker's
    word is not whole: a symbol missing from it would read as flat); a baseline cannot
    start from it."""
    out: list[BrokerPosition] = []
    problems: list[str] = []
    for row in rows:
        try:
            if not isinstance(row, Mapping):
                raise DecodeError(f"position row that is no object: {str(row)[:40]!r}")
            out.append(broker_position(row))
        except ValueError as exc:  # DecodeError, OutOfBounds
            problems.append(str(exc)[:300])
    return out, problems


class Adjustment(msgspec.Struct, frozen=True, gc=False):
    """One row of `position_adjustments` (ids of the rows it closed and opened aside)."""

    symbol: str
    reason: str
    qty_before: Decimal
    qty_after: Decimal
    avg_entry_price: Decimal | None
    asset_id: str | None
    taken_at: datetime


class SymbolChange(msgspec.Struct, frozen=True, gc=False):
    adjustment: Adjustment
    closed: Position | None  # our open row, closed by the adjustment
    opened: Position | None  # the broker's quantity and average, opened by it


def plan_adjustments(
    account_id: str,
    open_rows: Mapping[str, Position],
    broker: Iterable[BrokerPosition],
    *,
    reason: str,
    taken_at: datetime,
    symbols: Iterable[str] | None = None,
    expected: Mapping[str, Decimal] | None = None,
    working: Collection[str] = (),
) -> list[SymbolChange]:
    """Set each symbol (all held by either side when `symbols` is None) to the broker's
    quantity. A symbol already equal changes nothing; any other closes our open row (if
    any) and opens the broker's (if not flat). Never a silent overwrite: every change is
    an `Adjustment` carrying both quantities.

    `expected`: our quantity per symbol when the difference was found. A symbol whose
    open row holds another now is left as it is: a fill committed since then is in ours
    and (being newer than the broker's positions read) not in the broker's, and setting
    the broker's quantity would erase it.

    `working`: symbols with an order still working of which the broker filled more than
    reached us (a reconcile's, `unsettled_symbols`): left as they are. Such an order's
    next update carries every fill of it we missed (its cumulative quantity over our
    mark), and would count again what the adjustment took."""
    theirs = {b.symbol: b for b in broker}
    ours = {canonical_symbol(sym): row for sym, row in open_rows.items()}
    wanted = sorted(set(ours) | set(theirs)) if symbols is None else sorted(set(symbols))
    out = []
    for symbol in wanted:
        row = ours.get(symbol)
        target = theirs.get(symbol)
        before = row.qty if row is not None else ZERO
        if (expected is not None and symbol in expected and before != expected[symbol]
                or symbol in working):
            continue
        after = target.qty if target is not None else ZERO
        # A baseline takes the broker's average too: fills we never saw (while away past
        # the activities window) can leave the quantity as it was and move the average.
        same_price = (reason == RECONCILE or row is None or target is None
                      or abs(row.avg_entry_price - target.avg_entry_price) <= PRICE_TOLERANCE)
        if before == after and same_price:
            continue
        closed = None
        if row is not None:
            closed = Position(row.account_id, row.symbol, ZERO, row.avg_entry_price,
                              row.opened_by_order_id, row.opened_by_client_order_id,
                              row.opened_at, row.realized_pnl, taken_at, row.peak_qty,
                              row.position_id, row.multiplier, row.asset_class)
        opened = None
        if target is not None and after != 0:
            cls, mult = _contract_terms(symbol, target.asset_class)
            opened = Position(
                account_id=account_id, symbol=symbol, qty=after,
                avg_entry_price=target.avg_entry_price, opened_by_order_id=reason,
                opened_by_client_order_id=None, opened_at=taken_at, peak_qty=after,
                multiplier=mult, asset_class=cls,
            )
        out.append(SymbolChange(
            Adjustment(symbol, reason, before, after,
                       target.avg_entry_price if opened is not None and target else None,
                       target.asset_id if target is not None else None, taken_at),
            closed, opened))
    return out


def unsettled_symbols(
    working: Iterable[tuple[str, str, Decimal]], broker_filled: Mapping[str, Decimal] | None,
) -> set[str]:
    """Of the orders we hold as working, as (symbol, order id, our `filled_qty`), the
    symbols a reconcile must leave as they are: those with an order whose `filled_qty`
    the broker does not give as exactly ours (`broker_filled`, read after its positions;
    None: not read, so every such symbol). An order of which the broker filled more than
    reached us carries the rest in its next update (its cumulative quantity over our
    mark), which would count again what an adjustment to the broker's quantity took. One
    whose fills all reached us brings nothing of what the broker's positions held
    (docs/design.md, section 9)."""
    return {symbol for symbol, order_id, filled in working
            if broker_filled is None or broker_filled.get(order_id) != filled}


def _contract_terms(symbol: str, hint: str | None) -> tuple[str, Decimal]:
    """The class and standard multiplier of a position the broker reports: its own
    class when it is one we know, else the symbol's shape (an option is 100 a contract)."""
    try:
        cls = asset_class_of(symbol, hint)
    except ValueError:
        cls = asset_class_of(symbol)
    return cls.value, multiplier(cls)


def baseline_order(
    stored: OrderState | None, stored_baseline: Decimal, broker: OrderState
) -> tuple[OrderState, Decimal]:
    """An order as a baseline leaves it, with its new `baseline_qty`.

    The broker's `filled_qty` at the snapshot becomes the high-water mark. What it adds
    to ours is already in the broker's positions, so `baseline_qty` grows by exactly as
    much: `filled_qty - baseline_qty`, the part fills moved positions by, is unchanged."""
    if stored is None:
        return broker, broker.filled_qty
    filled = max(stored.filled_qty, broker.filled_qty)
    avg = broker.filled_avg_price if broker.filled_qty >= stored.filled_qty else (
        stored.filled_avg_price)
    newer = stored.updated_at is None or (
        broker.updated_at is not None and broker.updated_at >= stored.updated_at)
    status = merge_status(stored.status, broker.status, old_at=stored.updated_at,
                          new_at=broker.updated_at, authoritative=newer)
    updated_at = broker.updated_at if newer else stored.updated_at
    state = msgspec.structs.replace(
        stored, status=status, filled_qty=filled, filled_avg_price=avg, updated_at=updated_at,
        client_order_id=stored.client_order_id or broker.client_order_id,
        order_qty=stored.order_qty if stored.order_qty is not None else broker.order_qty,
        asset_class=stored.asset_class or broker.asset_class)
    return state, stored_baseline + (filled - stored.filled_qty)


@dataclass(frozen=True, slots=True)
class Difference:
    symbol: str  # canonical (crypto with its slash)
    ours: Decimal  # signed
    broker: Decimal  # signed
    broker_position: BrokerPosition | None


def compare(
    positions: Sequence[Position], broker: Iterable[BrokerPosition],
    known_assets: Mapping[str, str] | None = None,
) -> tuple[int, list[Difference]]:
    """How many symbols were compared, and every one whose signed quantity differs.

    Symbols are compared in their canonical spelling (`BTCUSD` from the broker is our
    `BTC/USD`); a broker row whose `asset_id` we already know (`known_assets`: asset id
    to our symbol, from earlier adjustments) matches that symbol whatever its own says
    (a renamed ticker)."""
    ours = net_by_symbol(positions)
    by_asset = dict(known_assets or {})
    theirs: dict[str, BrokerPosition] = {}
    for row in broker:
        symbol = by_asset.get(row.asset_id, row.symbol) if row.asset_id else row.symbol
        theirs[symbol] = row
    out = []
    symbols = sorted(set(ours) | set(theirs))
    for symbol in symbols:
        mine = ours.get(symbol, ZERO)
        found = theirs.get(symbol)
        their_qty = found.qty if found is not None else ZERO
        if mine != their_qty:
            out.append(Difference(symbol, mine, their_qty, found))
    return len(symbols), out


def net_by_symbol(positions: Sequence[Position]) -> dict[str, Decimal]:
    """Signed open quantity per canonical symbol."""
    out: dict[str, Decimal] = {}
    for p in positions:
        if p.is_open:
            sym = canonical_symbol(p.symbol)
            out[sym] = out.get(sym, ZERO) + p.qty
    return out
