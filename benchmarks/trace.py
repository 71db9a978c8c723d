"""Where an update's time goes inside the supervisor: per-phase timestamps for a sample of
updates, the writer's batches split into their hops and round trips, garbage-collection
pauses and event-loop stalls, for the benchmark's report (issue 18: find the stalls
before fixing anything).

Measurement only, and only in the benchmark's child: `Tracer.install` wraps a few
module-level names the actors look up at call time (the connection's decoder, the
dedupe actor's outbox, the writer's batch take and ack, the store's batch transaction
and the pure core inside it), so the service itself carries no tracing code and pays
nothing for it. Clocks: `time.perf_counter` everywhere (worker threads and GC callbacks
have no Trio clock); an update's `received_at` (Trio's clock, which is perf_counter plus
a constant offset) is converted once.

Phases of a sampled update, each the time from the previous mark:

  decode      socket read returned -> this frame decoded (the frames before it in the
              same read included: that is where it waited)
  to_dedupe   decoded -> the dedupe actor handed it on (live buffer, the connection's
              forward, the dedupe turn)
  queue       past dedupe -> taken by the writer (waiting for the batch in progress)
  commit      taken -> its batch's commit returned to the event loop

and each batch: build (taken -> store called), go_hop (store called -> worker thread
running: Trio's thread hand-off), rt1 (the claim-and-lock round trip with its Python),
core (`ledger.apply_events`), rt2 (parameters, writes and COMMIT, which waits for the
WAL flush), back_hop (thread done -> event loop running again: the GIL hand-off back),
bookkeeping (commit returned -> ack built: the writer's metrics and records).

A batch the writer took ahead (`writer.take_ahead`, while the batch before it committed)
had its keys claimed then: its rt1 is the locks and reads alone, and its build and its
updates' commit phase include the wait for the batch before it.
"""

from __future__ import annotations

import gc
import math
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Self

import trio

PHASES = ("decode", "to_dedupe", "queue", "commit")
BATCH_PARTS = ("build", "go_hop", "rt1", "core", "rt2", "back_hop", "bookkeeping")
#: An event-loop wake-up later than this (past its 1 ms sleep) counts as a stall.
STALL_S = 0.003
#: GC pauses at least this long are kept individually (all are counted).
GC_KEEP_S = 0.0005
NAN = math.nan


def _pcts(values: Sequence[float]) -> dict[str, float | int]:
    ordered = sorted(v for v in values if not math.isnan(v))
    n = len(ordered)
    if not n:
        return {"n": 0}

    def pct(p: float) -> float:
        return round(ordered[min(n - 1, int(p * n))] * 1000, 3)

    return {"n": n, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "max_ms": round(ordered[-1] * 1000, 3),
            "mean_ms": round(sum(ordered) / n * 1000, 3)}


class _BatchTrace:
    __slots__ = (
        "acked",
        "back",
        "call",
        "core_end",
        "core_start",
        "keys",
        "size",
        "taken",
        "thread_end",
        "thread_start",
    )

    def __init__(self, taken: float, size: int) -> None:
        self.taken = taken
        self.size = size
        self.call = self.thread_start = self.core_start = self.core_end = NAN
        self.thread_end = self.back = self.acked = NAN
        self.keys: list[str] = []

    def parts(self) -> dict[str, float]:
        return {
            "build": self.call - self.taken,
            "go_hop": self.thread_start - self.call,
            "rt1": self.core_start - self.thread_start,
            "core": self.core_end - self.core_start,
            "rt2": self.thread_end - self.core_end,
            "back_hop": self.back - self.thread_end,
            "bookkeeping": self.acked - self.back,
        }


class _Marks:
    """Each sampled update's five timestamps, in a flat array of floats, found through a
    dict of key -> slot: neither holds an object the cyclic garbage collector tracks, so
    tracing every update of a run does not bring on the collections it reports."""

    WIDTH = 5  # received, decoded, past dedupe, taken by the writer, committed

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.times = array("d")

    def add(self, key: str, received: float, decoded: float) -> None:
        if key not in self.slots:
            self.slots[key] = len(self.times) // self.WIDTH
            self.times.extend((received, decoded, NAN, NAN, NAN))

    def stamp(self, key: str, index: int, now: float) -> bool:
        """Set mark `index` of `key` once; True if `key` is sampled."""
        slot = self.slots.get(key)
        if slot is None:
            return False
        at = slot * self.WIDTH + index
        if math.isnan(self.times[at]):
            self.times[at] = now
        return True

    def rows(self) -> list[list[float]]:
        w = self.WIDTH
        return [list(self.times[i * w:(i + 1) * w]) for i in range(len(self.times) // w)]


class _Stamping:
    """The dedupe actor's outbox, stamping a sampled update once it is handed on."""

    def __init__(self, inner: Any, marks: _Marks) -> None:
        self._inner = inner
        self._marks = marks

    def _stamp(self, item: Any) -> None:
        key = getattr(item, "key", None)
        if key is not None:
            self._marks.stamp(key, 2, time.perf_counter())

    def send_nowait(self, item: Any) -> None:
        self._inner.send_nowait(item)
        self._stamp(item)

    async def send(self, item: Any) -> None:
        await self._inner.send(item)
        self._stamp(item)

    async def __aenter__(self) -> Self:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Tracer:
    """Samples every `every`-th decoded update; records every batch, GC pause and stall."""

    def __init__(self, every: int) -> None:
        self.every = max(1, every)
        self._n = 0
        self.offset = 0.0  # trio.current_time() - perf_counter()
        # key -> [received, decoded, deduped, taken, committed(back in the loop)]
        self.marks = _Marks()
        self.batches: list[_BatchTrace] = []
        self._current: _BatchTrace | None = None
        # A batch the writer took while the current one committed (claim ahead): it
        # becomes the current one once the current one is acknowledged.
        self._upcoming: _BatchTrace | None = None
        self.gc_counts: Counter[int] = Counter()
        self.gc_seconds: dict[int, float] = {}
        self.gc_pauses: list[tuple[float, float, int]] = []  # start, seconds, generation
        self._gc_start = 0.0
        self.stalls: list[tuple[float, float]] = []  # when, how late (s)
        self._undo: list[Callable[[], None]] = []

    # -- installing the probes -----------------------------------------------------

    def install(self) -> None:
        """Call inside `trio.run`, before the supervisor starts."""
        import stream_supervisor.connection
        import stream_supervisor.pgstore
        import stream_supervisor.supervisor
        import stream_supervisor.writer

        # Typed loosely on purpose: these are the modules' private names, looked up at
        # call time by the actors, which is what lets a benchmark probe them.
        connection: Any = stream_supervisor.connection
        supervisor: Any = stream_supervisor.supervisor
        pgstore: Any = stream_supervisor.pgstore
        writer: Any = stream_supervisor.writer
        self.offset = trio.current_time() - time.perf_counter()
        tracer = self
        marks = self.marks
        perf = time.perf_counter

        real_decode = connection.decode_frame

        def decode(message: Any, **kw: Any) -> Any:
            frame: Any = real_decode(message, **kw)
            received = kw.get("received_at")
            if received and hasattr(frame, "cum_qty"):
                tracer._n += 1
                if tracer._n % tracer.every == 0:
                    marks.add(frame.key, received - tracer.offset, perf())
            return frame

        real_dedupe = supervisor.dedupe_actor

        async def dedupe_actor(cache: Any, inbox: Any, outbox: Any, *args: Any,
                               **kw: Any) -> None:
            await real_dedupe(cache, inbox, _Stamping(outbox, marks), *args, **kw)

        real_take = writer.take_batch
        real_take_ahead = writer.take_ahead

        def taken(items: Any) -> _BatchTrace:
            now = perf()
            batch = _BatchTrace(now, len(items))
            for item in items:
                key = getattr(item, "key", "")
                if key and marks.stamp(key, 3, now):
                    batch.keys.append(key)
            tracer.batches.append(batch)
            return batch

        def take_batch(first: Any, inbox: Any, limit: int) -> Any:
            items = real_take(first, inbox, limit)
            tracer._current = taken(items)
            return items

        def take_ahead(inbox: Any, limit: int) -> Any:
            items = real_take_ahead(inbox, limit)
            if items:
                tracer._upcoming = taken(items)
            return items

        real_ack = writer._ack

        def ack(events: Any, outcome: Any) -> Any:
            b = tracer._current
            if b is not None:
                b.acked = perf()
            if tracer._upcoming is not None:
                tracer._current, tracer._upcoming = tracer._upcoming, None
            return real_ack(events, outcome)

        real_commit = pgstore._commit

        def commit(conn: Any, batch: Any, *args: Any) -> Any:
            b = tracer._current
            if b is not None and math.isnan(b.thread_start):
                b.thread_start = perf()
            result = real_commit(conn, batch, *args)
            if b is not None:
                b.thread_end = perf()
            return result

        real_core = pgstore.apply_events

        def core(*args: Any, **kw: Any) -> Any:
            b = tracer._current
            if b is not None and math.isnan(b.core_start):
                b.core_start = perf()
            result = real_core(*args, **kw)
            if b is not None and math.isnan(b.core_end):
                b.core_end = perf()
            return result

        patches: list[tuple[Any, str, Any]] = [
            (connection, "decode_frame", decode), (supervisor, "dedupe_actor", dedupe_actor),
            (writer, "take_batch", take_batch), (writer, "take_ahead", take_ahead),
            (writer, "_ack", ack),
            (pgstore, "_commit", commit), (pgstore, "apply_events", core)]
        for module, name, replacement in patches:
            self._undo.append(partial(setattr, module, name, getattr(module, name)))
            setattr(module, name, replacement)
        gc.callbacks.append(self._on_gc)
        self._undo.append(lambda: gc.callbacks.remove(self._on_gc))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        seconds = time.perf_counter() - self._gc_start
        generation = info.get("generation", -1)
        self.gc_counts[generation] += 1
        self.gc_seconds[generation] = self.gc_seconds.get(generation, 0.0) + seconds
        if seconds >= GC_KEEP_S:
            self.gc_pauses.append((self._gc_start, seconds, generation))

    # -- hooks the consumer's store wrapper calls (event loop) ----------------------

    def store_called(self) -> None:
        if self._current is not None and math.isnan(self._current.call):
            self._current.call = time.perf_counter()

    def store_returned(self) -> None:
        b = self._current
        if b is None:
            return
        b.back = now = time.perf_counter()
        for key in b.keys:
            self.marks.stamp(key, 4, now)

    async def watch_loop(self) -> None:
        """Sleep 1 ms at a time and note each wake-up more than `STALL_S` late: the
        event loop was held (decoding a large read, the writer thread holding the GIL,
        a collection)."""
        perf = time.perf_counter
        while True:
            before = perf()
            await trio.sleep(0.001)
            late = perf() - before - 0.001
            if late > STALL_S:
                self.stalls.append((before, late))

    # -- the report -----------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        done = [m for m in self.marks.rows() if not math.isnan(m[4])]
        phases = {name: [m[i + 1] - m[i] for m in done] for i, name in enumerate(PHASES)}
        totals = [m[4] - m[0] for m in done]
        batches = [b for b in self.batches if not math.isnan(b.back)]
        parts = [b.parts() for b in batches]
        out: dict[str, Any] = {
            "sampled_updates": len(done),
            "sample_every": self.every,
            "phases": {name: _pcts(v) for name, v in phases.items()},
            "total": _pcts(totals),
            "batches": len(batches),
            "batch_parts": {p: _pcts([x[p] for x in parts]) for p in BATCH_PARTS},
            "gc": {
                "collections": {str(g): self.gc_counts[g] for g in sorted(self.gc_counts)},
                "seconds": {str(g): round(self.gc_seconds[g], 4)
                            for g in sorted(self.gc_seconds)},
                "pauses_over_0.5ms": len(self.gc_pauses),
                "longest_ms": round(max((p[1] for p in self.gc_pauses), default=0.0) * 1000, 3),
            },
            "loop_stalls": {
                "count": len(self.stalls),
                "longest_ms": round(max((s[1] for s in self.stalls), default=0.0) * 1000, 3),
                "total_ms": round(sum(s[1] for s in self.stalls) * 1000, 1),
            },
        }
        out["tail"] = self._tail(done, totals, batches)
        return out

    def _tail(self, done: list[list[float]], totals: list[float],
              batches: list[_BatchTrace]) -> dict[str, Any]:
        """The slowest 1% of the sampled updates, and what each overlapped."""
        if not done:
            return {}
        ordered = sorted(totals)
        cut = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        slow = [m for m, t in zip(done, totals, strict=True) if t >= cut]
        big_gc = [(s, s + d) for s, d, _g in self.gc_pauses]
        stalls = [(s, s + d + 0.001) for s, d in self.stalls]
        # The batch each slow update rode in and the one before it (what it queued behind).
        by_taken = sorted(batches, key=lambda b: b.taken)
        takes = [b.taken for b in by_taken]
        dominant: Counter[str] = Counter()
        gc_hit = stall_hit = 0
        behind: list[int] = []
        own: list[int] = []
        behind_commit: list[float] = []
        rt2: list[float] = []
        back_hop: list[float] = []
        import bisect

        for m in slow:
            spans = {name: m[i + 1] - m[i] for i, name in enumerate(PHASES)}
            dominant[max(spans, key=lambda k: spans[k])] += 1
            if any(a < m[4] and b > m[0] for a, b in big_gc):
                gc_hit += 1
            if any(a < m[4] and b > m[0] for a, b in stalls):
                stall_hit += 1
            i = bisect.bisect_left(takes, m[3])
            if i < len(by_taken) and by_taken[i].taken == m[3]:
                mine = by_taken[i]
                own.append(mine.size)
                rt2.append(mine.thread_end - mine.core_end)
                back_hop.append(mine.back - mine.thread_end)
                if i > 0:
                    prev = by_taken[i - 1]
                    behind.append(prev.size)
                    behind_commit.append(prev.back - prev.taken)
        med = _median
        return {
            "updates": len(slow),
            "threshold_ms": round(cut * 1000, 3),
            "dominant_phase": dict(dominant.most_common()),
            "overlapped_gc_pause": gc_hit,
            "overlapped_loop_stall": stall_hit,
            "own_batch_size_median": med([float(x) for x in own]),
            "previous_batch_size_median": med([float(x) for x in behind]),
            "previous_batch_ms_median": _ms(med(behind_commit)),
            "own_rt2_ms_median": _ms(med(rt2)),
            "own_back_hop_ms_median": _ms(med(back_hop)),
            "all_batches_size_median": med([float(b.size) for b in batches]),
        }


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)
