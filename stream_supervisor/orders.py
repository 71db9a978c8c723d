"""Order level of exactly-once (docs/design.md, section 4, layer 2): pure, no I/O.

An order's stored cumulative `filled_qty` is a high-water mark: an update whose
cumulative quantity is not above it changes nothing, and the quantity that reaches
positions is always `C - c0`, priced so that a missed intermediate update still lands
right. Status follows the broker's latest word and never leaves a final status
(docs/design.md, section 9, "Status").
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Final

import msgspec

from .events import FILL_EVENTS, KNOWN_EVENTS, Event

TERMINAL_STATUSES: Final = frozenset({"filled", "canceled", "expired", "replaced", "rejected"})
#: A refused cancel or replace: the order goes back to the status its update carries.
REFUSAL_EVENTS: Final = frozenset({"order_cancel_rejected", "order_replace_rejected"})

# Progress of an order through its life; a status of lower rank never overwrites one of
# higher rank, and nothing leaves a terminal status (a late `new` cannot undo `filled`).
_STATUS_RANK: Final = {
    "pending_new": 0,
    "accepted": 1,
    "held": 1,
    "new": 2,
    "accepted_for_bidding": 2,
    "calculated": 3,
    "partially_filled": 3,
    "pending_replace": 4,
    "pending_cancel": 4,
    "stopped": 4,
    "suspended": 4,
    "done_for_day": 4,
}
_TERMINAL_RANK: Final = 10


def status_rank(status: str) -> int:
    if status in TERMINAL_STATUSES:
        return _TERMINAL_RANK
    return _STATUS_RANK.get(status, 1)


def merge_status(
    old: str,
    new: str,
    *,
    old_at: datetime | None = None,
    new_at: datetime | None = None,
    authoritative: bool = False,
) -> str:
    """The status after `new` (stamped `new_at` by the broker) is reported for an order
    that had `old` (stamped `old_at`).

    A final status never changes, and a final status reported wins. Between statuses
    that are not final, the broker's later stamp wins: a `new` the morning after
    `done_for_day`, a `partially_filled` after a refused cancel. `authoritative` (a
    refused cancel or replace, which names the status the order went back to) wins
    outright. Only without stamps, or on a tie, does the order of progress decide.
    """
    if old in TERMINAL_STATUSES:
        return old
    if new in TERMINAL_STATUSES or authoritative:
        return new
    if old_at is not None and new_at is not None and new_at != old_at:
        return new if new_at > old_at else old
    return new if status_rank(new) >= status_rank(old) else old


class OrderState(msgspec.Struct, frozen=True, gc=False):
    """What `broker_orders` holds for one order."""

    order_id: str
    symbol: str
    side: str
    status: str
    filled_qty: Decimal
    filled_avg_price: Decimal | None
    client_order_id: str | None = None
    order_qty: Decimal | None = None
    order_type: str | None = None
    asset_class: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: Time of the latest bust or correction applied (revisions.py): a fill stamped no
    #: later than it was already counted in the revision's cumulative figures.
    revised_at: datetime | None = None
    order_class: str | None = None  # `mleg` for a multi-leg parent (section 10)
    parent_order_id: str | None = None  # a leg's parent


class FillDelta(msgspec.Struct, frozen=True, gc=False):
    """The new quantity an update adds to an order, signed by side, at one price."""

    order_id: str
    client_order_id: str | None
    symbol: str
    qty: Decimal  # signed: positive for buys, negative for sells
    price: Decimal
    timestamp: datetime
    position_qty: Decimal | None  # the broker's net position after this fill, if told
    exact: bool  # False when priced from cumulative averages over a gap


class OrderOutcome(msgspec.Struct, frozen=True, gc=False):
    state: OrderState
    delta: FillDelta | None
    stale: bool  # a fill whose cumulative quantity was already reached (order-level duplicate)


def delta_price(
    c0: Decimal,
    p0: Decimal | None,
    cum: Decimal,
    cum_avg: Decimal | None,
    fill_qty: Decimal | None,
    fill_price: Decimal | None,
) -> tuple[Decimal, bool]:
    """Price of the quantity `cum - c0`, and whether it is exact.

    When this update continues exactly from what is stored, its own fill price is the
    truth. Otherwise some update was missed: `(C*P_C - c0*p0) / (C - c0)` recovers the
    average price of everything missed from the cumulative averages.
    """
    if fill_qty is not None and fill_price is not None and c0 + fill_qty == cum:
        return fill_price, True
    if cum_avg is not None:
        paid_before = c0 * p0 if (c0 and p0 is not None) else Decimal(0)
        return (cum * cum_avg - paid_before) / (cum - c0), True
    if fill_price is not None:
        # A REST activity past a gap carries no cumulative average: the best estimate.
        return fill_price, False
    raise ValueError("fill without any price")


def new_order_state(event: Event) -> OrderState:
    return OrderState(
        order_id=event.order_id,
        symbol=event.symbol,
        side=event.side,
        status="pending_new",
        filled_qty=Decimal(0),
        filled_avg_price=None,
        client_order_id=event.client_order_id,
        order_qty=event.order_qty,
        order_type=event.order_type,
        asset_class=event.asset_class,
        created_at=event.created_at,
        updated_at=None,
        order_class=event.order_class,
        parent_order_id=event.parent_order_id,
    )


def apply_order_event(prev: OrderState | None, event: Event) -> OrderOutcome:
    """Apply one update to an order: the cumulative guard and the status merge.

    It runs once per update, so the new state is built with one positional constructor
    call at each exit rather than a chain of `msgspec.structs.replace`.
    """
    state = prev if prev is not None else new_order_state(event)
    # Fill in order fields a REST activity could not tell us, once a richer update arrives.
    cid = state.client_order_id if state.client_order_id is not None else event.client_order_id
    order_qty = state.order_qty if state.order_qty is not None else event.order_qty
    order_type = state.order_type if state.order_type is not None else event.order_type
    asset_class = state.asset_class if state.asset_class is not None else event.asset_class
    created_at = state.created_at if state.created_at is not None else event.created_at
    c0, p0, cum = state.filled_qty, state.filled_avg_price, event.cum_qty
    ocls = state.order_class if state.order_class is not None else event.order_class
    parent = state.parent_order_id if state.parent_order_id is not None \
        else event.parent_order_id

    if event.event not in KNOWN_EVENTS and event.event != "refresh":
        # An event type we do not know yet: keep it (the dedupe row), change nothing.
        return OrderOutcome(
            OrderState(state.order_id, state.symbol, state.side, state.status, c0, p0, cid,
                       order_qty, order_type, asset_class, created_at, state.updated_at,
                       state.revised_at, ocls, parent),
            None, False)
    # A REST snapshot is the broker's word now: at a stamp not older than ours it repairs
    # whatever the stream left (a refused cancel whose update we never saw, say).
    status = merge_status(
        state.status, event.status, old_at=state.updated_at, new_at=event.timestamp,
        authoritative=event.event in REFUSAL_EVENTS or (
            event.event == "refresh" and (
                state.updated_at is None or event.timestamp >= state.updated_at)),
    )
    updated_at = (
        event.timestamp
        if state.updated_at is None or event.timestamp > state.updated_at
        else state.updated_at
    )
    if ocls == "mleg":
        # A multi-leg parent counts whole strategy units; its legs carry the quantities
        # that reach positions (docs/design.md, section 10), so it keeps its high-water
        # mark and its (net) average, and moves no position itself.
        # Any update, a REST snapshot too, may carry it further: no position depends on it.
        ahead = cum > c0
        avg_parent = event.cum_avg_price if ahead and event.cum_avg_price is not None else p0
        return OrderOutcome(
            OrderState(state.order_id, state.symbol, state.side, status, max(cum, c0),
                       avg_parent, cid,
                       order_qty, order_type, asset_class, created_at, updated_at,
                       state.revised_at, ocls, parent),
            None, False)
    implied_fill = (
        event.source == "stream" and cum > c0 and event.cum_avg_price is not None
    )
    # A non-fill stream update (canceled, expired...) whose cumulative filled quantity is
    # above ours reveals fills the stream never delivered: its cumulative average prices
    # them exactly, so they land in stream order as the missed fills would have. A REST
    # snapshot (`refresh`) never does this: it is taken *now*, ahead of live frames still
    # queued, and would apply fills out of order; the FILL activities carry those fills.
    # A fill whose cumulative quantity is not above ours was already counted (a duplicate
    # through another path, or an out-of-order late fill whose quantity a later
    # cumulative update already carried): stale.
    # A fill stamped no later than a bust or correction we applied is in the revision's
    # cumulative figures already (docs/design.md, section 11): stale too.
    revised = state.revised_at is not None and event.timestamp <= state.revised_at
    if (event.event not in FILL_EVENTS and not implied_fill) or cum <= c0 or revised:
        return OrderOutcome(
            OrderState(state.order_id, state.symbol, state.side, status, c0, p0, cid,
                       order_qty, order_type, asset_class, created_at, updated_at,
                       state.revised_at, ocls, parent),
            None, event.event in FILL_EVENTS or implied_fill)

    price, exact = delta_price(c0, p0, cum, event.cum_avg_price, event.fill_qty, event.fill_price)
    qty = cum - c0
    if event.cum_avg_price is not None:
        avg = event.cum_avg_price
    else:
        avg = ((c0 * p0 if p0 is not None else Decimal(0)) + qty * price) / cum
    if event.order_qty is not None and cum >= event.order_qty:
        status = merge_status(status, "filled")
    new_state = OrderState(state.order_id, state.symbol, state.side, status, cum, avg, cid,
                           order_qty, order_type, asset_class, created_at, updated_at,
                           state.revised_at, ocls, parent)
    delta = FillDelta(
        order_id=event.order_id,
        client_order_id=cid,
        symbol=event.symbol,
        qty=qty if event.side == "buy" else -qty,
        price=price,
        timestamp=event.timestamp,
        position_qty=event.position_qty,
        exact=exact,
    )
    return OrderOutcome(new_state, delta, False)
