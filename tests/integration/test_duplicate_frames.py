"""Layer 0 of dedupe (`dedupe.FrameMemo`): a frame byte for byte equal to one already
decoded, whose key the dedupe actor holds, is dropped by the connection actor without
being decoded; anything else takes the normal path. A real loopback WebSocket and real
PostgreSQL, fed the recorded Alpaca session."""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import trio

from stream_supervisor.metrics import Metrics
from stream_supervisor.protocol import decode_frame
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.supervisor import EXIT_OK, Supervisor
from stream_supervisor.testing.verify import verify_against_truth
from stream_supervisor.wiring import open_supervisor

from .replay import KEY_ID, SECRET_KEY, FixtureRest, ReplayServer, Script, fixture_frames
from .test_pipeline import ACCOUNT, FAST_BACKOFF, TRUTH, _snapshot

UNDECODED = "stream_supervisor_duplicates_undecoded_total"
DROPPED = "stream_supervisor_duplicates_dropped_total"


def _settings(database_url: str, server: ReplayServer) -> Settings:
    return Settings(key_id=KEY_ID, secret_key=SECRET_KEY, base_url="http://127.0.0.1:9",
                    stream_url=server.url, database_url=database_url, account_id=ACCOUNT,
                    ping_interval=2.0, ping_timeout=2.0, drain_timeout=10.0, baseline=False,
                    backoff=FAST_BACKOFF)


async def _run(
    database_url: str,
    script: Script,
    done: Callable[[Supervisor, ReplayServer], bool],
    *,
    metrics: Metrics,
    state: SupervisorState,
    wallclock: Callable[[], datetime] | None = None,
    rest: FixtureRest | None = None,
) -> Supervisor:
    server = ReplayServer(script)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with trio.fail_after(30):
            async with (
                open_supervisor(_settings(database_url, server), metrics=metrics, state=state,
                                rest=rest or FixtureRest(ACCOUNT), rng=random.Random(7),
                                wallclock=wallclock, install_signal_handlers=False) as sup,
                trio.open_nursery() as inner,
            ):
                inner.start_soon(sup.run)
                while not done(sup, server):
                    await trio.sleep(0.05)
                sup.request_drain("test")
        nursery.cancel_scope.cancel()
    assert sup.exit_code == EXIT_OK
    return sup


def _until(check: Callable[[], bool]) -> Callable[[], Awaitable[None]]:
    """A server pause: wait until `check` holds (the originals are committed, say)."""
    async def pause() -> None:
        while not check():
            await trio.sleep(0.02)

    return pause


def _dropped(metrics: Metrics) -> int:
    return int(sum(metrics.value(DROPPED, layer=layer) for layer in ("lru", "inflight")))


def _woken(frames: list[bytes], metrics: Metrics) -> tuple[list[bytes], dict[int, Any]]:
    """The memo remembers only while duplicates come (`FrameMemo.active`): one update
    twice first, the second copy dropped by the dedupe actor, wakes it."""
    return [frames[0], frames[0]], {1: _until(lambda: _dropped(metrics) >= 1)}


async def test_a_byte_identical_resend_is_dropped_without_decoding(database_url: str) -> None:
    # The whole session, then once it is committed the whole session again, byte for
    # byte (a broker resending what it sent): every second copy is dropped by its bytes.
    frames = fixture_frames()
    metrics, state = Metrics(), SupervisorState()
    wake, pauses = _woken(frames, metrics)
    end = len(wake) + len(frames) - 1
    pauses[end] = _until(lambda: state.committed_events >= len(frames))
    script = Script(wake + frames + frames, pause_after=pauses)
    await _run(database_url, script,
               lambda sup, server: server.done.is_set() and _dropped(metrics) >= len(frames) + 2,
               metrics=metrics, state=state)
    snap = await _snapshot(database_url)
    assert verify_against_truth(snap, TRUTH) == []
    assert len(snap.event_keys) == len(frames)
    # The whole resend, and nothing else: the first update's copies before it came while
    # the memo slept (the second) or before it remembered the frame (the third).
    assert metrics.value(UNDECODED) == len(frames)
    assert _dropped(metrics) == len(frames) + 2
    assert state.committed_events == len(frames)
    # Still received, by event type, as a decoded copy would be counted.
    assert metrics.value("stream_supervisor_events_received_total",
                         source="stream") == 2 * len(frames) + 2


async def test_a_copy_right_behind_its_first_is_dropped_without_decoding(
        database_url: str) -> None:
    # Each update twice in a row, as a broker resending at once would: the second copy
    # mostly arrives in the same socket read as the first, which is then still queued on
    # the stream buffer, short of the dedupe actor. It is dropped by its bytes all the
    # same (the key is on its way, `KeyCache.forwarded`), not decoded to be dropped there.
    frames = fixture_frames()
    metrics, state = Metrics(), SupervisorState()
    wake, pauses = _woken(frames, metrics)
    pairs = [copy for frame in frames[1:] for copy in (frame, frame)]
    script = Script(wake + pairs, pause_after=pauses)
    await _run(database_url, script,
               lambda sup, server: (server.done.is_set()
                                    and state.committed_events >= len(frames)
                                    and _dropped(metrics) >= len(frames)),
               metrics=metrics, state=state)
    snap = await _snapshot(database_url)
    assert verify_against_truth(snap, TRUTH) == []
    assert len(snap.event_keys) == len(frames) and state.committed_events == len(frames)
    assert metrics.value(UNDECODED) == len(frames) - 1  # every second copy of a pair
    assert metrics.value(DROPPED, layer="inflight") + metrics.value(
        DROPPED, layer="lru") == len(frames)  # and the waking one


async def test_without_duplicates_the_memo_sleeps(database_url: str) -> None:
    # A stream without duplicates pays nothing for the memo, so the same resend as above
    # with no duplicate before it is decoded (and dropped by the dedupe actor's LRU).
    frames = fixture_frames()
    metrics, state = Metrics(), SupervisorState()
    script = Script(frames + frames, pause_after={
        len(frames) - 1: _until(lambda: state.committed_events >= len(frames))})
    await _run(database_url, script,
               lambda sup, server: server.done.is_set() and _dropped(metrics) >= len(frames),
               metrics=metrics, state=state)
    assert verify_against_truth(await _snapshot(database_url), TRUTH) == []
    assert metrics.value(DROPPED, layer="lru") == len(frames)
    # The memo woke at the resend's first duplicate, and dropped by their bytes only the
    # copies of frames it remembered from then on: none, the originals came before.
    assert metrics.value(UNDECODED) == 0


async def test_a_copy_that_differs_by_one_byte_is_decoded(database_url: str) -> None:
    # The same updates again, each with one more byte (whitespace JSON allows): the same
    # keys, so the dedupe actor's LRU drops every one, but only after decoding it.
    frames = fixture_frames()
    near = [frame + b" " for frame in frames]
    metrics, state = Metrics(), SupervisorState()
    wake, pauses = _woken(frames, metrics)
    pauses[len(wake) + len(frames) - 1] = _until(
        lambda: state.committed_events >= len(frames))
    script = Script(wake + frames + near, pause_after=pauses)
    await _run(database_url, script,
               lambda sup, server: server.done.is_set() and _dropped(metrics) >= len(frames) + 2,
               metrics=metrics, state=state)
    snap = await _snapshot(database_url)
    assert verify_against_truth(snap, TRUTH) == []
    assert metrics.value(UNDECODED) == 0
    assert _dropped(metrics) == len(frames) + 2


def _future_update(at: datetime) -> bytes:
    """A `new` of an order of its own (no other update shares its key), stamped `at`."""
    template = fixture_frames()[1]
    first = decode_frame(template)
    assert not isinstance(first, Exception) and hasattr(first, "order_id")
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
    frame = template.replace(first.order_id.encode(), str(uuid.uuid4()).encode())
    old = b'"timestamp":"2026-11-23T20:47:37.764024701Z"'
    assert old in frame
    return frame.replace(old, b'"timestamp":"' + stamp + b'"')


async def test_a_frame_refused_once_is_judged_again_when_resent(database_url: str) -> None:
    # Stamped an hour ahead of the wall clock: dead-lettered. The wall clock then moves two
    # hours on, and the very same bytes come again: decoded again, and stored. Were a
    # refused frame remembered, the resend would be judged by its first copy.
    skew: list[timedelta] = [timedelta(0)]

    def wallclock() -> datetime:
        return datetime.now(UTC) + skew[0]

    future = _future_update(datetime.now(UTC) + timedelta(hours=1))
    metrics, state = Metrics(), SupervisorState()

    async def refused_then_later() -> None:
        await _until(lambda: metrics.value("stream_supervisor_dead_letters_total") >= 1)()
        skew[0] = timedelta(hours=2)

    wake, pauses = _woken(fixture_frames(), metrics)
    pauses[len(wake)] = refused_then_later
    script = Script([*wake, future, future], pause_after=pauses)
    await _run(database_url, script,
               lambda sup, server: server.done.is_set() and state.committed_events >= 2,
               metrics=metrics, state=state, wallclock=wallclock)
    with psycopg.connect(database_url) as conn:
        letters: list[Any] = conn.execute("SELECT reason, payload FROM dead_letters").fetchall()
    assert [bytes(row[1]) for row in letters] == [future]
    assert "timestamp" in letters[0][0]
    assert state.committed_events == 2  # the waking update, and the second copy
    assert metrics.value(UNDECODED) == 0
    assert _dropped(metrics) == 1  # the waking duplicate


class _SlowSecondRecovery(FixtureRest):
    """REST whose FILL activities answer late from the second backfill on: the frames a
    reconnect's server sends first arrive while recovery still runs."""

    def __init__(self, account_id: str) -> None:
        super().__init__(account_id)
        self.backfills = 0

    async def fill_activities(self, *, after: str | None, page_token: str | None,
                              page_size: int = 100) -> list[Any]:
        if page_token is None:
            self.backfills += 1
        if self.backfills >= 2:
            await trio.sleep(0.5)
        return await super().fill_activities(after=after, page_token=page_token,
                                             page_size=page_size)


async def test_frames_read_while_recovery_runs_are_decoded(database_url: str) -> None:
    # The memo awake (a duplicate first), the connection dropped after frame 60, and the
    # reconnect's overlap resent while its recovery still reads REST: those copies go
    # to the live buffer and through the normal path (a replay older than the connection
    # is shown to recovery's stale check, section 12), never dropped by their bytes.
    frames = fixture_frames()
    metrics, state = Metrics(), SupervisorState()
    wake, pauses = _woken(frames, metrics)
    overlap = 10
    drop_at = len(wake) + 60
    pauses[drop_at] = _until(lambda: state.committed_events >= 61)
    script = Script(wake + frames, drop_after={0: drop_at}, resend_overlap=overlap,
                    pause_after=pauses)
    rest = _SlowSecondRecovery(ACCOUNT)
    await _run(database_url, script,
               lambda sup, server: (server.done.is_set()
                                    and state.committed_events >= len(frames)),
               metrics=metrics, state=state, rest=rest)
    assert rest.backfills >= 2
    assert verify_against_truth(await _snapshot(database_url), TRUTH) == []
    assert metrics.value(DROPPED, layer="lru") >= overlap
    assert metrics.value(UNDECODED) == 0
