"""The writer actor: group commit into the store, retried until it sticks, acked after."""

from __future__ import annotations

import json
import random
import string
from decimal import Decimal
from functools import partial
from typing import Any

import msgspec
import psycopg
import pytest
import trio

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.errors import BatchKeepsFailing, LostLeadership
from stream_supervisor.events import DeadLetter, Event
from stream_supervisor.messages import Ack, Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.pgstore import PgStore
from stream_supervisor.positions import Position
from stream_supervisor.protocol import decode_frame
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import Batch, BatchResult, StoreSnapshot
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore
from stream_supervisor.writer import (
    REPEATS_BEFORE_CRASH,
    WriterSettings,
    take_batch,
    writer_actor,
)

from .fixtures import RECORDING
from .test_store_conformance import fill

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


# --- values the database refuses: isolated, dead-lettered, the rest committed once -----
#
# These run on the real PostgreSQL: what it refuses, and that its session (with the
# writer lock) survives the refusal, is the point. The updates are built directly, past
# the decoder's bounds, as a value the bounds missed would arrive.


def _noise(n: int, seed: int = 1) -> str:
    """Text PostgreSQL cannot compress into an index entry (`"a" * 3000` it can)."""
    rng = random.Random(seed)
    return "".join(rng.choices(string.ascii_letters + string.digits, k=n))


def _valid(n: int, prefix: str = "o") -> list[Event]:
    return [fill(f"{prefix}{i}", "buy", "1", "1", "10", i % 50) for i in range(n)]


def _poisons() -> dict[str, Event]:
    """One update per way PostgreSQL refuses a value, each with its own key."""
    base = fill("poison", "buy", "2", "2", "10", 3)
    return {
        # broker_orders' primary key: index row too large (54000)
        "order_id": msgspec.structs.replace(base, order_id=_noise(3000), key="fill:p1:2"),
        # the open-position index on (account, symbol): index row too large (54000)
        "symbol": msgspec.structs.replace(base, symbol=_noise(3000, 2), key="fill:p2:2"),
        # numeric cannot hold it (22003)
        "price": msgspec.structs.replace(base, order_id="p3", fill_price=Decimal("1E-20000"),
                                         cum_avg_price=None, key="fill:p3:2"),
    }


async def pg_writer(url: str, items: list[Item], *, max_batch: int = 1000,
                    metrics: Metrics | None = None, store_type: type[PgStore] = PgStore,
                    claim_ahead: bool = True) -> tuple[list[Ack], PgStore]:
    store = store_type(url, statement_timeout_ms=5_000)
    await store.open()
    try:
        # A previous step's store gave the writer lock back as it closed; one that was
        # dropped without closing holds it until its backend exits, a moment later.
        with trio.fail_after(10):
            while not await store.try_leadership(PG_ACCOUNT):
                await trio.sleep(0.02)
    except BaseException:
        await store.aclose()
        raise
    metrics = metrics if metrics is not None else Metrics()
    inbox_send, inbox_recv = trio.open_memory_channel[Item](len(items) + 1)
    ack_send, ack_recv = trio.open_memory_channel[Ack](len(items) + 1)
    for item in items:
        inbox_send.send_nowait(item)
    inbox_send.close()
    settings = WriterSettings(account_id=PG_ACCOUNT, max_batch=max_batch,
                              retry=BackoffPolicy(initial=0.01, factor=2.0, cap=0.05),
                              claim_ahead=claim_ahead)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(writer_actor, settings, store, inbox_recv, ack_send,
                                            metrics, SupervisorState(), rng=random.Random(3)))
    except BaseException:
        await store.aclose()
        raise
    return await drain(ack_recv), store


PG_ACCOUNT = "acct-flip"  # the account `fill()` builds positions for


@pytest.mark.parametrize("kind", ["order_id", "symbol", "price"])
async def test_a_refused_update_is_dead_lettered_and_the_rest_commits_once(
    database_url: str, kind: str
) -> None:
    valid = _valid(40)
    poison = _poisons()[kind]
    decode_error = DeadLetter("invalid JSON: x", b"{")
    items: list[Item] = [*valid[:17], poison, decode_error, *valid[17:]]
    metrics = Metrics()
    acks, store = await pg_writer(database_url, items, metrics=metrics)

    snap = await store.snapshot(PG_ACCOUNT)
    assert snap.event_keys == {ev.key for ev in valid}
    assert set(snap.orders) == {ev.order_id for ev in valid}
    assert snap.net_position("XYZ") == 40
    reasons = [d.reason for d in snap.dead_letters]
    assert len(reasons) == 2 and "invalid JSON: x" in reasons
    refused = next(d for d in snap.dead_letters if d.reason != "invalid JSON: x")
    expected = {"order_id": "index row size", "symbol": "index row size",
                "price": "numeric"}[kind]
    assert refused.reason.startswith("refused by the database [")
    assert expected in refused.reason, refused.reason
    assert refused.payload == msgspec.json.encode(poison)  # no raw frame: its JSON
    # One ack for the taken batch: every valid key in order, the refused one released.
    assert acks == [Ack(tuple(ev.key for ev in valid), valid[-1].key, (poison.key,))]
    assert metrics.value("stream_supervisor_updates_refused_total") == 1
    assert metrics.value("stream_supervisor_batch_retries_total") == 0
    # The session and its writer lock survived the refusals.
    rival = PgStore(database_url)
    await rival.open()
    assert not await rival.try_leadership(PG_ACCOUNT)
    await rival.aclose()
    again = await store.commit_batch(Batch(PG_ACCOUNT, valid[:3]))
    assert again.duplicate_keys == {ev.key for ev in valid[:3]}
    await store.aclose()


class _CountingClaims(PgStore):
    """The real store, counting the batches it claimed ahead; a commit that claims its
    keys itself (not claimed ahead) starts late, so that a claim made meanwhile, out of
    batch order, would win the race to `seq`."""

    claimed = 0

    async def claim_ahead(self, batch: Batch) -> bool:
        done = await super().claim_ahead(batch)
        self.claimed += done
        return done

    async def commit_batch(self, batch: Batch) -> BatchResult:
        ahead: Any = getattr(self, "_ahead")  # noqa: B009 (the test looks inside)
        if batch.events and (ahead is None or ahead.batch is not batch):
            await trio.sleep(0.05)
        return await super().commit_batch(batch)


async def test_a_busy_writer_claims_each_batch_while_the_one_before_commits(
    database_url: str,
) -> None:
    # Everything is queued before the writer starts: each batch is taken, and its keys
    # claimed, while the one before it commits. A refused update in the middle fails its
    # batch: the claims of the batch behind it are given up while the refusal is isolated,
    # then claiming ahead resumes. Every valid update is stored once, acked in order.
    valid = _valid(300)
    poison = _poisons()["price"]
    items: list[Item] = [*valid[:150], poison, *valid[150:]]
    acks, store = await pg_writer(database_url, items, max_batch=16,
                                  store_type=_CountingClaims)
    assert isinstance(store, _CountingClaims)
    snap = await store.snapshot(PG_ACCOUNT)
    assert snap.event_keys == {ev.key for ev in valid}
    assert snap.net_position("XYZ") == 300
    assert [d.reason[:27] for d in snap.dead_letters] == ["refused by the database [22"]
    assert [k for ack in acks for k in ack.keys] == [ev.key for ev in valid]
    assert [k for ack in acks for k in ack.rejected] == [poison.key]
    # Claimed in batch order, around the refusal too: `seq` says which keys are newest.
    with psycopg.connect(database_url) as conn:
        stored = [r[0] for r in conn.execute(
            "SELECT event_key FROM alpaca_event_dedupe WHERE account_id = %s ORDER BY seq",
            [PG_ACCOUNT])]
    assert stored == [ev.key for ev in valid]
    batches = len(acks)
    assert batches == 19  # ceil(301 / 16)
    # Claimed ahead: every batch but, at most, the one behind the refused batch (its
    # claim is given up, or refused, while the refusal is isolated) and the one after.
    assert store.claimed >= batches - 2
    await store.aclose()


async def test_with_claim_ahead_off_batches_commit_one_after_another(
    database_url: str,
) -> None:
    valid = _valid(100)
    acks, store = await pg_writer(database_url, list(valid), max_batch=16,
                                  store_type=_CountingClaims, claim_ahead=False)
    assert isinstance(store, _CountingClaims)
    assert store.claimed == 0
    assert [k for ack in acks for k in ack.keys] == [ev.key for ev in valid]
    assert (await store.snapshot(PG_ACCOUNT)).net_position("XYZ") == 100
    await store.aclose()


async def test_every_refused_update_of_a_batch_is_found(database_url: str) -> None:
    valid = _valid(100)
    poisons = list(_poisons().values())
    items: list[Item] = [poisons[0], *valid[:50], poisons[1], *valid[50:], poisons[2]]
    acks, store = await pg_writer(database_url, items)
    snap = await store.snapshot(PG_ACCOUNT)
    await store.aclose()

    assert snap.event_keys == {ev.key for ev in valid}
    assert snap.net_position("XYZ") == 100
    assert len(snap.dead_letters) == 3
    assert acks[0].rejected == tuple(p.key for p in poisons)
    assert acks[0].keys == tuple(ev.key for ev in valid)


async def test_a_valid_copy_of_a_refused_update_is_stored_later(database_url: str) -> None:
    # The refused update's key is not stored: a later valid copy of the same update
    # (from REST, or the broker corrected) is applied, once.
    good = fill("p3", "buy", "2", "2", "10", 3)
    bad = msgspec.structs.replace(good, fill_price=Decimal("1E-20000"), cum_avg_price=None)
    assert bad.key == good.key
    acks, store = await pg_writer(database_url, [bad, *_valid(3)])
    assert acks[0].rejected == (bad.key,)
    await store.aclose()
    acks, store = await pg_writer(database_url, [good])
    snap = await store.snapshot(PG_ACCOUNT)
    await store.aclose()
    assert acks == [Ack((good.key,), good.key, ())]
    assert good.key in snap.event_keys
    assert snap.orders["p3"].filled_qty == 2 and snap.net_position("XYZ") == 5


async def test_isolating_one_update_in_a_thousand_costs_about_twenty_commits(
    database_url: str,
) -> None:
    valid = _valid(999)
    poison = _poisons()["order_id"]
    items: list[Item] = [*valid[:611], poison, *valid[611:]]
    metrics = Metrics()
    acks, store = await pg_writer(database_url, items, metrics=metrics)
    snap = await store.snapshot(PG_ACCOUNT)
    await store.aclose()
    assert len(snap.event_keys) == 999 and len(snap.dead_letters) == 1
    # Binary splitting: per level one half refused and one committed, then the dead
    # letter; ceil(log2(1000)) = 10 levels.
    commits = metrics.value("stream_supervisor_batches_total")
    assert 10 <= commits <= 12, commits
    assert acks[0].keys == tuple(ev.key for ev in valid)


_REJECT_TRIGGER = """
CREATE FUNCTION refuse_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.alpaca_order_id = 'rejected' THEN RAISE EXCEPTION 'orders named rejected are refused'; END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_order BEFORE INSERT OR UPDATE ON broker_orders
    FOR EACH ROW EXECUTE FUNCTION refuse_order();
"""


async def test_the_same_refusal_again_and_again_is_a_crash(database_url: str) -> None:
    # Not a value's fault (a trigger says no): retried a few times, then BatchKeepsFailing,
    # which the supervisor counts towards the restart limit instead of looping quietly.
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_REJECT_TRIGGER)
    metrics = Metrics()
    with pytest.RaisesGroup(BatchKeepsFailing, flatten_subgroups=True):
        await pg_writer(database_url, [fill("rejected", "buy", "1", "1", "10", 1)],
                        metrics=metrics)
    assert metrics.value("stream_supervisor_batch_retries_total") == REPEATS_BEFORE_CRASH - 1
