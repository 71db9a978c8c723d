#!/usr/bin/env python3
"""Benchmarks: the pipeline against the per-event approach and the machine's limits.

In one run, on one PostgreSQL (embedded in a temporary directory unless
`--database-url` names a server where databases may be created) and one pre-generated
stream from the simulated broker served over a real loopback WebSocket, it measures:

  socket_only  receive and decode the frames, no database     (transport ceiling)
  pipeline     the real supervisor, first frame to last commit
  db_copy      COPY the rows the pipeline wrote into fresh tables (database ceiling)
  dup_heavy    the pipeline on the stream with every frame sent twice
  naive        one transaction of single-row statements per update (what users write)
  latency      the pipeline at fixed offered rates: frame receipt to commit, per event

Each consumer runs in a child process of its own (peak RSS is the supervisor's own),
each against a fresh database, and every database is verified against the simulated
broker's ground truth afterwards: a figure from a run that fails verification is void
and the exit code is 1.

    python benchmarks/run.py --quick                # under a minute
    python benchmarks/run.py --json results.json    # the default run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg
import trio

from benchmarks import machine as load
from benchmarks.server import FrameServer, Plan
from benchmarks.workload import KEY_ID, SECRET_KEY, Workload, generate, with_duplicates
from stream_supervisor.embedded import (
    create_database,
    drop_database,
    start_embedded_postgres,
)
from stream_supervisor.events import Event
from stream_supervisor.migrate import apply_migrations
from stream_supervisor.pgstore import PgStore
from stream_supervisor.protocol import decode_frame
from stream_supervisor.settings import DEFAULT_CHANNEL_SIZE, DEFAULT_LRU_SIZE, DEFAULT_MAX_BATCH
from stream_supervisor.testing.verify import Mismatch, verify_against_truth

#: Tables the pipeline writes, in an order COPY can load them.
COPY_TABLES = (
    "alpaca_event_dedupe",
    "broker_orders",
    "active_positions",
    "position_history",
    "stream_cursors",
)

TARGETS = {
    "speedup_vs_naive": (">=", 20.0),
    "fraction_of_limit": (">=", 0.5),
    "latency_p99_ms_at_1k": ("<=", 25.0),
    "latency_p99_ms_at_5k": ("<=", 50.0),
    "dup_heavy_vs_pipeline": (">=", 1.5),
    "peak_rss_mb": ("<=", 150.0),
}


@dataclass(frozen=True)
class Params:
    updates: int  # distinct updates in the stream (pipeline, socket_only, dup_heavy)
    naive_updates: int  # the naive handler replays this prefix of the same stream
    latency_seconds: float  # each fixed-rate run lasts this long
    rates: tuple[int, ...] = (1_000, 5_000)
    symbols: int = 50
    seed: int = 7
    max_batch: int = DEFAULT_MAX_BATCH  # the service's defaults, as users run it
    channel_size: int = DEFAULT_CHANNEL_SIZE
    lru_size: int = DEFAULT_LRU_SIZE
    dup_lag: int = 2_000  # a duplicate follows its original this many frames later
    timeout: float = 600.0  # per scenario
    reps: int = 3  # every scenario this many times; each figure is their median
    trace_every: int = 100  # pipeline_traced samples every n-th update (latency: all)


QUICK = Params(updates=15_000, naive_updates=1_500, latency_seconds=3.0, timeout=120.0,
               reps=1, trace_every=20)
DEFAULT = Params(updates=120_000, naive_updates=10_000, latency_seconds=10.0)


# --- the databases ------------------------------------------------------------------


class Databases:
    """A migrated template, and a fresh clone of it per scenario."""

    def __init__(self, admin_uri: str) -> None:
        self.admin_uri = admin_uri
        self.run_id = uuid.uuid4().hex[:8]
        self.template = f"bench_{self.run_id}_template"
        self.created: list[str] = []
        apply_migrations(self._create(self.template))

    def _create(self, name: str, template: str | None = None) -> str:
        uri = create_database(self.admin_uri, name, template=template)
        self.created.append(name)
        return uri

    def fresh(self, label: str) -> str:
        return self._create(f"bench_{self.run_id}_{len(self.created)}_{label}",
                            template=self.template)

    def drop_all(self) -> None:
        for name in reversed(self.created):
            drop_database(self.admin_uri, name)

    def describe(self) -> dict[str, Any]:
        with psycopg.connect(self.admin_uri, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            settings: dict[str, str] = dict(conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                [["fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
                  "wal_level", "max_wal_size"]]).fetchall())
        return {"server_version": version[0] if version else None, **settings}


# --- scenarios ------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    result: dict[str, Any]
    verified: bool
    mismatches: list[str]


class Bench:
    def __init__(self, params: Params, workload: Workload, dbs: Databases, server: FrameServer,
                 logs: Path, profile: Path | None) -> None:
        self.p = params
        self.w = workload
        self.dbs = dbs
        self.server = server
        self.logs = logs
        self.profile = profile
        # Distinct event keys per prefix length: what a correct consumer commits.
        keys = []
        for frame in workload.frames:
            decoded = decode_frame(frame)
            assert isinstance(decoded, Event), decoded
            keys.append(decoded.key)
        self._keys = keys
        self.outcomes: dict[str, Outcome] = {}
        self.root = ROOT  # the checkout consumers run (ab.py switches it)
        self.pipeline_db = ""
        self.postmaster = load.postmaster_pid(dbs.admin_uri)
        self.trace_latency = True  # ab.py turns it off: it measures the code, not its trace

    def distinct(self, length: int) -> int:
        return len(set(self._keys[:length]))

    async def consume(self, kind: str, label: str, frames: list[bytes], *, database_url: str,
                      expect_events: int, expect_dups: int = 0, rate: float | None = None,
                      profile: bool = False, root: Path | None = None,
                      no_write: bool = False, trace_every: int = 0) -> dict[str, Any]:
        """Serve `frames` to one consumer child. `root` is the checkout whose
        `stream_supervisor` (and `benchmarks.consumer`) the child runs: `ab.py` passes
        two, to measure a change before and after on the same workload."""
        plan = Plan.of(frames, rate)  # encoded before the child starts: not timed
        self.server.load(plan)
        args = {
            "kind": kind,
            "ws_url": self.server.url,
            "database_url": database_url,
            "account_id": self.w.account_id,
            "key_id": KEY_ID,
            "secret_key": SECRET_KEY,
            "expect_events": expect_events,
            "expect_dups": expect_dups,
            "max_batch": self.p.max_batch,
            "channel_size": self.p.channel_size,
            "lru_size": self.p.lru_size,
            "timeout": self.p.timeout,
            "no_write": no_write,
            "trace_every": trace_every,
        }
        command = [sys.executable, "-m", "benchmarks.consumer", json.dumps(args)]
        root = (root or self.root).resolve()
        if profile and self.profile is not None:
            spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
            if spy:
                # Every thread (the event loop and the psycopg worker), raw collapsed
                # stacks: `python -m benchmarks.profile_summary` reads them.
                out = self.profile / f"{label}.py-spy.txt"
                command = [spy, "record", "--rate", "250", "--format", "raw", "--gil",
                           "--output", str(out), "--", *command]
            else:
                args["profile"] = str(self.profile / f"{label}.pyinstrument.txt")
                command[-1] = json.dumps(args)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(root), *filter(None, [env.get("PYTHONPATH")])])
        meter = load.CpuMeter(self.postmaster)
        pg_before = await trio.to_thread.run_sync(load.pg_activity, self.dbs.admin_uri)
        meter.start()
        with trio.fail_after(self.p.timeout + 60):
            proc = await trio.run_process(
                command,
                cwd=str(root), env=env, capture_stdout=True, capture_stderr=True, check=False)
        cpu = meter.stop()
        pg_after = await trio.to_thread.run_sync(load.pg_activity, self.dbs.admin_uri)
        (self.logs / f"{label}.log").write_bytes(proc.stderr)
        # The result is the last JSON line: py-spy, when it wraps the child, prints its
        # own lines to the same stdout after it.
        lines = [line for line in proc.stdout.decode().strip().splitlines()
                 if line.startswith("{")]
        try:
            result: dict[str, Any] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = proc.stderr.decode(errors="replace")[-2000:]
            raise RuntimeError(f"{label}: consumer failed (exit {proc.returncode}):\n{tail}")
        result["cpu"] = cpu
        result["pg"] = load.pg_delta(pg_before, pg_after, result.get("batches"))
        report = self.server.report
        result["server"] = {
            "connections": report.connections,
            "frames_sent": report.frames_sent,
            "offered_rate": report.offered_rate,
            "finished": report.finished,
        }
        if report.connections != 1:
            result["ok"] = False
            result["error"] = f"{report.connections} connections (expected exactly 1)"
        return result

    async def verify(self, database_url: str, truth: dict[str, Any], expect_keys: int,
                     *, cursor: bool = True) -> list[Mismatch]:
        store = PgStore(database_url)
        await store.open()
        try:
            snapshot = await store.snapshot(self.w.account_id)
        finally:
            await store.aclose()
        found = verify_against_truth(snapshot, truth)
        if not cursor:
            # The per-event handler keeps no resume cursor: users' handlers have none.
            found = [m for m in found if m.invariant != "cursor"]
        if len(snapshot.event_keys) != expect_keys:
            found.append(Mismatch("dedupe_rows", "account", f"{expect_keys} rows",
                                  f"{len(snapshot.event_keys)} rows"))
        if snapshot.dead_letters:
            found.append(Mismatch("dead_letters", "account", "none",
                                  str(len(snapshot.dead_letters))))
        return found

    def record(self, name: str, result: dict[str, Any], mismatches: list[Mismatch]) -> Outcome:
        ok = bool(result.get("ok")) and not mismatches
        outcome = Outcome(name, result, ok, [str(m) for m in mismatches[:10]])
        self.outcomes[name] = outcome
        rate = result.get("events_per_s") or result.get("rows_per_s")
        status = "verified" if ok else f"FAILED ({len(mismatches)} mismatches)"
        print(f"  {name:<14} {_fmt(rate):>10}/s  {status}", file=sys.stderr, flush=True)
        for m in outcome.mismatches[:5]:
            print(f"      {m}", file=sys.stderr)
        return outcome

    # -- the scenarios -------------------------------------------------------------------

    async def socket_only(self) -> Outcome:
        frames = self.w.frames
        # Nothing is written, so the check is the count: every update arrived, decoded.
        result = await self.consume("socket_only", "socket_only", frames,
                                    database_url="", expect_events=len(frames))
        bad = [] if result.get("events") == len(frames) else [
            Mismatch("frames", "socket", str(len(frames)), str(result.get("events")))]
        return self.record("socket_only", result, bad)

    async def pipeline_no_db(self) -> Outcome:
        """Diagnostic: the supervisor with commits that write nothing (its Python ceiling).
        Nothing reaches the database, so the check is that every update was committed."""
        frames = self.w.frames
        db = self.dbs.fresh("no_db")
        expect = self.distinct(len(frames))
        result = await self.consume("pipeline", "pipeline_no_db", frames, database_url=db,
                                    expect_events=expect, no_write=True, profile=True)
        bad = [] if result.get("events") == expect else [
            Mismatch("events", "committed", str(expect), str(result.get("events")))]
        return self.record("pipeline_no_db", result, bad)

    async def pipeline(self) -> Outcome:
        frames = self.w.frames
        db = self.dbs.fresh("pipeline")
        expect = self.distinct(len(frames))
        result = await self.consume("pipeline", "pipeline", frames, database_url=db,
                                    expect_events=expect, profile=True)
        self.pipeline_db = db
        return self.record("pipeline", result, await self.verify(db, self.w.truth, expect))

    async def pipeline_traced(self) -> Outcome:
        """Diagnostic, once per run: the pipeline with per-phase timestamps for every
        `trace_every`-th update and every batch (benchmarks/trace.py); its throughput is
        not a headline figure (the probes cost about a microsecond an update)."""
        frames = self.w.frames
        db = self.dbs.fresh("traced")
        expect = self.distinct(len(frames))
        result = await self.consume("pipeline", "pipeline_traced", frames, database_url=db,
                                    expect_events=expect, trace_every=self.p.trace_every)
        return self.record("pipeline_traced", result, await self.verify(db, self.w.truth, expect))

    async def dup_only(self) -> Outcome:
        """Only duplicates the LRU knows: the newest `lru_size` frames of the stream again,
        into the pipeline's database (which holds them all; the supervisor warms its LRU
        from it at start). What a duplicate costs, against `socket_only` (decode only)."""
        source = self.pipeline_db
        if not source:
            raise RuntimeError("dup_only reads the pipeline scenario's database: "
                               "run `pipeline` first (ab.py: --scenarios pipeline,dup_only)")
        n = min(len(self.w.frames), self.p.lru_size)
        frames = self.w.frames[len(self.w.frames) - n:]
        keys = self.distinct(len(self.w.frames))
        result = await self.consume("pipeline", "dup_only", frames, database_url=source,
                                    expect_events=0, expect_dups=n)
        bad = [] if result.get("duplicates", {}).get("lru") == n and not result.get("events") \
            else [Mismatch("duplicates", "lru", str(n), str(result.get("duplicates")))]
        bad += await self.verify(source, self.w.truth, keys)
        return self.record("dup_only", result, bad)

    async def db_copy(self) -> Outcome:
        source = self.pipeline_db
        target = self.dbs.fresh("db_copy")
        result = await trio.to_thread.run_sync(copy_tables, source, target)
        result["events_per_s"] = self.distinct(len(self.w.frames)) / result["seconds"]
        mismatches = await self.verify(target, self.w.truth, self.distinct(len(self.w.frames)))
        return self.record("db_copy", result, mismatches)

    async def dup_heavy(self) -> Outcome:
        frames = with_duplicates(self.w.frames, self.p.dup_lag)
        expect = self.distinct(len(self.w.frames))
        db = self.dbs.fresh("dup_heavy")
        result = await self.consume("pipeline", "dup_heavy", frames, database_url=db,
                                    expect_events=expect, expect_dups=len(frames) - expect,
                                    profile=True)
        return self.record("dup_heavy", result, await self.verify(db, self.w.truth, expect))

    async def naive(self) -> Outcome:
        length, truth = self.w.prefix(self.p.naive_updates)
        db = self.dbs.fresh("naive")
        expect = self.distinct(length)
        result = await self.consume("naive", "naive", self.w.frames[:length], database_url=db,
                                    expect_events=expect)
        return self.record("naive", result, await self.verify(db, truth, expect, cursor=False))

    async def latency(self, rate: int) -> Outcome:
        length, truth = self.w.prefix(int(rate * self.p.latency_seconds))
        name = f"latency_{rate // 1000}k" if rate % 1000 == 0 else f"latency_{rate}"
        db = self.dbs.fresh(name)
        expect = self.distinct(length)
        result = await self.consume("pipeline", name, self.w.frames[:length], database_url=db,
                                    expect_events=expect, rate=float(rate), profile=False,
                                    trace_every=1 if self.trace_latency else 0)
        result["offered_rate"] = rate
        return self.record(name, result, await self.verify(db, truth, expect))


def copy_tables(source: str, target: str) -> dict[str, Any]:
    """COPY (binary) every row the pipeline wrote into the same, empty tables of another
    database, in one transaction: the rate PostgreSQL absorbs this data with no per-row
    client work at all. The rows are read out first; only the load and commit are timed."""
    data: dict[str, bytes] = {}
    rows: dict[str, int] = {}
    with psycopg.connect(source, autocommit=True) as src:
        for table in COPY_TABLES:
            buf = bytearray()
            with src.cursor().copy(f"COPY {table} TO STDOUT (FORMAT binary)") as copy:
                for block in copy:
                    buf += block
            data[table] = bytes(buf)
            count = src.execute(f"SELECT count(*) FROM {table}").fetchone()
            rows[table] = int(count[0]) if count else 0
    with psycopg.connect(target, autocommit=True) as dst:
        started = time.perf_counter()
        with dst.transaction(), dst.cursor() as cur:
            for table in COPY_TABLES:
                with cur.copy(f"COPY {table} FROM STDIN (FORMAT binary)") as copy:
                    copy.write(data[table])
        seconds = time.perf_counter() - started
        # The identity sequence must follow the copied ids, or later inserts would clash.
        dst.execute("SELECT setval(pg_get_serial_sequence('active_positions', 'id'), "
                    "coalesce(max(id), 1)) FROM active_positions")
    total = sum(rows.values())
    return {"ok": True, "rows": rows, "total_rows": total, "seconds": seconds,
            "rows_per_s": total / seconds, "bytes": sum(len(b) for b in data.values())}


# --- summary --------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def summarize(bench: Bench, params: Params) -> dict[str, Any]:
    """One repetition's figures (ratios from the same repetition's scenarios)."""
    o = {name: out.result for name, out in bench.outcomes.items()}

    def get(name: str, *path: str) -> Any:
        value: Any = o.get(name)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    pipeline = get("pipeline", "events_per_s")
    naive = get("naive", "events_per_s")
    socket = get("socket_only", "events_per_s")
    db_events = get("db_copy", "events_per_s")
    ceilings = [c for c in (socket, db_events) if c]
    summary: dict[str, Any] = {
        "pipeline_events_per_s": pipeline,
        "naive_events_per_s": naive,
        "speedup_vs_naive": pipeline / naive if pipeline and naive else None,
        "socket_only_events_per_s": socket,
        "pipeline_no_db_events_per_s": get("pipeline_no_db", "events_per_s"),
        "db_copy_rows_per_s": get("db_copy", "rows_per_s"),
        "db_copy_events_per_s": db_events,
        "fraction_of_limit": pipeline / min(ceilings) if pipeline and ceilings else None,
        "dup_heavy_frames_per_s": get("dup_heavy", "frames_per_s"),
        "dup_heavy_fresh_per_s": get("dup_heavy", "events_per_s"),
        "dup_heavy_duplicates_per_s": get("dup_heavy", "duplicates_per_s"),
        "dup_only_duplicates_per_s": get("dup_only", "duplicates_per_s"),
        "latency_p50_ms_at_1k": get("latency_1k", "latency", "p50_ms"),
        "latency_p99_ms_at_1k": get("latency_1k", "latency", "p99_ms"),
        "latency_max_ms_at_1k": get("latency_1k", "latency", "max_ms"),
        "latency_p50_ms_at_5k": get("latency_5k", "latency", "p50_ms"),
        "latency_p99_ms_at_5k": get("latency_5k", "latency", "p99_ms"),
        "latency_max_ms_at_5k": get("latency_5k", "latency", "max_ms"),
        "peak_rss_mb": get("pipeline", "peak_rss_mb"),
    }
    dup = summary["dup_heavy_frames_per_s"]
    summary["dup_heavy_vs_pipeline"] = dup / pipeline if dup and pipeline else None
    only = summary["dup_only_duplicates_per_s"]
    # 1.0: a duplicate costs what decoding it costs, nothing more.
    summary["dup_only_vs_socket_only"] = only / socket if only and socket else None
    # Other people's work on the machine while this repetition's scenarios ran.
    others = [r["cpu"]["others_cores"] for r in o.values()
              if isinstance(r.get("cpu"), dict) and r["cpu"].get("others_cores") is not None]
    summary["others_cores_max"] = max(others) if others else None
    steal = [r["cpu"]["steal_cores"] for r in o.values()
             if isinstance(r.get("cpu"), dict) and r["cpu"].get("steal_cores") is not None]
    summary["steal_cores_max"] = max(steal) if steal else None
    summary.update(cpu_bounds(get("pipeline", "cpu_us_per_event"),
                              get("pipeline", "user_cpu_us_per_event"),
                              get("pipeline", "backend_cpu_us_per_event"),
                              min(ceilings) if ceilings else None, os.cpu_count() or 1))
    return summary


def cpu_bounds(supervisor_us: float | None, user_us: float | None, backend_us: float | None,
               limit: float | None, cpus: int) -> dict[str, float | None]:
    """How far the pipeline's own CPU cost per update lets the fraction of the limit go,
    however well the work were spread over time. Two bounds, each an upper one:

    - one interpreter: the supervisor's user CPU nearly all runs holding the interpreter
      lock (Python, and the C extensions it calls), so at most one core's worth of it
      per second: 10**6 / user_us updates a second;
    - the machine: the supervisor and its PostgreSQL backend together (the simulated
      broker, which sends pre-encoded frames, left out) on every core at once:
      cpus * 10**6 / (supervisor_us + backend_us).

    Each is given as a fraction of the same limit as `fraction_of_limit`: a target above
    a bound cannot be met without cutting the CPU an update costs."""
    def fraction(rate: float | None) -> float | None:
        return rate / limit if rate and limit else None

    one = 1e6 / user_us if user_us else None
    both = (cpus * 1e6 / (supervisor_us + backend_us)
            if supervisor_us and backend_us else None)
    return {
        "pipeline_cpu_us_per_event": supervisor_us,
        "pipeline_user_cpu_us_per_event": user_us,
        "pipeline_backend_cpu_us_per_event": backend_us,
        "fraction_one_interpreter_allows": fraction(one),
        "fraction_the_cores_allow": fraction(both),
    }


FIGURE_KEYS = (
    "pipeline_events_per_s", "naive_events_per_s", "speedup_vs_naive",
    "socket_only_events_per_s", "pipeline_no_db_events_per_s", "db_copy_rows_per_s",
    "db_copy_events_per_s", "fraction_of_limit", "dup_heavy_frames_per_s",
    "dup_heavy_fresh_per_s", "dup_heavy_duplicates_per_s", "dup_heavy_vs_pipeline",
    "dup_only_duplicates_per_s", "dup_only_vs_socket_only",
    "latency_p50_ms_at_1k", "latency_p99_ms_at_1k", "latency_max_ms_at_1k",
    "latency_p50_ms_at_5k", "latency_p99_ms_at_5k", "latency_max_ms_at_5k", "peak_rss_mb",
    "others_cores_max", "steal_cores_max", "host_loop_ms", "pipeline_cpu_us_per_event",
    "pipeline_user_cpu_us_per_event", "pipeline_backend_cpu_us_per_event",
    "fraction_one_interpreter_allows", "fraction_the_cores_allow",
)


def combine(reps: list[tuple[Bench, dict[str, Any], dict[str, Any]]], params: Params,
            machine: dict[str, Any]) -> dict[str, Any]:
    """Every figure as the median of its repetitions, with the spread (min, max)."""
    figures = [fig for _bench, fig, _load in reps]
    summary: dict[str, Any] = {}
    spread: dict[str, list[float] | None] = {}
    for key in FIGURE_KEYS:
        values = [f[key] for f in figures if f.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
        spread[key] = [min(values), max(values)] if values else None
    summary["spread"] = spread
    summary["reps"] = len(reps)
    outcomes = [(i + 1, name, out) for i, (bench, _f, _l) in enumerate(reps)
                for name, out in bench.outcomes.items()]
    summary["verified"] = all(out.verified for _i, _n, out in outcomes)
    summary["verification"] = {}
    for i, name, out in outcomes:
        label = name if len(reps) == 1 else f"{name}#{i}"
        summary["verification"][label] = {"verified": out.verified,
                                          "mismatches": out.mismatches}
    # The scenarios' details: the repetition whose pipeline figure is the median one.
    ranked = sorted(range(len(reps)),
                    key=lambda i: figures[i].get("pipeline_events_per_s") or 0.0)
    middle = reps[ranked[len(ranked) // 2]][0]
    o = {name: out.result for name, out in middle.outcomes.items()}
    for bench, _f, _l in reps:  # the diagnostics that run once, in the first repetition
        for name, out in bench.outcomes.items():
            o.setdefault(name, out.result)
    summary["parameters"] = {
        **asdict(params),
        "stream_updates": len(middle.w.frames),
        "stream_fills": middle.w.fills,
        "stream_events": middle.w.event_counts,
        "naive_updates_replayed": (o.get("naive") or {}).get("events"),
        "dup_heavy_frames": (o.get("dup_heavy") or {}).get("frames"),
    }
    summary["machine"] = machine
    summary["repetitions"] = [{"figures": fig, "load": ld} for _b, fig, ld in reps]
    summary["scenarios"] = o
    summary["scenarios_of_every_repetition"] = [
        {name: out.result for name, out in bench.outcomes.items()} for bench, _f, _l in reps]
    return summary


def markdown(s: dict[str, Any]) -> str:
    def target(key: str) -> str:
        if key not in TARGETS:
            return ""
        op, bound = TARGETS[key]
        value = s.get(key)
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        return f"{op} {bound:g} ({'met' if met else 'MISSED'})"

    rows = [
        ("pipeline", "events/s", "pipeline_events_per_s", 0, ""),
        ("naive (1 txn per event)", "events/s", "naive_events_per_s", 0, ""),
        ("speedup vs naive", "x", "speedup_vs_naive", 1, "speedup_vs_naive"),
        ("socket_only (transport ceiling)", "events/s", "socket_only_events_per_s", 0, ""),
        ("pipeline, commits writing nothing", "events/s", "pipeline_no_db_events_per_s", 0, ""),
        ("db_copy (database ceiling)", "rows/s", "db_copy_rows_per_s", 0, ""),
        ("db_copy, per event of the stream", "events/s", "db_copy_events_per_s", 0, ""),
        ("fraction of limit", "", "fraction_of_limit", 2, "fraction_of_limit"),
        ("pipeline: supervisor CPU per update", "us", "pipeline_cpu_us_per_event", 1, ""),
        ("pipeline: of which user CPU", "us", "pipeline_user_cpu_us_per_event", 1, ""),
        ("pipeline: PostgreSQL backend CPU per update", "us",
         "pipeline_backend_cpu_us_per_event", 1, ""),
        ("fraction one interpreter allows at that cost", "", "fraction_one_interpreter_allows",
         2, ""),
        ("fraction the machine's cores allow at that cost", "", "fraction_the_cores_allow", 2,
         ""),
        ("dup_heavy (half duplicates)", "frames/s", "dup_heavy_frames_per_s", 0, ""),
        ("dup_heavy: fresh updates", "events/s", "dup_heavy_fresh_per_s", 0, ""),
        ("dup_heavy: duplicates", "frames/s", "dup_heavy_duplicates_per_s", 0, ""),
        ("dup_heavy / pipeline", "x", "dup_heavy_vs_pipeline", 2, "dup_heavy_vs_pipeline"),
        ("dup_only (LRU duplicates only)", "frames/s", "dup_only_duplicates_per_s", 0, ""),
        ("dup_only / socket_only", "x", "dup_only_vs_socket_only", 2, ""),
        ("latency p50 @ 1,000/s", "ms", "latency_p50_ms_at_1k", 1, ""),
        ("latency p99 @ 1,000/s", "ms", "latency_p99_ms_at_1k", 1, "latency_p99_ms_at_1k"),
        ("latency max @ 1,000/s", "ms", "latency_max_ms_at_1k", 1, ""),
        ("latency p50 @ 5,000/s", "ms", "latency_p50_ms_at_5k", 1, ""),
        ("latency p99 @ 5,000/s", "ms", "latency_p99_ms_at_5k", 1, "latency_p99_ms_at_5k"),
        ("latency max @ 5,000/s", "ms", "latency_max_ms_at_5k", 1, ""),
        ("peak RSS of the supervisor", "MB", "peak_rss_mb", 1, "peak_rss_mb"),
        ("others' work during a scenario (max)", "cores", "others_cores_max", 2, ""),
        ("of which the hypervisor's steal (max)", "cores", "steal_cores_max", 2, ""),
        ("host speed: a fixed Python loop (lower is faster)", "ms", "host_loop_ms", 1, ""),
    ]
    m, p = s["machine"], s["parameters"]
    lines = []
    if m.get("busy"):
        lines += [(f"**MACHINE BUSY: {m['busy_reason']}. Other work competed for the CPUs; "
                   "these figures are not a verdict on any target.**"), ""]
    n = s["reps"]
    lines += [f"| figure | median of {n} | min - max | unit | target |",
              "|---|---:|---:|---|---|"]
    for label, unit, key, digits, tkey in rows:
        value = s.get(key)
        rng = s["spread"].get(key)
        shown = _fmt(float(value), digits) if value is not None else "n/a"
        spread = (f"{_fmt(float(rng[0]), digits)} - {_fmt(float(rng[1]), digits)}"
                  if rng else "")
        lines.append(f"| {label} | {shown} | {spread} | {unit} | "
                     f"{target(tkey) if tkey else ''} |")
    lines.append("")
    lines.append(
        f"{p['stream_updates']:,} updates ({p['stream_fills']:,} fills) across "
        f"{p['symbols']} symbols; naive replayed {p['naive_updates_replayed']} of them; "
        f"max_batch {p['max_batch']}, channel_size {p['channel_size']}, lru_size "
        f"{p['lru_size']:,}. {m['cpus']} CPUs ({m['cpu_model']}), PostgreSQL "
        f"{m['postgres']['server_version']} (fsync {m['postgres'].get('fsync')}, "
        f"synchronous_commit {m['postgres'].get('synchronous_commit')}). "
        + ("Every database verified against the ground truth." if s["verified"]
           else "VERIFICATION FAILED: the figures above are void."))
    lines.append("")
    lines.append(f"`uptime` at start: {m['uptime_start']}")
    for i, rep in enumerate(s["repetitions"], 1):
        lines.append(f"`uptime` before repetition {i}: {rep['load']['uptime']}"
                     + (f" (host loop {rep['load']['host_loop_ms']} ms)"
                        if rep["load"].get("host_loop_ms") is not None else ""))
    lines.append(f"`uptime` at end: {m['uptime_end']}")
    tail = tail_markdown(s["scenarios"])
    if tail:
        lines += ["", tail]
    return "\n".join(lines)


def tail_markdown(scenarios: dict[str, Any]) -> str:
    """Where the time of a traced scenario went: per phase and per batch part."""
    lines = []
    for name in ("latency_1k", "latency_5k", "pipeline_traced"):
        r = scenarios.get(name) or {}
        t = r.get("trace")
        if not t:
            continue
        lines.append(f"#### {name}: {t['sampled_updates']:,} updates traced, "
                     f"{t['batches']:,} batches")
        lines.append("")
        lines.append("| phase | p50 ms | p99 ms | max ms |")
        lines.append("|---|---:|---:|---:|")
        for phase, v in [*t["phases"].items(), ("total", t["total"]),
                         *(("batch: " + k, v) for k, v in t["batch_parts"].items())]:
            if v.get("n"):
                lines.append(f"| {phase} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |")
        tail, g, st = t["tail"], t["gc"], t["loop_stalls"]
        pg = r.get("pg") or {}
        cpu = r.get("cpu") or {}
        lines.append("")
        lines.append(
            f"Slowest 1% ({tail.get('updates')} updates, >= {tail.get('threshold_ms')} ms): "
            f"dominant phase {tail.get('dominant_phase')}; {tail.get('overlapped_gc_pause')} "
            f"overlapped a GC pause >= 0.5 ms, {tail.get('overlapped_loop_stall')} an event-loop "
            f"stall > 3 ms; own batch {tail.get('own_batch_size_median')} updates (median "
            f"batch {tail.get('all_batches_size_median')}), behind a batch of "
            f"{tail.get('previous_batch_size_median')} taking "
            f"{tail.get('previous_batch_ms_median')} ms; own rt2 {tail.get('own_rt2_ms_median')}"
            f" ms, back hop {tail.get('own_back_hop_ms_median')} ms. GC: collections "
            f"{g['collections']}, seconds {g['seconds']}, longest {g['longest_ms']} ms. "
            f"Loop stalls: {st['count']} (longest {st['longest_ms']} ms). Server: "
            f"{pg.get('checkpoints')} checkpoints, {pg.get('wal_sync')} WAL flushes "
            f"(mean {pg.get('wal_sync_ms_mean')} ms). Others' work: "
            f"{cpu.get('others_cores')} cores.")
        lines.append("")
    return "\n".join(lines)


def machine_info(admin: Databases) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "postgres": admin.describe(),
    }


# --- main -----------------------------------------------------------------------------


SCENARIOS = ("socket_only", "pipeline_no_db", "pipeline", "db_copy", "dup_only", "dup_heavy",
             "naive", "latency", "pipeline_traced")


async def run_once(bench: Bench, params: Params, only: set[str], first: bool) -> None:
    if "socket_only" in only:
        await bench.socket_only()
    if "pipeline_no_db" in only:
        await bench.pipeline_no_db()
    if only & {"pipeline", "db_copy", "dup_only"}:
        await bench.pipeline()
        if "db_copy" in only:
            await bench.db_copy()
        if "dup_only" in only:
            await bench.dup_only()
    if "dup_heavy" in only:
        await bench.dup_heavy()
    if "naive" in only:
        await bench.naive()
    if "latency" in only:
        for rate in params.rates:
            await bench.latency(rate)
    if "pipeline_traced" in only and first:
        await bench.pipeline_traced()


async def run(params: Params, admin_uri: str, only: set[str], profile: Path | None,
              logs: Path, keep: bool, machine: dict[str, Any],
              wal_timing: bool = False) -> dict[str, Any]:
    print("benchmark: generating the stream ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    prefixes = [params.naive_updates, *(int(r * params.latency_seconds) for r in params.rates)]
    workload = await trio.to_thread.run_sync(partial(
        generate, params.updates, seed=params.seed, symbols=params.symbols, prefixes=prefixes))
    print(f"benchmark: {len(workload.frames):,} updates, {workload.fills:,} fills "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    dbs = await trio.to_thread.run_sync(Databases, admin_uri)
    machine.update(machine_info(dbs))
    # Only on the server this run started: never change a given server's configuration.
    machine["wal_io_timing"] = wal_timing and await trio.to_thread.run_sync(
        load.enable_wal_timing, admin_uri)
    server = FrameServer()
    reps: list[tuple[Bench, dict[str, Any], dict[str, Any]]] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            for i in range(params.reps):
                before = {"uptime": load.uptime(),
                          "loadavg": [round(x, 2) for x in os.getloadavg()],
                          "host_loop_ms": await trio.to_thread.run_sync(load.host_loop_ms)}
                print(f"benchmark: repetition {i + 1} of {params.reps} ({before['uptime']}; "
                      f"host loop {before['host_loop_ms']} ms)", file=sys.stderr, flush=True)
                bench = Bench(params, workload, dbs, server, logs,
                              profile if i == 0 else None)
                await run_once(bench, params, only, i == 0)
                figures = summarize(bench, params)
                figures["host_loop_ms"] = before["host_loop_ms"]
                reps.append((bench, figures, before))
            nursery.cancel_scope.cancel()
    finally:
        if not keep:
            await trio.to_thread.run_sync(dbs.drop_all)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["uptime_end"] = load.uptime()
    return combine(reps, params, machine)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small run, under a minute")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--database-url", default=None,
                    help="a server where databases may be created (default: embedded)")
    ap.add_argument("--updates", type=int, help="distinct updates in the stream")
    ap.add_argument("--naive-updates", type=int, help="updates the naive handler replays")
    ap.add_argument("--latency-seconds", type=float, help="length of each fixed-rate run")
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--channel-size", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--reps", type=int,
                    help="repetitions of every scenario (default 3; --quick 1)")
    ap.add_argument("--max-load", type=float, default=load.MAX_LOAD_PER_CPU,
                    help="refuse to run when the 1-minute load average per CPU is above "
                         "this (default %(default)s)")
    ap.add_argument("--busy-ok", action="store_true",
                    help="run on a busy machine anyway; the report says so at its top")
    ap.add_argument("--only", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--profile", type=Path,
                    help="write a pyinstrument profile of the pipeline child here (a dir)")
    ap.add_argument("--logs", type=Path, help="keep each consumer's log lines in this dir")
    ap.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    args = ap.parse_args(argv)

    params = QUICK if args.quick else DEFAULT
    overrides = {k: v for k, v in {
        "updates": args.updates, "naive_updates": args.naive_updates,
        "latency_seconds": args.latency_seconds, "max_batch": args.max_batch,
        "channel_size": args.channel_size, "seed": args.seed, "reps": args.reps}.items()
        if v is not None}
    params = replace(params, **overrides)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    # The load-average guard: a figure from a busy machine measures the other work too.
    busy, why = load.busy_at_start(args.max_load)
    machine: dict[str, Any] = {"busy": busy, "busy_reason": why, "uptime_start": load.uptime()}
    print(f"benchmark: {machine['uptime_start']}", file=sys.stderr)
    if busy and not (args.busy_ok or args.quick):
        print(f"benchmark: refusing to run: {why}. Wait for an idle machine, or pass "
              "--busy-ok to run anyway (the report then says the machine was busy).",
              file=sys.stderr)
        return 3
    if busy:
        print(f"benchmark: MACHINE BUSY ({why}): running anyway, and the report says so",
              file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="stream-supervisor-bench-"))
    logs = args.logs or tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    embedded = None
    try:
        admin_uri = args.database_url
        if not admin_uri:
            print(f"benchmark: starting embedded PostgreSQL in {tmp}", file=sys.stderr)
            embedded = start_embedded_postgres(tmp / "pgdata", delete_on_stop=True)
            admin_uri = embedded.uri
        summary = trio.run(run, params, admin_uri, only, args.profile, logs, args.keep, machine,
                           embedded is not None)
    finally:
        if embedded is not None:
            embedded.stop()
        if args.logs is None:
            shutil.rmtree(tmp, ignore_errors=True)
    summary["parameters"]["quick"] = args.quick
    summary["parameters"]["database"] = "given" if args.database_url else "embedded"
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
