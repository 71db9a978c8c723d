"""The store contract: what the writer and dedupe actors need from durable storage.

Two implementations keep it: `PgStore` (PostgreSQL, production) and `MemoryStore`
(deterministic simulation). One conformance suite runs against both. The contract:
`commit_batch` is atomic (all of a batch or nothing), idempotent for events already
stored (the ambiguous-commit retry applies nothing twice), and moves the cursor only
forward, in the same transaction as the events it covers. A batch holding a value the
store cannot keep fails with `StoreDataError` and leaves the store as it was, connection
and writer lock included (the writer then finds the update at fault, section 4).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from .activities import ActivityRecord, PositionChange
from .adjustments import RECONCILE, Adjustment, BrokerPosition, Difference
from .events import DeadLetter, Event
from .ledger import Cursor, Drift
from .orders import OrderState
from .positions import Position

#: `ReplayMark.outcome` when the store decides it: the key was new, or already stored.
REPLAY_STORED = "stored"
REPLAY_ALREADY_STORED = "already stored"


@dataclass(frozen=True, slots=True)
class ReplayMark:
    """A dead letter replayed (`stream-supervisor dead-letters --replay`): its row records
    the outcome in the transaction of the batch that carries the replayed update."""

    dead_letter_id: int
    #: The replayed update's key (it travels in the same batch), or None when the
    #: payload still cannot become an update.
    event_key: str | None
    #: A fixed outcome (`still refused: ...`, `refused by the database: ...`); None lets
    #: the store say `stored` or `already stored` from its dedupe table.
    outcome: str | None = None


def replay_outcome(mark: ReplayMark, new_keys: set[str] | frozenset[str]) -> str:
    """What a replayed dead letter's row records (both stores decide it the same way)."""
    if mark.outcome is not None:
        return mark.outcome
    return REPLAY_STORED if mark.event_key in new_keys else REPLAY_ALREADY_STORED


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """How far a Broker API events stream is durably applied (docs/design.md, section
    11): the `event_id` (a ULID) of the newest event of a fully committed batch."""

    stream: str
    event_id: str


@dataclass(frozen=True, slots=True)
class Batch:
    account_id: str
    events: Sequence[Event]
    dead_letters: Sequence[DeadLetter] = ()
    replays: Sequence[ReplayMark] = ()
    #: Moved (only forward) in this batch's transaction, when set.
    stream_position: StreamPosition | None = None
    #: False: the commit need not wait for its WAL flush (`synchronous_commit = off`).
    #: Only for a part of an events-stream batch followed by a durable part: that later
    #: commit flushes the WAL, and this one with it, before anything is acknowledged.
    durable: bool = True


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """One row of `dead_letters`, as the replay reads it."""

    id: int
    account_id: str
    received_at: datetime
    reason: str
    payload: bytes
    source: str
    replay_requested_at: datetime | None = None
    replayed_at: datetime | None = None
    replay_result: str | None = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    applied_keys: frozenset[str]  # stored by this transaction
    duplicate_keys: frozenset[str]  # already in the dedupe table: the database layer caught them
    fills_applied: int
    stale_fills: int  # order-level duplicates
    inexact_fills: int
    positions_closed: int
    drift: tuple[Drift, ...]
    cursor: Cursor  # the account's cursor after this batch
    dead_letters: int

    @property
    def committed_keys(self) -> frozenset[str]:
        """Every key of the batch that is now durably known: the LRU may learn them all."""
        return self.applied_keys | self.duplicate_keys


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """Everything a store holds for one account, for checks and the conformance suite."""

    event_keys: frozenset[str]
    orders: dict[str, OrderState]
    positions: list[Position]  # every row of active_positions, open and closed
    history: list[Position]
    cursor: Cursor | None
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: Non-trade activities stored, oldest id first (docs/design.md, section 10).
    activities: list[ActivityRecord] = field(default_factory=list)
    #: position_adjustments, oldest first, and each order's baseline_qty (0 if none).
    adjustments: list[Adjustment] = field(default_factory=list)
    baseline_qty: dict[str, Decimal] = field(default_factory=dict)
    #: What non-trade activities did to positions, oldest activity first, and the latest
    #: baseline's moments (`activities.ACCOUNT_WIDE` and per symbol), section 10.
    position_changes: list[PositionChange] = field(default_factory=list)
    baseline_moments: dict[str, datetime] = field(default_factory=dict)
    #: Per symbol a reconcile adjusted, its moment (`baseline_moments.reconciled_at`).
    reconcile_moments: dict[str, datetime] = field(default_factory=dict)

    def net_position(self, symbol: str) -> Decimal:
        return sum((p.qty for p in self.positions if p.symbol == symbol and p.is_open), Decimal(0))

    def realized_pnl(self, symbol: str) -> Decimal:
        return sum(
            (p.realized_pnl for p in self.positions if p.symbol == symbol), Decimal(0)
        )


@dataclass(frozen=True, slots=True)
class BrokerWord:
    """Positions (and orders) set to the broker's word in one transaction
    (docs/design.md, section 9): a baseline, a rebaseline, or `reconcile --apply`."""

    account_id: str
    reason: str  # adjustments.BASELINE, REBASELINE or RECONCILE
    taken_at: datetime  # the snapshot's moment
    positions: Sequence[BrokerPosition]
    #: The symbols to set; None: every symbol either side holds.
    symbols: Sequence[str] | None = None
    #: Orders at the snapshot: their filled_qty becomes a high-water mark (baseline_qty).
    orders: Sequence[OrderState] = ()
    #: Where fills start to count (the cursor moves only forward, as ever).
    cursor: Cursor | None = None
    #: A baseline's per-symbol moments beyond `taken_at` (the broker's clock at the start
    #: of the round each symbol settled in): with `taken_at` for the whole account, they decide
    #: which later-posted activities are already in its positions (section 10). A
    #: reconcile's: the broker's clock read before its positions read, per symbol; only
    #: the symbols it adjusts record theirs (`ledger.recorded_moments`).
    moments: Mapping[str, datetime] = field(default_factory=dict)
    #: A reconcile's: our signed quantity per symbol when it found the difference. A
    #: symbol that holds another inside the transaction is left for the next run
    #: (`adjustments.plan_adjustments`).
    expected: Mapping[str, Decimal] | None = None
    #: A reconcile's: the broker's `filled_qty` of orders we hold as working, read after
    #: its positions. A symbol with a working order whose `filled_qty` is not exactly
    #: this is left (`adjustments.unsettled_symbols`); None: every symbol with one.
    working_filled: Mapping[str, Decimal] | None = None


def reconcile_word(account_id: str, diffs: Sequence[Difference], *, taken_at: datetime,
                   moment: datetime | None = None,
                   working_filled: Mapping[str, Decimal] | None = None) -> BrokerWord:
    """What a reconcile applies for `diffs`: each symbol set to the broker's quantity
    where ours is still what was compared (`expected`), recording `moment` (the broker's
    clock read before its positions read) as the moment of each symbol it adjusts, so an
    activity posting later whose effect the broker's quantity already holds is stored and
    not applied on top of it, and a fill stamped no later that reaches us only now moves
    no position (`reconciled_at`; docs/design.md, sections 9 and 10). A symbol with an
    order still working is adjusted only where `working_filled` (the broker's, read after
    its positions) gives that order's `filled_qty` as ours."""
    return BrokerWord(
        account_id=account_id, reason=RECONCILE, taken_at=taken_at,
        positions=[d.broker_position for d in diffs if d.broker_position is not None],
        symbols=[d.symbol for d in diffs],
        moments={} if moment is None else {d.symbol: moment for d in diffs},
        expected={d.symbol: d.ours for d in diffs},
        working_filled=working_filled,
    )


class Store(Protocol):
    """Durable storage for one or more accounts. Methods are async so that PostgreSQL can
    run them in a worker thread while the in-memory store runs inline (deterministic)."""

    async def open(self) -> None:
        """Connect and verify the schema; raise StoreUnavailable if unreachable."""
        ...

    async def aclose(self) -> None: ...

    async def recent_keys(self, account_id: str, limit: int) -> list[str]:
        """The most recently stored event keys, newest first (LRU warm start)."""
        ...

    async def load_cursor(self, account_id: str) -> Cursor | None: ...

    async def load_activity_cursor(self, account_id: str) -> str | None:
        """The newest non-trade activity id stored: where the activities backfill resumes."""
        ...

    async def has_key(self, key: str) -> bool:
        """Whether this event key is stored (a check that acknowledged commits survived)."""
        ...

    async def open_order_ids(self, account_id: str,
                             symbols: Collection[str] | None = None) -> list[str]:
        """Orders stored with a status that is not terminal (backfill refreshes them); of
        `symbols` only, when given (a reconcile asks the broker about those)."""
        ...

    async def try_leadership(self, account_id: str) -> bool:
        """Try to become the account's one writer (docs/design.md, section 7). True once held; the
        store then refuses to write through any other connection (LostLeadership)."""
        ...

    async def commit_batch(self, batch: Batch) -> BatchResult:
        """Apply a batch in one transaction. Raises StoreError if it may not have committed;
        StoreDataError if a value of it cannot be stored (nothing of it was)."""
        ...

    async def claim_ahead(self, batch: Batch) -> bool:
        """Prepare `batch`'s commit while the batch before it commits, for `commit_batch`
        of this same batch to finish (docs/design.md, section 4, "Claim ahead"): PgStore
        claims its keys in a transaction of their own connection. True if prepared, and
        the writer may then prepare the next batch while this one commits; False if not,
        when `commit_batch` does everything itself. Never raises a StoreError."""
        ...

    async def release_ahead(self) -> None:
        """Give up a batch `claim_ahead` prepared that will not be committed now (the
        writer stops, or the batch before it failed): whatever it holds is let go."""
        ...

    async def snapshot(self, account_id: str) -> StoreSnapshot: ...

    async def open_positions(self, account_id: str) -> list[Position]:
        """The account's open position rows (the scheduled reconcile reads them)."""
        ...

    async def apply_broker_word(self, word: BrokerWord) -> list[Adjustment]:
        """Set positions to the broker's, writing an adjustment per symbol changed, raise
        the orders' high-water marks, move the cursor: one transaction. The caller holds
        the account's writer lock."""
        ...

    async def load_stream_position(self, stream: str) -> str | None:
        """The newest `event_id` of `stream` committed (section 11), None before any."""
        ...

    async def pending_replays(self, account_id: str, limit: int) -> list[StoredDeadLetter]:
        """Dead letters an operator asked to replay (`dead-letters --replay` while a
        service holds the writer lock) that no replay has answered yet, oldest request
        first: the leader replays them through its own store."""
        ...
