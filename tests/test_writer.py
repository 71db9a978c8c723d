"""The writer actor: group commit into the store, retried until it sticks, acked after."""

from __future__ import annotations

import json
import random
from decimal import Decimal
from functools import partial
from typing import Any

import msgspec
import pytest
import trio

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.errors import LostLeadership
from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.messages import Ack, Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.positions import Position
from stream_supervisor.protocol import decode_frame
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import Batch, BatchResult, StoreSnapshot
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore
from stream_supervisor.writer import WriterSettings, take_batch, writer_actor

from .fixtures import RECORDING

TRUTH: dict[str, Any] = json.loads((RECORDING / "ground_truth.json").read_text())
ACCOUNT = TRUTH["account_id"]
EVENTS: list[Event] = [
    ev
    for ev in map(decode_frame, (RECORDING / "trade_updates.jsonl").read_bytes().splitlines())
    if isinstance(ev, Event)
]
RETRY = BackoffPolicy(initial=0.1, factor=2.0, cap=5.0)


# --- take_batch -----------------------------------------------------------------------


async def test_take_batch_takes_everything_queued_up_to_the_limit() -> None:
    send, recv = trio.open_memory_channel[Item](100)
    for ev in EVENTS[:10]:
        send.send_nowait(ev)
    first = await recv.receive()
    assert take_batch(first, recv, limit=4) == EVENTS[:4]
    assert take_batch(recv.receive_nowait(), recv, limit=100) == EVENTS[4:10]


async def test_take_batch_never_waits() -> None:
    send, recv = trio.open_memory_channel[Item](10)
    # Nothing else queued: a batch of one, at once. take_batch is synchronous, so it
    # cannot wait for more by construction; what matters is what it returns.
    assert take_batch(EVENTS[0], recv, limit=500) == [EVENTS[0]]
    await send.aclose()  # a closed inbox ends the batch too
    assert take_batch(EVENTS[1], recv, limit=500) == [EVENTS[1]]


# --- writer_actor with the memory store -----------------------------------------------


async def drain(recv: trio.MemoryReceiveChannel[Ack]) -> list[Ack]:
    out = []
    async for ack in recv:
        out.append(ack)
    return out


async def writer(
    store: MemoryStore,
    items: list[Item],
    *,
    max_batch: int = 500,
    metrics: Metrics | None = None,
    state: SupervisorState | None = None,
) -> list[tuple[str, ...]]:
    """Run the writer over `items`; the keys of each ack, in order."""
    acks = await writer_acks(store, items, max_batch=max_batch, metrics=metrics, state=state)
    return [ack.keys for ack in acks]


async def writer_acks(
    store: MemoryStore,
    items: list[Item],
    *,
    max_batch: int = 500,
    metrics: Metrics | None = None,
    state: SupervisorState | None = None,
) -> list[Ack]:
    metrics = metrics if metrics is not None else Metrics()
    state = state if state is not None else SupervisorState()
    inbox_send, inbox_recv = trio.open_memory_channel[Item](len(items) + 1)
    ack_send, ack_recv = trio.open_memory_channel[Ack](len(items) + 1)
    for item in items:
        inbox_send.send_nowait(item)
    inbox_send.close()
    if not store.opened:
        await store.open()
    settings = WriterSettings(account_id=ACCOUNT, max_batch=max_batch, retry=RETRY)
    actor = partial(
        writer_actor, settings, store, inbox_recv, ack_send, metrics, state, rng=random.Random(7)
    )
    with trio.fail_after(120):  # virtual seconds when the test uses autojump_clock
        async with trio.open_nursery() as nursery:
            await nursery.start(actor)
    # The writer closed its ack channel on the way out: the acks it sent are all queued.
    return await drain(ack_recv)


def rows(positions: list[Position]) -> list[Position]:
    """Position rows without their store-assigned ids (which follow batching), sorted."""
    return sorted(
        (msgspec.structs.replace(p, position_id=None) for p in positions),
        key=lambda p: (p.symbol, p.opened_at, p.opened_by_order_id),
    )


def assert_ground_truth(snap: StoreSnapshot) -> None:
    for oid, truth in TRUTH["orders"].items():
        order = snap.orders[oid]
        assert order.filled_qty == Decimal(truth["filled_qty"])
        assert order.status == truth["status"]
    for symbol, truth in TRUTH["positions"].items():
        assert snap.net_position(symbol) == Decimal(truth["qty"])


async def test_batches_commit_and_acks_carry_the_committed_keys() -> None:
    db = MemoryDatabase()
    state = SupervisorState()
    metrics = Metrics()
    acks = await writer(MemoryStore(db), list(EVENTS), max_batch=50, metrics=metrics, state=state)
    # 194 queued updates, at most 50 per transaction: 4 commits, acked in order.
    assert [len(a) for a in acks] == [50, 50, 50, 44]
    assert [k for a in acks for k in a] == [ev.key for ev in EVENTS]
    assert db.commits == 4
    snap = await MemoryStore(db).snapshot(ACCOUNT)
    assert snap.event_keys == {ev.key for ev in EVENTS}
    assert_ground_truth(snap)
    assert metrics.value("stream_supervisor_batches_total") == 4
    assert metrics.value("stream_supervisor_fills_applied_total") == 101
    assert state.committed_events == 194 and state.committed_batches == 4
    assert state.db_writable
    assert state.committed_cursor is not None and state.committed_cursor == snap.cursor


async def test_dead_letters_are_stored_in_the_batch_and_not_acked_as_keys() -> None:
    db = MemoryDatabase()
    dead = DeadLetter(reason="invalid JSON: truncated", payload=b'{"stream":')
    metrics = Metrics()
    acks = await writer(MemoryStore(db), [EVENTS[0], dead, EVENTS[1]], metrics=metrics)
    assert acks == [(EVENTS[0].key, EVENTS[1].key)]
    snap = await MemoryStore(db).snapshot(ACCOUNT)
    assert snap.dead_letters == [dead]
    assert metrics.value("stream_supervisor_dead_letters_total") == 1


async def test_only_dead_letters_still_commit() -> None:
    db = MemoryDatabase()
    dead = DeadLetter(reason="oversized frame", payload=b"x")
    assert await writer(MemoryStore(db), [dead]) == [()]
    assert (await MemoryStore(db).snapshot(ACCOUNT)).dead_letters == [dead]


async def test_an_ack_names_the_newest_key_its_batch_stored() -> None:
    db = MemoryDatabase()
    await writer(MemoryStore(db), list(EVENTS[:20]))
    # Old duplicates only: nothing stored, so no newest key.
    assert await writer_acks(MemoryStore(db), list(EVENTS[5:10])) == [
        Ack(tuple(ev.key for ev in EVENTS[5:10]), None)]
    # New keys followed by an old duplicate: the newest *stored* key, not the last key.
    batch = [*EVENTS[20:25], EVENTS[3]]
    assert await writer_acks(MemoryStore(db), list[Item](batch)) == [
        Ack(tuple(ev.key for ev in batch), EVENTS[24].key)]


async def test_duplicates_already_stored_are_acked_and_counted_not_applied() -> None:
    db = MemoryDatabase()
    await writer(MemoryStore(db), list(EVENTS[:20]))
    metrics = Metrics()
    acks = await writer(MemoryStore(db), list(EVENTS[:30]), metrics=metrics)
    assert [k for a in acks for k in a] == [ev.key for ev in EVENTS[:30]]
    assert metrics.value("stream_supervisor_duplicates_dropped_total", layer="database") == 20
    clean = MemoryDatabase()
    await writer(MemoryStore(clean), list(EVENTS[:30]))
    snap, want = await MemoryStore(db).snapshot(ACCOUNT), await MemoryStore(clean).snapshot(ACCOUNT)
    assert (snap.event_keys, snap.orders, snap.cursor) == (
        want.event_keys,
        want.orders,
        want.cursor,
    )
    assert rows(snap.positions) == rows(want.positions)
    assert rows(snap.history) == rows(want.history)


class FailTimes:
    def __init__(self, n: int) -> None:
        self.left = n
        self.calls = 0

    def __call__(self, batch: Batch) -> bool:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            return True
        return False


@pytest.mark.parametrize("failures", [1, 5, 12])
async def test_failing_store_is_retried_until_it_commits(
    failures: int, autojump_clock: trio.testing.MockClock
) -> None:
    db = MemoryDatabase()
    hook = FailTimes(failures)
    metrics = Metrics()
    state = SupervisorState()
    start = trio.current_time()
    acks = await writer(
        MemoryStore(db, fail_before_commit=hook), list(EVENTS), metrics=metrics, state=state
    )
    assert hook.calls == failures + 1
    assert metrics.value("stream_supervisor_batch_retries_total") == failures
    # Nothing dropped: every update committed, once.
    assert [k for a in acks for k in a] == [ev.key for ev in EVENTS]
    assert db.commits == 1
    assert_ground_truth(await MemoryStore(db).snapshot(ACCOUNT))
    assert state.db_writable
    # It backed off between attempts (virtual time, so this costs nothing).
    assert trio.current_time() > start


async def test_unavailable_database_is_waited_out(autojump_clock: trio.testing.MockClock) -> None:
    db = MemoryDatabase()
    store = MemoryStore(db)
    await store.open()
    db.available = False
    state = SupervisorState()
    metrics = Metrics()

    async def recover() -> None:
        await trio.sleep(30)
        assert not state.db_writable  # the writer said so while it waited
        db.available = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(recover)
        acks = await writer(store, list(EVENTS[:10]), metrics=metrics, state=state)
    assert [k for a in acks for k in a] == [ev.key for ev in EVENTS[:10]]
    assert metrics.value("stream_supervisor_batch_retries_total") >= 1
    assert state.db_writable


async def test_ambiguous_commit_retried_applies_nothing_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The commit succeeded but the writer was told it failed (connection lost after
    # COMMIT): the retry finds every key stored and must change nothing.
    clean_db = MemoryDatabase()
    await writer(MemoryStore(clean_db), list(EVENTS), max_batch=40)
    db = MemoryDatabase()
    metrics = Metrics()
    hook = FailTimes(1)
    acks = await writer(
        MemoryStore(db, fail_after_commit=hook), list(EVENTS), max_batch=40, metrics=metrics
    )
    assert metrics.value("stream_supervisor_batch_retries_total") == 1
    assert [k for a in acks for k in a] == [ev.key for ev in EVENTS]
    snap = await MemoryStore(db).snapshot(ACCOUNT)
    clean = await MemoryStore(clean_db).snapshot(ACCOUNT)
    assert snap.orders == clean.orders
    assert snap.positions == clean.positions
    assert snap.history == clean.history
    assert snap.cursor == clean.cursor
    assert snap.event_keys == clean.event_keys
    assert_ground_truth(snap)
    # The retry was caught by the database layer, not applied.
    assert metrics.value("stream_supervisor_duplicates_dropped_total", layer="database") == 40


async def test_ambiguous_commit_of_a_flip_keeps_one_open_position(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every batch fails after commit once: each is retried, and a symbol still has at
    # most one open row with the broker's quantity.
    db = MemoryDatabase()
    seen: set[tuple[str, ...]] = set()

    def every_batch_once(batch: Batch) -> bool:
        ident = tuple(ev.key for ev in batch.events)
        if ident in seen:
            return False
        seen.add(ident)
        return True

    metrics = Metrics()
    await writer(
        MemoryStore(db, fail_after_commit=every_batch_once),
        list(EVENTS),
        max_batch=7,
        metrics=metrics,
    )
    snap = await MemoryStore(db).snapshot(ACCOUNT)
    assert_ground_truth(snap)
    for symbol in TRUTH["positions"]:
        assert sum(1 for p in snap.positions if p.symbol == symbol and p.is_open) <= 1
    assert metrics.value("stream_supervisor_batch_retries_total") == 28  # ceil(194 / 7)


class LeadershipLost(MemoryStore):
    async def commit_batch(self, batch: Batch) -> BatchResult:
        raise LostLeadership("advisory lock lost")


async def test_lost_leadership_stops_the_writer_without_acking() -> None:
    # Fencing: another replica owns the account now; retrying would write through it.
    db = MemoryDatabase()
    state = SupervisorState()
    metrics = Metrics()
    with pytest.RaisesGroup(LostLeadership, flatten_subgroups=True):
        await writer(LeadershipLost(db), list(EVENTS[:5]), metrics=metrics, state=state)
    assert not state.db_writable
    assert db.commits == 0
    assert metrics.value("stream_supervisor_batch_retries_total") == 0
