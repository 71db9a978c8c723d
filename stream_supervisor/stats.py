"""Nightly strategy statistics: closed positions into `strategy_stats` and
`strategy_symbol_stats`, one UTC day at a time (`stream-supervisor stats`).

The arithmetic runs on the server: one pass over `position_history` up to the last day
asked for (window functions for the running P&L curve, its peak and the to-date figures;
gaps-and-islands for losing streaks) fills session temporary tables, then each day is
swapped in by its own transaction (delete the day, insert the new rows), so a crash
leaves every day either as it was or as recomputed. Money stays `numeric` until a ratio
is taken, so a re-run gives identical rows. A session advisory lock serialises runs: a
second one waits for the first (up to `--lock-wait`), then does its own days.
Definitions and conventions: docs/statistics.md. Longer than our other modules because
most of it is the SQL of each figure, kept beside the command that runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from .errors import ConfigError
from .logs import get_logger
from .settings import Settings
from .stats_report import REPORT_EXTRA
from .strategy import BASELINE, BASELINE_ORIGIN, PATTERN_VARIABLE, UNATTRIBUTED, StrategyPattern

if TYPE_CHECKING:
    import psycopg

log = get_logger("stream_supervisor.stats")

#: `pg_advisory_lock` key held for a whole run: the bytes "ss-stats" as a bigint, fixed
#: so operators can find the holder (pg_locks.objid) and tests can hold it.
STATS_LOCK_KEY: Final = int.from_bytes(b"ss-stats", "big")
#: How long a run waits for another run's lock before giving up (exit 1).
DEFAULT_LOCK_WAIT_S: Final = 1800.0
#: Bound on each statement: the history pass is the long one (seconds for a year of 50
#: strategies, see BENCHMARKS.md); the per-day swaps take milliseconds.
STATEMENT_TIMEOUT_MS: Final = 600_000
#: Memory for the history pass's sorts before they spill to disk.
WORK_MEM: Final = "64MB"
#: Distinct client order ids on which the SQL and the Python strategy mapping are compared
#: before anything is written.
PATTERN_SAMPLE: Final = 1000
#: Annualisation of the daily Sharpe ratio: trading days per year.
TRADING_DAYS: Final = 252

#: The columns both tables share, in table order; strategy_stats adds TO_DATE_COLUMNS.
PER_DAY_COLUMNS: Final = (
    "trades", "wins", "losses", "breakevens", "win_rate", "gross_profit", "gross_loss",
    "net_pnl", "profit_factor", "expectancy", "avg_win", "avg_loss", "largest_win",
    "largest_loss", "avg_holding_seconds", "median_holding_seconds", "max_consecutive_losses",
)
TO_DATE_COLUMNS: Final = ("cum_net_pnl", "max_drawdown", "sqn", "sharpe_daily")
#: Each table's primary key: a row holds the trades of one quote currency (0009).
STRATEGY_KEY: Final = ("account_id", "strategy", "currency", "day")
SYMBOL_KEY: Final = ("account_id", "strategy", "currency", "symbol", "day")
#: The columns in table order (`currency` came last, with migration 0009).
STRATEGY_COLUMNS: Final = (
    ("account_id", "strategy", "day") + PER_DAY_COLUMNS + TO_DATE_COLUMNS + ("currency",))
SYMBOL_COLUMNS: Final = ("account_id", "strategy", "symbol", "day") + PER_DAY_COLUMNS + (
    "currency",)
#: The migration that keys the statistics by currency: `stats` refuses to run without it.
STATS_MIGRATION: Final = "0009_stats_currency"
#: Currency of everything that is not a crypto pair (equities, options).
HOME_CURRENCY: Final = "USD"


class StatsError(Exception):
    """`stats` could not run (lock held too long, a database error); the message says why."""


# --------------------------------------------------------------------------------- SQL

_ACCOUNT = "(%(account)s::text IS NULL OR {alias}account_id = %(account)s::text)"



def _strategy_sql(origin: str, client_order_id: str) -> str:
    """`strategy.strategy_of` in SQL (the pattern translated by `strategy.to_postgres`)."""
    return f"""
CASE WHEN {origin} = '{BASELINE_ORIGIN}' THEN '{BASELINE}'
     ELSE coalesce(nullif((regexp_match({client_order_id}, %(pattern)s::text))[%(group)s::int],
                          ''),
                   '{UNATTRIBUTED}')
END"""


_PATTERN_COMPILES = "SELECT regexp_match('', %(pattern)s::text)"

_HAS_MIGRATIONS = "SELECT to_regclass('stream_supervisor_migrations') IS NOT NULL"
_MIGRATED = "SELECT EXISTS (SELECT 1 FROM stream_supervisor_migrations WHERE version = %s)"

# What crypto fees cost each row: a CFEE takes its fee from the coin held, and the ledger
# lets that quantity go at the row's average (nothing realized), so its cost basis
# (quantity removed x average then x multiplier) is money paid that realized_pnl lacks.
_FEE_COSTS = f"""
SELECT pc.position_id,
       sum((abs(pc.qty_before) - abs(pc.qty_after)) * pc.avg_before) AS cost
FROM position_changes pc
WHERE pc.activity_type = 'CFEE' AND pc.position_id IS NOT NULL
  AND {_ACCOUNT.format(alias='pc.')}
GROUP BY pc.position_id
"""

# A row's own net P&L: what it realized, less its known fees and its crypto fees' cost.
_ROW_PNL = "h.realized_pnl - h.fees - coalesce(f.cost, 0) * h.multiplier"

# The quote currency P&L is realized in: a crypto pair's quote (stored spelling BASE/QUOTE),
# else dollars.
_CURRENCY = f"""CASE WHEN strpos(h.symbol, '/') > 0 THEN split_part(h.symbol, '/', 2)
     ELSE '{HOME_CURRENCY}' END"""

# Every trade up to the end of the last day: the to-date figures need the whole history.
#
# A trade is a position flat to flat. An adjustment (baseline, rebaseline, reconcile) that
# closes a row and opens one on the same side continues the position: the rows it links
# are one trade, counted when the last of them closes, with the first one's opener
# (strategy) and opened_at, and the P&L of them all. A row closed by an adjustment that
# opened no continuation, or by a transfer out (ACATS), was not closed by a trade: no
# trade. A stock row an assignment or exercise opened from flat has no order of its own:
# it takes the opener of the option row the same activity closed.
#
# `holding` stays numeric (exact, so sums and means do not depend on row order); it is
# never below 0 (a close stamped from a date-only activity can read as before the open).
_TRADES = f"""
CREATE TEMP TABLE stats_trades AS
WITH RECURSIVE
links AS (
    SELECT a.closed_position_id AS prev, a.opened_position_id AS next
    FROM position_adjustments a
    WHERE a.closed_position_id IS NOT NULL AND a.opened_position_id IS NOT NULL
      AND sign(a.qty_before) = sign(a.qty_after) AND {_ACCOUNT.format(alias='a.')}
),
-- Every row of a chain of links, with the chain's first row.
chained AS (
    SELECT l.prev AS position_id, l.prev AS first_id FROM links l
    WHERE NOT EXISTS (SELECT 1 FROM links x WHERE x.next = l.prev)
    UNION ALL
    SELECT l.next, c.first_id FROM chained c JOIN links l ON l.prev = c.position_id
),
fee_costs AS ({_FEE_COSTS}),
chain_pnl AS (
    SELECT c.first_id, sum({_ROW_PNL}) AS pnl
    FROM chained c JOIN position_history h ON h.position_id = c.position_id
    LEFT JOIN fee_costs f ON f.position_id = h.position_id
    GROUP BY c.first_id
),
-- The stock row an assignment or exercise opened from flat, and the option row (its
-- chain's first) the same activity changed.
assigned AS (
    SELECT st.position_id AS stock_id, coalesce(oc.first_id, op.position_id) AS option_id
    FROM position_changes st
    JOIN position_changes op ON op.account_id = st.account_id
        AND op.activity_id = st.activity_id AND op.symbol <> st.symbol
    LEFT JOIN chained oc ON oc.position_id = op.position_id
    WHERE st.activity_type IN ('OPASN', 'OPEXC') AND st.qty_before = 0
      AND st.position_id IS NOT NULL AND op.position_id IS NOT NULL
      AND {_ACCOUNT.format(alias='st.')}
),
trades AS (
    SELECT h.account_id, h.symbol, h.closed_at, h.position_id,
           {_CURRENCY} AS currency,
           coalesce(cp.pnl, {_ROW_PNL}) AS pnl,
           extract(epoch FROM greatest(h.closed_at - first.opened_at, interval '0'))
               AS holding,
           coalesce(oh.origin, oa.origin, first.origin) AS origin,
           CASE WHEN coalesce(oh.origin, oa.origin) IS NOT NULL
                THEN coalesce(oh.client_order_id, oa.client_order_id, oo.client_order_id)
                ELSE coalesce(first.client_order_id, o.client_order_id)
           END AS cid
    FROM position_history h
    LEFT JOIN chained c ON c.position_id = h.position_id
    JOIN position_history first ON first.position_id = coalesce(c.first_id, h.position_id)
    LEFT JOIN broker_orders o ON o.alpaca_order_id = first.alpaca_order_id
    LEFT JOIN chain_pnl cp ON cp.first_id = c.first_id
    LEFT JOIN fee_costs f ON f.position_id = h.position_id
    LEFT JOIN assigned asn ON asn.stock_id = first.position_id
    LEFT JOIN position_history oh ON oh.position_id = asn.option_id
    LEFT JOIN active_positions oa ON oa.id = asn.option_id AND oh.position_id IS NULL
    LEFT JOIN broker_orders oo
        ON oo.alpaca_order_id = coalesce(oh.alpaca_order_id, oa.alpaca_order_id)
    WHERE h.closed_at < %(end)s AND {_ACCOUNT.format(alias='h.')}
      AND h.close_reason IS NULL
      AND NOT EXISTS (SELECT 1 FROM account_activities aa
                      WHERE aa.account_id = h.account_id
                        AND aa.activity_id = h.closing_activity_id
                        AND aa.activity_type = 'ACATS')
)
SELECT account_id,
       {_strategy_sql('origin', 'cid')} AS strategy,
       symbol, currency,
       (closed_at AT TIME ZONE 'UTC')::date AS day,
       closed_at, position_id, pnl, holding, origin, cid
FROM trades
"""

# A sample of the client order ids just attributed, with the server's answer.
_PATTERN_SAMPLE = f"""
SELECT cid, {_strategy_sql("'fill'", "cid")}
FROM (SELECT DISTINCT cid FROM stats_trades
      WHERE day BETWEEN %(first)s AND %(last)s AND origin <> '{BASELINE_ORIGIN}'
        AND cid IS NOT NULL
      LIMIT %(sample)s) AS ids
"""

# Trades of one day, in the order streaks and curves follow.
_ORDER = "ORDER BY closed_at, position_id ROWS UNBOUNDED PRECEDING"


def _per_day_sql(key: tuple[str, ...]) -> str:
    """The per-day columns grouped by `key` (a table's primary key), over the trades of
    the days asked for, as a query whose columns are `key + PER_DAY_COLUMNS`."""
    k = ", ".join(key)
    return f"""
WITH ranged AS (
    SELECT * FROM stats_trades WHERE day BETWEEN %(first)s AND %(last)s
),
sums AS (
    SELECT {k},
           count(*) AS trades,
           count(*) FILTER (WHERE pnl > 0) AS wins,
           count(*) FILTER (WHERE pnl < 0) AS losses,
           count(*) FILTER (WHERE pnl = 0) AS breakevens,
           coalesce(sum(pnl) FILTER (WHERE pnl > 0), 0) AS gross_profit,
           coalesce(-sum(pnl) FILTER (WHERE pnl < 0), 0) AS gross_loss,
           sum(pnl) AS net_pnl,
           max(pnl) FILTER (WHERE pnl > 0) AS largest_win,
           min(pnl) FILTER (WHERE pnl < 0) AS largest_loss,
           avg(holding)::float8 AS avg_holding_seconds,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY holding::float8)
               AS median_holding_seconds
    FROM ranged GROUP BY {k}
),
-- Gaps and islands: the non-losing trades seen so far number the island a loss is on,
-- so consecutive losses share a number and a win or a breakeven starts a new one.
islands AS (
    SELECT {k}, pnl,
           count(*) FILTER (WHERE pnl >= 0) OVER (PARTITION BY {k} {_ORDER}) AS island
    FROM ranged
),
streaks AS (
    SELECT {k}, max(run) AS longest
    FROM (SELECT {k}, count(*) AS run FROM islands WHERE pnl < 0 GROUP BY {k}, island) AS runs
    GROUP BY {k}
)
SELECT {", ".join(f"s.{c}" for c in key)},
       s.trades::int,
       s.wins::int,
       s.losses::int,
       s.breakevens::int,
       s.wins::float8 / s.trades AS win_rate,
       s.gross_profit,
       s.gross_loss,
       s.net_pnl,
       CASE WHEN s.gross_loss > 0 THEN (s.gross_profit / s.gross_loss)::float8 END
           AS profit_factor,
       trim_scale(s.net_pnl / s.trades) AS expectancy,
       CASE WHEN s.wins > 0 THEN trim_scale(s.gross_profit / s.wins) END AS avg_win,
       CASE WHEN s.losses > 0 THEN trim_scale(-s.gross_loss / s.losses) END AS avg_loss,
       s.largest_win,
       s.largest_loss,
       s.avg_holding_seconds,
       s.median_holding_seconds,
       coalesce(st.longest, 0)::int AS max_consecutive_losses
FROM sums s LEFT JOIN streaks st USING ({k})
"""


# To-date figures per strategy and day, over the whole history up to that day.
#
# With n values, sum s and sum of squares q, the sample variance is D / (n (n - 1)) with
# D = n q - s^2, exact in numeric (no cancellation between rounded terms). Then
#   sqrt(n) * mean / sd = s / sqrt(D / (n - 1))          (SQN over trades)
#   mean / sd           = s / sqrt(D * n / (n - 1))      (Sharpe over days, * sqrt(252))
_TO_DATE = f"""
WITH curve AS (
    SELECT account_id, strategy, currency, day, closed_at, position_id,
           sum(pnl) OVER (PARTITION BY account_id, strategy, currency {_ORDER}) AS cum
    FROM stats_trades
),
-- The curve starts at 0 before the first trade: the peak is never below 0.
falls AS (
    SELECT account_id, strategy, currency, day,
           greatest(max(cum) OVER (PARTITION BY account_id, strategy, currency {_ORDER}), 0)
               - cum AS fall
    FROM curve
),
daily AS (
    SELECT t.account_id, t.strategy, t.currency, t.day,
           count(*) AS n, sum(t.pnl) AS net, sum(t.pnl * t.pnl) AS sq
    FROM stats_trades t GROUP BY t.account_id, t.strategy, t.currency, t.day
),
daily_falls AS (
    SELECT account_id, strategy, currency, day, max(fall) AS fall FROM falls
    GROUP BY account_id, strategy, currency, day
),
running AS (
    SELECT d.account_id, d.strategy, d.currency, d.day,
           sum(d.net) OVER w AS cum_net_pnl,
           max(f.fall) OVER w AS max_drawdown,
           sum(d.n) OVER w AS n,
           sum(d.sq) OVER w AS sq,
           count(*) OVER w AS days,
           sum(d.net * d.net) OVER w AS day_sq
    FROM daily d JOIN daily_falls f USING (account_id, strategy, currency, day)
    WINDOW w AS (PARTITION BY d.account_id, d.strategy, d.currency ORDER BY d.day
                 ROWS UNBOUNDED PRECEDING)
),
spread AS (
    SELECT *, n * sq - cum_net_pnl * cum_net_pnl AS trade_d,
           days * day_sq - cum_net_pnl * cum_net_pnl AS day_d
    FROM running WHERE day BETWEEN %(first)s AND %(last)s
)
SELECT account_id, strategy, currency, day, cum_net_pnl, max_drawdown,
       CASE WHEN n >= 2 AND trade_d > 0
            THEN (cum_net_pnl / sqrt(trade_d / (n - 1)))::float8 END AS sqn,
       CASE WHEN days >= 2 AND day_d > 0
            THEN (cum_net_pnl / sqrt(day_d * days / (days - 1)))::float8
                 * sqrt({TRADING_DAYS}::float8) END AS sharpe_daily
FROM spread
"""

_NEW_STRATEGY = f"""
CREATE TEMP TABLE stats_new_strategy AS
SELECT {", ".join(f"p.{c}" for c in STRATEGY_KEY + PER_DAY_COLUMNS)},
       {", ".join(f"t.{c}" for c in TO_DATE_COLUMNS)}
FROM ({_per_day_sql(STRATEGY_KEY)}) AS p
JOIN ({_TO_DATE}) AS t USING ({", ".join(STRATEGY_KEY)})
"""

_NEW_SYMBOL = f"""
CREATE TEMP TABLE stats_new_symbol AS {_per_day_sql(SYMBOL_KEY)}
"""

_DROP_TEMP = "DROP TABLE IF EXISTS stats_trades, stats_new_strategy, stats_new_symbol"


def _replace_sql(table: str, source: str, columns: tuple[str, ...]) -> tuple[str, str]:
    cols = ", ".join(columns)
    delete = f"DELETE FROM {table} WHERE day = %(day)s AND {_ACCOUNT.format(alias='')}"
    insert = f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {source} WHERE day = %(day)s"
    return delete, insert


_REPLACE: Final = (
    _replace_sql("strategy_symbol_stats", "stats_new_symbol", SYMBOL_COLUMNS),
    _replace_sql("strategy_stats", "stats_new_strategy", STRATEGY_COLUMNS),
)


# ------------------------------------------------------------------------------ the run


@dataclass(frozen=True, slots=True)
class DayRange:
    first: date
    last: date

    def __post_init__(self) -> None:
        if self.first > self.last:
            raise ValueError(f"the range starts ({self.first}) after it ends ({self.last})")

    def days(self) -> Iterator[date]:
        day = self.first
        while day <= self.last:
            yield day
            day += timedelta(days=1)

    @property
    def start(self) -> datetime:
        return datetime(self.first.year, self.first.month, self.first.day, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """Exclusive: midnight UTC after the last day."""
        after = self.last + timedelta(days=1)
        return datetime(after.year, after.month, after.day, tzinfo=UTC)


def nightly_range(today: date, lookback_days: int) -> DayRange:
    """Yesterday, and the `lookback_days` before it (closes can land late)."""
    yesterday = today - timedelta(days=1)
    return DayRange(yesterday - timedelta(days=lookback_days), yesterday)


@dataclass(slots=True)
class StatsResult:
    first: str
    last: str
    account_id: str | None
    days: int = 0
    strategy_rows: int = 0
    symbol_rows: int = 0
    trades: int = 0
    lock_wait_s: float = 0.0
    compute_s: float = 0.0
    replace_s: float = 0.0
    per_day: dict[str, int] = field(default_factory=dict)  # day -> strategy rows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_stats(
    conninfo: str,
    pattern: StrategyPattern,
    days: DayRange,
    *,
    account_id: str | None = None,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> StatsResult:
    """Recompute and replace `days` (every account, or `account_id`'s). Raises
    `ConfigError` (a pattern the server reads differently), `StatsError` (the lock),
    `StoreError` / `StoreUnavailable` (the database), all without the password."""
    import psycopg

    from . import pgconn
    from .errors import StoreError

    result = StatsResult(first=days.first.isoformat(), last=days.last.isoformat(),
                         account_id=account_id)
    params: dict[str, Any] = {
        "pattern": pattern.postgres, "group": pattern.group, "account": account_id,
        "first": days.first, "last": days.last, "start": days.start, "end": days.end,
        "sample": PATTERN_SAMPLE,
    }
    try:
        with pgconn.connect(conninfo, autocommit=True, prepare_threshold=None,
                            application_name="stream-supervisor stats") as conn:
            conn.execute("SELECT set_config('statement_timeout', %s, false),"
                         " set_config('TimeZone', 'UTC', false),"
                         " set_config('work_mem', %s, false)",
                         [str(STATEMENT_TIMEOUT_MS), WORK_MEM])
            require_migration(conn, conninfo)
            started = time.monotonic()
            _lock(conn, lock_wait_s)
            result.lock_wait_s = round(time.monotonic() - started, 3)
            _check_pattern(conn, pattern, params)
            started = time.monotonic()
            _compute(conn, params, result)
            result.compute_s = round(time.monotonic() - started, 3)
            _check_attribution(conn, pattern, params)
            started = time.monotonic()
            for day in days.days():
                _replace_day(conn, day, params, result)
            result.replace_s = round(time.monotonic() - started, 3)
            conn.execute(_DROP_TEMP)
    except psycopg.Error as exc:
        # Not chained: psycopg's text may echo the conninfo.
        raise StoreError(f"stats failed: {pgconn.error_text(exc, conninfo)}") from None
    log.info("stats_done", first=result.first, last=result.last, account=account_id,
             days=result.days, strategy_rows=result.strategy_rows,
             symbol_rows=result.symbol_rows, trades=result.trades,
             compute_s=result.compute_s, replace_s=result.replace_s)
    return result


def require_migration(conn: psycopg.Connection[Any], conninfo: str) -> None:
    """ConfigError (exit 78) unless the statistics tables have their currency (0009)."""
    from . import pgconn

    row = conn.execute(_HAS_MIGRATIONS).fetchone()
    if row and row[0]:
        row = conn.execute(_MIGRATED, [STATS_MIGRATION]).fetchone()
    if not (row and row[0]):
        raise ConfigError(f"the database ({pgconn.describe(conninfo)}) is not migrated "
                          f"(migration {STATS_MIGRATION} not applied): run "
                          "`stream-supervisor migrate` first")


def _lock(conn: psycopg.Connection[Any], wait_s: float) -> None:
    import psycopg

    row = conn.execute("SELECT pg_try_advisory_lock(%s)", [STATS_LOCK_KEY]).fetchone()
    if row and row[0]:
        return
    held_too_long = StatsError(
        f"another stats run has held the stats lock ({STATS_LOCK_KEY}) for more than "
        f"{max(wait_s, 0):g} s (--lock-wait)"
    )
    if wait_s <= 0:  # lock_timeout 0 would mean "wait for ever"
        raise held_too_long
    log.info("stats_lock_wait", key=STATS_LOCK_KEY, wait_s=wait_s)
    # lock_timeout bounds the wait; the statement bound (shorter than the default wait)
    # is lifted around it, or it would cut the wait short with a message about neither.
    conn.execute("SELECT set_config('lock_timeout', %s, false),"
                 " set_config('statement_timeout', '0', false)",
                 [f"{math.ceil(wait_s * 1000)}ms"])
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", [STATS_LOCK_KEY])
    except psycopg.errors.LockNotAvailable:
        raise held_too_long from None
    conn.execute("SELECT set_config('lock_timeout', '0', false),"
                 " set_config('statement_timeout', %s, false)", [str(STATEMENT_TIMEOUT_MS)])


def _check_pattern(conn: psycopg.Connection[Any], pattern: StrategyPattern,
                   params: dict[str, Any]) -> None:
    """The server must compile the pattern, or it is the operator's to fix (a ConfigError,
    exit 78)."""
    import psycopg

    try:
        conn.execute(_PATTERN_COMPILES, params)
    except psycopg.errors.InvalidRegularExpression as exc:
        raise ConfigError(f"{PATTERN_VARIABLE}={pattern.source!r} is not a regular expression "
                          f"PostgreSQL accepts: {exc.diag.message_primary}") from None


def _check_attribution(conn: psycopg.Connection[Any], pattern: StrategyPattern,
                       params: dict[str, Any]) -> None:
    """The server must read the pattern as Python does on the ids just attributed (before
    any day is replaced), or it is the operator's to fix (a ConfigError, exit 78)."""
    for cid, on_server in conn.execute(_PATTERN_SAMPLE, params):
        in_python = pattern.strategy_of(cid)
        if on_server != in_python:
            raise ConfigError(
                f"{PATTERN_VARIABLE}={pattern.source!r} reads client_order_id {cid!r} as "
                f"{in_python!r} in Python but {on_server!r} in PostgreSQL (as {pattern.postgres!r})"
                ": use constructs both dialects read alike (docs/statistics.md)"
            )


def _compute(conn: psycopg.Connection[Any], params: dict[str, Any],
             result: StatsResult) -> None:
    conn.execute(_DROP_TEMP)
    # One snapshot for the history pass: the temporary tables are the run's input from
    # here on, whatever the writer commits meanwhile (the next run picks that up).
    with conn.transaction():
        conn.execute(_TRADES, params)
        conn.execute(_NEW_STRATEGY, params)
        conn.execute(_NEW_SYMBOL, params)
        conn.execute("CREATE INDEX ON stats_new_strategy (day)")
        conn.execute("CREATE INDEX ON stats_new_symbol (day)")
        row = conn.execute("SELECT count(*) FROM stats_trades WHERE day BETWEEN %(first)s"
                           " AND %(last)s", params).fetchone()
    result.trades = int(row[0]) if row else 0


def _replace_day(conn: psycopg.Connection[Any], day: date, params: dict[str, Any],
                 result: StatsResult) -> None:
    """One day, in one transaction: its rows before are all gone and its new rows all in,
    or (a crash, a kill) nothing changed."""
    day_params = {**params, "day": day}
    counts: list[int] = []
    with conn.transaction():
        for delete, insert in _REPLACE:
            conn.execute(delete, day_params)
            counts.append(conn.execute(insert, day_params).rowcount)
    symbol_rows, strategy_rows = counts
    result.days += 1
    result.strategy_rows += strategy_rows
    result.symbol_rows += symbol_rows
    result.per_day[day.isoformat()] = strategy_rows
    log.debug("stats_day_replaced", day=day.isoformat(), strategy_rows=strategy_rows,
              symbol_rows=symbol_rows)


# ------------------------------------------------------------------------ `stats` command


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (YYYY-MM-DD)") from None


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    when = p.add_mutually_exclusive_group()
    when.add_argument("--date", type=_day, metavar="D",
                      help="compute this UTC day only (YYYY-MM-DD)")
    when.add_argument("--from", dest="from_day", type=_day, metavar="D1",
                      help="backfill from this UTC day (with --to; default to yesterday)")
    p.add_argument("--to", dest="to_day", type=_day, metavar="D2",
                   help="backfill up to this UTC day, inclusive (with --from)")
    p.add_argument("--account-id", help="limit to one account (env STREAM_SUPERVISOR_ACCOUNT_ID;"
                   " default: every account)")
    p.add_argument("--lock-wait", type=float, default=DEFAULT_LOCK_WAIT_S, metavar="SECONDS",
                   help="wait this long for another stats run to finish "
                        f"(default {DEFAULT_LOCK_WAIT_S:g}), then exit 1")
    p.add_argument("--report", metavar="FILE", default=None,
                   help="also write a self-contained HTML report of the stored statistics "
                        f"(needs the report extra: {REPORT_EXTRA})")
    p.add_argument("--no-compute", action="store_true",
                   help="with --report: only write the report from what is stored")


def requested_range(args: argparse.Namespace, settings: Settings, today: date) -> DayRange:
    """The days a `stats` command line asks for (ValueError for a bad combination)."""
    if args.to_day is not None and args.from_day is None:
        raise ValueError("--to needs --from")
    if args.date is not None:
        return DayRange(args.date, args.date)
    if args.from_day is not None:
        return DayRange(args.from_day, args.to_day or today - timedelta(days=1))
    return nightly_range(today, settings.stats_lookback_days)


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url)")
    pattern = settings.strategy()
    try:
        days = requested_range(args, settings, datetime.now(UTC).date())
    except ValueError as exc:
        print(f"stream-supervisor stats: {exc}", file=sys.stderr)
        return 2
    if args.no_compute and not args.report:
        print("stream-supervisor stats: --no-compute needs --report", file=sys.stderr)
        return 2
    if args.report:
        from .stats_report import require_plotting, unwritable

        require_plotting()  # before the work, not after it
        if (why := unwritable(args.report)) is not None:
            print(f"stream-supervisor stats: cannot write the report: {why}", file=sys.stderr)
            return 1
    output: dict[str, Any] = {}
    if not args.no_compute:
        try:
            result = compute_stats(settings.database_url, pattern, days,
                                   account_id=settings.account_id, lock_wait_s=args.lock_wait)
        except StatsError as exc:
            log.error("stats_failed", error=str(exc))
            print(f"stream-supervisor stats: {exc}", file=sys.stderr)
            return 1
        output = result.as_dict()
    if args.report:
        from .stats_report import write_report

        try:
            output["report"] = write_report(settings.database_url, args.report,
                                            account_id=settings.account_id)
        except OSError as exc:  # the path went away or filled up since the check
            print(json.dumps(output))
            log.error("stats_report_failed", error=str(exc))
            print(f"stream-supervisor stats: cannot write the report: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(output))  # one line: stdout also carries the JSON log lines
    return 0


__all__ = [
    "DEFAULT_LOCK_WAIT_S",
    "STATS_LOCK_KEY",
    "DayRange",
    "StatsError",
    "StatsResult",
    "add_stats_arguments",
    "cmd_stats",
    "compute_stats",
    "nightly_range",
    "requested_range",
]
