#!/usr/bin/env python3
"""Benchmark: what one small batch costs the writer, the batch a quiet stream makes.

At 1,000 updates/s a batch holds one or two updates, and the writer commits about 650
of them a second: every millisecond of a small batch's commit is queueing for the next
update (BENCHMARKS.md, "The tail"). This commits `--batches` batches of `--size` fills
(distinct orders over 50 symbols, one position touched per fill) through the real
`PgStore` into a fresh database per variant, the variants taking turns in rounds (A B,
B A, ...) so that a loaded machine weighs on both alike, and reports per batch: the
wall time of `commit_batch` and the PostgreSQL backend's CPU.

Variants (measurement only: each is set on the store's own session after it opened):
  custom   the service as it is: `plan_cache_mode = force_custom_plan` (every batch
           statement planned with its parameters, each time)
  auto     PostgreSQL's default: a generic plan is cached after five executions

    python benchmarks/small_batches.py                  # about half a minute
    python benchmarks/small_batches.py --size 1000 --batches 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio

from benchmarks import machine as load
from benchmarks.consumer import proc_cpu_seconds
from benchmarks.poison import ACCOUNT, fills
from stream_supervisor.embedded import create_database, drop_database, start_embedded_postgres
from stream_supervisor.logs import configure_logging
from stream_supervisor.migrate import apply_migrations
from stream_supervisor.pgstore import PgStore
from stream_supervisor.store import Batch

VARIANTS = {"custom": "force_custom_plan", "auto": "auto"}


async def open_store(url: str, mode: str) -> PgStore:
    store = PgStore(url)
    await store.open()
    assert await store.try_leadership(ACCOUNT)
    conn: Any = getattr(store, "_conn")  # noqa: B009 (measurement: the store's session)
    conn.execute(f"SET plan_cache_mode = {mode}")
    return store


async def measure(urls: dict[str, str], size: int, batches: int, rounds: int
                  ) -> dict[str, Any]:
    stores = {name: await open_store(urls[name], mode) for name, mode in VARIANTS.items()}
    walls: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpus: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for name, store in stores.items():  # warm: statements prepared, pages cached
            for i in range(50):
                await store.commit_batch(Batch(ACCOUNT, fills(size, f"warm{i}")))
        for r in range(rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                store = stores[name]
                conn: Any = getattr(store, "_conn")  # noqa: B009
                pid = conn.info.backend_pid
                work = [Batch(ACCOUNT, fills(size, f"r{r}-{i}-{name}"))
                        for i in range(batches)]
                cpu0 = proc_cpu_seconds(pid)
                for batch in work:
                    started = time.perf_counter()
                    await store.commit_batch(batch)
                    walls[name].append(time.perf_counter() - started)
                cpu1 = proc_cpu_seconds(pid)
                if cpu0 is not None and cpu1 is not None:
                    cpus[name].append((cpu1 - cpu0) / batches)
    finally:
        for store in stores.values():
            await store.aclose()

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {name: {"batches": len(walls[name]), "wall_p50_ms": ms(walls[name], 0.5),
                   "wall_p90_ms": ms(walls[name], 0.9), "wall_p99_ms": ms(walls[name], 0.99),
                   "backend_cpu_ms_per_batch_median_of_rounds":
                       round(statistics.median(cpus[name]) * 1000, 3) if cpus[name] else None}
            for name in VARIANTS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--database-url", help="a server where databases may be created "
                   "(default: an embedded PostgreSQL in a temporary directory)")
    p.add_argument("--size", type=int, default=1, help="updates per batch (default 1)")
    p.add_argument("--batches", type=int, default=500, help="batches per round (default 500)")
    p.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    configure_logging(fmt="json", level="warning", stream=sys.stderr)
    started_uptime = load.uptime()
    tmp = Path(tempfile.mkdtemp(prefix="stream-supervisor-small-"))
    embedded = None
    admin = args.database_url
    if not admin:
        embedded = start_embedded_postgres(tmp / "pgdata", delete_on_stop=True)
        admin = embedded.uri
    run_id = uuid.uuid4().hex[:8]
    names = {name: f"bench_small_{run_id}_{name}" for name in VARIANTS}
    try:
        urls = {name: create_database(admin, db) for name, db in names.items()}
        for url in urls.values():
            apply_migrations(url)
        result = trio.run(measure, urls, args.size, args.batches, args.rounds)
    finally:
        if embedded is None:  # an embedded server goes with its databases
            for db in names.values():
                drop_database(admin, db)
        if embedded is not None:
            embedded.stop()
    result["size"] = args.size
    result["uptime_start"] = started_uptime
    result["uptime_end"] = load.uptime()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
