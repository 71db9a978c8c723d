#!/usr/bin/env python3
"""Benchmark: what one update PostgreSQL refuses costs a full batch.

The real writer actor and `PgStore` commit batches of `--batch` updates (fills of
distinct orders over 50 symbols, as a backlog fills a batch) into a fresh database,
alternating clean batches with batches holding one update the database refuses (an
order id of 3,000 characters: index row too large, SQLSTATE 54000), at a random place.
A poisoned batch is split in halves until the refused update is alone; the other
updates commit, once. Reported per kind of batch: the median and p90 time from taking
the batch to its last commit, and the commits it took; the cost of one poison update is
the difference of the medians. Every round is checked: every valid key stored once, the
refused one dead-lettered with the database's message, nothing else stored.

    python benchmarks/poison.py                  # 15 rounds of each, about half a minute
    python benchmarks/poison.py --rounds 3 --batch 100      # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import string
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec
import psycopg
import trio

from stream_supervisor.embedded import create_database, drop_database, start_embedded_postgres
from stream_supervisor.events import Event, fill_key
from stream_supervisor.logs import configure_logging
from stream_supervisor.messages import Ack, Item
from stream_supervisor.metrics import Metrics
from stream_supervisor.migrate import apply_migrations
from stream_supervisor.pgstore import PgStore
from stream_supervisor.settings import DEFAULT_MAX_BATCH
from stream_supervisor.state import SupervisorState
from stream_supervisor.writer import WriterSettings, writer_actor

ACCOUNT = "BENCH-POISON"
T0 = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)


def fills(n: int, tag: str) -> list[Event]:
    out = []
    for i in range(n):
        order = f"{tag}-{i}"
        ts = T0 + timedelta(milliseconds=i)
        out.append(Event(
            key=fill_key(order, Decimal(3)), event="fill", source="stream", order_id=order,
            symbol=f"SYM{i % 50}", side="buy" if i % 2 else "sell", status="filled",
            cum_qty=Decimal(3), timestamp=ts, ts_ns=int(ts.timestamp() * 1e9),
            client_order_id=f"c-{order}", order_qty=Decimal(3),
            cum_avg_price=Decimal("101.25"), fill_qty=Decimal(3),
            fill_price=Decimal("101.25"), position_qty=None,
        ))
    return out


def poison(tag: str, rng: random.Random) -> Event:
    """Within the bounds nobody checks here (built past the decoder): an order id of
    3,000 characters PostgreSQL cannot compress below its index limit."""
    base = fills(1, f"{tag}-poison")[0]
    long_id = "".join(rng.choices(string.ascii_letters + string.digits, k=3000))
    return msgspec.structs.replace(base, order_id=long_id)


async def commit_one(store: PgStore, items: list[Item]) -> tuple[float, int, list[Ack]]:
    """One taken batch through the real writer: seconds to its last commit, commits."""
    metrics = Metrics()
    inbox_send, inbox_recv = trio.open_memory_channel[Item](len(items) + 1)
    ack_send, ack_recv = trio.open_memory_channel[Ack](len(items) + 1)
    for item in items:
        inbox_send.send_nowait(item)
    inbox_send.close()
    settings = WriterSettings(account_id=ACCOUNT, max_batch=len(items))
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(writer_actor, settings, store, inbox_recv, ack_send,
                                    metrics, SupervisorState(), rng=random.Random(1)))
    elapsed = time.perf_counter() - started
    acks = [ack async for ack in ack_recv]
    return elapsed, int(metrics.value("stream_supervisor_batches_total")), acks


def missing_keys(url: str, valid: list[Event]) -> int:
    """How many of the valid updates are not stored."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM alpaca_event_dedupe WHERE event_key = ANY(%s)",
                           [[e.key for e in valid]]).fetchone()
    return len(valid) - (int(row[0]) if row else 0)


def dead_letter_count(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    return int(row[0]) if row else 0


async def measure(url: str, rounds: int, batch: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    store = PgStore(url)
    await store.open()
    assert await store.try_leadership(ACCOUNT)
    times: dict[str, list[float]] = {"clean": [], "poisoned": []}
    commits: dict[str, list[int]] = {"clean": [], "poisoned": []}
    problems: list[str] = []
    try:
        # Warm the session and the tables first (prepared statements, pages in cache).
        await commit_one(store, list(fills(batch, "warm")))
        for r in range(rounds):
            for kind in ("clean", "poisoned"):
                tag = f"r{r}-{kind}"
                valid = fills(batch - (kind == "poisoned"), tag)
                items: list[Item] = list(valid)
                bad = None
                if kind == "poisoned":
                    bad = poison(tag, rng)
                    items.insert(rng.randrange(len(items) + 1), bad)
                before = dead_letter_count(url)
                elapsed, n, acks = await commit_one(store, items)
                times[kind].append(elapsed)
                commits[kind].append(n)
                if missing := missing_keys(url, valid):
                    problems.append(f"{tag}: {missing} valid updates not stored")
                if bad is not None:
                    if dead_letter_count(url) != before + 1:
                        problems.append(f"{tag}: not exactly one dead letter")
                    if acks[0].rejected != (bad.key,):
                        problems.append(f"{tag}: the refused key was not released")
                    if len(acks[0].keys) != len(valid):
                        problems.append(f"{tag}: {len(acks[0].keys)} keys acknowledged")
    finally:
        await store.aclose()

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    result: dict[str, Any] = {}
    for kind in ("clean", "poisoned"):
        result[kind] = {"median_ms": round(statistics.median(times[kind]) * 1000, 1),
                        "p90_ms": ms(times[kind], 0.9),
                        "commits_median": statistics.median(commits[kind])}
    result["poison_cost_ms"] = round(result["poisoned"]["median_ms"]
                                     - result["clean"]["median_ms"], 1)
    result["verified"] = not problems
    result["problems"] = problems[:20]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--database-url", help="a server where databases may be created "
                   "(default: an embedded PostgreSQL in a temporary directory)")
    p.add_argument("--rounds", type=int, default=15, help="batches of each kind (default 15)")
    p.add_argument("--batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"updates per batch (default {DEFAULT_MAX_BATCH}, the service's)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    # The writer's warnings (`batch_refused`, `update_refused`) are the expected outcome
    # here, once per poisoned batch: keep them off the report.
    configure_logging(fmt="console", level="error", stream=sys.stderr)

    embedded = None
    tmp = None
    admin_uri = args.database_url
    if admin_uri is None:
        tmp = tempfile.TemporaryDirectory(prefix="poison-bench-")
        print(f"benchmark: starting embedded PostgreSQL in {tmp.name}", file=sys.stderr)
        embedded = start_embedded_postgres(Path(tmp.name) / "pgdata", delete_on_stop=True)
        admin_uri = embedded.uri
    name = f"bench_poison_{uuid.uuid4().hex[:8]}"
    try:
        url = create_database(admin_uri, name)
        apply_migrations(url)
        results = trio.run(measure, url, args.rounds, args.batch, args.seed)
    finally:
        drop_database(admin_uri, name)
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            tmp.cleanup()
    results["parameters"] = {"rounds": args.rounds, "batch": args.batch, "seed": args.seed,
                             "database": "given" if args.database_url else "embedded",
                             "python": platform.python_version()}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if results["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
