"""The broker's word as a starting state (docs/design.md, section 9).

A baseline reads `GET /v2/positions`, the open orders and the FILL activities of a recent
window, again and again until each symbol has had a round with no new activity around
its reads (nothing filled meanwhile) and no change since the previous read (nothing
else changed it: section 10), and stores that moment of each symbol as where
positions start: each position the broker holds, opened before the service knew it, at
the broker's average entry; each order's `filled_qty` then as its high-water mark, so
only fills beyond it count. Used on
a first start (no cursor), on a restart whose cursor is older than the broker keeps
activities, and by `stream-supervisor rebaseline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Final

from .adjustments import (
    BASELINE,
    REBASELINE,
    Adjustment,
    BrokerPosition,
    broker_clock,
    broker_positions,
)
from .bounds import (
    MAX_ID_CHARS,
    MAX_SYMBOL_CHARS,
    check_price,
    check_qty,
    check_text,
    qty_ok,
)
from .errors import BrokerUnavailable, DecodeError, OutOfBounds
from .events import format_timestamp, parse_timestamp
from .ledger import Cursor
from .nontrade import AssetBook, looks_compact_crypto
from .orders import OrderState
from .protocol import WireActivity, WireOrder, activity_to_event
from .rest import BrokerRest
from .store import BrokerWord, Store
from .symbols import AssetClass, canonical_symbol

#: Rounds of reads before giving up on a symbol that never had a quiet one.
MAX_ATTEMPTS: Final = 10
#: The window of activities a baseline reads reaches back at least this far (seconds),
#: whatever the backfill overlap: it must hold every fill the first backfill re-reads
#: (one overlap before the snapshot) and the fills a reconnecting stream may replay.
MIN_WINDOW: Final = 3_600.0
#: How far before the newest fill read the second read starts.
RE_READ_MARGIN: Final = timedelta(seconds=1)
#: Most pages of activities one read of the window takes.
MAX_WINDOW_PAGES: Final = 1_000
#: Most orders a reconcile reads one by one (orders we hold as working that the broker
#: no longer lists as open): each is a request of the REST budget the user's own bot
#: shares. An order past it is not read, and its symbol waits for a later run.
MAX_ORDER_READS: Final = 20


@dataclass(frozen=True, slots=True)
class BrokerSnapshot:
    taken_at: datetime
    positions: list[BrokerPosition]
    #: Every order whose fills may still reach us (open now, or filled inside the
    #: window that the first backfill re-reads), with its filled_qty at the snapshot.
    orders: list[OrderState]
    newest_activity: str | None = None
    attempts: int = 1
    notes: list[str] = field(default_factory=list)
    #: Per symbol, the broker's clock at the start of the round it settled in (at least
    #: its newest fill's time): every effect at or before it, a fill after `taken_at`
    #: and the crypto fee charged at it, a split, is in its position
    #: (docs/design.md, section 10).
    moments: dict[str, datetime] = field(default_factory=dict)


def needs_baseline(cursor: Cursor | None, now: datetime, activities_window: float) -> str | None:
    """`baseline` for a first start, `rebaseline` when the cursor is older than the
    broker keeps activities (backfill could not bring the gap back), else None."""
    if cursor is None or cursor.fill_time is None:
        return BASELINE
    if activities_window > 0 and cursor.fill_time < now - timedelta(seconds=activities_window):
        return REBASELINE
    return None


def _order_state(order: WireOrder, parent: str | None = None) -> OrderState:
    created = parse_timestamp(order.created_at)[0] if order.created_at else None
    updated = parse_timestamp(order.updated_at)[0] if order.updated_at else created
    return OrderState(
        order_id=order.id, symbol=order.symbol, side=order.side or "", status=order.status,
        filled_qty=order.filled_qty, filled_avg_price=order.filled_avg_price,
        client_order_id=order.client_order_id, order_qty=order.qty,
        order_type=order.order_type or order.type, asset_class=order.asset_class,
        created_at=created, updated_at=updated,
        # A multi-leg order (docs/design.md, section 10): its legs' filled_qty are their
        # own high-water marks (`_by_symbol`).
        order_class="mleg" if order.legs else order.order_class or None,
        parent_order_id=parent,
    )


def _by_symbol(open_orders: list[WireOrder]) -> dict[str, list[tuple[WireOrder, str | None]]]:
    """Open orders by the symbol whose position their fills move: a simple order's own,
    and each leg of a multi-leg order under its leg's symbol (with its parent's id); the
    parent itself moves no position and is kept apart (`_parents`)."""
    out: dict[str, list[tuple[WireOrder, str | None]]] = {}
    for order in open_orders:
        if order.legs:
            for leg in order.legs:
                out.setdefault(canonical_symbol(leg.symbol), []).append((leg, order.id))
        else:
            out.setdefault(canonical_symbol(order.symbol), []).append((order, None))
    return out


async def _activities(rest: BrokerRest, after: str) -> list[WireActivity]:
    out: list[WireActivity] = []
    token: str | None = None
    for _ in range(MAX_WINDOW_PAGES):
        page = await rest.fill_activities(after=after, page_token=token)
        out.extend(_within_bounds(a) for a in page if a.id and a.order_id)
        # A short page is not the last one (brokers cut pages short): only an empty one is.
        if not page or not page[-1].id:
            return out
        token = page[-1].id
    raise BrokerUnavailable(f"more than {MAX_WINDOW_PAGES} pages of activities after {after}")


def _within_bounds(activity: WireActivity) -> WireActivity:
    """A FILL activity of the window, held to the bounds the backfill holds it to
    (`protocol.activity_to_event`). One outside them (a `cum_qty` of NaN taken as a mark,
    a `transaction_time` that is no time) fails the baseline, naming it: starting without
    it could count its order's fills twice."""
    try:
        activity_to_event(activity)
    except ValueError as exc:  # DecodeError, OutOfBounds, TimestampError
        raise BrokerUnavailable(f"FILL activity {activity.id[:64]} is outside the bounds "
                                f"({str(exc)[:200]}): a baseline cannot start from it") from None
    return activity


def _marked(order: WireOrder) -> WireOrder:
    """An order whose `filled_qty` becomes a mark (a multi-leg order's legs too), held to
    the bounds of every broker value: a mark of Infinity would take every later fill of
    it as stale, one of NaN fail every batch holding one. One outside them fails the
    baseline, naming it."""
    try:
        for part in (order, *(order.legs or ())):
            check_text("id", part.id, MAX_ID_CHARS)
            check_text("symbol", part.symbol, MAX_SYMBOL_CHARS)
            check_qty("filled_qty", part.filled_qty)
            check_qty("qty", part.qty)
            check_price("filled_avg_price", part.filled_avg_price)
            if part.filled_qty < 0:
                raise OutOfBounds("filled_qty is negative")
            for stamp in (part.created_at, part.updated_at):
                if stamp:
                    parse_timestamp(stamp)
    except ValueError as exc:  # OutOfBounds, TimestampError
        raise BrokerUnavailable(f"the broker's order {order.id[:64]} is outside the bounds "
                                f"({str(exc)[:200]}): a baseline cannot mark it") from None
    return order


async def broker_now(rest: BrokerRest, fallback: datetime) -> datetime:
    """`GET /v2/clock`'s timestamp; our own clock if the broker has none to give (a
    broker that keeps retrying errors fails the baseline, as any read does). A baseline
    and `reconcile --apply` read it before the positions they take (section 10)."""
    try:
        return broker_clock(await rest.clock(), fallback)
    except BrokerUnavailable:
        return fallback


def _moved_by_its_fills(was: BrokerPosition | None, now: BrokerPosition | None,
                        fills: Sequence[WireActivity], before: datetime,
                        after: datetime) -> bool:
    """Whether a symbol's position moved between two rounds' reads by its fills alone.

    `fills` are those the earlier round found; `before` and `after` are the broker's
    clock read either side of that round's positions read. A fill stamped after `after`
    came after the positions read, one stamped at or before `before` came before it (it
    is in `was`); one stamped between is undecided, and so is the answer (False: the
    next round's read decides). Otherwise the quantity read now must be the earlier one
    plus exactly the later fills: a split, an expiry or an assignment between the reads
    (without a fill) would not add up. Prices are not compared: the broker's average is
    its own rounding."""
    if not fills:
        return False
    qty = was.qty if was is not None else Decimal(0)
    for fill in fills:
        if fill.side not in ("buy", "sell"):
            return False
        stamp = parse_timestamp(fill.transaction_time)[0]
        if before < stamp <= after:
            return False
        if stamp > after:
            qty += fill.qty if fill.side == "buy" else -fill.qty
    return qty == (now.qty if now is not None else Decimal(0))


async def take_snapshot(
    rest: BrokerRest, *, now: datetime, window: float, known: Sequence[str] = ()
) -> BrokerSnapshot:
    """A consistent moment of each symbol: the activities of the window are read before
    and after the positions and open orders; a symbol no new activity touched, whose
    position is also what the previous round read (or, if it filled in that round, moved
    by exactly those fills: `_moved_by_its_fills`), is settled in that round (its
    position, open orders and fills then, at the broker's clock read before its positions
    read), the others are read again until each has had a quiet round.

    `known`: orders we hold as still working. One the broker no longer lists as open
    finished while we were away; its final `filled_qty` (in the broker's positions by
    now) becomes its mark, so its row is right again and nothing of it counts twice."""
    # The moment is stamped by the broker's clock, read first: the cursor it becomes is
    # compared with fill times, which the broker stamps; ours may run ahead of its.
    now = await broker_now(rest, now)
    start = now - timedelta(seconds=max(window, MIN_WINDOW))
    # A FILL activity names a crypto pair without its slash (`BTCUSD`), positions and
    # orders with it once canonical: one spelling, or a pair's fill would not unsettle
    # its position (docs/design.md, section 10).
    book = AssetBook(rest)
    spelled: dict[str, str] = {}

    async def spell(found: list[WireActivity]) -> None:
        for act in found:
            if act.symbol in spelled:
                continue
            canon = canonical_symbol(act.symbol)
            if looks_compact_crypto(canon) and \
                    await book.asset_class(canon) == AssetClass.CRYPTO.value:
                canon = canonical_symbol(canon, AssetClass.CRYPTO)
            spelled[act.symbol] = canon

    acts = await _activities(rest, format_timestamp(start))
    await spell(acts)
    # Per symbol, the round it settled in: its position, its open orders and the
    # activities known then. A symbol no fill touched while a round read it is
    # consistent in that round, whatever its neighbours did meanwhile.
    held: dict[str, BrokerPosition] = {}
    # A multi-leg order's legs are read with their own symbols, each leg's filled_qty in
    # the round its symbol settled in; the parent, which moves no position, as last read.
    working: dict[str, list[tuple[WireOrder, str | None]]] = {}
    parents: dict[str, WireOrder] = {}
    known_acts: dict[str, list[WireActivity]] = {}
    settled: set[str] = set()
    # Per symbol, the broker's clock read at the start of the round it settled in.
    clocks: dict[str, datetime] = {}
    previous: dict[str, BrokerPosition] | None = None
    # The previous round: its clock reads either side of its positions read, and the
    # fills it found, by symbol (`_moved_by_its_fills`).
    before = after = now
    filled: dict[str, list[WireActivity]] = {}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        # The round's moment: the broker's clock read after the previous round's
        # positions read and before this one's (the first round's is the clock read
        # first). Read again right after the positions, it brackets them: a fill stamped
        # after it came after them, one stamped before the round's moment before them.
        clock = after
        read, refused = broker_positions(await rest.positions())
        if refused:
            raise BrokerUnavailable(f"the broker's positions hold a row outside the bounds "
                                    f"({refused[0]}): a baseline cannot start from them")
        positions = {b.symbol: b for b in read}
        after = await broker_now(rest, now)
        listed = await rest.open_orders()
        skipped = getattr(listed, "skipped", ())
        if skipped:
            # An open order left out would have no mark: its fills before the baseline,
            # in the positions taken, would count again with its next update.
            raise BrokerUnavailable(f"the broker's open orders hold one that does not decode "
                                    f"({skipped[0][:200]}): a baseline cannot mark it")
        open_orders = [_marked(o) for o in listed]
        by_symbol = _by_symbol(open_orders)
        parents.update((o.id, o) for o in open_orders if o.legs)
        # The second read only needs what is new since the first (from a second before
        # its newest fill: one stored late within its millisecond is seen too), so a
        # busy account pays a page or two for it, not the window again.
        seen = {a.id for a in acts}
        newest = max((parse_timestamp(a.transaction_time)[0] for a in acts), default=start)
        fresh = [a for a in await _activities(
            rest, format_timestamp(max(start, newest - RE_READ_MARGIN))) if a.id not in seen]
        acts = acts + fresh
        await spell(fresh)
        touched = {spelled[a.symbol] for a in fresh}
        symbols = (set(positions) | set(by_symbol)
                   | {spelled[a.symbol] for a in acts})
        for symbol in symbols - touched - settled:
            # A change without a fill (a split, an expiry, an assignment) between the
            # clock read and the positions read would be in the positions yet after the
            # moment: a symbol settles only once a read finds it as the previous round
            # did, so nothing changed it between the two reads and the moment between
            # them is exact. One that filled in the previous round may instead have moved
            # by exactly those of its fills that came after that round's positions read;
            # a change without a fill landing beside them (a short put assigned while its
            # stock trades) would not add up, and is caught the same way.
            if previous is None:
                continue
            if positions.get(symbol) != previous.get(symbol) and not _moved_by_its_fills(
                    previous.get(symbol), positions.get(symbol), filled.get(symbol, []),
                    before, clock):
                continue
            settled.add(symbol)
            clocks[symbol] = clock
            if symbol in positions:
                held[symbol] = positions[symbol]
            working[symbol] = by_symbol.get(symbol, [])
            known_acts[symbol] = [a for a in acts if spelled[a.symbol] == symbol]
        if symbols <= settled:
            break
        previous, before = positions, clock
        filled = {}
        for act in fresh:
            filled.setdefault(spelled[act.symbol], []).append(act)
    else:
        raise BrokerUnavailable(
            f"the account kept filling: {len(symbols - settled)} symbol(s) had no quiet "
            f"moment in {MAX_ATTEMPTS} reads of its positions")
    # An open multi-leg order's legs are orders of their own.
    orders = {o.id: _order_state(o) for o in parents.values()}
    orders.update((o.id, _order_state(o, parent)) for group in working.values()
                  for o, parent in group)
    notes = []
    for settled_acts in known_acts.values():
        reached: dict[str, WireActivity] = {}
        for act in settled_acts:
            if act.order_id not in reached or act.cum_qty > reached[act.order_id].cum_qty:
                reached[act.order_id] = act
        for order_id, act in sorted(reached.items()):
            if order_id in orders:
                continue
            # Filled inside the window but not open when its symbol settled: finished,
            # and backfill will re-read those fills, so the order needs its mark too.
            full = await rest.order(order_id)
            if full is not None:
                full = _marked(full)
            if full is not None and full.filled_qty == act.cum_qty:
                orders[order_id] = _order_state(full)
                continue
            fills = [a for a in settled_acts if a.order_id == order_id]
            covered = sum((a.qty for a in fills), Decimal(0)) == act.cum_qty
            avg = (sum((a.qty * a.price for a in fills), Decimal(0)) / act.cum_qty
                   if covered else act.price)
            if not covered:
                notes.append(f"order {order_id}: average before the window unknown")
            stamp = parse_timestamp(act.transaction_time)[0]
            orders[order_id] = OrderState(
                order_id=order_id, symbol=spelled[act.symbol], side=act.side,
                status=act.order_status or "partially_filled", filled_qty=act.cum_qty,
                filled_avg_price=avg, updated_at=stamp)
    for order_id in known:
        if order_id not in orders:
            # Not open at the snapshot, so finished: its filled_qty is final.
            final = await rest.order(order_id)
            if final is not None:
                orders[order_id] = _order_state(_marked(final))
    moments = {
        symbol: max([at, *(parse_timestamp(a.transaction_time)[0]
                           for a in known_acts.get(symbol, ()))])
        for symbol, at in clocks.items()}
    return BrokerSnapshot(
        taken_at=now, positions=list(held.values()), orders=list(orders.values()),
        newest_activity=max((a.id for a in acts), default=None),
        attempts=attempt, notes=notes,
        moments={s: at for s, at in moments.items() if at > now})


async def broker_filled(rest: BrokerRest, order_ids: Sequence[str]) -> dict[str, Decimal]:
    """The broker's `filled_qty` now of each of `order_ids` (orders we hold as working):
    its open orders in one read (a multi-leg order's legs by their own ids), then each it
    no longer lists (finished meanwhile) on its own, at most `MAX_ORDER_READS` of them.
    An order not read, or unknown to the broker, is left out, and a reconcile leaves its
    symbol (`adjustments.unsettled_symbols`). Read after the positions a reconcile
    compared: a fill between the two reads shows here as more than ours."""
    if not order_ids:
        return {}
    listed: dict[str, Decimal] = {}
    for order in await rest.open_orders():
        listed[order.id] = order.filled_qty
        for leg in order.legs or ():
            listed[leg.id] = leg.filled_qty
    out = {oid: listed[oid] for oid in order_ids if oid in listed}
    for oid in [oid for oid in order_ids if oid not in listed][:MAX_ORDER_READS]:
        try:
            full = await rest.order(oid)
        except DecodeError:  # an answer that is no order: as if not read
            continue
        if full is not None:
            out[oid] = full.filled_qty
    # A quantity outside the bounds says nothing (NaN equals nothing anyway): left out,
    # its symbol waits.
    return {oid: filled for oid, filled in out.items() if qty_ok(filled)}


def broker_word(snapshot: BrokerSnapshot, account_id: str, reason: str) -> BrokerWord:
    return BrokerWord(
        account_id=account_id, reason=reason, taken_at=snapshot.taken_at,
        positions=snapshot.positions, orders=snapshot.orders,
        cursor=Cursor(snapshot.taken_at, snapshot.newest_activity),
        moments=snapshot.moments,
    )


async def take_baseline(
    store: Store, rest: BrokerRest, account_id: str, *, reason: str, now: datetime,
    window: float,
) -> tuple[BrokerSnapshot, list[Adjustment]]:
    """Snapshot the broker and store it as the starting state; the caller holds the
    account's writer lock. History is kept: rows we held are closed with the reason."""
    known = await store.open_order_ids(account_id)
    snapshot = await take_snapshot(rest, now=now, window=window, known=known)
    made = await store.apply_broker_word(broker_word(snapshot, account_id, reason))
    return snapshot, made
