"""One benchmark consumer, run in a child process of its own so that its CPU, memory and
peak RSS are its own: the real supervisor (`pipeline`), the per-event handler users write
today (`naive`), or receive-and-decode only (`socket_only`).

`python -m benchmarks.consumer '<json args>'` prints one JSON object on stdout. Times are
`trio.current_time()` in this process: from the first update frame received to the last
commit (or the last frame decoded).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

import psycopg
import trio

from benchmarks.trace import Tracer
from stream_supervisor.activities import WireNonTrade
from stream_supervisor.events import Event
from stream_supervisor.ledger import Cursor
from stream_supervisor.logs import configure_logging
from stream_supervisor.metrics import Metrics
from stream_supervisor.orders import OrderState, apply_order_event
from stream_supervisor.pgstore import PgStore
from stream_supervisor.positions import Position, apply_fill
from stream_supervisor.protocol import (
    Authorization,
    Listening,
    WireActivity,
    WireOrder,
    authenticate_message,
    decode_frame,
    listen_message,
)
from stream_supervisor.service import tune_interpreter
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import Batch, BatchResult
from stream_supervisor.supervisor import Supervisor
from stream_supervisor.wiring import open_supervisor, pg_store
from stream_supervisor.wsclient import websocket_connector

DUP_LAYERS = ("lru", "inflight", "database")


def peak_rss_mb() -> float:
    """This process's peak resident set. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over from the forking parent (the orchestrator, which holds the whole workload)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency_summary(samples: Sequence[float]) -> dict[str, float | int]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    n = len(ordered)

    def pct(p: float) -> float:
        return ordered[min(n - 1, int(p * n))] * 1000

    return {
        "n": n,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1] * 1000,
        "mean_ms": sum(ordered) / n * 1000,
    }


def proc_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU of a process on this machine (a local PostgreSQL backend)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def store_backends(store: PgStore) -> list[int]:
    """The backend pids of a store's open connections: the main session and the
    claim-ahead ones. They are private: this is measurement, not an interface."""
    inner: Any = store
    conns = [inner._conn, *(side.conn for side in inner._sides)]
    return [c.info.backend_pid for c in conns if c is not None and not c.closed]


def _per_event(start: float | None, end: float | None, events: int) -> float | None:
    if start is None or end is None or events <= 0:
        return None
    return (end - start) / events * 1e6


# --- pipeline: the real supervisor ------------------------------------------------------


@dataclass
class Probe:
    """Counts what the supervisor committed and dropped, and stamps each event's commit."""

    expect_events: int
    expect_dups: int
    applied: int = 0
    dups: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DUP_LAYERS, 0))
    first_receipt: float | None = None
    # When the first duplicate was dropped: where a run that commits nothing (every frame
    # a duplicate the LRU knows) starts; late by one socket read's decode at most.
    first_drop: float | None = None
    end: float | None = None
    batches: int = 0
    batch_events: int = 0
    commit_seconds: float = 0.0  # wall time inside commit_batch, summed
    commit_times: list[float] = field(default_factory=list)
    # CPU seconds from the first commit to the end: this process, and its PostgreSQL
    # backend (read from /proc when the server is on this machine).
    cpu_start: float | None = None
    cpu_end: float | None = None
    # User CPU alone, over the same span: the part that runs holding the interpreter lock
    # (Python and the C extensions it calls), so one core at most whatever the threads.
    user_cpu_start: float | None = None
    user_cpu_end: float | None = None
    # The store's backends (its main session and its claim-ahead connections, which open
    # later): CPU at the start per pid, and the sum of what each used by the end.
    backends: Callable[[], list[int]] | None = None
    backend_cpu_at_start: dict[int, float] = field(default_factory=dict)
    backend_cpu_start: float | None = None
    backend_cpu_end: float | None = None
    events_after_first_commit: int = 0
    # Frame receipt to commit, per event: an array, so that the benchmark's own bookkeeping
    # adds 8 bytes an event (1 MB at the default size) to the peak RSS it reports.
    latencies: array[float] = field(default_factory=lambda: array("d"))
    done: trio.Event = field(default_factory=trio.Event)

    def committed(self, batch: Batch, result: BatchResult, now: float) -> None:
        if self.batches:
            self.events_after_first_commit += len(result.applied_keys)
        self.batches += 1
        self.batch_events += len(batch.events)
        self.applied += len(result.applied_keys)
        lat = self.latencies
        first = self.first_receipt
        for ev in batch.events:
            received = ev.received_at
            if received:
                lat.append(now - received)
                if first is None or received < first:
                    first = received
        self.first_receipt = first
        self._check(now)

    def dropped(self, layer: str, amount: float) -> None:
        if layer in self.dups:
            now = trio.current_time()
            if self.first_drop is None:
                self.first_drop = now
            self.dups[layer] += int(amount)
            self._check(now)

    def _check(self, now: float) -> None:
        if (self.end is None and self.applied >= self.expect_events
                and sum(self.dups.values()) >= self.expect_dups):
            self.end = now
            self.cpu_end = time.process_time()
            self.user_cpu_end = resource.getrusage(resource.RUSAGE_SELF).ru_utime
            self.backend_cpu_end = self._backends_cpu()
            self.done.set()

    def start_backends(self, backends: Callable[[], list[int]]) -> None:
        self.backends = backends
        self.backend_cpu_at_start = {pid: cpu for pid in backends()
                                     if (cpu := proc_cpu_seconds(pid)) is not None}
        self.backend_cpu_start = 0.0 if self.backend_cpu_at_start else None

    def _backends_cpu(self) -> float | None:
        """CPU the store's backends used since `start_backends` (a backend opened since
        then counts from zero)."""
        if self.backends is None or self.backend_cpu_start is None:
            return None
        used = 0.0
        for pid in self.backends():
            cpu = proc_cpu_seconds(pid)
            if cpu is not None:
                used += cpu - self.backend_cpu_at_start.get(pid, 0.0)
        return used


class TimedStore:
    """The real PgStore, with each batch's commit time stamped for its events: exact
    per-event latency from frame receipt to commit (the metric histogram is bucketed)."""

    def __init__(self, inner: PgStore, probe: Probe, tracer: Tracer | None = None) -> None:
        self._inner = inner
        self._probe = probe
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def commit_batch(self, batch: Batch) -> BatchResult:
        probe = self._probe
        if probe.cpu_start is None:
            probe.cpu_start = time.process_time()
            probe.user_cpu_start = resource.getrusage(resource.RUSAGE_SELF).ru_utime
            probe.start_backends(partial(store_backends, self._inner))
        tracer = self._tracer
        if tracer is not None:
            tracer.store_called()
        started = trio.current_time()
        result = await self._inner.commit_batch(batch)
        now = trio.current_time()
        if tracer is not None:
            tracer.store_returned()
        self._probe.commit_seconds += now - started
        self._probe.commit_times.append(now - started)
        self._probe.committed(batch, result, now)
        return result


def _nothing() -> None:
    return None


class NoWriteStore(TimedStore):
    """The real store for everything but the batches, whose commit is a thread hop that
    does nothing: the supervisor's Python side (transport, decode, actors, writer loop)
    with no database work, i.e. how fast the pipeline could go if PostgreSQL were free."""

    async def claim_ahead(self, batch: Batch) -> bool:
        """Nothing is claimed (no commit will finish it), but the writer's path is the
        one it takes with a real store under load."""
        return bool(batch.events)

    async def release_ahead(self) -> None:
        """Nothing is held."""

    async def commit_batch(self, batch: Batch) -> BatchResult:
        probe = self._probe
        if probe.cpu_start is None:
            probe.cpu_start = time.process_time()
            probe.user_cpu_start = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        # The real store's thread hop, with no work in the thread.
        await trio.to_thread.run_sync(_nothing)
        keys = frozenset(ev.key for ev in batch.events)
        result = BatchResult(
            applied_keys=keys, duplicate_keys=frozenset(), fills_applied=0, stale_fills=0,
            inexact_fills=0, positions_closed=0, drift=(), cursor=Cursor(),
            dead_letters=len(batch.dead_letters))
        now = trio.current_time()
        probe.commit_times.append(0.0)
        probe.committed(batch, result, now)
        return result


class _CountingChild:
    def __init__(self, child: Any, layer: str, probe: Probe) -> None:
        self._child, self._layer, self._probe = child, layer, probe

    def inc(self, amount: float = 1) -> None:
        self._child.inc(amount)
        self._probe.dropped(self._layer, amount)


class _CountingCounter:
    """`metrics.duplicates_dropped` seen through the probe: the exact moment the last
    duplicate is dropped ends a duplicate-heavy run."""

    def __init__(self, counter: Any, probe: Probe) -> None:
        self._counter, self._probe = counter, probe

    def labels(self, layer: str) -> _CountingChild:
        return _CountingChild(self._counter.labels(layer), layer, self._probe)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._counter, name)


class NoNewsRest:
    """The broker's REST side when every fill arrives on the socket: backfill finds no
    FILL activity and no open order, so the benchmark times the stream path only."""

    def __init__(self, account_id: str) -> None:
        self._account_id = account_id
        self.calls = 0

    async def account_id(self) -> str:
        return self._account_id

    async def fill_activities(
        self, *, after: str | None, page_token: str | None, page_size: int = 100
    ) -> list[WireActivity]:
        self.calls += 1
        return []

    async def open_orders(self) -> list[WireOrder]:
        self.calls += 1
        return []

    async def orders_since(self, *, after: str, limit: int = 500) -> list[WireOrder]:
        return []

    async def order(self, order_id: str) -> WireOrder | None:
        self.calls += 1
        return None

    async def positions(self) -> list[dict[str, Any]]:
        return []

    async def non_trade_activities(self, **_: Any) -> list[WireNonTrade]:
        return []

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        return None
    async def clock(self) -> dict[str, Any]:
        return {"is_open": False}


async def _watch(tracer: Tracer, scope: trio.CancelScope) -> None:
    with scope:
        await tracer.watch_loop()


async def run_pipeline(args: dict[str, Any]) -> dict[str, Any]:
    tune_interpreter()  # what `stream-supervisor run` does before it starts
    probe = Probe(args["expect_events"], args.get("expect_dups", 0))
    settings = Settings(
        key_id=args["key_id"],
        secret_key=args["secret_key"],
        base_url="http://127.0.0.1:9",  # unused: REST is in-process
        stream_url=args["ws_url"],
        database_url=args["database_url"],
        account_id=args["account_id"],
        max_batch=args["max_batch"],
        channel_size=args["channel_size"],
        lru_size=args["lru_size"],
        order_refresh_interval=0.0,  # no REST polling mid-run: nothing changes off-stream
        first_start_lookback=3600.0,
        baseline=False,  # an empty account whose session starts with the service
    )
    metrics = Metrics()
    metrics.duplicates_dropped = _CountingCounter(  # type: ignore[assignment]
        metrics.duplicates_dropped, probe)
    store_class = NoWriteStore if args.get("no_write") else TimedStore
    tracer: Tracer | None = None
    if args.get("trace_every"):
        tracer = Tracer(int(args["trace_every"]))
        tracer.install()
    gc_before = [g["collections"] for g in gc.get_stats()]
    state = SupervisorState()
    rest = NoNewsRest(args["account_id"])
    codes: list[int] = []
    timed_out = False

    async def supervise(sup: Supervisor) -> None:
        codes.append(await sup.run())

    async with (
        open_supervisor(
            settings, metrics=metrics, state=state,
            rest=rest,
            store_factory=lambda: store_class(pg_store(settings), probe, tracer),
            install_signal_handlers=False,
        ) as sup,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(supervise, sup)
        watcher = trio.CancelScope()
        if tracer is not None:
            nursery.start_soon(_watch, tracer, watcher)
        with trio.move_on_after(args["timeout"]) as scope:
            await probe.done.wait()
        timed_out = scope.cancelled_caught
        sup.request_drain("benchmark finished")
        watcher.cancel()
    if tracer is not None:
        tracer.uninstall()
    start = probe.first_receipt if probe.first_receipt is not None else probe.first_drop
    span = (probe.end - start) if probe.end and start else None
    frames = probe.expect_events + probe.expect_dups
    dropped = sum(probe.dups.values())
    gc_after = [g["collections"] for g in gc.get_stats()]
    return {
        "ok": not timed_out and codes == [0],
        "exit_code": codes[0] if codes else None,
        "timed_out": timed_out,
        "events": probe.applied,
        "frames": frames,
        "seconds": span,
        "events_per_s": probe.applied / span if span else None,
        "frames_per_s": frames / span if span else None,
        # Fresh updates and duplicates separately (in one run they share the span).
        "duplicates_per_s": dropped / span if span else None,
        "batches": probe.batches,
        "mean_batch": probe.batch_events / probe.batches if probe.batches else None,
        # Share of the run the writer spent in commit_batch: near 1, the database side
        # (one transaction at a time) is the bottleneck; well below, the event loop is.
        "writer_busy": probe.commit_seconds / span if span else None,
        "commit": latency_summary(probe.commit_times),  # per batch, in the writer
        "cpu_seconds": time.process_time(),
        "cpu_us_per_event": _per_event(probe.cpu_start, probe.cpu_end,
                                       probe.events_after_first_commit),
        "user_cpu_us_per_event": _per_event(probe.user_cpu_start, probe.user_cpu_end,
                                            probe.events_after_first_commit),
        "backend_cpu_us_per_event": _per_event(probe.backend_cpu_start, probe.backend_cpu_end,
                                               probe.events_after_first_commit),
        "duplicates": probe.dups,
        # Of those, dropped by their bytes without being decoded (dedupe.FrameMemo).
        "duplicates_undecoded": int(metrics.value(
            "stream_supervisor_duplicates_undecoded_total")),
        "latency": latency_summary(probe.latencies),
        "reconnects": int(metrics.value("stream_supervisor_reconnects_total")),
        "restarts": state.restarts,
        "rest_calls": rest.calls,
        "peak_rss_mb": peak_rss_mb(),
        "gc_collections": [a - b for a, b in zip(gc_after, gc_before, strict=True)],
        "trace": tracer.report() if tracer is not None else None,
    }


# --- naive: one transaction per event ----------------------------------------------------

_N_SEEN = "SELECT 1 FROM alpaca_event_dedupe WHERE event_key = %s"
_N_KEY = """INSERT INTO alpaca_event_dedupe (event_key, account_id, event_type, source)
VALUES (%s, %s, %s, %s)"""
_N_ORDER = """SELECT symbol, side, status, filled_qty, filled_avg_price, client_order_id, qty,
    order_type, asset_class, created_at, updated_at
FROM broker_orders WHERE alpaca_order_id = %s FOR UPDATE"""
_N_UPSERT_ORDER = """
INSERT INTO broker_orders (alpaca_order_id, account_id, client_order_id, symbol, side,
    order_type, asset_class, qty, filled_qty, filled_avg_price, status, created_at, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (alpaca_order_id) DO UPDATE SET
    client_order_id = EXCLUDED.client_order_id, order_type = EXCLUDED.order_type,
    asset_class = EXCLUDED.asset_class, qty = EXCLUDED.qty, filled_qty = EXCLUDED.filled_qty,
    filled_avg_price = EXCLUDED.filled_avg_price, status = EXCLUDED.status,
    created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, last_stored_at = now()
"""
_N_POSITION = """SELECT id, qty, side, avg_entry_price, alpaca_order_id, client_order_id,
    opened_at, realized_pnl, peak_qty
FROM active_positions WHERE account_id = %s AND symbol = %s AND status = 'open' FOR UPDATE"""
_N_UPDATE_POSITION = """UPDATE active_positions SET qty = %s, avg_entry_price = %s,
    realized_pnl = %s, peak_qty = %s, closed_at = %s,
    status = CASE WHEN %s::timestamptz IS NULL THEN 'open' ELSE 'closed' END, updated_at = now()
WHERE id = %s"""
_N_INSERT_POSITION = """INSERT INTO active_positions (account_id, symbol, side, qty,
    avg_entry_price, alpaca_order_id, client_order_id, status, realized_pnl, opened_at,
    peak_qty) VALUES (%s, %s, %s, %s, %s, %s, %s, 'open', %s, %s, %s)"""
_N_HISTORY = """INSERT INTO position_history (position_id, account_id, symbol, side, qty,
    peak_qty, avg_entry_price, realized_pnl, alpaca_order_id, client_order_id, opened_at,
    closed_at)
SELECT id, account_id, symbol, side, qty, peak_qty, avg_entry_price, realized_pnl,
    alpaca_order_id, client_order_id, opened_at, closed_at FROM active_positions WHERE id = %s"""


def naive_handle(conn: psycopg.Connection[Any], account_id: str, ev: Event) -> bool:
    """What a hand-written handler does per update: one transaction of single-row
    statements, one round trip each. The order and position arithmetic is the project's
    own pure code, so that the database state can be verified like the pipeline's."""
    try:
        if conn.execute(_N_SEEN, [ev.key]).fetchone() is not None:
            conn.rollback()
            return False
        conn.execute(_N_KEY, [ev.key, account_id, ev.event, ev.source])
        row = conn.execute(_N_ORDER, [ev.order_id]).fetchone()
        prev = None if row is None else OrderState(ev.order_id, *row)
        outcome = apply_order_event(prev, ev)
        o = outcome.state
        conn.execute(_N_UPSERT_ORDER, [
            o.order_id, account_id, o.client_order_id, o.symbol, o.side, o.order_type,
            o.asset_class, o.order_qty, o.filled_qty, o.filled_avg_price, o.status,
            o.created_at, o.updated_at])
        if outcome.delta is not None:
            row = conn.execute(_N_POSITION, [account_id, ev.symbol]).fetchone()
            current = None
            if row is not None:
                sign = 1 if row[2] == "long" else -1
                current = Position(account_id, ev.symbol, row[1] * sign, row[3], row[4], row[5],
                                   row[6], row[7], None, row[8] * sign, row[0])
            step = apply_fill(current, account_id, outcome.delta)
            for pos in (step.closed, step.open):
                if pos is None:
                    continue
                if pos.position_id is not None:
                    conn.execute(_N_UPDATE_POSITION, [
                        abs(pos.qty), pos.avg_entry_price, pos.realized_pnl, abs(pos.peak_qty),
                        pos.closed_at, pos.closed_at, pos.position_id])
                    if pos.closed_at is not None:
                        conn.execute(_N_HISTORY, [pos.position_id])
                else:
                    conn.execute(_N_INSERT_POSITION, [
                        account_id, pos.symbol, pos.side, abs(pos.qty), pos.avg_entry_price,
                        pos.opened_by_order_id, pos.opened_by_client_order_id,
                        pos.realized_pnl, pos.opened_at, abs(pos.peak_qty)])
        conn.commit()
        return True
    except BaseException:
        conn.rollback()
        raise


async def _handshake(ws: Any, args: dict[str, Any]) -> None:
    await ws.send_message(authenticate_message(args["key_id"], args["secret_key"]))
    reply = decode_frame(await ws.get_message())
    if not (isinstance(reply, Authorization) and reply.authorized):
        raise RuntimeError(f"not authorized: {reply!r}")
    await ws.send_message(listen_message())
    reply = decode_frame(await ws.get_message())
    if isinstance(reply, Listening):
        return
    raise RuntimeError(f"not listening: {reply!r}")


async def run_naive(args: dict[str, Any]) -> dict[str, Any]:
    """Sync psycopg called straight from the receive loop, as an SDK handler does: no
    thread hop, no batching, the generous version of what users write."""
    expect, account_id = args["expect_events"], args["account_id"]
    conn = psycopg.connect(args["database_url"])
    applied = 0
    first: float | None = None
    latencies: list[float] = []
    connector = websocket_connector(connect_timeout=10.0)
    with trio.move_on_after(args["timeout"]) as scope:
        async with connector(args["ws_url"]) as ws:
            await _handshake(ws, args)
            while applied < expect:
                message = await ws.get_message()
                now = trio.current_time()
                frame = decode_frame(message, received_at=now)
                if not isinstance(frame, Event):
                    continue
                first = now if first is None else first
                if naive_handle(conn, account_id, frame):
                    applied += 1
                    latencies.append(trio.current_time() - now)
            end = trio.current_time()
    conn.close()
    span = end - first if not scope.cancelled_caught and first is not None else None
    return {
        "ok": not scope.cancelled_caught,
        "timed_out": scope.cancelled_caught,
        "events": applied,
        "seconds": span,
        "events_per_s": applied / span if span else None,
        "latency": latency_summary(latencies),  # handling time only: no queueing counted
        "peak_rss_mb": peak_rss_mb(),
    }


# --- socket only: the transport ceiling ------------------------------------------------


async def run_socket_only(args: dict[str, Any]) -> dict[str, Any]:
    """Receive and decode through the supervisor's own transport and decoder, no DB:
    the connection actor's reader with nothing behind it."""
    expect = args["expect_events"]
    events = 0
    first: float | None = None
    connector = websocket_connector(connect_timeout=10.0)
    with trio.move_on_after(args["timeout"]) as scope:
        async with connector(args["ws_url"]) as ws:
            await _handshake(ws, args)
            while events < expect:
                # Reads as the connection actor does: a socket read's worth at a time.
                messages = await ws.get_messages()
                now = trio.current_time()
                first = now if first is None else first
                for message in messages:
                    if isinstance(decode_frame(message, received_at=now), Event):
                        events += 1
            end = trio.current_time()
    span = end - first if not scope.cancelled_caught and first is not None else None
    return {
        "ok": not scope.cancelled_caught,
        "timed_out": scope.cancelled_caught,
        "events": events,
        "seconds": span,
        "events_per_s": events / span if span else None,
        "peak_rss_mb": peak_rss_mb(),
    }


SCENARIOS = {"pipeline": run_pipeline, "naive": run_naive, "socket_only": run_socket_only}


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    # As in production: JSON lines at info (per-batch lines are debug), here on stderr.
    configure_logging(fmt="json", level=args.get("log_level", "info"), stream=sys.stderr)
    profile = args.get("profile")
    runner = partial(SCENARIOS[args["kind"]], args)
    if profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        result = trio.run(runner)
        profiler.stop()
        with open(profile, "w") as out:
            out.write(profiler.output_text(unicode=True, color=False, show_all=False))
    else:
        result = trio.run(runner)
    print(json.dumps(result, default=_json_default))
    return 0 if result.get("ok") else 1


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
