"""One contract, two stores: every test here runs unchanged on MemoryStore and PgStore.

Events come from the recorded Alpaca session (stream frames and REST FILL activities);
outcomes are compared with the broker's ground truth for that session.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from stream_supervisor import bounds, protocol
from stream_supervisor.adjustments import BASELINE, RECONCILE, BrokerPosition, Difference
from stream_supervisor.deadletters import list_dead_letters
from stream_supervisor.errors import StoreDataError, StoreError
from stream_supervisor.events import DeadLetter, Event, broker_event_key, fill_key
from stream_supervisor.ledger import Cursor
from stream_supervisor.orders import OrderState
from stream_supervisor.pgstore import PgStore
from stream_supervisor.settings import Settings
from stream_supervisor.store import (
    Batch,
    BatchResult,
    BrokerWord,
    ReplayMark,
    Store,
    StoredDeadLetter,
    StoreSnapshot,
    reconcile_word,
)
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore
from stream_supervisor.testing.verify import verify_against_truth

from .fixtures import RECORDING

TRUTH: dict[str, Any] = json.loads((RECORDING / "ground_truth.json").read_text())
ACCOUNT: str = TRUTH["account_id"]
TOLERANCE = Decimal("1e-9")
POISON = "conformance: this dead letter makes the batch fail"
WAIT = 30  # seconds: a hung store fails the test instead of the suite

Hook = Callable[[Batch], bool]


def stream_events() -> list[Event]:
    frames = (RECORDING / "trade_updates.jsonl").read_bytes().splitlines()
    decoded = [protocol.decode_frame(f) for f in frames]
    return [f for f in decoded if isinstance(f, Event)]


def rest_events() -> list[Event]:
    activities = protocol.decode_activities((RECORDING / "fill_activities.json").read_bytes())
    return [protocol.activity_to_event(a) for a in activities]


STREAM = stream_events()
REST = rest_events()


# --- the two backends ------------------------------------------------------------------


class _PgStoreWithFaults(PgStore):
    """PgStore whose commit can report failure after a real commit (the ambiguous case)."""

    def __init__(self, url: str, fail_after: Hook | None) -> None:
        super().__init__(url, statement_timeout_ms=5_000)
        self.fail_after = fail_after

    async def commit_batch(self, batch: Batch) -> BatchResult:
        result = await super().commit_batch(batch)
        if self.fail_after is not None and self.fail_after(batch):
            raise StoreError("injected failure after commit (ambiguous)")
        return result


def _poisoned(batch: Batch) -> bool:
    return any(d.reason == POISON for d in batch.dead_letters)


# A trigger makes PostgreSQL itself fail the batch at its last write (the dead letters come
# after orders, positions, history and cursor): everything before it must roll back.
_POISON_TRIGGER = f"""
CREATE FUNCTION conformance_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.reason = '{POISON}' THEN RAISE EXCEPTION 'poisoned batch'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER conformance_poison BEFORE INSERT ON dead_letters
    FOR EACH ROW EXECUTE FUNCTION conformance_poison();
"""


@dataclass
class Backend:
    name: str
    make: Callable[..., Awaitable[Store]]
    #: What `dead-letters --replay` does to a row while a service holds the lock.
    request_replay: Callable[[int], None]
    #: Every dead letter of an account with its replay columns, oldest first.
    stored_letters: Callable[[str], list[StoredDeadLetter]]


@pytest.fixture(params=["memory", "postgres"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    opened: list[Store] = []
    request_replay: Callable[[int], None]
    stored_letters: Callable[[str], list[StoredDeadLetter]]
    if request.param == "memory":
        db = MemoryDatabase()
        request_replay = db.request_replay
        stored_letters = db.stored_dead_letters

        async def make(fail_after: Hook | None = None) -> Store:
            store = MemoryStore(db, fail_before_commit=_poisoned, fail_after_commit=fail_after)
            await store.open()
            opened.append(store)
            return store

    else:
        url: str = request.getfixturevalue("database_url")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(_POISON_TRIGGER)

        async def make(fail_after: Hook | None = None) -> Store:
            store = _PgStoreWithFaults(url, fail_after)
            await store.open()
            opened.append(store)
            return store

        def request_replay(letter_id: int) -> None:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE dead_letters SET replay_requested_at = now(), "
                             "replayed_at = NULL, replay_result = NULL WHERE id = %s",
                             [letter_id])

        def stored_letters(account_id: str) -> list[StoredDeadLetter]:
            found = list_dead_letters(Settings(database_url=url), account_id, 1000)
            return sorted(found, key=lambda d: d.id)

    yield Backend(request.param, make, request_replay, stored_letters)
    for store in opened:
        await store.aclose()


# --- helpers ---------------------------------------------------------------------------


def batches(events: Sequence[Event], size: int) -> list[list[Event]]:
    return [list(events[i : i + size]) for i in range(0, len(events), size)]


async def replay(store: Store, events: Sequence[Event], size: int) -> list[BatchResult]:
    with trio.fail_after(WAIT):
        return [await store.commit_batch(Batch(ACCOUNT, b)) for b in batches(events, size)]


def dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def quantity_mismatches(snap: StoreSnapshot) -> list[str]:
    out = []
    for order_id, want in TRUTH["orders"].items():
        got = snap.orders.get(order_id)
        want_qty = Decimal(want["filled_qty"])
        if want_qty == 0 and got is None:
            continue
        if got is None or got.filled_qty != want_qty:
            out.append(f"order {order_id}: filled_qty {got and got.filled_qty} != {want_qty}")
    for symbol, want in TRUTH["positions"].items():
        if snap.net_position(symbol) != Decimal(want["qty"]):
            out.append(f"{symbol}: net {snap.net_position(symbol)} != {want['qty']}")
    open_symbols = [p.symbol for p in snap.positions if p.is_open]
    if len(open_symbols) != len(set(open_symbols)):
        out.append(f"two open rows for one symbol: {sorted(open_symbols)}")
    return out


def full_mismatches(snap: StoreSnapshot) -> list[str]:
    """Quantities, plus prices, P&L and statuses: what a complete in-order replay gives."""
    out = quantity_mismatches(snap)
    for order_id, want in TRUTH["orders"].items():
        got = snap.orders[order_id]
        if got.status != want["status"]:
            out.append(f"order {order_id}: status {got.status} != {want['status']}")
        want_avg = dec(want["filled_avg_price"])
        if want_avg is not None and (
            got.filled_avg_price is None or abs(got.filled_avg_price - want_avg) > TOLERANCE
        ):
            out.append(f"order {order_id}: avg {got.filled_avg_price} != {want_avg}")
    for symbol, want in TRUTH["positions"].items():
        rows = [p for p in snap.positions if p.symbol == symbol and p.is_open]
        want_avg = dec(want["avg_entry_price"])
        got_avg = rows[0].avg_entry_price if rows else None
        if (want_avg is None) != (got_avg is None) or (
            want_avg is not None and got_avg is not None and abs(got_avg - want_avg) > TOLERANCE
        ):
            out.append(f"{symbol}: avg_entry_price {got_avg} != {want_avg}")
        pnl = snap.realized_pnl(symbol)
        if abs(pnl - Decimal(want["realized_pnl"])) > TOLERANCE:
            out.append(f"{symbol}: realized_pnl {pnl} != {want['realized_pnl']}")
    # Every closed row is in the history once, and the history holds nothing else.
    closed = sorted(p.position_id or 0 for p in snap.positions if not p.is_open)
    history = sorted(p.position_id or 0 for p in snap.history)
    if closed != history:
        out.append(f"history ids {history} != closed ids {closed}")
    out.extend(str(m) for m in verify_against_truth(snap, TRUTH))
    return out


def comparable(snap: StoreSnapshot) -> tuple[Any, ...]:
    """A snapshot's content, independent of row order and storage ids' numbering."""
    def pos_key(p: Any) -> tuple[Any, ...]:
        return (p.symbol, p.opened_at, p.opened_by_order_id)

    return (
        snap.event_keys,
        snap.orders,
        sorted((msgspec.structs.replace(p, position_id=None) for p in snap.positions), key=pos_key),
        sorted((msgspec.structs.replace(p, position_id=None) for p in snap.history), key=pos_key),
        snap.cursor,
        [(d.reason, d.payload, d.source) for d in snap.dead_letters],
    )


# --- the contract ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 17, 1000])
async def test_whole_stream_replay_ends_at_ground_truth(backend: Backend, size: int) -> None:
    store = await backend.make()
    results = await replay(store, STREAM, size)
    snap = await store.snapshot(ACCOUNT)

    assert full_mismatches(snap) == []
    assert sum(r.fills_applied for r in results) == TRUTH["fills_total"]
    assert snap.event_keys == {e.key for e in STREAM}
    assert snap.cursor == Cursor(max(e.timestamp for e in STREAM if e.is_fill), None)
    assert await store.load_cursor(ACCOUNT) == snap.cursor
    assert set(await store.open_order_ids(ACCOUNT)) == set()


async def test_rest_activities_alone_give_the_quantities(backend: Backend) -> None:
    store = await backend.make()
    await replay(store, REST, 25)
    snap = await store.snapshot(ACCOUNT)

    assert quantity_mismatches(snap) == []
    assert snap.cursor is not None
    assert snap.cursor.activity_id == max(e.activity_id or "" for e in REST)


async def test_replaying_everything_again_changes_nothing(backend: Backend) -> None:
    store = await backend.make()
    await replay(store, STREAM, 50)
    before = await store.snapshot(ACCOUNT)

    again = await replay(store, STREAM + REST, 7)
    after = await store.snapshot(ACCOUNT)

    assert comparable(after)[:3] == comparable(before)[:3]
    assert after.history == before.history
    # The REST keys equal the stream's fill keys: nothing new, nothing applied.
    assert all(not r.applied_keys for r in again)
    assert sum(r.fills_applied for r in again) == 0
    assert set().union(*(r.duplicate_keys for r in again)) == {e.key for e in STREAM + REST}
    assert after.cursor is not None and before.cursor is not None
    assert after.cursor.fill_time == before.cursor.fill_time


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_mixed_duplicated_shuffled_batches_end_at_the_quantities(
    backend: Backend, seed: int
) -> None:
    rng = random.Random(seed)
    pool = [e for e in STREAM + REST for _ in range(rng.randint(1, 3))]
    rng.shuffle(pool)
    store = await backend.make()
    with trio.fail_after(WAIT):
        i = 0
        while i < len(pool):
            n = rng.randint(1, 60)
            await store.commit_batch(Batch(ACCOUNT, pool[i : i + n]))
            i += n
    snap = await store.snapshot(ACCOUNT)

    assert quantity_mismatches(snap) == []
    assert snap.event_keys == {e.key for e in pool}
    closed = sorted(p.position_id or 0 for p in snap.positions if not p.is_open)
    assert sorted(p.position_id or 0 for p in snap.history) == closed


async def test_a_failed_batch_leaves_nothing_and_a_retry_applies_it(backend: Backend) -> None:
    store = await backend.make()
    half = len(STREAM) // 2
    await replay(store, STREAM[:half], 40)
    before = await store.snapshot(ACCOUNT)
    poison = DeadLetter(reason=POISON, payload=b"{}")
    assert any(e.is_fill for e in STREAM[half:])

    with trio.fail_after(WAIT), pytest.raises(StoreError):
        await store.commit_batch(
            Batch(ACCOUNT, STREAM[half:], [DeadLetter("bad json", b"{"), poison])
        )
    assert comparable(await store.snapshot(ACCOUNT)) == comparable(before)

    # The same store carries on (PgStore reconnects) and the retry applies everything.
    with trio.fail_after(WAIT):
        result = await store.commit_batch(
            Batch(ACCOUNT, STREAM[half:], [DeadLetter("bad json", b"{")])
        )
    assert result.applied_keys == {e.key for e in STREAM[half:]}
    snap = await store.snapshot(ACCOUNT)
    assert full_mismatches(snap) == []
    assert [(d.reason, d.payload) for d in snap.dead_letters] == [("bad json", b"{")]


# --- claim ahead: the writer prepares the next batch while one commits ---------------


async def replay_ahead(store: Store, events: Sequence[Event], size: int) -> list[BatchResult]:
    """What a busy writer does: each batch's keys claimed while the one before commits."""
    parts = [Batch(ACCOUNT, b) for b in batches(events, size)]
    results: list[BatchResult] = []
    with trio.fail_after(WAIT):
        await store.claim_ahead(parts[0])
        for i, batch in enumerate(parts):
            async with trio.open_nursery() as nursery:
                if i + 1 < len(parts):
                    nursery.start_soon(store.claim_ahead, parts[i + 1])
                results.append(await store.commit_batch(batch))
    return results


@pytest.mark.parametrize("size", [1, 17, 1000])
async def test_batches_claimed_ahead_end_where_batches_one_by_one_do(
    backend: Backend, size: int
) -> None:
    store = await backend.make()
    results = await replay_ahead(store, STREAM, size)
    snap = await store.snapshot(ACCOUNT)

    assert full_mismatches(snap) == []
    assert sum(r.fills_applied for r in results) == TRUTH["fills_total"]
    assert snap.event_keys == {e.key for e in STREAM}
    assert snap.cursor == Cursor(max(e.timestamp for e in STREAM if e.is_fill), None)
    # Everything again, claimed ahead too: every key is found stored, nothing applies.
    again = await replay_ahead(store, STREAM + REST, 7)
    assert all(not r.applied_keys for r in again)
    assert set().union(*(r.duplicate_keys for r in again)) == {e.key for e in STREAM + REST}
    assert comparable(await store.snapshot(ACCOUNT))[:3] == comparable(snap)[:3]


async def test_a_batch_given_up_ahead_is_claimed_by_its_own_commit(backend: Backend) -> None:
    store = await backend.make()
    batch = Batch(ACCOUNT, STREAM[:40])
    with trio.fail_after(WAIT):
        await store.claim_ahead(batch)
        await store.release_ahead()
        # Its claims were let go: the commit claims the keys itself, all of them new.
        result = await store.commit_batch(batch)
    assert result.applied_keys == {e.key for e in STREAM[:40]}
    assert (await store.snapshot(ACCOUNT)).event_keys == {e.key for e in STREAM[:40]}


async def test_a_failed_batch_gives_up_the_claims_of_the_one_behind_it(
    backend: Backend,
) -> None:
    store = await backend.make()
    half = len(STREAM) // 2
    poison = DeadLetter(reason=POISON, payload=b"{}")
    failing = Batch(ACCOUNT, STREAM[:half], [poison])
    behind = Batch(ACCOUNT, STREAM[half:])
    with trio.fail_after(WAIT):
        await store.claim_ahead(failing)
        with pytest.RaisesGroup(StoreError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.claim_ahead, behind)
                await store.commit_batch(failing)
        # The writer's order: the failed batch again (it may not wait behind the claims
        # of the one after it), then that one, which claims its keys itself.
        first = await store.commit_batch(Batch(ACCOUNT, STREAM[:half]))
        second = await store.commit_batch(behind)
    assert first.applied_keys == {e.key for e in STREAM[:half]}
    assert second.applied_keys == {e.key for e in STREAM[half:]}
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []


async def test_ambiguous_commit_retried_applies_nothing_twice(backend: Backend) -> None:
    failed: list[Batch] = []

    def once(batch: Batch) -> bool:
        if failed:
            return False
        failed.append(batch)
        return True

    store = await backend.make(fail_after=once)
    first = STREAM[:60]
    with trio.fail_after(WAIT), pytest.raises(StoreError):
        await store.commit_batch(Batch(ACCOUNT, first))
    retry = await store.commit_batch(Batch(ACCOUNT, first))

    assert retry.applied_keys == frozenset()
    assert retry.committed_keys == {e.key for e in first}
    assert retry.fills_applied == 0
    await replay(store, STREAM[60:], 60)
    assert full_mismatches(await store.snapshot(ACCOUNT)) == []


async def test_cursor_never_moves_backwards(backend: Backend) -> None:
    store = await backend.make()
    fills = sorted(REST, key=lambda e: e.timestamp)
    late, early = fills[len(fills) // 2 :], fills[: len(fills) // 2]

    after_late = (await replay(store, late, 10))[-1].cursor
    assert after_late == Cursor(late[-1].timestamp, max(e.activity_id or "" for e in late))
    results = await replay(store, early, 10)

    assert results and all(r.applied_keys for r in results)  # new fills, older times
    assert all(r.cursor == after_late for r in results)
    assert await store.load_cursor(ACCOUNT) == after_late
    # A batch with no fills at all (dead letters only) leaves it where it is too.
    nothing = await store.commit_batch(Batch(ACCOUNT, [], [DeadLetter("x", b"x")]))
    assert nothing.cursor == after_late


async def test_recent_keys_newest_first(backend: Backend) -> None:
    store = await backend.make()
    first_three = STREAM[:3]
    for ev in first_three:
        await store.commit_batch(Batch(ACCOUNT, [ev]))

    assert await store.recent_keys(ACCOUNT, 2) == [first_three[2].key, first_three[1].key]
    assert await store.recent_keys(ACCOUNT, 10) == [e.key for e in reversed(first_three)]
    assert await store.recent_keys("another-account", 10) == []
    assert await store.load_cursor("another-account") is None


async def test_duplicates_inside_one_batch_count_once(backend: Backend) -> None:
    store = await backend.make()
    fills = [e for e in STREAM if e.is_fill][:5]
    result = await store.commit_batch(Batch(ACCOUNT, fills + fills[::-1] + fills))

    assert result.applied_keys == {e.key for e in fills}
    assert result.duplicate_keys == frozenset()
    assert result.fills_applied == 5


async def test_open_orders_are_the_non_terminal_ones(backend: Backend) -> None:
    store = await backend.make()
    await replay(store, STREAM[:40], 40)
    snap = await store.snapshot(ACCOUNT)
    working = {oid for oid, o in snap.orders.items() if o.status not in
               {"filled", "canceled", "expired", "replaced", "rejected"}}

    assert working  # the recording has orders still working at this point
    assert set(await store.open_order_ids(ACCOUNT)) == working


# --- position flips and closes, on a synthetic account -------------------------------


T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)


def fill(order: str, side: str, cum: str, qty: str, price: str, minute: int) -> Event:
    ts = T0 + timedelta(minutes=minute)
    return Event(
        key=fill_key(order, Decimal(cum)),
        event="fill",
        source="stream",
        order_id=order,
        symbol="XYZ",
        side=side,
        status="filled",
        cum_qty=Decimal(cum),
        timestamp=ts,
        ts_ns=int(ts.timestamp()) * 1_000_000_000,
        client_order_id=f"c-{order}",
        order_qty=Decimal(cum),
        cum_avg_price=Decimal(price),
        fill_qty=Decimal(qty),
        fill_price=Decimal(price),
    )


FLIP_SCRIPT = [
    fill("o1", "buy", "10", "10", "100", 1),  # open long 10 @ 100
    fill("o2", "sell", "15", "15", "110", 2),  # close long (+100), open short 5 @ 110
    fill("o3", "buy", "5", "5", "105", 3),  # close short (+25): flat
    fill("o4", "buy", "2", "2", "90", 4),  # open long 2 @ 90, stays open
]


@pytest.mark.parametrize("size", [1, 2, 4])
async def test_flip_and_close_write_position_history(backend: Backend, size: int) -> None:
    store = await backend.make()
    results = [await store.commit_batch(Batch("acct-flip", b)) for b in batches(FLIP_SCRIPT, size)]
    snap = await store.snapshot("acct-flip")

    assert sum(r.positions_closed for r in results) == 2
    rows = sorted(snap.positions, key=lambda p: p.opened_at)
    assert [(p.qty, p.peak_qty, p.side, p.is_open) for p in rows] == [
        (Decimal(0), Decimal(10), "long", False),
        (Decimal(0), Decimal(-5), "short", False),
        (Decimal(2), Decimal(2), "long", True),
    ]
    assert [p.realized_pnl for p in rows] == [Decimal(100), Decimal(25), Decimal(0)]
    assert [p.opened_by_order_id for p in rows] == ["o1", "o2", "o4"]
    assert [p.opened_by_client_order_id for p in rows] == ["c-o1", "c-o2", "c-o4"]
    assert rows[0].closed_at == FLIP_SCRIPT[1].timestamp
    assert rows[1].closed_at == FLIP_SCRIPT[2].timestamp
    assert sorted(snap.history, key=lambda p: p.opened_at) == rows[:2]
    assert snap.net_position("XYZ") == 2
    assert snap.realized_pnl("XYZ") == 125


async def test_dead_letters_are_kept_verbatim(backend: Backend) -> None:
    store = await backend.make()
    letters = [
        DeadLetter("invalid JSON: x", b"{not json", "stream"),
        DeadLetter("oversized frame", bytes(range(256)) * 4, "stream"),
        DeadLetter("invalid activities", b"[]", "rest"),
    ]
    result = await store.commit_batch(Batch(ACCOUNT, STREAM[:2], letters))
    snap = await store.snapshot(ACCOUNT)

    assert result.dead_letters == 3
    assert [(d.reason, d.payload, d.source) for d in snap.dead_letters] == [
        (d.reason, d.payload, d.source) for d in letters
    ]
    assert snap.event_keys == {e.key for e in STREAM[:2]}


# --- the extremes bounds.py accepts: stored and read back exactly ---------------------


def _extreme_updates() -> list[Event]:
    from .test_bounds import LIMIT_NS, PRICE_MAX, QTY_MAX, WIDE, ns_text

    floor = ns_text(bounds.TIMESTAMP_FLOOR_NS)

    def update(event: str, order: dict[str, Any], stamp: str, **extra: Any) -> Event:
        base = {"id": "", "client_order_id": None, "symbol": "", "side": "buy",
                "status": "filled", "filled_qty": "0", "qty": None,
                "filled_avg_price": None, "order_type": "limit", "asset_class": "crypto",
                "created_at": floor}
        frame = {"stream": "trade_updates",
                 "data": {"event": event, "order": {**base, **order}, "timestamp": stamp,
                          **extra}}
        ev = protocol.decode_frame(json.dumps(frame).encode(), not_after_ns=LIMIT_NS)
        assert isinstance(ev, Event), ev
        return ev

    label = WIDE * bounds.MAX_LABEL_CHARS
    big = {"id": WIDE * bounds.MAX_ID_CHARS, "symbol": WIDE * bounds.MAX_SYMBOL_CHARS,
           "client_order_id": WIDE * bounds.MAX_CLIENT_ORDER_ID_CHARS, "status": label,
           "order_type": label, "asset_class": label, "filled_qty": str(QTY_MAX),
           "qty": str(QTY_MAX), "filled_avg_price": str(PRICE_MAX)}
    tiny = {"id": "t" * bounds.MAX_ID_CHARS, "symbol": "TINY", "filled_qty": "0.000000000001",
            "qty": "0.000000000001", "filled_avg_price": "1E-28", "created_at": ns_text(LIMIT_NS)}
    labelled = {**big, "id": "n" * bounds.MAX_ID_CHARS, "filled_qty": "0",
                "filled_avg_price": None}
    return [
        update(label, {**big, "filled_qty": "0", "filled_avg_price": None}, floor),
        update("new", labelled, floor),
        update("fill", big, floor, price=str(PRICE_MAX), qty=str(QTY_MAX),
               position_qty=str(QTY_MAX)),
        update("fill", tiny, ns_text(LIMIT_NS), price="1E-28", qty="0.000000000001",
               position_qty="0.000000000001"),
    ]


async def test_the_extreme_accepted_values_are_stored_and_read_back_exactly(
    backend: Backend,
) -> None:
    updates = _extreme_updates()
    store = await backend.make()
    with trio.fail_after(WAIT):
        result = await store.commit_batch(Batch("acct-extremes", updates))
        snap = await store.snapshot("acct-extremes")
    assert result.applied_keys == {ev.key for ev in updates}
    assert snap.event_keys == {ev.key for ev in updates}
    labelled = snap.orders[updates[1].order_id]
    assert (labelled.status, labelled.order_type, labelled.asset_class, labelled.symbol) == (
        updates[1].status, updates[1].order_type, updates[1].asset_class, updates[1].symbol)
    for ev in updates[2:]:
        order = snap.orders[ev.order_id]
        assert (order.order_id, order.symbol, order.client_order_id, order.status,
                order.order_type, order.asset_class) == (
            ev.order_id, ev.symbol, ev.client_order_id, "filled", ev.order_type,
            ev.asset_class)
        assert (order.filled_qty, order.order_qty, order.filled_avg_price) == (
            ev.cum_qty, ev.order_qty, ev.cum_avg_price)
        assert str(order.filled_qty) == str(ev.cum_qty)  # the digits, not only the value
        assert order.created_at == ev.created_at
        position = next(p for p in snap.positions if p.symbol == ev.symbol)
        assert (position.qty, position.avg_entry_price, position.opened_at) == (
            ev.fill_qty, ev.fill_price, ev.timestamp)
        assert position.opened_by_client_order_id == ev.client_order_id
    assert snap.cursor == Cursor(updates[3].timestamp, None)


# --- values the store cannot hold, and replay marks ------------------------------------


def _noise(n: int) -> str:
    rng = random.Random(n)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(n))


POISONS = {
    "order id": lambda ev: msgspec.structs.replace(ev, order_id=_noise(3000)),
    "symbol": lambda ev: msgspec.structs.replace(ev, symbol=_noise(3001)),
    "key": lambda ev: msgspec.structs.replace(ev, key=_noise(3002)),
    "tiny average": lambda ev: msgspec.structs.replace(ev, cum_avg_price=Decimal("1E-20000")),
    "huge average": lambda ev: msgspec.structs.replace(ev, cum_avg_price=Decimal("1E+200000")),
}


@pytest.mark.parametrize("kind", sorted(POISONS))
async def test_a_value_the_store_cannot_hold_refuses_the_batch_and_keeps_nothing(
    backend: Backend, kind: str
) -> None:
    store = await backend.make()
    half = len(STREAM) // 2
    await replay(store, STREAM[:half], 40)
    before = await store.snapshot(ACCOUNT)
    poisoned = list(STREAM[half:])
    # The last update of its order in the batch: what the batch writes for that order.
    at = next(i for i in range(len(poisoned) - 1, -1, -1) if poisoned[i].is_fill
              and all(e.order_id != poisoned[i].order_id for e in poisoned[i + 1:]))
    poisoned[at] = POISONS[kind](poisoned[at])

    with trio.fail_after(WAIT), pytest.raises(StoreDataError) as err:
        await store.commit_batch(Batch(ACCOUNT, poisoned, [DeadLetter("bad json", b"{")]))
    assert err.value.detail
    assert comparable(await store.snapshot(ACCOUNT)) == comparable(before)

    # The same store carries on (PgStore keeps its session), and without the poison the
    # batch applies whole.
    without = poisoned[:at] + poisoned[at + 1:]
    with trio.fail_after(WAIT):
        result = await store.commit_batch(Batch(ACCOUNT, without))
    assert result.applied_keys == {e.key for e in without}


async def test_replay_marks_record_the_outcome_in_the_batch(backend: Backend) -> None:
    store = await backend.make()
    letters = [DeadLetter("refused earlier", STREAM[i].raw) for i in (0, 1, 2)]
    await store.commit_batch(Batch(ACCOUNT, [STREAM[1]], letters))
    assert await store.pending_replays(ACCOUNT, 10) == []
    ids = [d.id for d in backend.stored_letters(ACCOUNT)]
    assert len(ids) == 3
    for letter_id in ids:
        backend.request_replay(letter_id)
    pending = await store.pending_replays(ACCOUNT, 10)
    assert [p.id for p in pending] == ids
    assert [p.payload for p in pending] == [STREAM[i].raw for i in (0, 1, 2)]
    assert await store.pending_replays(ACCOUNT, 2) == pending[:2]

    marks = [ReplayMark(ids[0], STREAM[0].key), ReplayMark(ids[1], STREAM[1].key),
             ReplayMark(ids[2], None, "still refused: out of bounds")]
    result = await store.commit_batch(Batch(ACCOUNT, [STREAM[0], STREAM[1]], (), marks))
    assert result.applied_keys == {STREAM[0].key}
    assert await store.pending_replays(ACCOUNT, 10) == []
    outcomes = {d.id: d.replay_result for d in backend.stored_letters(ACCOUNT)}
    assert outcomes == {ids[0]: "stored", ids[1]: "already stored",
                        ids[2]: "still refused: out of bounds"}


async def test_a_reconcile_leaves_a_symbol_whose_quantity_moved_since_it_compared(
        backend: Backend) -> None:
    """`expected` (our quantity when the difference was found) is checked against the
    locked row in the adjustment's own transaction, in both stores: a symbol a fill has
    moved since is left, with no adjustment and no moment; the others are set."""
    store = await backend.make()
    acct = "acct-expected"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    await store.apply_broker_word(BrokerWord(acct, BASELINE, t0, [
        BrokerPosition("AAPL", Decimal(10), Decimal(100)),
        BrokerPosition("MSFT", Decimal(4), Decimal(50))]))
    later = t0 + timedelta(minutes=1)
    diffs = [Difference("AAPL", Decimal(9), Decimal(15),
                        BrokerPosition("AAPL", Decimal(15), Decimal(100))),
             Difference("MSFT", Decimal(4), Decimal(6),
                        BrokerPosition("MSFT", Decimal(6), Decimal(50)))]
    made = await store.apply_broker_word(reconcile_word(acct, diffs, taken_at=later,
                                                        moment=later))
    assert [(a.symbol, a.qty_before, a.qty_after) for a in made] == [
        ("MSFT", Decimal(4), Decimal(6))]
    snap = await store.snapshot(acct)
    assert (snap.net_position("AAPL"), snap.net_position("MSFT")) == (Decimal(10), Decimal(6))
    assert snap.baseline_moments == {"": t0, "MSFT": later}
    assert snap.reconcile_moments == {"MSFT": later}


def _identity(snap: StoreSnapshot, symbol: str) -> Decimal:
    """What `check` holds an open position to: its orders' signed (filled_qty -
    baseline_qty) plus its adjustments' (qty_after - qty_before)."""
    fills = sum(((o.filled_qty - snap.baseline_qty.get(o.order_id, Decimal(0)))
                 * (1 if o.side == "buy" else -1)
                 for o in snap.orders.values() if o.symbol == symbol), Decimal(0))
    return fills + sum((a.qty_after - a.qty_before for a in snap.adjustments
                        if a.symbol == symbol), Decimal(0))


async def test_a_reconcile_leaves_a_symbol_whose_order_is_still_working(
        backend: Backend) -> None:
    """10 of a working order applied, the broker holds 20 (a fill of it we missed): the
    order's next update carries what we missed, so adjusting to 20 now would count it
    twice. Left as it is; the update then brings ours to the broker's."""
    store = await backend.make()
    acct = "acct-working"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

    def partial(cum: str, minutes: int, event: str = "partial_fill") -> Event:
        ev = fill("g", "buy", cum, "10", "100", minutes)
        return msgspec.structs.replace(
            ev, event=event, status="filled" if event == "fill" else "partially_filled",
            order_qty=Decimal(30))

    await store.commit_batch(Batch(acct, [partial("10", 1)]))
    diffs = [Difference("XYZ", Decimal(10), Decimal(20),
                        BrokerPosition("XYZ", Decimal(20), Decimal(100)))]
    # Not asked (the broker's filled_qty not read), or asked and it filled 20 of it.
    assert await store.apply_broker_word(reconcile_word(acct, diffs, taken_at=t0,
                                                        moment=t0)) == []
    assert await store.apply_broker_word(reconcile_word(
        acct, diffs, taken_at=t0, moment=t0, working_filled={"g": Decimal(20)})) == []
    assert await store.open_order_ids(acct, ["XYZ"]) == ["g"]
    assert await store.open_order_ids(acct, ["AAPL"]) == []
    await store.commit_batch(Batch(acct, [partial("30", 3, "fill")]))
    snap = await store.snapshot(acct)
    assert snap.net_position("XYZ") == 30 == _identity(snap, "XYZ")
    assert snap.adjustments == [] and snap.baseline_moments == {}


async def test_a_reconcile_adjusts_a_symbol_whose_working_order_has_all_its_fills_with_us(
        backend: Backend) -> None:
    """A resting order of which 10 filled, all 10 with us; the broker holds 15 (5 of
    another order that never reached us). The broker gives the resting order's filled_qty
    as ours: nothing of it is still to come, so the symbol is set to 15, and the order's
    next fill counts on top of that."""
    store = await backend.make()
    acct = "acct-resting"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

    def resting(cum: str, minutes: int) -> Event:
        ev = fill("g", "buy", cum, "10", "100", minutes)
        done = cum == "30"
        return msgspec.structs.replace(
            ev, event="fill" if done else "partial_fill",
            status="filled" if done else "partially_filled", order_qty=Decimal(30))

    await store.commit_batch(Batch(acct, [resting("10", 1)]))
    diffs = [Difference("XYZ", Decimal(10), Decimal(15),
                        BrokerPosition("XYZ", Decimal(15), Decimal(101)))]
    [made] = await store.apply_broker_word(reconcile_word(
        acct, diffs, taken_at=t0, moment=t0, working_filled={"g": Decimal(10)}))
    assert (made.symbol, made.qty_before, made.qty_after) == ("XYZ", Decimal(10), Decimal(15))
    later = datetime(2026, 11, 30, 15, 5, tzinfo=UTC)
    ev = msgspec.structs.replace(resting("30", 3), timestamp=later,
                                 ts_ns=int(later.timestamp()) * 10**9)
    await store.commit_batch(Batch(acct, [ev]))
    snap = await store.snapshot(acct)
    assert snap.net_position("XYZ") == 35 == _identity(snap, "XYZ")


async def test_a_fill_the_reconcile_already_took_moves_its_order_not_the_position(
        backend: Backend) -> None:
    """The broker holds 15, we 10: a fill of 5 (order k, done) never reached us. Once
    the reconcile set 15, that fill arriving (a dead letter replayed, a backfill's
    overlap) is in the broker's word already: stamped before the reconcile's moment, it
    moves order k's mark and `baseline_qty`, not the position. A fill after the moment
    counts."""
    store = await backend.make()
    acct = "acct-taken"
    await store.commit_batch(Batch(acct, [fill("h", "buy", "10", "10", "100", 1)]))
    moment = T0 + timedelta(minutes=10)
    diffs = [Difference("XYZ", Decimal(10), Decimal(15),
                        BrokerPosition("XYZ", Decimal(15), Decimal(101)))]
    [made] = await store.apply_broker_word(reconcile_word(acct, diffs, taken_at=moment,
                                                          moment=moment))
    assert (made.qty_before, made.qty_after) == (Decimal(10), Decimal(15))
    result = await store.commit_batch(Batch(acct, [fill("k", "buy", "5", "5", "103", 2)]))
    assert (result.fills_applied, result.stale_fills) == (0, 1)
    snap = await store.snapshot(acct)
    assert snap.net_position("XYZ") == 15 == _identity(snap, "XYZ")
    assert snap.orders["k"].filled_qty == 5 and snap.baseline_qty == {"k": Decimal(5)}
    result = await store.commit_batch(Batch(acct, [fill("m", "sell", "4", "4", "110", 11)]))
    assert result.fills_applied == 1
    snap = await store.snapshot(acct)
    assert snap.net_position("XYZ") == 11 == _identity(snap, "XYZ")


async def test_a_bust_the_reconcile_already_took_moves_its_order_not_the_position(
        backend: Backend) -> None:
    """Bought 10; the broker busted the fill (we never saw the bust) and the reconcile set
    the symbol to the broker's 0. The bust reaching us later, stamped before the
    reconcile's moment, undoes the fill on its order (baseline_qty below zero), not on the
    position: no short of 10 appears."""
    store = await backend.make()
    acct = "acct-bust-taken"
    await store.commit_batch(Batch(acct, [fill("b", "buy", "10", "10", "100", 1)]))
    moment = T0 + timedelta(minutes=10)
    diffs = [Difference("XYZ", Decimal(10), Decimal(0), None)]
    [made] = await store.apply_broker_word(reconcile_word(acct, diffs, taken_at=moment,
                                                          moment=moment))
    assert (made.qty_before, made.qty_after) == (Decimal(10), Decimal(0))
    at = T0 + timedelta(minutes=5)
    bust = Event(key=broker_event_key("b-bust"), event="trade_bust", source="stream",
                 order_id="b", symbol="XYZ", side="buy", status="filled",
                 cum_qty=Decimal(0), timestamp=at, ts_ns=int(at.timestamp()) * 10**9,
                 order_qty=Decimal(10), fill_qty=Decimal(-10), fill_price=Decimal(100))
    result = await store.commit_batch(Batch(acct, [bust]))
    assert result.fills_applied == 0
    snap = await store.snapshot(acct)
    assert snap.net_position("XYZ") == 0 == _identity(snap, "XYZ")
    assert snap.orders["b"].filled_qty == 0 and snap.baseline_qty == {"b": Decimal(-10)}


async def test_the_broker_word_is_kept_the_same_way(backend: Backend) -> None:
    """A baseline, later fills and a reconcile adjustment (docs/design.md, section 9):
    the same rows, marks, adjustments and cursor in both stores."""
    store = await backend.make()
    acct = "acct-word"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    gtc = OrderState("gtc-1", "AAPL", "buy", "partially_filled", Decimal(10), Decimal(100),
                     order_qty=Decimal(20), updated_at=t0 - timedelta(hours=20))
    made = await store.apply_broker_word(BrokerWord(
        acct, BASELINE, t0,
        [BrokerPosition("AAPL", Decimal(10), Decimal(100)),
         BrokerPosition("BTC/USD", Decimal("-0.5"), Decimal(60000), asset_id="btc-asset")],
        orders=[gtc], cursor=Cursor(t0, None)))
    assert [(a.symbol, a.qty_before, a.qty_after) for a in made] == [
        ("AAPL", Decimal(0), Decimal(10)), ("BTC/USD", Decimal(0), Decimal("-0.5"))]

    def fill(cum: str, qty: str, price: str, avg: str, minutes: int) -> Event:
        ts = t0 + timedelta(minutes=minutes)
        ns = int(ts.timestamp()) * 10**9
        return Event(key=fill_key("gtc-1", Decimal(cum)), event="partial_fill",
                     source="stream", order_id="gtc-1", symbol="AAPL", side="buy",
                     status="partially_filled", cum_qty=Decimal(cum), timestamp=ts, ts_ns=ns,
                     order_qty=Decimal(20), cum_avg_price=Decimal(avg),
                     fill_qty=Decimal(qty), fill_price=Decimal(price))

    # The fill of yesterday (at the mark) is stale; today's 5 count.
    await store.commit_batch(Batch(acct, [fill("10", "10", "100", "100", -1200),
                                          fill("15", "5", "106", "102", 5)]))
    word = BrokerWord(acct, RECONCILE, t0 + timedelta(minutes=10),
                      [BrokerPosition("AAPL", Decimal(30), Decimal(51))], symbols=["AAPL"])
    # gtc-1 still works: its next update may carry what the broker holds beyond ours.
    assert await store.apply_broker_word(word) == []
    at = t0 + timedelta(minutes=8)
    done = Event(key=f"canceled:gtc-1:{int(at.timestamp()) * 10**9}", event="canceled",
                 source="stream", order_id="gtc-1", symbol="AAPL", side="buy",
                 status="canceled", cum_qty=Decimal(15), timestamp=at,
                 ts_ns=int(at.timestamp()) * 10**9, order_qty=Decimal(20),
                 cum_avg_price=Decimal(102))
    await store.commit_batch(Batch(acct, [done]))
    await store.apply_broker_word(word)
    snap = await store.snapshot(acct)
    assert sorted((p.symbol, p.qty, p.avg_entry_price, p.is_open, p.opened_by_order_id)
                  for p in snap.positions) == [
        ("AAPL", Decimal(0), Decimal(102), False, "baseline"),
        ("AAPL", Decimal(30), Decimal(51), True, "reconcile"),
        ("BTC/USD", Decimal("-0.5"), Decimal(60000), True, "baseline")]
    assert [(p.symbol, p.peak_qty) for p in snap.history] == [("AAPL", Decimal(15))]
    assert [(a.reason, a.symbol, a.qty_before, a.qty_after, a.asset_id)
            for a in snap.adjustments] == [
        ("baseline", "AAPL", Decimal(0), Decimal(10), None),
        ("baseline", "BTC/USD", Decimal(0), Decimal("-0.5"), "btc-asset"),
        ("reconcile", "AAPL", Decimal(15), Decimal(30), None)]
    assert snap.baseline_qty == {"gtc-1": Decimal(10)}
    assert snap.orders["gtc-1"].filled_qty == 15
    assert snap.cursor == Cursor(t0 + timedelta(minutes=5), None)


async def test_a_baselined_option_keeps_its_contract_terms(backend: Backend) -> None:
    """An option held before the first start is stored as the broker's class with its
    contract multiplier (docs/design.md, section 10), so its cost basis is in money."""
    store = await backend.make()
    acct = "acct-word-option"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    call = "AAPL261218C00190000"
    await store.apply_broker_word(BrokerWord(
        acct, BASELINE, t0,
        [BrokerPosition(call, Decimal(2), Decimal("1.5"), asset_class="us_option"),
         BrokerPosition("AAPL", Decimal(5), Decimal(190), asset_class="us_equity")],
        cursor=Cursor(t0, None)))
    snap = await store.snapshot(acct)
    assert sorted((p.symbol, p.multiplier, p.asset_class, p.cost_basis)
                  for p in snap.positions) == [
        ("AAPL", Decimal(1), "us_equity", Decimal(950)),
        (call, Decimal(100), "us_option", Decimal(300))]


async def test_a_bust_is_kept_across_batches_and_a_late_fill_stays_stale(
        backend: Backend) -> None:
    """Busts (docs/design.md, section 11): the revision's time is stored with the order,
    so a fill stamped before it and arriving in a later batch changes nothing."""
    from stream_supervisor.events import broker_event_key

    def broker_event(base: Event, event_id: str, **changes: Any) -> Event:
        return msgspec.structs.replace(base, key=broker_event_key(event_id), **changes)

    first = broker_event(fill("r1", "buy", "4", "4", "10", 1), "e1", event="partial_fill",
                         status="partially_filled", order_qty=Decimal(10))
    late = broker_event(fill("r1", "buy", "10", "6", "12", 2), "e2",
                        cum_avg_price=Decimal("11.2"), order_qty=Decimal(10))
    bust = broker_event(fill("r1", "buy", "4", "-6", "12", 3), "e3", event="trade_bust",
                        status="partially_filled", cum_avg_price=Decimal(10),
                        order_qty=Decimal(10))
    store = await backend.make()
    await store.commit_batch(Batch("acct-bust", [first]))
    await store.commit_batch(Batch("acct-bust", [bust]))
    result = await store.commit_batch(Batch("acct-bust", [late]))
    snap = await store.snapshot("acct-bust")
    assert result.stale_fills == 1 and result.fills_applied == 0
    order = snap.orders["r1"]
    assert (order.filled_qty, order.filled_avg_price) == (Decimal(4), Decimal(10))
    assert order.revised_at == bust.timestamp
    assert snap.net_position("XYZ") == 4


async def test_an_activity_a_baseline_already_holds_is_stored_not_applied(
        backend: Backend) -> None:
    """Activities posted after a baseline (docs/design.md, section 10): one whose effect
    is at or before the baseline's moment (the account's, or the symbol's own newest
    fill) is stored once and reported, not applied; a later one is applied and its
    change recorded with its id. The moments survive a restart and move forward with a
    rebaseline."""
    from stream_supervisor.activities import (
        ACCOUNT_WIDE,
        APPLIED,
        IN_BASELINE,
        WireNonTrade,
        non_trade_to_event,
    )
    from stream_supervisor.adjustments import REBASELINE

    acct = "acct-late-activities"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

    def act(n: int, kind: str, symbol: str, qty: str, at: datetime) -> Event:
        return non_trade_to_event(WireNonTrade(
            id=f"20261130{n:09d}::late", activity_type=kind, date="2026-11-30",
            transaction_time=at.isoformat(), symbol=symbol, qty=Decimal(qty)))

    store = await backend.make()
    await store.apply_broker_word(BrokerWord(
        acct, BASELINE, t0,
        [BrokerPosition("BTC/USD", Decimal("0.9975"), Decimal(50_000)),
         BrokerPosition("NVDA", Decimal(100), Decimal(100))],
        cursor=Cursor(t0, None), moments={"BTC/USD": t0 + timedelta(seconds=2),
                                          "NVDA": t0 - timedelta(seconds=5)}))
    before = act(1, "CFEE", "BTCUSD", "-0.0025", t0 - timedelta(minutes=1))
    inside = act(2, "CFEE", "BTCUSD", "-0.001", t0 + timedelta(seconds=2))
    after = act(3, "CFEE", "BTCUSD", "-0.0005", t0 + timedelta(seconds=5))
    split = act(4, "SPLIT", "NVDA", "300", t0 + timedelta(seconds=10))
    for _ in range(2):  # the second pass is the overlap re-read: keyed, nothing twice
        await store.commit_batch(Batch(acct, [before, inside, after, split]))
    snap = await store.snapshot(acct)
    assert snap.baseline_moments == {ACCOUNT_WIDE: t0, "BTC/USD": t0 + timedelta(seconds=2)}
    assert [a.outcome for a in snap.activities] == [IN_BASELINE, IN_BASELINE, APPLIED,
                                                    APPLIED]
    held = {p.symbol: p for p in snap.positions if p.is_open}
    assert (held["BTC/USD"].qty, held["NVDA"].qty, held["NVDA"].avg_entry_price) == (
        Decimal("0.997"), Decimal(400), Decimal(25))
    ids = {p.symbol: p.position_id for p in snap.positions if p.is_open}
    assert [(c.activity_id, c.symbol, c.position_id, c.qty_before, c.qty_after)
            for c in snap.position_changes] == [
        (after.activity_id, "BTC/USD", ids["BTC/USD"], Decimal("0.9975"), Decimal("0.997")),
        (split.activity_id, "NVDA", ids["NVDA"], Decimal(100), Decimal(400))]
    assert snap.history == []  # nothing closed: position_history is untouched

    # A rebaseline (say after the activities window) moves the moment forward; a restart
    # (a new connection) reads it back: a split it already holds is not applied again.
    t1 = t0 + timedelta(hours=3)
    await store.apply_broker_word(BrokerWord(
        acct, REBASELINE, t1, [BrokerPosition("NVDA", Decimal(1600), Decimal("6.25"))],
        cursor=Cursor(t1, None)))
    restarted = await backend.make()
    second = act(5, "SPLIT", "NVDA", "1200", t1 - timedelta(minutes=1))
    fee = act(6, "CFEE", "BTCUSD", "-0.001", t1 + timedelta(seconds=1))
    await restarted.commit_batch(Batch(acct, [second, fee]))
    snap = await restarted.snapshot(acct)
    assert snap.baseline_moments == {ACCOUNT_WIDE: t1, "BTC/USD": t0 + timedelta(seconds=2)}
    assert [a.outcome for a in snap.activities][-2:] == [IN_BASELINE, "no open position"]
    held = {p.symbol: p for p in snap.positions if p.is_open}
    assert set(held) == {"NVDA"} and held["NVDA"].qty == 1600
    assert len(snap.position_changes) == 2


async def test_a_reconcile_records_the_moment_of_each_symbol_it_adjusts(
        backend: Backend) -> None:
    """`reconcile --apply` (docs/design.md, section 10): each symbol it sets to the
    broker's records the broker's clock read before its positions read, in the
    adjustment's transaction; a symbol it left as it was, and the account as a whole,
    record nothing. A later-posted activity at or before the moment is stored, not
    applied; one after it is applied."""
    from stream_supervisor.activities import (
        ACCOUNT_WIDE,
        APPLIED,
        IN_BASELINE,
        WireNonTrade,
        non_trade_to_event,
    )

    acct = "acct-reconcile-moments"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

    def act(n: int, kind: str, symbol: str, qty: str, at: datetime) -> Event:
        return non_trade_to_event(WireNonTrade(
            id=f"20261130{n:09d}::rec", activity_type=kind, date="2026-11-30",
            transaction_time=at.isoformat(), symbol=symbol, qty=Decimal(qty)))

    store = await backend.make()
    await store.apply_broker_word(BrokerWord(
        acct, BASELINE, t0, [BrokerPosition("BTC/USD", Decimal(1), Decimal(50_000)),
                             BrokerPosition("NVDA", Decimal(100), Decimal(100))],
        cursor=Cursor(t0, None)))
    t1 = t0 + timedelta(hours=1)
    made = await store.apply_broker_word(BrokerWord(
        acct, RECONCILE, t1 + timedelta(seconds=1),
        [BrokerPosition("BTC/USD", Decimal("0.9975"), Decimal(50_000)),
         BrokerPosition("NVDA", Decimal(100), Decimal(100))],
        symbols=["BTC/USD", "NVDA"], moments={"BTC/USD": t1, "NVDA": t1}))
    assert [a.symbol for a in made] == ["BTC/USD"]
    restarted = await backend.make()
    snap = await restarted.snapshot(acct)
    assert snap.baseline_moments == {ACCOUNT_WIDE: t0, "BTC/USD": t1}
    held_fee = act(1, "CFEE", "BTCUSD", "-0.0025", t1 - timedelta(minutes=5))
    at_moment = act(2, "CFEE", "BTCUSD", "-0.001", t1)
    later_fee = act(3, "CFEE", "BTCUSD", "-0.0005", t1 + timedelta(seconds=1))
    split = act(4, "SPLIT", "NVDA", "100", t1 - timedelta(minutes=5))
    await restarted.commit_batch(Batch(acct, [held_fee, at_moment, later_fee, split]))
    snap = await restarted.snapshot(acct)
    assert [a.outcome for a in snap.activities] == [IN_BASELINE, IN_BASELINE, APPLIED,
                                                    APPLIED]
    held = {p.symbol: p.qty for p in snap.positions if p.is_open}
    assert held == {"BTC/USD": Decimal("0.997"), "NVDA": Decimal(200)}
    # Moments only move forward: an older reconcile moment leaves the newer one.
    await restarted.apply_broker_word(BrokerWord(
        acct, RECONCILE, t1, [BrokerPosition("BTC/USD", Decimal("0.9"), Decimal(50_000))],
        symbols=["BTC/USD"], moments={"BTC/USD": t0 + timedelta(minutes=1)}))
    assert (await restarted.snapshot(acct)).baseline_moments["BTC/USD"] == t1


async def test_each_change_an_activity_makes_is_recorded_in_both_stores(
        backend: Backend) -> None:
    """A transfer into a flat symbol opens a row, a partial assignment leaves the option
    open and opens the stock, an expiry closes the rest: each change is one row of
    `position_changes` with its activity id and the row's id; the closed option is also
    in `position_history` with its closing activity (docs/design.md, section 10)."""
    from stream_supervisor.activities import WireNonTrade, non_trade_to_event

    acct = "acct-changes"
    put = "AAPL261218P00190000"
    t0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

    def act(n: int, kind: str, symbol: str, qty: str, price: str | None = None) -> Event:
        at = t0 + timedelta(seconds=n)
        return non_trade_to_event(WireNonTrade(
            id=f"20261130{n:09d}::chg", activity_type=kind, transaction_time=at.isoformat(),
            symbol=symbol, qty=Decimal(qty), price=None if price is None else Decimal(price)))

    short = Event(key=fill_key("p1", Decimal(3)), event="fill", source="stream",
                  order_id="p1", symbol=put, side="sell", status="filled", cum_qty=Decimal(3),
                  timestamp=t0, ts_ns=1, order_qty=Decimal(3), cum_avg_price=Decimal(2),
                  fill_qty=Decimal(3), fill_price=Decimal(2), asset_class="us_option")
    store = await backend.make()
    transfer = act(1, "ACATC", "MSFT", "10", "400")
    assigned = act(2, "OPASN", put, "1")
    expired = act(3, "OPEXP", put, "2")
    await store.commit_batch(Batch(acct, [short, transfer]))
    await store.commit_batch(Batch(acct, [assigned, expired]))
    snap = await store.snapshot(acct)
    rows = {(p.symbol, p.is_open): p.position_id for p in snap.positions}
    assert [(c.activity_id, c.symbol, c.position_id, c.qty_before, c.qty_after, c.realized_pnl)
            for c in snap.position_changes] == [
        (transfer.activity_id, "MSFT", rows["MSFT", True], Decimal(0), Decimal(10), Decimal(0)),
        (assigned.activity_id, "AAPL", rows["AAPL", True], Decimal(0), Decimal(100),
         Decimal(0)),
        (assigned.activity_id, put, rows[put, False], Decimal(-3), Decimal(-2), Decimal(200)),
        (expired.activity_id, put, rows[put, False], Decimal(-2), Decimal(0), Decimal(600))]
    assert [(h.symbol, h.closing_activity_id) for h in snap.history] == [
        (put, expired.activity_id)]
