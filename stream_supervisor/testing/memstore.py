"""In-memory store with PostgreSQL's transactional contract, for deterministic simulation.

A batch commits atomically or not at all; committed data survives a simulated crash
(the `MemoryDatabase` outlives supervisors), everything uncommitted does not. Faults are
injected through `fail_before_commit` / `fail_after_commit` hooks. Like PostgreSQL it
refuses data it could not hold (`StoreDataError`, nothing of the batch kept): what
`postgres_would_refuse` finds, and whatever the `refuse` predicate names (the simulated
worlds inject poison values through it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from ..activities import ActivityRecord, PositionChange
from ..adjustments import (
    RECONCILE,
    Adjustment,
    baseline_order,
    plan_adjustments,
    unsettled_symbols,
)
from ..bounds import (
    POSTGRES_INDEX_ROW_MAX,
    POSTGRES_NUMERIC_MAX_INTEGER_DIGITS,
    POSTGRES_NUMERIC_MAX_SCALE,
)
from ..errors import StoreDataError, StoreError, StoreUnavailable
from ..events import DeadLetter, Event
from ..ledger import (
    Cursor,
    LedgerResult,
    apply_events,
    cursor_of,
    recorded_moments,
    touched,
)
from ..orders import TERMINAL_STATUSES, OrderState
from ..positions import Position
from ..store import (
    Batch,
    BatchResult,
    BrokerWord,
    StoredDeadLetter,
    StoreSnapshot,
    replay_outcome,
)

#: Bytes of an index entry's own header and alignment, beyond the indexed text.
_INDEX_OVERHEAD = 16


def _numeric_refusal(name: str, value: Decimal | None) -> str | None:
    if value is None:
        return None
    if not value.is_finite():
        return f"{name}: numeric cannot hold {str(value)[:40]}"
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > POSTGRES_NUMERIC_MAX_SCALE or (
            value and value.adjusted() >= POSTGRES_NUMERIC_MAX_INTEGER_DIGITS):
        return "value overflows numeric format"
    return None


def _text_refusal(name: str, text: str | None) -> str | None:
    if text is None:
        return None
    size = len(text.encode("utf-8", "surrogatepass")) + _INDEX_OVERHEAD
    if size > POSTGRES_INDEX_ROW_MAX:
        return (f"index row size {size} exceeds btree version 4 maximum "
                f"{POSTGRES_INDEX_ROW_MAX} for index on {name}")
    return None


def postgres_would_refuse(keys: Iterable[str], result: LedgerResult) -> str | None:
    """What PostgreSQL would refuse among the rows a batch writes (SQLSTATE 54000 or
    22003), by its documented limits: an index entry over 2704 bytes (event key, order
    id, symbol; a real server compresses a repetitive text first, so it refuses no more
    than this), a number `numeric` cannot hold."""
    checks: list[str | None] = [_text_refusal("event_key", key) for key in keys]
    for order in result.orders.values():
        checks += [_text_refusal("alpaca_order_id", order.order_id),
                   _text_refusal("symbol", order.symbol),
                   _numeric_refusal("filled_qty", order.filled_qty),
                   _numeric_refusal("filled_avg_price", order.filled_avg_price),
                   _numeric_refusal("qty", order.order_qty)]
    for row in result.positions:
        checks += [_text_refusal("symbol", row.symbol),
                   _numeric_refusal("qty", row.qty),
                   _numeric_refusal("avg_entry_price", row.avg_entry_price),
                   _numeric_refusal("realized_pnl", row.realized_pnl)]
    return next((c for c in checks if c is not None), None)


Refusal = Callable[[Event], str | None]


@dataclass
class _StoredLetter:
    letter: DeadLetter
    id: int
    received_at: datetime
    replay_requested_at: datetime | None = None
    replayed_at: datetime | None = None
    replay_result: str | None = None


def _stored_letter(account_id: str, row: _StoredLetter) -> StoredDeadLetter:
    return StoredDeadLetter(
        id=row.id, account_id=account_id, received_at=row.received_at,
        reason=row.letter.reason, payload=row.letter.payload, source=row.letter.source,
        replay_requested_at=row.replay_requested_at, replayed_at=row.replayed_at,
        replay_result=row.replay_result)


@dataclass
class _Account:
    keys: OrderedDict[str, None] = field(default_factory=OrderedDict)
    orders: dict[str, OrderState] = field(default_factory=dict)
    positions: dict[int, Position] = field(default_factory=dict)
    history: list[Position] = field(default_factory=list)
    cursor: Cursor | None = None
    dead_letters: list[_StoredLetter] = field(default_factory=list)
    activities: dict[str, ActivityRecord] = field(default_factory=dict)
    adjustments: list[Adjustment] = field(default_factory=list)
    baseline_qty: dict[str, Decimal] = field(default_factory=dict)
    changes: list[PositionChange] = field(default_factory=list)
    baselines: dict[str, datetime] = field(default_factory=dict)
    reconciled: dict[str, datetime] = field(default_factory=dict)


class MemoryDatabase:
    """The durable part: survives the `MemoryStore` (the connection) that wrote it."""

    def __init__(self, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.accounts: dict[str, _Account] = {}
        self.next_position_id = 1
        self.next_dead_letter_id = 1
        self.available = True
        self.commits = 0
        self.stream_positions: dict[str, str] = {}  # events stream -> newest event_id
        self.clock = clock  # the database's now(): receipt and replay times

    def account(self, account_id: str) -> _Account:
        return self.accounts.setdefault(account_id, _Account())

    def stored_dead_letters(self, account_id: str) -> list[StoredDeadLetter]:
        """Every dead letter of the account with its replay columns, oldest first."""
        return [_stored_letter(account_id, row) for row in self.account(account_id).dead_letters]

    def request_replay(self, letter_id: int) -> None:
        """What `dead-letters --replay` does to a row while a service holds the lock."""
        for acct in self.accounts.values():
            for row in acct.dead_letters:
                if row.id == letter_id:
                    row.replay_requested_at = self.clock()
                    row.replayed_at = row.replay_result = None


FaultHook = Callable[[Batch], bool]


class MemoryStore:
    def __init__(
        self,
        db: MemoryDatabase,
        *,
        fail_before_commit: FaultHook | None = None,
        fail_after_commit: FaultHook | None = None,
        refuse: Refusal | None = None,
    ) -> None:
        self.db = db
        self.fail_before_commit = fail_before_commit
        self.fail_after_commit = fail_after_commit
        self.refuse = refuse
        self.opened = False

    async def open(self) -> None:
        if not self.db.available:
            raise StoreUnavailable("memory database unavailable")
        self.opened = True

    async def aclose(self) -> None:
        self.opened = False

    def _check(self) -> None:
        if not self.db.available:
            raise StoreUnavailable("memory database unavailable")

    async def recent_keys(self, account_id: str, limit: int) -> list[str]:
        self._check()
        keys = list(self.db.account(account_id).keys)
        return keys[::-1][:limit]

    async def load_cursor(self, account_id: str) -> Cursor | None:
        self._check()
        return self.db.account(account_id).cursor

    async def load_activity_cursor(self, account_id: str) -> str | None:
        self._check()
        return max(self.db.account(account_id).activities, default=None)

    async def has_key(self, key: str) -> bool:
        self._check()
        return any(key in acct.keys for acct in self.db.accounts.values())

    async def try_leadership(self, account_id: str) -> bool:
        """One process, one writer: leadership is always ours in memory."""
        self._check()
        return True

    async def open_order_ids(self, account_id: str,
                             symbols: Collection[str] | None = None) -> list[str]:
        self._check()
        return [
            oid
            for oid, order in self.db.account(account_id).orders.items()
            if order.status not in TERMINAL_STATUSES
            and (symbols is None or order.symbol in symbols)
        ]

    async def claim_ahead(self, batch: Batch) -> bool:
        """Nothing to prepare in memory (a commit is one step): a batch of updates is
        ready, so the writer's claim-ahead path runs in the simulation too."""
        return bool(batch.events)

    async def release_ahead(self) -> None:
        """Nothing is held ahead in memory."""

    async def commit_batch(self, batch: Batch) -> BatchResult:
        self._check()
        if self.fail_before_commit is not None and self.fail_before_commit(batch):
            raise StoreError("injected failure before commit")
        if self.refuse is not None:
            for ev in batch.events:
                refused = self.refuse(ev)
                if refused is not None:
                    raise StoreDataError(f"commit_batch: {refused}", sqlstate="22000",
                                         detail=refused)
        acct = self.db.account(batch.account_id)
        # Work on copies: nothing touches the durable state until the single swap below.
        seen: set[str] = set()
        new_events = []
        duplicates = set()
        for ev in batch.events:
            if ev.key in acct.keys or ev.key in seen:
                if ev.key in acct.keys:
                    duplicates.add(ev.key)
                continue
            seen.add(ev.key)
            new_events.append(ev)
        touched_orders, touched_symbols = touched(new_events)
        orders = {oid: acct.orders[oid] for oid in touched_orders if oid in acct.orders}
        open_rows = {
            p.symbol: p
            for p in acct.positions.values()
            if p.is_open and p.symbol in touched_symbols
        }
        result = apply_events(batch.account_id, orders, open_rows, new_events,
                              acct.baselines, acct.reconciled)
        refused = postgres_would_refuse(seen, result)
        if refused is not None:
            raise StoreDataError(f"commit_batch: {refused}", sqlstate="54000", detail=refused)

        # Everything below builds new values first, then swaps them in: the commit point.
        positions = dict(acct.positions)
        closed_rows: list[Position] = []
        next_id = self.db.next_position_id
        for row in result.positions:
            if row.position_id is None:
                row = msgspec.structs.replace(row, position_id=next_id)
                next_id += 1
            assert row.position_id is not None
            positions[row.position_id] = row
            if row.closed_at is not None:
                closed_rows.append(row)
        open_symbols = [row.symbol for row in positions.values() if row.is_open]
        if len(open_symbols) != len(set(open_symbols)):  # the partial unique index
            raise StoreError("unique violation: two open positions for one symbol")
        acct.positions = positions
        acct.history.extend(closed_rows)
        self.db.next_position_id = next_id
        for ev in new_events:
            acct.keys[ev.key] = None
        acct.orders.update(result.orders)
        for oid, qty in result.in_broker_word.items():
            acct.baseline_qty[oid] = acct.baseline_qty.get(oid, Decimal(0)) + qty
        for record in result.activities:
            acct.activities.setdefault(record.activity_id, record)
        for change in result.changes:
            if change.position_id is None:  # opened in this batch: the open row's id
                opened = [pid for pid, row in positions.items()
                          if row.symbol == change.symbol and row.is_open]
                if opened:
                    change = replace(change, position_id=opened[0])
            acct.changes.append(change)
        moved = cursor_of(new_events)
        acct.cursor = moved if acct.cursor is None else acct.cursor.advanced(moved)
        if batch.stream_position is not None:
            stream, event_id = batch.stream_position.stream, batch.stream_position.event_id
            held = self.db.stream_positions.get(stream)
            self.db.stream_positions[stream] = event_id if held is None else max(held, event_id)
        now = self.db.clock()
        known = {row.letter.key for row in acct.dead_letters}
        for letter in batch.dead_letters:
            if letter.key in known:
                continue  # a retry of a commit that happened: the unique letter_key
            known.add(letter.key)
            acct.dead_letters.append(_StoredLetter(letter, self.db.next_dead_letter_id, now))
            self.db.next_dead_letter_id += 1
        for mark in batch.replays:
            for stored in acct.dead_letters:
                if stored.id == mark.dead_letter_id:
                    stored.replayed_at = now
                    stored.replay_result = replay_outcome(mark, seen)
        self.db.commits += 1

        if self.fail_after_commit is not None and self.fail_after_commit(batch):
            raise StoreError("injected failure after commit (ambiguous)")
        return BatchResult(
            applied_keys=frozenset(seen),
            duplicate_keys=frozenset(duplicates),
            fills_applied=result.fills_applied,
            stale_fills=result.stale_fills,
            inexact_fills=result.inexact_fills,
            positions_closed=len(result.closed),
            drift=tuple(result.drift),
            cursor=acct.cursor,
            dead_letters=len(batch.dead_letters),
        )

    async def load_stream_position(self, stream: str) -> str | None:
        self._check()
        return self.db.stream_positions.get(stream)

    async def snapshot(self, account_id: str) -> StoreSnapshot:
        acct = self.db.account(account_id)
        return StoreSnapshot(
            event_keys=frozenset(acct.keys),
            orders=dict(acct.orders),
            positions=list(acct.positions.values()),
            history=list(acct.history),
            cursor=acct.cursor,
            dead_letters=[row.letter for row in acct.dead_letters],
            activities=[acct.activities[k] for k in sorted(acct.activities)],
            adjustments=list(acct.adjustments),
            baseline_qty={oid: q for oid, q in acct.baseline_qty.items() if q},
            position_changes=sorted(acct.changes, key=lambda c: (c.activity_id, c.symbol)),
            baseline_moments=dict(acct.baselines),
            reconcile_moments=dict(acct.reconciled),
        )

    async def open_positions(self, account_id: str) -> list[Position]:
        self._check()
        rows = [p for p in self.db.account(account_id).positions.values() if p.is_open]
        return sorted(rows, key=lambda p: p.symbol)

    async def apply_broker_word(self, word: BrokerWord) -> list[Adjustment]:
        self._check()
        acct = self.db.account(word.account_id)
        open_rows = {p.symbol: p for p in acct.positions.values() if p.is_open}
        wanted = set(word.symbols or ())
        working = (unsettled_symbols(
            ((o.symbol, o.order_id, o.filled_qty) for o in acct.orders.values()
             if o.symbol in wanted and o.status not in TERMINAL_STATUSES),
            word.working_filled) if word.reason == RECONCILE else set())
        changes = plan_adjustments(word.account_id, open_rows, word.positions,
                                   reason=word.reason, taken_at=word.taken_at,
                                   symbols=word.symbols,
                                   expected=word.expected, working=working)
        orders = dict(acct.orders)
        baselines = dict(acct.baseline_qty)
        for broker in word.orders:
            state, base = baseline_order(orders.get(broker.order_id),
                                         baselines.get(broker.order_id, Decimal(0)), broker)
            orders[broker.order_id] = state
            baselines[broker.order_id] = base
        positions = dict(acct.positions)
        next_id = self.db.next_position_id
        for change in changes:
            if change.closed is not None:
                assert change.closed.position_id is not None
                positions[change.closed.position_id] = change.closed
                acct.history.append(change.closed)
            if change.opened is not None:
                positions[next_id] = msgspec.structs.replace(change.opened, position_id=next_id)
                next_id += 1
        acct.positions = positions
        self.db.next_position_id = next_id
        acct.orders = orders
        acct.baseline_qty = baselines
        if word.cursor is not None:
            acct.cursor = word.cursor if acct.cursor is None else acct.cursor.advanced(word.cursor)
        made = [c.adjustment for c in changes]
        acct.adjustments.extend(made)
        for symbol, at in recorded_moments(word.reason, word.taken_at, word.moments,
                                           (a.symbol for a in made)).items():
            held = acct.baselines.get(symbol)
            acct.baselines[symbol] = at if held is None else max(held, at)
            if word.reason == RECONCILE:
                held = acct.reconciled.get(symbol)
                acct.reconciled[symbol] = at if held is None else max(held, at)
        self.db.commits += 1
        return made

    async def pending_replays(self, account_id: str, limit: int) -> list[StoredDeadLetter]:
        self._check()
        pending = [row for row in self.db.account(account_id).dead_letters
                   if row.replay_requested_at is not None and row.replayed_at is None]
        pending.sort(key=lambda row: (row.replay_requested_at or row.received_at, row.id))
        return [_stored_letter(account_id, row) for row in pending[:limit]]
