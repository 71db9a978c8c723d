"""A batch of new events applied to orders and positions: pure, no I/O.

Both stores call `apply_events` inside their transaction with the state they loaded
for the touched orders and symbols, then persist what it returns. Keeping this pure is
what lets the in-memory store and PostgreSQL share one contract, and lets property
tests run the exact code that production runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import TypeVar

import msgspec

from .activities import (
    ACCOUNT_WIDE,
    ActivityRecord,
    PositionChange,
    apply_activity,
    position_change,
    touched_symbols,
)
from .adjustments import BASELINE, REBASELINE
from .events import ACTIVITY_EVENT, FILL_EVENTS, KNOWN_EVENTS, REVISION_EVENTS, Event
from .orders import OrderState, apply_order_event
from .positions import Position, PositionStep, apply_fill
from .revisions import apply_revision, revise_position
from .symbols import asset_class_of, multiplier


class Cursor(msgspec.Struct, frozen=True, gc=False):
    """How far the account's fill history is durably applied. Only ever moves forward."""

    fill_time: datetime | None = None
    activity_id: str | None = None

    def advanced(self, other: Cursor) -> Cursor:
        fill_time = _max_opt(self.fill_time, other.fill_time)
        activity_id = _max_opt(self.activity_id, other.activity_id)
        return Cursor(fill_time, activity_id)


_T = TypeVar("_T", datetime, str)


def _max_opt(a: _T | None, b: _T | None) -> _T | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def cursor_of(events: Iterable[Event]) -> Cursor:
    """The cursor a set of committed events moves the account to: the newest fill's time
    and the greatest activity id among them (each batch's, so no `Cursor` per fill)."""
    fills = [ev for ev in events if ev.event in FILL_EVENTS]
    if not fills:
        return Cursor()
    ids = [ev.activity_id for ev in fills if ev.activity_id is not None]
    return Cursor(max(ev.timestamp for ev in fills), max(ids) if ids else None)


def baseline_moments(taken_at: datetime, per_symbol: Mapping[str, datetime]) -> dict[str, datetime]:
    """The rows a baseline writes to `baseline_moments`: the account-wide moment, and each
    symbol's own where it is later. Stores keep the latest of each (moments only move
    forward)."""
    out = {ACCOUNT_WIDE: taken_at}
    for symbol, at in per_symbol.items():
        if symbol and at > taken_at:
            out[symbol] = at
    return out


def recorded_moments(
    reason: str, taken_at: datetime, per_symbol: Mapping[str, datetime],
    adjusted: Iterable[str],
) -> dict[str, datetime]:
    """The rows a broker word writes to `baseline_moments` (docs/design.md, section 10).

    A baseline or rebaseline: `baseline_moments`. A reconcile: each symbol it adjusted,
    at its moment (the broker's clock read before the positions it set them to), and
    nothing account-wide: the symbols it left alone were not set to the broker's, so an
    activity of theirs is not in anything the reconcile took."""
    if reason in (BASELINE, REBASELINE):
        return baseline_moments(taken_at, per_symbol)
    changed = set(adjusted)
    return {symbol: at for symbol, at in per_symbol.items() if symbol and symbol in changed}


@dataclass(frozen=True, slots=True)
class Drift:
    """Our net position disagreed with the broker's `position_qty` after a fill."""

    symbol: str
    order_id: str
    ours: Decimal
    broker: Decimal


@dataclass(slots=True)
class LedgerResult:
    orders: dict[str, OrderState] = field(default_factory=dict)  # every order changed
    positions: list[Position] = field(default_factory=list)  # final version of each row touched
    closed: list[Position] = field(default_factory=list)  # rows that closed (for history)
    drift: list[Drift] = field(default_factory=list)
    fills_applied: int = 0
    stale_fills: int = 0  # order-level duplicates: cumulative qty already reached
    inexact_fills: int = 0  # priced across a gap without a cumulative average
    #: Non-trade activities of the batch and what each did (`account_activities`).
    activities: list[ActivityRecord] = field(default_factory=list)
    #: Each position change they made, closing or not (`position_changes`).
    changes: list[PositionChange] = field(default_factory=list)
    #: Per order, how far updates already in the broker's word (stamped no later than
    #: the moment of the reconcile that adjusted their symbol) moved its filled_qty: its
    #: `baseline_qty` moves by as much (down, for a bust).
    in_broker_word: dict[str, Decimal] = field(default_factory=dict)


MLEG: str = "mleg"


def flatten(events: Iterable[Event]) -> list[Event]:
    """The events with every multi-leg order's legs after their parent."""
    out: list[Event] = []
    for ev in events:
        out.append(ev)
        out.extend(ev.legs)
    return out


def touched(events: Iterable[Event]) -> tuple[set[str], set[str]]:
    """The order ids and symbols a batch may change (a store loads and locks them)."""
    order_ids: set[str] = set()
    symbols: set[str] = set()
    for ev in flatten(events):
        if ev.event == ACTIVITY_EVENT:
            symbols.update(touched_symbols(ev))
            continue
        order_ids.add(ev.order_id)
        symbols.add(ev.symbol)
    return order_ids, symbols


@lru_cache(maxsize=4096)
def contract_terms(symbol: str, hint: str | None) -> tuple[str, Decimal]:
    """(asset class, contract multiplier) of a symbol: the broker's word when it gives a
    class we know, else the symbol's shape (docs/design.md, section 10)."""
    try:
        cls = asset_class_of(symbol, hint)
    except ValueError:
        cls = asset_class_of(symbol)
    return cls.value, multiplier(cls)


def order_fills_by_cum_qty(events: Sequence[Event]) -> list[Event]:
    """Within a batch, put each order's fills in cumulative order, keeping their slots.

    The broker can return same-millisecond partial fills of one order out of order. A
    fill's slot in the batch decides its place in the symbol's position history, so each
    order's fills are re-dealt, smallest cumulative first, into the slots they occupied.
    """
    # A bust or correction starts a new run of the order's fills: its cumulative figures
    # come back down, so fills on either side of it must not be sorted together.
    slots: dict[tuple[str, int], list[int]] = {}
    runs: dict[str, int] = {}
    for i, ev in enumerate(events):
        if ev.event in FILL_EVENTS:
            slots.setdefault((ev.order_id, runs.get(ev.order_id, 0)), []).append(i)
        elif ev.event in REVISION_EVENTS:
            runs[ev.order_id] = runs.get(ev.order_id, 0) + 1
    if all(len(s) == 1 for s in slots.values()):
        return list(events)
    out = list(events)
    for idxs in slots.values():
        if len(idxs) > 1:
            ordered = sorted((events[i] for i in idxs), key=lambda e: e.cum_qty)
            for i, ev in zip(idxs, ordered, strict=True):
                out[i] = ev
    return out


def apply_events(
    account_id: str,
    orders: Mapping[str, OrderState],
    open_positions: Mapping[str, Position],
    events: Sequence[Event],
    baselines: Mapping[str, datetime] | None = None,
    reconciled: Mapping[str, datetime] | None = None,
) -> LedgerResult:
    """Apply new (not yet stored) events, in order, to the loaded state.

    `orders` holds the stored state of every order the events touch (absent = unknown
    yet); `open_positions` the open row of every symbol they touch (absent = flat);
    `baselines` the latest baseline's broker-clock moment for the account (key
    `ACCOUNT_WIDE`) and, where later, per symbol (`activities.baseline_moment`);
    `reconciled` the moment of the latest reconcile that adjusted a symbol: a fill (or a
    bust, a correction) stamped at or before it is in the quantity the reconcile took (the
    broker's positions, read after that clock), so it moves its order's mark and not the
    position, and the order's `baseline_qty` moves as far (`in_broker_word`), as a
    baseline's own marks do (docs/design.md, section 9).
    """
    result = LedgerResult()
    order_state = dict(orders)
    current = dict(open_positions)

    def place(symbol: str, step: PositionStep) -> None:
        if step.closed is not None:
            result.closed.append(step.closed)
            result.positions.append(step.closed)
        if step.open is not None:
            current[symbol] = step.open
        else:
            current.pop(symbol, None)

    for ev in flatten(order_fills_by_cum_qty(events)):
        if ev.event == ACTIVITY_EVENT:
            applied = apply_activity(account_id, current, ev, baselines)
            result.activities.append(applied.record)
            for symbol, step in applied.steps:
                result.changes.append(
                    position_change(applied.record, symbol, current.get(symbol), step))
                place(symbol, step)
            continue
        if ev.event not in KNOWN_EVENTS and ev.event != "refresh" and ev.order_id not in order_state:
            continue  # an unknown event type about an order we never saw invents no order
        revision = ev.event in REVISION_EVENTS
        before = order_state.get(ev.order_id)
        outcome = (apply_revision if revision else apply_order_event)(before, ev)
        order_state[ev.order_id] = outcome.state
        result.orders[ev.order_id] = outcome.state
        if outcome.stale:
            result.stale_fills += 1
        delta = outcome.delta
        if delta is None or outcome.state.order_class == MLEG:
            continue  # a multi-leg parent's quantity reaches positions through its legs
        if reconciled:
            moment = reconciled.get(ev.symbol)
            if moment is not None and ev.timestamp <= moment:
                # In the broker's word already: a fill (or a bust, a correction) that
                # reached us only after the reconcile that took its symbol's quantity (a
                # dead letter replayed, a backfill's overlap, an update the stream lost).
                result.stale_fills += 1
                moved = outcome.state.filled_qty - (before.filled_qty if before else 0)
                if moved:
                    result.in_broker_word[ev.order_id] = (
                        result.in_broker_word.get(ev.order_id, Decimal(0)) + moved)
                continue
        result.fills_applied += 1
        if not delta.exact:
            result.inexact_fills += 1
        held = current.get(ev.symbol)
        if held is None or held.qty == 0:
            # A row opens (a revision too may open one): it takes the symbol's terms.
            cls, mult = contract_terms(ev.symbol, ev.asset_class)
            step = (revise_position(held, account_id, delta, ev.side, mult, cls) if revision
                    else apply_fill(held, account_id, delta, mult, cls))
        elif revision:
            step = revise_position(held, account_id, delta, ev.side)
        else:
            step = apply_fill(held, account_id, delta)
        place(ev.symbol, step)
        if ev.source == "stream" and delta.position_qty is not None:
            ours = step.open.qty if step.open is not None else Decimal(0)
            if ours != delta.position_qty:
                result.drift.append(Drift(ev.symbol, ev.order_id, ours, delta.position_qty))
    # Final version of every open row touched: rows that stayed open or opened here.
    for symbol, pos in current.items():
        if open_positions.get(symbol) is not pos:
            result.positions.append(pos)
    return result
