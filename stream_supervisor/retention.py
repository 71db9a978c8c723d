"""Retention: prune old dedupe keys, dead letters and closed positions in small batches.

Runs as its own command (`stream-supervisor prune`, from a systemd timer or an ECS
scheduled task) on its own connection, never the writer's. Each batch is one short
autocommitted DELETE that skips rows someone else holds locked, so the writer never
waits on it for long. `position_history` is never touched.

A dedupe key is pruned only once it is older than anything the broker could still
replay or REST backfill could fetch again: the cutoff is never newer than the first-start
lookback plus the backfill overlap plus a safety margin, and never newer than an
account's cursor minus the overlap and margin. This floor is enforced here, whatever
age is asked for. A non-trade activity's key (`activity:<id>`) is never pruned: nothing
else stops it applying twice, and its re-read reaches back from the newest activity
stored, however old. A dead letter whose replay was asked for stays until it ends.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from .errors import ConfigError
from .logs import get_logger
from .settings import Settings

if TYPE_CHECKING:
    import psycopg

log = get_logger("stream_supervisor.retention")

DEFAULT_MAX_AGE: Final = timedelta(days=30)
DEFAULT_BATCH_ROWS: Final = 5_000
DEFAULT_PAUSE: Final = 0.1
#: With no explicit first-start lookback, a first start backfills from midnight US/Eastern
#: of the current day: at most 24 hours back, 25 on the day daylight saving time ends.
TRADING_DAY_LOOKBACK: Final = timedelta(hours=25)
#: Slack on top of the floor: clock skew between broker timestamps and our commit times,
#: and replays the broker sends late.
SAFETY_MARGIN: Final = timedelta(hours=1)
STATEMENT_TIMEOUT_MS: Final = 30_000
#: A batch waits at most this long for a lock (SKIP LOCKED makes that rare), then the
#: table is retried after a pause: the writer is never queued behind retention for long.
LOCK_TIMEOUT_MS: Final = 2_000
LOCK_RETRIES: Final = 5

@dataclass(frozen=True, slots=True)
class _Target:
    """One table: the rows that may go (a SELECT of keys), and how to lock them."""

    table: str
    key: str
    select: str
    lock: str

    @property
    def delete(self) -> str:
        return (f"DELETE FROM {self.table} WHERE {self.key} IN ("
                f"{self.select} LIMIT %(limit)s FOR UPDATE OF {self.lock} SKIP LOCKED)")

    @property
    def count(self) -> str:
        return f"SELECT count(*) FROM ({self.select}) AS doomed"


_ACCOUNT = "(%(account)s::text IS NULL OR {alias}.account_id = %(account)s::text)"

#: Batches in this order; dedupe first as the biggest.
TARGETS: Final = (
    _Target(
        "alpaca_event_dedupe", "event_key",
        "SELECT d.event_key FROM alpaca_event_dedupe d"
        " LEFT JOIN stream_cursors c ON c.account_id = d.account_id"
        " WHERE d.stored_at < %(cutoff)s"
        # A non-trade activity's key is all that stops it applying twice (no order's mark
        # does), and the activities backfill re-reads a day before the newest stored
        # activity however old that is: those keys stay (they are few, as orders are).
        " AND d.event_key NOT LIKE 'activity:%%'"
        # backfill resumes at the cursor minus the overlap: keys it could fetch again stay
        " AND (c.fill_time IS NULL OR d.stored_at < c.fill_time - make_interval(secs => %(guard)s))"
        " AND " + _ACCOUNT.format(alias="d"),
        "d",
    ),
    _Target(
        "dead_letters", "id",
        "SELECT l.id FROM dead_letters l WHERE l.received_at < %(cutoff)s"
        # a replay asked for and not yet ended keeps its letter until it ends
        " AND NOT (l.replay_requested_at IS NOT NULL AND l.replayed_at IS NULL)"
        " AND " + _ACCOUNT.format(alias="l") + " ORDER BY l.id",
        "l",
    ),
    # Only rows already copied to position_history: that copy is the permanent record.
    _Target(
        "active_positions", "id",
        "SELECT p.id FROM active_positions p WHERE p.status = 'closed'"
        " AND p.closed_at < %(cutoff)s AND " + _ACCOUNT.format(alias="p") +
        " AND EXISTS (SELECT 1 FROM position_history h WHERE h.position_id = p.id)"
        " ORDER BY p.id",
        "p",
    ),
)


def dedupe_floor(backfill_overlap: float, first_start_lookback: float | None) -> timedelta:
    """The youngest a dedupe key may be when pruned: older than any backfill or replay."""
    lookback = (
        timedelta(seconds=first_start_lookback)
        if first_start_lookback is not None
        else TRADING_DAY_LOOKBACK
    )
    return lookback + timedelta(seconds=backfill_overlap) + SAFETY_MARGIN


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    max_age: timedelta = DEFAULT_MAX_AGE
    batch_rows: int = DEFAULT_BATCH_ROWS
    pause: float = DEFAULT_PAUSE
    account_id: str | None = None
    backfill_overlap: float = 300.0
    first_start_lookback: float | None = None

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise ConfigError("prune --batch-rows must be at least 1")
        if self.max_age <= timedelta(0):
            raise ConfigError("prune --older-than must be positive")

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> RetentionPolicy:
        return cls(backfill_overlap=settings.backfill_overlap,
                   first_start_lookback=settings.first_start_lookback, **kw)

    @property
    def floor(self) -> timedelta:
        return dedupe_floor(self.backfill_overlap, self.first_start_lookback)

    @property
    def dedupe_age(self) -> timedelta:
        return max(self.max_age, self.floor)

    @property
    def cursor_guard(self) -> timedelta:
        """Keys younger than an account's cursor minus this stay: backfill resumes there."""
        return timedelta(seconds=self.backfill_overlap) + SAFETY_MARGIN


@dataclass(slots=True)
class TableReport:
    cutoff: str
    rows: int = 0
    batches: int = 0
    complete: bool = True  # False when lock retries ran out; the next run goes on


@dataclass(slots=True)
class PruneReport:
    dry_run: bool
    floor_applied: bool
    tables: dict[str, TableReport] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "floor_applied": self.floor_applied,
                "rows": self.rows, "tables": {k: asdict(v) for k, v in self.tables.items()}}


def prune(
    conninfo: str,
    policy: RetentionPolicy,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> PruneReport:
    """Prune every table in batches of `policy.batch_rows`; returns what was removed (or,
    with `dry_run`, what would be)."""
    # psycopg loads only for this command, not on every CLI start (`health` runs often).
    import psycopg

    from . import pgconn
    from .errors import StoreError

    now = now if now is not None else datetime.now(UTC)
    floor_applied = policy.max_age < policy.floor
    if floor_applied:
        log.warning("prune_floor_applied", requested_s=policy.max_age.total_seconds(),
                    floor_s=policy.floor.total_seconds())
    cutoffs = {
        "alpaca_event_dedupe": now - policy.dedupe_age,
        "dead_letters": now - policy.max_age,
        "active_positions": now - policy.max_age,
    }
    report = PruneReport(dry_run=dry_run, floor_applied=floor_applied)
    try:
        _prune_all(conninfo, policy, cutoffs, report, dry_run, sleep)
    except psycopg.Error as exc:
        # Not chained: psycopg's text may echo the conninfo.
        raise StoreError(f"prune failed: {pgconn.error_text(exc, conninfo)}") from None
    log.info("prune_done", rows=report.rows, dry_run=dry_run)
    return report


def _prune_all(
    conninfo: str,
    policy: RetentionPolicy,
    cutoffs: dict[str, datetime],
    report: PruneReport,
    dry_run: bool,
    sleep: Callable[[float], None],
) -> None:
    from . import pgconn

    with pgconn.connect(conninfo, autocommit=True,
                        application_name="stream-supervisor-prune") as conn:
        conn.execute("SELECT set_config('statement_timeout', %s, false),"
                     " set_config('lock_timeout', %s, false)",
                     [str(STATEMENT_TIMEOUT_MS), str(LOCK_TIMEOUT_MS)])
        for target in TARGETS:
            table = target.table
            params = {
                "cutoff": cutoffs[table],
                "guard": policy.cursor_guard.total_seconds(),
                "account": policy.account_id,
                "limit": policy.batch_rows,
            }
            result = TableReport(cutoff=cutoffs[table].isoformat())
            report.tables[table] = result
            if dry_run:
                row = conn.execute(target.count, params).fetchone()
                result.rows = int(row[0]) if row else 0
            else:
                _prune_table(conn, table, target.delete, params, policy, result, sleep)
            log.info("prune_table_done", table=table, rows=result.rows, batches=result.batches,
                     cutoff=result.cutoff, complete=result.complete, dry_run=dry_run)


def _prune_table(
    conn: psycopg.Connection[Any],
    table: str,
    statement: str,
    params: dict[str, Any],
    policy: RetentionPolicy,
    result: TableReport,
    sleep: Callable[[float], None],
) -> None:
    import psycopg

    busy = 0
    while True:
        try:
            deleted = conn.execute(statement, params).rowcount
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            busy += 1
            log.warning("prune_busy", table=table, attempt=busy, error=type(exc).__name__)
            if busy > LOCK_RETRIES:
                result.complete = False
                return
            sleep(max(1.0, policy.pause * 10))
            continue
        result.rows += deleted
        result.batches += 1
        log.debug("prune_batch", table=table, rows=deleted)
        if deleted < policy.batch_rows:
            return
        sleep(policy.pause)


# --------------------------------------------------------------------- `prune` command

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w` or plain seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30d, 12h, 90m)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--older-than", type=parse_duration, default=DEFAULT_MAX_AGE,
                   help="prune rows older than this (default 30d); dedupe keys never younger "
                        "than the first-start lookback + backfill overlap + 1h")
    p.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS,
                   help=f"rows per DELETE (default {DEFAULT_BATCH_ROWS})")
    p.add_argument("--pause", type=float, default=DEFAULT_PAUSE,
                   help=f"seconds between batches (default {DEFAULT_PAUSE:g})")
    p.add_argument("--account-id", help="limit to one account (default: all)")
    p.add_argument("--dry-run", action="store_true", help="count what would be pruned")


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url)")
    policy = RetentionPolicy.from_settings(
        settings, max_age=args.older_than, batch_rows=args.batch_rows, pause=args.pause,
        account_id=args.account_id,
    )
    # Database errors (StoreError) reach the CLI, which logs `database_error`, exit 1.
    report = prune(settings.database_url, policy, dry_run=args.dry_run)
    print(json.dumps(report.as_dict(), indent=1))
    return 0 if all(t.complete for t in report.tables.values()) else 1


__all__ = [
    "RetentionPolicy",
    "add_prune_arguments",
    "cmd_prune",
    "dedupe_floor",
    "parse_duration",
    "prune",
]
