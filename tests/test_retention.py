"""Retention on real PostgreSQL: old rows go in small batches, recent ones stay,
position_history is never touched, and dedupe keys respect the replay/backfill floor."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from stream_supervisor.errors import ConfigError
from stream_supervisor.retention import (
    SAFETY_MARGIN,
    TRADING_DAY_LOOKBACK,
    RetentionPolicy,
    add_prune_arguments,
    cmd_prune,
    dedupe_floor,
    parse_duration,
    prune,
)
from stream_supervisor.settings import Settings

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def _keys(conn: psycopg.Connection[Any], account: str, prefix: str, n: int,
          age: timedelta) -> None:
    conn.execute(
        "INSERT INTO alpaca_event_dedupe (event_key, account_id, event_type, source, stored_at)"
        " SELECT %s || g, %s, 'fill', 'stream', %s FROM generate_series(1, %s) AS g",
        [f"{prefix}:", account, NOW - age, n],
    )


def _dead(conn: psycopg.Connection[Any], n: int, age: timedelta) -> None:
    conn.execute(
        "INSERT INTO dead_letters (account_id, received_at, reason, payload, source)"
        " SELECT 'A', %s, 'invalid json', '\\x7b'::bytea, 'stream' FROM generate_series(1, %s)",
        [NOW - age, n],
    )


def _position(conn: psycopg.Connection[Any], symbol: str, *, closed_age: timedelta | None,
              history: bool = True) -> int:
    opened = NOW - (closed_age or timedelta(0)) - timedelta(hours=2)
    closed_at = None if closed_age is None else NOW - closed_age
    row = conn.execute(
        "INSERT INTO active_positions (account_id, symbol, side, qty, avg_entry_price,"
        " alpaca_order_id, status, realized_pnl, opened_at, closed_at, peak_qty)"
        " VALUES ('A', %s, 'long', %s, 10, 'o-' || %s, %s, 1.5, %s, %s, 5) RETURNING id",
        [symbol, 0 if closed_at else 5, symbol, "closed" if closed_at else "open", opened,
         closed_at],
    ).fetchone()
    assert row is not None
    if closed_at is not None and history:
        conn.execute(
            "INSERT INTO position_history (position_id, account_id, symbol, side, qty, peak_qty,"
            " avg_entry_price, realized_pnl, alpaca_order_id, opened_at, closed_at)"
            " SELECT id, account_id, symbol, side, qty, peak_qty, avg_entry_price, realized_pnl,"
            " alpaca_order_id, opened_at, closed_at FROM active_positions WHERE id = %s",
            [row[0]],
        )
    return int(row[0])


def _count(conn: psycopg.Connection[Any], sql: str, *params: Any) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def test_old_rows_go_in_batches_recent_stay_history_untouched(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _keys(conn, "A", "old", 12, 40 * DAY)
        _keys(conn, "A", "new", 3, 2 * DAY)
        _dead(conn, 7, 40 * DAY)
        _dead(conn, 2, DAY)
        old_closed = [_position(conn, f"OLD{i}", closed_age=40 * DAY) for i in range(6)]
        recent_closed = _position(conn, "RECENT", closed_age=DAY)
        not_in_history = _position(conn, "NOHIST", closed_age=40 * DAY, history=False)
        still_open = _position(conn, "OPEN", closed_age=None)
        history_before = conn.execute(
            "SELECT * FROM position_history ORDER BY position_id").fetchall()

    pauses: list[float] = []
    policy = RetentionPolicy(max_age=30 * DAY, batch_rows=5, pause=0.01)
    report = prune(database_url, policy, now=NOW, sleep=pauses.append)

    tables = report.tables
    assert (tables["alpaca_event_dedupe"].rows, tables["alpaca_event_dedupe"].batches) == (12, 3)
    assert (tables["dead_letters"].rows, tables["dead_letters"].batches) == (7, 2)
    assert (tables["active_positions"].rows, tables["active_positions"].batches) == (6, 2)
    assert report.rows == 25 and not report.floor_applied
    assert pauses == [0.01] * 4  # after each full batch, never after the last
    with psycopg.connect(database_url) as conn:
        keys = [r[0] for r in conn.execute(
            "SELECT event_key FROM alpaca_event_dedupe ORDER BY event_key")]
        assert keys == ["new:1", "new:2", "new:3"]
        assert _count(conn, "SELECT count(*) FROM dead_letters") == 2
        remaining = {r[0] for r in conn.execute("SELECT id FROM active_positions")}
        assert remaining == {recent_closed, not_in_history, still_open}
        assert not remaining & set(old_closed)
        assert conn.execute(
            "SELECT * FROM position_history ORDER BY position_id").fetchall() == history_before
        assert len(history_before) == 7

    # Nothing left to do: a second run deletes nothing.
    again = prune(database_url, policy, now=NOW, sleep=pauses.append)
    assert again.rows == 0


def test_dedupe_floor_is_enforced_whatever_age_is_asked(database_url: str) -> None:
    policy = RetentionPolicy(max_age=timedelta(hours=1), batch_rows=100, pause=0.0,
                             backfill_overlap=300.0, first_start_lookback=None)
    floor = TRADING_DAY_LOOKBACK + timedelta(seconds=300) + SAFETY_MARGIN
    assert policy.floor == floor == timedelta(hours=26, minutes=5)
    assert policy.dedupe_age == floor
    with psycopg.connect(database_url, autocommit=True) as conn:
        _keys(conn, "A", "inside-floor", 4, timedelta(hours=2))
        _keys(conn, "A", "just-inside", 1, floor - timedelta(minutes=1))
        _keys(conn, "A", "beyond-floor", 5, floor + timedelta(minutes=1))
        _dead(conn, 3, timedelta(hours=2))  # dead letters have no floor: 1 h applies

    report = prune(database_url, policy, now=NOW, sleep=lambda _: None)

    assert report.floor_applied
    assert report.tables["alpaca_event_dedupe"].rows == 5
    assert report.tables["alpaca_event_dedupe"].cutoff == (NOW - floor).isoformat()
    assert report.tables["dead_letters"].rows == 3
    with psycopg.connect(database_url) as conn:
        assert _count(conn, "SELECT count(*) FROM alpaca_event_dedupe") == 5
        assert _count(conn, "SELECT count(*) FROM alpaca_event_dedupe"
                            " WHERE event_key LIKE 'beyond-floor:%%'") == 0


def test_an_explicit_first_start_lookback_sets_the_floor() -> None:
    assert dedupe_floor(60.0, 7 * 86400.0) == timedelta(days=7, seconds=60) + SAFETY_MARGIN
    policy = RetentionPolicy.from_settings(Settings(first_start_lookback=3 * 86400.0,
                                                    backfill_overlap=600.0),
                                           max_age=DAY)
    assert policy.dedupe_age == timedelta(days=3, minutes=10) + SAFETY_MARGIN
    assert RetentionPolicy(max_age=90 * DAY).dedupe_age == 90 * DAY


def test_keys_a_backfill_from_the_cursor_could_fetch_again_stay(database_url: str) -> None:
    """An account that has been down for 60 days resumes backfill at its cursor: its
    keys from then on must survive a 30-day retention."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO stream_cursors (account_id, fill_time) VALUES"
                     " ('STALE', %s), ('LIVE', %s)", [NOW - 60 * DAY, NOW - timedelta(minutes=1)])
        _keys(conn, "STALE", "stale-before-cursor", 4, 61 * DAY)
        _keys(conn, "STALE", "stale-after-cursor", 3, 45 * DAY)
        _keys(conn, "LIVE", "live-old", 2, 45 * DAY)
        _keys(conn, "NOCURSOR", "nocursor-old", 2, 45 * DAY)

    report = prune(database_url, RetentionPolicy(max_age=30 * DAY, pause=0.0), now=NOW)

    assert report.tables["alpaca_event_dedupe"].rows == 8
    with psycopg.connect(database_url) as conn:
        left = [r[0] for r in conn.execute(
            "SELECT event_key FROM alpaca_event_dedupe ORDER BY event_key")]
    assert left == ["stale-after-cursor:1", "stale-after-cursor:2", "stale-after-cursor:3"]


def test_account_filter_and_dry_run(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _keys(conn, "A", "a", 3, 40 * DAY)
        _keys(conn, "B", "b", 4, 40 * DAY)
    dry = prune(database_url, RetentionPolicy(max_age=30 * DAY), now=NOW, dry_run=True)
    assert dry.dry_run and dry.tables["alpaca_event_dedupe"].rows == 7
    only_b = prune(database_url, RetentionPolicy(max_age=30 * DAY, account_id="B", pause=0.0),
                   now=NOW)
    assert only_b.tables["alpaca_event_dedupe"].rows == 4
    with psycopg.connect(database_url) as conn:
        assert _count(conn, "SELECT count(*) FROM alpaca_event_dedupe") == 3


def test_prune_command(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        _keys(conn, "A", "ancient", 3, 400 * DAY)
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    args = parser.parse_args(["--older-than", "90d", "--batch-rows", "2", "--pause", "0"])
    assert cmd_prune(args, Settings(database_url=database_url)) == 0
    assert '"rows": 3' in capsys.readouterr().out
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        cmd_prune(args, Settings())


def test_database_errors_are_store_errors_without_the_password(empty_database_url: str) -> None:
    from stream_supervisor.errors import StoreError

    with pytest.raises(StoreError, match="alpaca_event_dedupe") as caught:
        prune(empty_database_url, RetentionPolicy(), now=NOW)  # not migrated
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 14 * 86400),
     ("3600", 3600), ("1.5h", 5400)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_bad_policies_are_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("a month")
    with pytest.raises(ConfigError):
        RetentionPolicy(batch_rows=0)
    with pytest.raises(ConfigError):
        RetentionPolicy(max_age=timedelta(0))


def _letter(conn: psycopg.Connection[Any], age: timedelta, *, requested: bool,
            replayed: bool) -> None:
    conn.execute(
        "INSERT INTO dead_letters (account_id, received_at, reason, payload, source,"
        " replay_requested_at, replayed_at)"
        " VALUES ('A', %s, 'invalid json', '\\x7b'::bytea, 'stream', %s, %s)",
        [NOW - age, NOW - DAY if requested else None, NOW - DAY if replayed else None])


def test_a_letter_whose_replay_is_pending_stays(database_url: str) -> None:
    """Asked for and not yet replayed: the service's leader will read it; pruning it would
    leave the request nothing to replay. Once replayed, its age decides again."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        _letter(conn, 40 * DAY, requested=True, replayed=False)
        _letter(conn, 40 * DAY, requested=True, replayed=True)
        _letter(conn, 40 * DAY, requested=False, replayed=False)

    report = prune(database_url, RetentionPolicy(pause=0.0), now=NOW, sleep=lambda _: None)

    assert report.tables["dead_letters"].rows == 2
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT replay_requested_at IS NOT NULL, replayed_at IS NULL"
                            " FROM dead_letters").fetchall() == [(True, True)]


async def test_a_non_trade_activity_is_never_applied_twice_after_a_prune(
        database_url: str) -> None:
    """A transfer in (ACATC) applied once; 31 days later `prune` runs. The activities
    backfill re-reads a day before the newest stored activity, however old: the same
    activity comes again, and only its key stops it (no order's mark does). The key
    stays, so MSFT stays 10, as the broker holds."""
    from stream_supervisor.activities import WireNonTrade, non_trade_to_event
    from stream_supervisor.pgstore import PgStore
    from stream_supervisor.store import Batch

    at = datetime.now(UTC) - timedelta(hours=2)
    acatc = non_trade_to_event(WireNonTrade(
        id="20261130093000000::acat-1", activity_type="ACATC",
        transaction_time=at.isoformat(), symbol="MSFT", qty=Decimal(10), price=Decimal(400)))
    store = PgStore(database_url)
    await store.open()
    try:
        assert await store.try_leadership("A")
        assert (await store.commit_batch(Batch("A", [acatc]))).applied_keys
        report = prune(database_url, RetentionPolicy(pause=0.0),
                       now=datetime.now(UTC) + 31 * DAY, sleep=lambda _: None)
        assert report.tables["alpaca_event_dedupe"].rows == 0
        assert not (await store.commit_batch(Batch("A", [acatc]))).applied_keys
        assert (await store.snapshot("A")).net_position("MSFT") == 10
    finally:
        await store.aclose()
