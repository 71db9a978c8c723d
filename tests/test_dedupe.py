"""The dedupe actor and its key cache: duplicates dropped, keys learnt only once durable."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
import trio
import trio.testing

from stream_supervisor.dedupe import FrameMemo, KeyCache, dedupe_actor
from stream_supervisor.events import DeadLetter, Event, fill_key
from stream_supervisor.messages import Ack, Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.state import SupervisorState

DROPPED = "stream_supervisor_duplicates_dropped_total"


def fill(order: str, cum: int) -> Event:
    ts = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)
    return Event(
        key=fill_key(order, Decimal(cum)),
        event="partial_fill",
        source="stream",
        order_id=order,
        symbol="AAPL",
        side="buy",
        status="partially_filled",
        cum_qty=Decimal(cum),
        timestamp=ts,
        ts_ns=int(ts.timestamp()) * 10**9,
        fill_qty=Decimal(1),
        fill_price=Decimal(10),
    )


# --- KeyCache -------------------------------------------------------------------------


def test_new_key_goes_in_flight_and_its_duplicate_is_dropped_but_not_learnt() -> None:
    cache = KeyCache(10)
    assert cache.check("a") is None
    assert cache.in_flight == 1 and len(cache) == 0
    assert cache.check("a") == "inflight"
    assert len(cache) == 0  # not learnt: the batch holding it has not committed


def test_keys_are_learnt_only_on_commit() -> None:
    cache = KeyCache(10)
    cache.check("a")
    cache.check("b")
    cache.committed(["a"])
    assert cache.check("a") == "lru"
    assert cache.check("b") == "inflight"
    assert (len(cache), cache.in_flight) == (1, 1)


def test_a_key_the_database_refused_is_released_not_learnt() -> None:
    # The writer dead-lettered the update (the database refused a value of it): its key
    # is not stored, so another copy of the update (a valid one from REST, say) must not
    # be dropped as a duplicate, neither now (in flight) nor later (LRU).
    cache = KeyCache(10)
    cache.check("bad")
    cache.check("good")
    cache.committed(["good"])
    cache.released(["bad"])
    assert cache.in_flight == 0
    assert cache.check("bad") is None  # a new copy goes through
    assert cache.check("good") == "lru"


def test_the_restart_check_uses_the_newest_key_a_commit_stored() -> None:
    # A batch of old duplicates only (found stored, storing nothing) must not make an old
    # key the one a restart looks for: it would be found even in a database that lost
    # every commit after it.
    cache = KeyCache(10)
    cache.committed(["new-1", "new-2"], newest_stored="new-2")
    cache.committed(["ancient"], newest_stored=None)
    assert cache.last_committed == "new-2"
    cache.committed(["ancient", "new-3"], newest_stored="new-3")
    assert cache.last_committed == "new-3"


def test_restart_forgets_in_flight_keys_but_keeps_committed_ones() -> None:
    # A crash before commit: the lost event must be accepted when it is delivered again.
    cache = KeyCache(10)
    cache.check("stored")
    cache.check("lost")
    cache.committed(["stored"])
    cache.forget_in_flight()
    assert cache.in_flight == 0
    assert cache.check("lost") is None
    assert cache.check("stored") == "lru"


def test_uncommitted_keys_are_forgotten_by_a_fresh_cache() -> None:
    # A crash before commit: the restarted pipeline builds its cache from durable keys
    # only, so the event the crash lost is accepted again when it is re-delivered.
    cache = KeyCache(10)
    cache.check("lost")
    fresh = KeyCache(10, warm=[])
    assert fresh.check("lost") is None


def test_lru_is_bounded_and_evicts_the_least_recently_used() -> None:
    cache = KeyCache(3)
    cache.committed(["a", "b", "c"])
    assert cache.check("a") == "lru"  # a is now the most recently used
    cache.committed(["d"])
    assert len(cache) == 3
    assert cache.check("b") is None  # b was the least recently used: evicted
    assert cache.check("a") == "lru" and cache.check("c") == "lru" and cache.check("d") == "lru"


def test_warm_start_is_newest_first() -> None:
    # The store returns its most recent keys newest first; the capacity keeps the newest.
    cache = KeyCache(3, warm=["k5", "k4", "k3", "k2", "k1"])
    assert len(cache) == 3
    assert cache.check("k2") is None  # older than the capacity: not loaded
    cache = KeyCache(3, warm=["k5", "k4", "k3"])
    cache.committed(["new"])  # evicts the oldest warm key first
    assert cache.check("k3") is None
    assert [cache.check(k) for k in ("k5", "k4", "new")] == ["lru"] * 3


def test_zero_capacity_learns_nothing_and_leaks_nothing() -> None:
    cache = KeyCache(0, warm=["x"])
    assert cache.check("a") is None
    cache.committed(["a"])
    assert len(cache) == 0 and cache.in_flight == 0
    assert cache.check("a") is None  # the database layer is the authority


def test_committing_unknown_keys_learns_them() -> None:
    cache = KeyCache(5)
    cache.committed(["from-another-path"])
    assert cache.check("from-another-path") == "lru"
    assert cache.in_flight == 0


# --- the actor, through real channels -------------------------------------------------


async def test_dedupe_actor_drops_duplicates_and_counts_them() -> None:
    metrics, state = Metrics(), SupervisorState()
    cache = KeyCache(100, warm=[fill("o", 1).key])
    in_send, in_recv = trio.open_memory_channel[Item](100)
    out_send, out_recv = trio.open_memory_channel[Item](100)
    ack_send, ack_recv = trio.open_memory_channel[Ack](10)
    dead = DeadLetter(reason="invalid JSON: x", payload=b"{")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(dedupe_actor, cache, in_recv, out_send, ack_recv, metrics, state)
            # fill 1 is already durable (warm); fill 2 arrives twice before any commit.
            for item in (fill("o", 1), fill("o", 2), dead, fill("o", 2), dead, fill("o", 3)):
                await in_send.send(item)
            await trio.testing.wait_all_tasks_blocked()
            forwarded = [out_recv.receive_nowait() for _ in range(4)]
            assert forwarded == [fill("o", 2), dead, dead, fill("o", 3)]
            # The writer commits 2 and 3; their replays are now caught by the LRU.
            await ack_send.send(Ack((fill("o", 2).key, fill("o", 3).key)))
            await trio.testing.wait_all_tasks_blocked()
            await in_send.send(fill("o", 3))
            await in_send.send(fill("o", 4))
            await trio.testing.wait_all_tasks_blocked()
            assert out_recv.receive_nowait() == fill("o", 4)
            # End of the inbox closes the outbox; end of acks ends the actor.
            await in_send.aclose()
            await trio.testing.wait_all_tasks_blocked()
            async for extra in out_recv:
                raise AssertionError(f"unexpected {extra}")
            await ack_send.aclose()
    assert metrics.value(DROPPED, layer="lru") == 2  # the warm fill 1 and the replayed fill 3
    assert metrics.value(DROPPED, layer="inflight") == 1
    assert "dedupe" in state.heartbeats


async def test_an_ack_releases_refused_keys_so_a_later_copy_is_forwarded() -> None:
    metrics, state = Metrics(), SupervisorState()
    cache = KeyCache(100)
    in_send, in_recv = trio.open_memory_channel[Item](10)
    out_send, out_recv = trio.open_memory_channel[Item](10)
    ack_send, ack_recv = trio.open_memory_channel[Ack](10)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(dedupe_actor, cache, in_recv, out_send, ack_recv, metrics, state)
            await in_send.send(fill("o", 1))
            await in_send.send(fill("o", 2))
            await trio.testing.wait_all_tasks_blocked()
            assert [out_recv.receive_nowait() for _ in range(2)] == [fill("o", 1), fill("o", 2)]
            await ack_send.send(Ack((fill("o", 1).key,), fill("o", 1).key,
                                    rejected=(fill("o", 2).key,)))
            await trio.testing.wait_all_tasks_blocked()
            await in_send.send(fill("o", 2))  # another copy of the refused update
            await in_send.send(fill("o", 1))  # a replay of the stored one
            await trio.testing.wait_all_tasks_blocked()
            assert out_recv.receive_nowait() == fill("o", 2)
            with pytest.raises(trio.WouldBlock):
                out_recv.receive_nowait()
            await in_send.aclose()
            await ack_send.aclose()
    assert metrics.value(DROPPED, layer="lru") == 1


async def test_acks_are_drained_while_the_outbox_is_full() -> None:
    # The writer must never block telling us about a commit while we block on it.
    metrics, state = Metrics(), SupervisorState()
    cache = KeyCache(100)
    in_send, in_recv = trio.open_memory_channel[Item](10)
    out_send, out_recv = trio.open_memory_channel[Item](0)  # nobody reads: forward blocks
    ack_send, ack_recv = trio.open_memory_channel[Ack](0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(dedupe_actor, cache, in_recv, out_send, ack_recv, metrics, state)
            await in_send.send(fill("o", 1))
            await trio.testing.wait_all_tasks_blocked()
            await ack_send.send(Ack((fill("o", 9).key,)))  # completes although forward is stuck
            await trio.testing.wait_all_tasks_blocked()
            assert cache.check(fill("o", 9).key) == "lru"
            assert await out_recv.receive() == fill("o", 1)
            await in_send.aclose()
            await ack_send.aclose()


# --- FrameMemo (layer 0: a frame known by its bytes) -------------------------------------


def test_known_reads_the_cache_and_never_puts_a_key_in_flight() -> None:
    cache = KeyCache(10)
    assert cache.known("a") is None
    assert cache.in_flight == 0  # asking is not checking: the key is not in flight now
    cache.check("a")
    assert cache.known("a") == "inflight"
    cache.committed(["a"])
    assert cache.known("a") == "lru"


def test_a_remembered_frame_is_a_duplicate_only_while_its_key_is_held() -> None:
    cache = KeyCache(10)
    memo = FrameMemo(cache)
    frame = b'{"stream":"trade_updates","data":{"event":"fill"}}'
    memo.remember(frame, "k", "fill")
    assert memo.duplicate(frame) is None  # remembered, but the key is not held yet
    cache.check("k")
    assert memo.duplicate(bytes(bytearray(frame))) == ("inflight", "fill")  # equal bytes
    cache.committed(["k"])
    assert memo.duplicate(frame) == ("lru", "fill")
    assert memo.duplicate(frame + b" ") is None  # one byte more: decode it


def test_an_update_on_its_way_is_held_until_the_dedupe_actor_checks_it() -> None:
    cache = KeyCache(10)
    memo = FrameMemo(cache)
    frame = b'{"stream":"trade_updates","data":{"event":"new"}}'
    memo.remember(frame, "k", "new")
    memo.forwarded("k")  # the connection actor put its first copy on the stream buffer
    assert memo.duplicate(bytes(bytearray(frame))) == ("inflight", "new")  # a copy behind it
    assert cache.in_flight == 0  # marked, not in flight: only the check puts it there
    assert cache.check("k") is None  # the first copy itself is no duplicate
    assert cache.known("k") == "inflight"  # now for the in-flight set
    cache.released(["k"])  # the database refused it: a later copy is judged again
    assert memo.duplicate(frame) is None


def test_a_session_end_or_pipeline_restart_forgets_what_was_on_its_way() -> None:
    # A session cancelled with updates still queued loses them: their copies in the next
    # session must be decoded and taken, not dropped for a first copy that never came.
    cache = KeyCache(10)
    memo = FrameMemo(cache)
    memo.remember(b"frame-a", "a", "new")
    memo.remember(b"frame-b", "b", "new")
    memo.forwarded("a")
    memo.session_ended()
    assert memo.duplicate(b"frame-a") is None and cache.known("a") is None
    memo.forwarded("b")
    cache.forget_in_flight()
    assert memo.duplicate(b"frame-b") is None and cache.known("b") is None


def test_a_frame_whose_update_the_database_refused_is_not_a_duplicate() -> None:
    cache = KeyCache(10)
    memo = FrameMemo(cache)
    memo.remember(b"frame", "bad", "new")
    cache.check("bad")
    cache.released(["bad"])  # dead-lettered by the writer: neither in flight nor learnt
    assert memo.duplicate(b"frame") is None


def test_a_frame_whose_key_left_the_lru_is_decoded_again() -> None:
    cache = KeyCache(2)
    memo = FrameMemo(cache)
    memo.remember(b"frame-a", "a", "new")
    cache.committed(["a", "b", "c"])  # "a" evicted from an LRU of two
    assert memo.duplicate(b"frame-a") is None


def test_the_memo_holds_at_most_its_capacity_of_frames_no_longer_than_its_limit() -> None:
    cache = KeyCache(1000)
    memo = FrameMemo(cache, capacity=100, max_frame_bytes=64)
    keys = [f"k{i}" for i in range(250)]
    cache.committed(keys)
    for i, key in enumerate(keys):
        memo.remember(f"frame-{i:03d}".encode().ljust(64, b"."), key, "new")
    memo.remember(b"x" * 65, "k0", "new")  # over the limit: never remembered
    assert len(memo) == 100
    assert memo.held_bytes == 100 * 64
    assert memo.duplicate(b"x" * 65) is None
    assert memo.duplicate(b"frame-000".ljust(64, b".")) is None  # the oldest went first
    assert memo.duplicate(b"frame-249".ljust(64, b".")) == ("lru", "new")
    # The same bytes again refresh their entry, and take no second place.
    memo.remember(b"frame-249".ljust(64, b"."), "k249", "new")
    assert len(memo) == 100


def test_the_memo_is_active_only_while_duplicates_come() -> None:
    cache = KeyCache(10)
    memo = FrameMemo(cache, capacity=100)
    assert not memo.active(10)  # no duplicate yet: fresh frames pay nothing
    cache.hits += 1  # the dedupe actor dropped one
    assert memo.active(60)
    memo.remember(b"old", "o", "new")
    assert memo.active(60)  # 60 frames since it
    assert not memo.active(60)  # 120 > 100 frames without a duplicate: asleep again
    assert len(memo) == 0  # and holding nothing
    memo.remember(b"frame", "k", "new")
    cache.committed(["k"])
    assert memo.duplicate(b"frame") == ("lru", "new")  # one found here wakes it too
    assert memo.active(1)
