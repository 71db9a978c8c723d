#!/usr/bin/env python3
"""Benchmark: the writer's database path alone, batches one after another against claim
ahead (docs/design.md, section 4, "Claim ahead").

The benchmark's stream (`benchmarks/workload.py`, decoded before anything is timed) is
committed in batches of `--size` through the real `PgStore`, each variant into a fresh
database of the same server, the variants taking turns in rounds (A B, B A, ...) so
that a loaded machine weighs on both alike:

  serial   `commit_batch` of each batch after the one before it, as with
           `STREAM_SUPERVISOR_CLAIM_AHEAD=off` (the claim inside the commit)
  ahead    what a busy writer does: each batch's keys claimed (`claim_ahead`) while the
           batch before it commits, then its `commit_batch` finishes the transaction

No event loop competes for the interpreter here, so this is the ceiling of the writer's
chain, not the pipeline's rate (`run.py`'s `pipeline` is that). Per variant: updates a
second (median of rounds), this process's CPU and its PostgreSQL backends' CPU per
update; for `ahead`, the wall time of a batch's claim and of the commit that finishes
it (they overlap). Every round's database is verified against the broker's ground
truth.

    python benchmarks/claim_ahead.py                    # about a minute
    python benchmarks/claim_ahead.py --updates 120000 --rounds 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio

from benchmarks import machine as load
from benchmarks.consumer import proc_cpu_seconds, store_backends
from benchmarks.run import Databases
from benchmarks.workload import generate
from stream_supervisor.embedded import start_embedded_postgres
from stream_supervisor.events import Event
from stream_supervisor.logs import configure_logging
from stream_supervisor.pgstore import PgStore
from stream_supervisor.protocol import decode_frame
from stream_supervisor.store import Batch
from stream_supervisor.testing.verify import verify_against_truth

VARIANTS = ("serial", "ahead")


async def commit_all(store: PgStore, batches: list[Batch], ahead: bool) -> dict[str, float]:
    """Commit every batch; with `ahead`, also the wall time the claims and the commits
    that finish them took, each summed (they overlap: the sum exceeds the run)."""
    spent = {"claim_s": 0.0, "finish_s": 0.0}
    if not ahead:
        for batch in batches:
            await store.commit_batch(batch)
        return spent

    async def timed(what: str, call: Any) -> None:
        started = time.perf_counter()
        await call
        spent[what] += time.perf_counter() - started

    await timed("claim_s", store.claim_ahead(batches[0]))
    for i, batch in enumerate(batches):
        async with trio.open_nursery() as nursery:
            if i + 1 < len(batches):
                nursery.start_soon(timed, "claim_s", store.claim_ahead(batches[i + 1]))
            await timed("finish_s", store.commit_batch(batch))
    return spent


async def one_round(url: str, account: str, batches: list[Batch], ahead: bool,
                    truth: dict[str, Any]) -> dict[str, Any]:
    store = PgStore(url)
    await store.open()
    assert await store.try_leadership(account)
    try:
        backends: dict[int, float] = {}

        def sample() -> None:
            for pid in store_backends(store):
                backends.setdefault(pid, proc_cpu_seconds(pid) or 0.0)

        sample()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        spent = await commit_all(store, batches, ahead)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        # Backends opened during the run (the claim-ahead ones) count from zero.
        backend_cpu = sum((proc_cpu_seconds(pid) or 0.0) - backends.get(pid, 0.0)
                          for pid in store_backends(store))
        mismatches = verify_against_truth(await store.snapshot(account), truth)
    finally:
        await store.aclose()
    updates = sum(len(b.events) for b in batches)
    return {"updates_per_s": updates / wall, "client_cpu_us": cpu / updates * 1e6,
            "backend_cpu_us": backend_cpu / updates * 1e6,
            "claim_ms_per_batch": spent["claim_s"] / len(batches) * 1e3,
            "finish_ms_per_batch": spent["finish_s"] / len(batches) * 1e3,
            "verified": not mismatches, "mismatches": [str(m) for m in mismatches[:5]]}


async def measure(admin: str, updates: int, size: int, rounds: int) -> dict[str, Any]:
    workload = generate(updates, seed=11, symbols=50, prefixes=[])
    events = [e for e in map(decode_frame, workload.frames) if isinstance(e, Event)]
    account = workload.account_id
    batches = [Batch(account, events[i:i + size]) for i in range(0, len(events), size)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    databases = Databases(admin)  # a migrated template, a fresh copy per round
    try:
        for r in range(rounds):
            for name in VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS)):
                url = databases.fresh(f"ahead_{r}_{name}")
                runs[name].append(await one_round(url, account, batches, name == "ahead",
                                                  workload.truth))
    finally:
        databases.drop_all()

    def median(name: str, key: str) -> float:
        return round(statistics.median(float(r[key]) for r in runs[name]), 1)

    result: dict[str, Any] = {
        name: {key: median(name, key)
               for key in ("updates_per_s", "client_cpu_us", "backend_cpu_us",
                           "claim_ms_per_batch", "finish_ms_per_batch")}
        for name in VARIANTS}
    result["ahead_vs_serial"] = round(
        statistics.median(a["updates_per_s"] / s["updates_per_s"]
                          for a, s in zip(runs["ahead"], runs["serial"], strict=True)), 2)
    result["verified"] = all(r["verified"] for rs in runs.values() for r in rs)
    result["rounds"] = runs
    result["updates"] = len(events)
    result["batch_size"] = size
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--database-url", help="a server where databases may be created "
                   "(default: an embedded PostgreSQL in a temporary directory)")
    p.add_argument("--updates", type=int, default=60_000, help="stream length (default 60,000)")
    p.add_argument("--size", type=int, default=1000, help="updates per batch (default 1000)")
    p.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    configure_logging(fmt="json", level="warning", stream=sys.stderr)
    started_uptime = load.uptime()
    embedded = None
    admin = args.database_url
    if not admin:
        tmp = Path(tempfile.mkdtemp(prefix="stream-supervisor-ahead-"))
        embedded = start_embedded_postgres(tmp / "pgdata", delete_on_stop=True)
        admin = embedded.uri
    try:
        result = trio.run(measure, admin, args.updates, args.size, args.rounds)
    finally:
        if embedded is not None:
            embedded.stop()
    result["uptime_start"] = started_uptime
    result["uptime_end"] = load.uptime()
    summary = {k: v for k, v in result.items() if k != "rounds"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
