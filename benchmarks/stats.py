#!/usr/bin/env python3
"""Benchmark of `stream-supervisor stats`: a year of closed positions for 50 strategies.

Generates the history on the server (by default 250 trading days x 50 strategies x 20
trades a day in 10 symbols: 250,000 closed positions) into a fresh database, then times
the real command in a child process, as cron or systemd would run it:

  backfill  `stats --from <first day> --to <last day>`: the whole year
  nightly   `stats --from <last day - 3> --to <last day>`: what the timer runs each night
            (yesterday and the 3 lookback days), over the same year of history

and checks the rows: every trade counted once, the net P&L summed exactly, and a
re-run's rows identical to the first run's. A run that fails a check exits 1.

    python benchmarks/stats.py                      # the default, about a minute
    python benchmarks/stats.py --days 20 --strategies 5 --trades 4   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg

from stream_supervisor.embedded import create_database, drop_database, start_embedded_postgres
from stream_supervisor.migrate import apply_migrations
from stream_supervisor.settings import DEFAULT_STATS_LOOKBACK_DAYS
from stream_supervisor.stats import DEFAULT_LOCK_WAIT_S

FIRST_DAY = date(2025, 1, 2)
ACCOUNT = "BENCH"

# One closed position per (day, strategy, n): P&L, fees and holding time are fixed
# functions of the row number (a multiplicative hash), so every run writes the same year.
_GENERATE = """
INSERT INTO position_history (position_id, account_id, symbol, side, qty, peak_qty,
    avg_entry_price, realized_pnl, alpaca_order_id, client_order_id, opened_at, closed_at,
    origin, fees)
SELECT id, %(account)s, 'SYM' || (h %% %(symbols)s), CASE WHEN h %% 2 = 0 THEN 'long' ELSE 'short' END,
       0, 100, 50, round(((h >> 3) %% 2001 - 1000)::numeric / 100, 2), 'order-' || id,
       's' || s || '-' || id, closed - make_interval(secs => 60 + (h >> 5) %% 7200), closed,
       CASE WHEN s = 0 AND n = 0 THEN 'baseline' ELSE 'fill' END, round(((h >> 7) %% 5)::numeric / 100, 2)
FROM unnest(%(days)s::date[]) WITH ORDINALITY AS d(day, di),
     generate_series(0, %(strategies)s - 1) AS s,
     generate_series(0, %(trades)s - 1) AS n,
     LATERAL (SELECT ((di - 1) * %(strategies)s + s) * %(trades)s + n + 1 AS id) AS i,
     LATERAL (SELECT (i.id * 2654435761) %% 4294967296 AS h) AS x,
     LATERAL (SELECT d.day + time '13:30' + make_interval(secs => (n * 23400 / %(trades)s)
              + (h >> 11) %% 60) AS closed) AS c
"""


def trading_days(count: int) -> list[date]:
    out: list[date] = []
    day = FIRST_DAY
    while len(out) < count:
        if day.weekday() < 5:
            out.append(day)
        day += timedelta(days=1)
    return out


def run_stats(url: str, first: date, last: date) -> dict[str, Any]:
    env = {**os.environ, "DATABASE_URL": url, "STREAM_SUPERVISOR_LOG_FORMAT": "json",
           "STREAM_SUPERVISOR_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stream_supervisor", "stats", "--from", first.isoformat(),
         "--to", last.isoformat(), "--lock-wait", str(DEFAULT_LOCK_WAIT_S)],
        env=env, capture_output=True, text=True, check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"stats exited {done.returncode}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 3)
    return result


def rows(url: str, first: date, last: date) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT * FROM strategy_stats WHERE day BETWEEN %s AND %s"
                            " ORDER BY 1, 2, 3", [first, last]).fetchall()


def check(url: str) -> list[str]:
    """Every trade counted once, money summed exactly, in both tables."""
    problems = []
    with psycopg.connect(url, autocommit=True) as conn:
        want = conn.execute("SELECT count(*), sum(realized_pnl - fees) FROM position_history"
                            ).fetchone()
        for name in ("strategy_stats", "strategy_symbol_stats"):
            got = conn.execute(f"SELECT sum(trades), sum(net_pnl) FROM {name}").fetchone()
            if got != want:
                problems.append(f"{name}: {got} != position_history {want}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--database-url", help="a server where databases may be created "
                   "(default: an embedded PostgreSQL in a temporary directory)")
    p.add_argument("--days", type=int, default=250, help="trading days (default 250)")
    p.add_argument("--strategies", type=int, default=50, help="strategies (default 50)")
    p.add_argument("--trades", type=int, default=20,
                   help="closed positions per strategy per day (default 20)")
    p.add_argument("--symbols", type=int, default=10, help="symbols (default 10)")
    p.add_argument("--nightly-runs", type=int, default=3,
                   help="nightly runs to time, the median reported (default 3)")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)

    embedded = None
    tmp = None
    admin_uri = args.database_url
    if admin_uri is None:
        tmp = tempfile.TemporaryDirectory(prefix="stats-bench-")
        print(f"benchmark: starting embedded PostgreSQL in {tmp.name}", file=sys.stderr)
        embedded = start_embedded_postgres(Path(tmp.name) / "pgdata", delete_on_stop=True)
        admin_uri = embedded.uri
    name = f"bench_stats_{uuid.uuid4().hex[:8]}"
    try:
        url = create_database(admin_uri, name)
        apply_migrations(url)
        results = measure(url, args)
        results["parameters"]["database"] = "given" if args.database_url else "embedded"
    finally:
        drop_database(admin_uri, name)
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            tmp.cleanup()
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if results["verified"] else 1


def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    days = trading_days(args.days)
    first, last = days[0], days[-1]
    nightly_first = last - timedelta(days=DEFAULT_STATS_LOOKBACK_DAYS)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(_GENERATE, {"account": ACCOUNT, "days": days, "strategies": args.strategies,
                                 "trades": args.trades, "symbols": args.symbols})
        conn.execute("VACUUM ANALYZE position_history")
        count = conn.execute("SELECT count(*), pg_total_relation_size('position_history')"
                             " FROM position_history").fetchone()
    assert count is not None
    generate_s = time.perf_counter() - started

    backfill = run_stats(url, first, last)
    year_rows = rows(url, nightly_first, last)
    nightly = [run_stats(url, nightly_first, last) for _ in range(args.nightly_runs)]
    problems = check(url)
    if rows(url, nightly_first, last) != year_rows:
        problems.append("a nightly re-run changed rows the backfill wrote")

    def median(key: str) -> float:
        return round(float(statistics.median(n[key] for n in nightly)), 3)

    return {
        "verified": not problems,
        "problems": problems,
        "backfill_wall_s": backfill["wall_s"],
        "backfill_compute_s": backfill["compute_s"],
        "backfill_replace_s": backfill["replace_s"],
        "nightly_wall_s": median("wall_s"),
        "nightly_compute_s": median("compute_s"),
        "nightly_replace_s": median("replace_s"),
        "strategy_rows": backfill["strategy_rows"],
        "symbol_rows": backfill["symbol_rows"],
        "parameters": {
            "trading_days": args.days, "first_day": first.isoformat(),
            "last_day": last.isoformat(), "strategies": args.strategies,
            "trades_per_strategy_day": args.trades, "symbols": args.symbols,
            "closed_positions": count[0], "position_history_mb": round(count[1] / 2**20, 1),
            "generate_s": round(generate_s, 1), "nightly_days": f"{nightly_first}..{last}",
            "python": platform.python_version(), "cpus": os.cpu_count(),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
