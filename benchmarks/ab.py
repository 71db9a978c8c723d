#!/usr/bin/env python3
"""Before/after: the same scenarios on the same workload and database server, with the
consumer children running two checkouts in turn (A B B A ...), so that a change is
measured against its baseline under the same, however noisy, machine load.

    python benchmarks/ab.py --a /path/to/baseline --b /path/to/patched --rounds 3 \\
        --scenarios pipeline,socket_only,dup_heavy,latency_1k,latency_5k

Each checkout needs `stream_supervisor/` and `benchmarks/` (a copy of the repository).
Every run is verified against the ground truth, as in `run.py`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio

from benchmarks import machine as load
from benchmarks.run import DEFAULT, QUICK, Bench, Databases, Outcome, Params
from benchmarks.server import FrameServer
from benchmarks.workload import generate
from stream_supervisor.embedded import start_embedded_postgres

#: scenario -> (figure, path into the consumer's result, higher is better)
FIGURES: dict[str, list[tuple[str, tuple[str, ...], bool]]] = {
    "pipeline": [("events/s", ("events_per_s",), True),
                 ("CPU us/event", ("cpu_us_per_event",), False),
                 ("PG backend CPU us/event", ("backend_cpu_us_per_event",), False),
                 ("mean batch", ("mean_batch",), True),
                 ("commit p50 ms", ("commit", "p50_ms"), False),
                 ("peak RSS MB", ("peak_rss_mb",), False)],
    "socket_only": [("events/s", ("events_per_s",), True)],
    "pipeline_no_db": [("events/s", ("events_per_s",), True),
                       ("CPU us/event", ("cpu_us_per_event",), False)],
    "dup_only": [("duplicates/s", ("duplicates_per_s",), True),
                 ("CPU s of the child", ("cpu_seconds",), False)],
    "dup_heavy": [("frames/s", ("frames_per_s",), True),
                  ("fresh events/s", ("events_per_s",), True),
                  ("duplicates/s", ("duplicates_per_s",), True),
                  ("undecoded duplicates", ("duplicates_undecoded",), True),
                  ("mean batch", ("mean_batch",), True),
                  ("CPU us/event", ("cpu_us_per_event",), False)],
    "naive": [("events/s", ("events_per_s",), True)],
    "pipeline_traced": [("events/s", ("events_per_s",), True),
                        ("go_hop mean ms", ("trace", "batch_parts", "go_hop", "mean_ms"), False),
                        ("rt1 mean ms", ("trace", "batch_parts", "rt1", "mean_ms"), False),
                        ("core mean ms", ("trace", "batch_parts", "core", "mean_ms"), False),
                        ("rt2 mean ms", ("trace", "batch_parts", "rt2", "mean_ms"), False),
                        ("back_hop mean ms", ("trace", "batch_parts", "back_hop", "mean_ms"),
                         False),
                        ("bookkeeping mean ms",
                         ("trace", "batch_parts", "bookkeeping", "mean_ms"), False)],
    "latency_1k": [("p50 ms", ("latency", "p50_ms"), False),
                   ("p99 ms", ("latency", "p99_ms"), False),
                   ("max ms", ("latency", "max_ms"), False),
                   ("gen-2 collections", ("gc_collections", "2"), False),
                   ("commit p50 ms", ("commit", "p50_ms"), False)],
    "latency_5k": [("p50 ms", ("latency", "p50_ms"), False),
                   ("p99 ms", ("latency", "p99_ms"), False),
                   ("max ms", ("latency", "max_ms"), False),
                   ("gen-2 collections", ("gc_collections", "2"), False),
                   ("commit p50 ms", ("commit", "p50_ms"), False)],
}


def _dig(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = result
    for key in path:
        if isinstance(value, list) and key.isdigit():  # gc_collections[generation]
            value = value[int(key)] if int(key) < len(value) else None
        else:
            value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


async def _one(bench: Bench, scenario: str) -> Outcome:
    if scenario.startswith("latency_"):
        return await bench.latency(int(scenario.removeprefix("latency_").removesuffix("k")) * 1000)
    outcome: Outcome = await getattr(bench, scenario)()
    return outcome


async def main_async(params: Params, a: Path, b: Path, rounds: int, scenarios: list[str],
                     admin_uri: str, logs: Path) -> int:
    started_uptime = load.uptime()
    prefixes = [params.naive_updates, *(int(r * params.latency_seconds) for r in params.rates)]
    workload = await trio.to_thread.run_sync(partial(
        generate, params.updates, seed=params.seed, symbols=params.symbols, prefixes=prefixes))
    dbs = await trio.to_thread.run_sync(Databases, admin_uri)
    server = FrameServer()
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failed = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            bench = Bench(params, workload, dbs, server, logs, None)
            bench.trace_latency = False  # the same, untraced code path on both sides
            for r in range(rounds):
                order = [("A", a), ("B", b)] if r % 2 == 0 else [("B", b), ("A", a)]
                for scenario in scenarios:
                    for tag, root in order:
                        bench.root = root
                        print(f"round {r + 1} {tag}", end="", file=sys.stderr)
                        outcome = await _one(bench, scenario)
                        failed |= not outcome.verified
                        results.setdefault((scenario, tag), []).append(outcome.result)
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(dbs.drop_all)
    print(f"\nA = {a}\nB = {b}\n{len(workload.frames):,} updates, {rounds} rounds (A B, B A, ...)\n")
    # A pair's ratio holds under a steady load, not a verdict under any: say what it was.
    print(f"`uptime` at start: {started_uptime}  \n`uptime` at end: {load.uptime()}\n")
    print("| scenario | figure | A (median) | B (median) | B / A | per round B / A |")
    print("|---|---|---:|---:|---:|---|")
    for scenario in scenarios:
        for label, path, _higher in FIGURES.get(scenario, []):
            found_a = [_dig(x, path) for x in results[(scenario, "A")]]
            found_b = [_dig(x, path) for x in results[(scenario, "B")]]
            va = [v for v in found_a if v is not None]
            vb = [v for v in found_b if v is not None]
            if not va or len(va) != len(found_a) or len(vb) != len(found_b):
                continue
            ma, mb = statistics.median(va), statistics.median(vb)
            per = ", ".join(f"{y / x:.2f}" for x, y in zip(va, vb, strict=True) if x)
            print(f"| {scenario} | {label} | {ma:,.1f} | {mb:,.1f} | "
                  f"{mb / ma if ma else float('nan'):.2f} | {per} |")
    if failed:
        print("\nVERIFICATION FAILED in at least one run: see above", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="baseline checkout")
    ap.add_argument("--b", type=Path, required=True, help="patched checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default="pipeline,socket_only")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--updates", type=int)
    ap.add_argument("--latency-seconds", type=float)
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--channel-size", type=int)
    ap.add_argument("--database-url")
    args = ap.parse_args()
    params = QUICK if args.quick else DEFAULT
    params = replace(params, **{k: v for k, v in {
        "updates": args.updates, "latency_seconds": args.latency_seconds,
        "max_batch": args.max_batch, "channel_size": args.channel_size}.items()
        if v is not None})
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in FIGURES]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; choose from {sorted(FIGURES)}")
    tmp = Path(tempfile.mkdtemp(prefix="stream-supervisor-ab-"))
    embedded = None
    try:
        admin_uri = args.database_url
        if not admin_uri:
            embedded = start_embedded_postgres(tmp / "pgdata", delete_on_stop=True)
            admin_uri = embedded.uri
        (tmp / "logs").mkdir()
        return trio.run(main_async, params, args.a, args.b, args.rounds, scenarios,
                        admin_uri, tmp / "logs")
    finally:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
