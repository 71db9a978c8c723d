"""In-memory store with PostgreSQL's transactional contract, for deterministic simulation.

A batch commits atomically or not at all; committed data survives a simulated crash
(the `MemoryDatabase` outlives supervisors), everything uncommitted does not. Faults are
injected through `fail_before_commit` / `fail_after_commit` hooks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from ..errors import StoreError, StoreUnavailable
from ..events import DeadLetter
from ..ledger import Cursor, apply_events, cursor_of
from ..orders import TERMINAL_STATUSES, OrderState
from ..positions import Position
from ..store import Batch, BatchResult, StoreSnapshot


@dataclass
class _Account:
    keys: OrderedDict[str, None] = field(default_factory=OrderedDict)
    orders: dict[str, OrderState] = field(default_factory=dict)
    positions: dict[int, Position] = field(default_factory=dict)
    history: list[Position] = field(default_factory=list)
    cursor: Cursor | None = None
    dead_letters: list[DeadLetter] = field(default_factory=list)


class MemoryDatabase:
    """The durable part: survives the `MemoryStore` (the connection) that wrote it."""

    def __init__(self) -> None:
        self.accounts: dict[str, _Account] = {}
        self.next_position_id = 1
        self.available = True
        self.commits = 0

    def account(self, account_id: str) -> _Account:
        return self.accounts.setdefault(account_id, _Account())


FaultHook = Callable[[Batch], bool]


class MemoryStore:
    def __init__(
        self,
        db: MemoryDatabase,
        *,
        fail_before_commit: FaultHook | None = None,
        fail_after_commit: FaultHook | None = None,
    ) -> None:
        self.db = db
        self.fail_before_commit = fail_before_commit
        self.fail_after_commit = fail_after_commit
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

    async def has_key(self, key: str) -> bool:
        self._check()
        return any(key in acct.keys for acct in self.db.accounts.values())

    async def try_leadership(self, account_id: str) -> bool:
        """One process, one writer: leadership is always ours in memory."""
        self._check()
        return True

    async def open_order_ids(self, account_id: str) -> list[str]:
        self._check()
        return [
            oid
            for oid, order in self.db.account(account_id).orders.items()
            if order.status not in TERMINAL_STATUSES
        ]

    async def commit_batch(self, batch: Batch) -> BatchResult:
        self._check()
        if self.fail_before_commit is not None and self.fail_before_commit(batch):
            raise StoreError("injected failure before commit")
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
        touched_orders = {ev.order_id for ev in new_events}
        touched_symbols = {ev.symbol for ev in new_events}
        orders = {oid: acct.orders[oid] for oid in touched_orders if oid in acct.orders}
        open_rows = {
            p.symbol: p
            for p in acct.positions.values()
            if p.is_open and p.symbol in touched_symbols
        }
        result = apply_events(batch.account_id, orders, open_rows, new_events)

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
        moved = cursor_of(new_events)
        acct.cursor = moved if acct.cursor is None else acct.cursor.advanced(moved)
        acct.dead_letters.extend(batch.dead_letters)
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

    async def snapshot(self, account_id: str) -> StoreSnapshot:
        acct = self.db.account(account_id)
        return StoreSnapshot(
            event_keys=frozenset(acct.keys),
            orders=dict(acct.orders),
            positions=list(acct.positions.values()),
            history=list(acct.history),
            cursor=acct.cursor,
            dead_letters=list(acct.dead_letters),
        )
