"""`migrate`: ordered, once each, checksummed, safe to run twice and concurrently; and the
schema it builds keeps its promises (one open position per symbol, append-only history,
comments a user's `\\d+` shows)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stream_supervisor.errors import MigrationError
from stream_supervisor.migrate import (
    MIGRATIONS_DIR_ENV,
    apply_migrations,
    find_migrations_dir,
    load_migrations,
)

REPO_MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"
TABLES = (
    "alpaca_event_dedupe",
    "broker_orders",
    "active_positions",
    "position_history",
    "stream_cursors",
    "dead_letters",
)


def rows(url: str, query: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query, params or None).fetchall()


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    """A writable copy of the repository's migrations."""
    target = tmp_path / "migrations"
    shutil.copytree(REPO_MIGRATIONS, target)
    return target


def test_applies_each_file_once_and_nothing_the_second_time(empty_database_url: str) -> None:
    first = apply_migrations(empty_database_url, REPO_MIGRATIONS)
    second = apply_migrations(empty_database_url, REPO_MIGRATIONS)

    files = sorted(p.name for p in REPO_MIGRATIONS.glob("*.sql"))
    assert first == [f.removesuffix(".sql") for f in files]
    assert "0001_initial" in first
    assert second == []
    recorded = rows(empty_database_url,
                    "SELECT version, filename, checksum FROM stream_supervisor_migrations ORDER BY version")
    assert recorded == [
        (f.removesuffix(".sql"), f, hashlib.sha256((REPO_MIGRATIONS / f).read_bytes()).hexdigest())
        for f in files
    ]
    present = rows(empty_database_url,
                   "SELECT count(*) FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NOT NULL",
                   list(TABLES))
    assert present == [(len(TABLES),)]


def test_new_files_apply_in_filename_order(empty_database_url: str, migrations: Path) -> None:
    apply_migrations(empty_database_url, migrations)
    (migrations / "0003_b.sql").write_text("INSERT INTO order_log VALUES ('0003');\n")
    (migrations / "0002_a.sql").write_text(
        "CREATE TABLE order_log (v text, n bigserial);\nINSERT INTO order_log VALUES ('0002');\n"
    )

    assert apply_migrations(empty_database_url, migrations) == ["0002_a", "0003_b"]
    assert rows(empty_database_url, "SELECT v FROM order_log ORDER BY n") == [("0002",), ("0003",)]


def test_concurrent_runs_apply_once(empty_database_url: str, migrations: Path) -> None:
    # A slow migration keeps the first run inside the lock while the second arrives.
    (migrations / "9999_slow.sql").write_text("SELECT pg_sleep(0.5);\n")  # after the repo's
    start = threading.Barrier(2)

    def run() -> list[str]:
        start.wait(timeout=10)
        return apply_migrations(empty_database_url, migrations)

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run) for _ in range(2)]
        results = sorted((f.result(timeout=30) for f in futures), key=len)

    repo = sorted(p.stem for p in REPO_MIGRATIONS.glob("*.sql"))
    assert results == [[], [*repo, "9999_slow"]]
    assert rows(empty_database_url, "SELECT count(*) FROM stream_supervisor_migrations") == [
        (len(repo) + 1,)]


def test_a_changed_applied_file_is_refused_by_name(
    empty_database_url: str, migrations: Path
) -> None:
    apply_migrations(empty_database_url, migrations)
    initial = migrations / "0001_initial.sql"
    initial.write_text(initial.read_text() + "\n-- edited after it was applied\n")
    (migrations / "0002_next.sql").write_text("CREATE TABLE next_thing (id int);\n")

    with pytest.raises(MigrationError, match=r"0001_initial\.sql"):
        apply_migrations(empty_database_url, migrations)
    # Nothing after the refused file ran.
    assert rows(empty_database_url, "SELECT to_regclass('next_thing')") == [(None,)]


def test_a_failing_file_rolls_back_whole_and_is_named(
    empty_database_url: str, migrations: Path
) -> None:
    (migrations / "0002_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT no_such_function();\n"
    )

    with pytest.raises(MigrationError, match=r"0002_broken\.sql"):
        apply_migrations(empty_database_url, migrations)

    assert rows(empty_database_url, "SELECT to_regclass('half_done')") == [(None,)]
    assert rows(empty_database_url, "SELECT version FROM stream_supervisor_migrations") == [
        ("0001_initial",)]


def test_missing_directory_is_a_clear_error(empty_database_url: str, tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="not found"):
        apply_migrations(empty_database_url, tmp_path / "nowhere")


def test_migrations_dir_argument_then_env_then_repository(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(MIGRATIONS_DIR_ENV, raising=False)
    assert find_migrations_dir() == REPO_MIGRATIONS
    monkeypatch.setenv(MIGRATIONS_DIR_ENV, str(tmp_path))
    assert find_migrations_dir() == tmp_path
    assert find_migrations_dir(tmp_path / "x") == tmp_path / "x"


# --- what the schema guarantees ---------------------------------------------------------


def _open_position(symbol: str = "AAPL", **over: object) -> tuple[str, list[object]]:
    values: dict[str, object] = {
        "account_id": "a", "symbol": symbol, "side": "long", "qty": 1, "avg_entry_price": 10,
        "alpaca_order_id": "o", "status": "open", "opened_at": "2026-01-05T15:00:00Z",
        "peak_qty": 1, **over,
    }
    cols = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    return f"INSERT INTO active_positions ({cols}) VALUES ({marks})", list(values.values())


def _execute(url: str, *statements: tuple[str, list[object]]) -> Callable[[], None]:
    def attempt() -> None:
        with psycopg.connect(url) as conn:
            for sql, params in statements:
                conn.execute(sql, params)

    return attempt


def test_one_open_position_per_account_and_symbol(database_url: str) -> None:
    with pytest.raises(psycopg.errors.UniqueViolation):
        _execute(database_url, _open_position(), _open_position())()
    # Closed rows do not count; other accounts do not count.
    _execute(
        database_url,
        _open_position(),
        _open_position(status="closed", qty=0, closed_at="2026-01-05T16:00:00Z"),
        _open_position(account_id="b"),
    )()
    assert rows(database_url, "SELECT count(*) FROM active_positions") == [(3,)]


def test_status_closed_at_and_qty_must_agree(database_url: str) -> None:
    for bad in (
        {"status": "closed", "qty": 0},  # closed without closed_at
        {"closed_at": "2026-01-05T16:00:00Z"},  # open with closed_at
        {"status": "closed", "closed_at": "2026-01-05T16:00:00Z"},  # closed with qty 1
        {"side": "flat"},
        {"qty": -1},
    ):
        with pytest.raises(psycopg.errors.CheckViolation):
            _execute(database_url, _open_position(**bad))()


def test_position_history_is_append_only(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO position_history (position_id, account_id, symbol, side, qty, peak_qty, "
            "avg_entry_price, realized_pnl, alpaca_order_id, opened_at, closed_at) VALUES "
            "(1, 'a', 'AAPL', 'long', 0, 5, 10, 2.5, 'o', now(), now())"
        )
        for statement in (
            "UPDATE position_history SET realized_pnl = 0",
            "DELETE FROM position_history",
            "TRUNCATE position_history",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT realized_pnl FROM position_history").fetchall() == [(2.5,)]


def test_every_table_and_column_is_commented(database_url: str) -> None:
    missing = rows(
        database_url,
        """
        SELECT c.relname, a.attname
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
          AND col_description(c.oid, a.attnum) IS NULL
        UNION ALL
        SELECT c.relname, NULL FROM pg_class c
        WHERE c.relname = ANY(%s) AND obj_description(c.oid, 'pg_class') IS NULL
        """,
        list(TABLES),
        list(TABLES),
    )
    assert missing == []


# Other tools' tables of the same name (docs/design.md, section 9): none has a checksum.
FOREIGN_MIGRATION_TABLES = {
    "golang-migrate": (
        "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL)",
        "INSERT INTO schema_migrations VALUES (20240101120000, false)",
    ),
    "dbmate": (
        "CREATE TABLE schema_migrations (version varchar(128) PRIMARY KEY)",
        "INSERT INTO schema_migrations VALUES ('20240101120000')",
    ),
    "rails": (
        "CREATE TABLE schema_migrations (version character varying NOT NULL PRIMARY KEY)",
        "INSERT INTO schema_migrations VALUES ('20240101120000')",
    ),
}


@pytest.mark.parametrize("tool", sorted(FOREIGN_MIGRATION_TABLES))
def test_a_database_another_tool_migrates_too(empty_database_url: str, tool: str) -> None:
    create, insert = FOREIGN_MIGRATION_TABLES[tool]
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(create)
        conn.execute(insert)
    before = rows(empty_database_url, "SELECT * FROM schema_migrations")

    applied = apply_migrations(empty_database_url, REPO_MIGRATIONS)

    assert applied == sorted(p.stem for p in REPO_MIGRATIONS.glob("*.sql"))
    assert rows(empty_database_url, "SELECT * FROM schema_migrations") == before
    assert apply_migrations(empty_database_url, REPO_MIGRATIONS) == []


def test_an_install_from_before_the_rename_keeps_its_records(
    empty_database_url: str, migrations: Path
) -> None:
    # What migrate did before: our records in schema_migrations, 0001 to 0003 applied.
    for later in sorted(migrations.glob("*.sql"))[3:]:
        later.unlink()
    apply_migrations(empty_database_url, migrations)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE stream_supervisor_migrations RENAME TO schema_migrations")
        conn.execute("UPDATE schema_migrations SET applied_at = '2025-01-02T03:04:05Z'")
    old = rows(empty_database_url,
               "SELECT version, filename, checksum, applied_at FROM schema_migrations "
               "ORDER BY version")
    assert [r[0] for r in old] == ["0001_initial", "0002_strategy_stats",
                                   "0003_dead_letter_replay"]

    applied = apply_migrations(empty_database_url, REPO_MIGRATIONS)

    assert applied == [p.stem for p in sorted(REPO_MIGRATIONS.glob("*.sql"))[3:]]
    moved = rows(empty_database_url,
                 "SELECT version, filename, checksum, applied_at FROM "
                 "stream_supervisor_migrations ORDER BY version")
    assert moved[:3] == old
    assert rows(empty_database_url, "SELECT to_regclass('schema_migrations')") == [(None,)]


def _forward(listener: socket.socket, target: dict[str, Any]) -> None:
    """Accept connections on `listener` and pipe each to the database `target` names
    (its host and port, or its Unix socket directory): a server coming up late."""
    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        host, port = target.get("host") or "localhost", int(target.get("port") or 5432)
        if host.startswith("/"):
            server = socket.socket(socket.AF_UNIX)
            server.connect(f"{host}/.s.PGSQL.{port}")
        else:
            server = socket.create_connection((host, port))
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def test_run_migrate_waits_for_a_database_that_comes_up_late(
        empty_database_url: str) -> None:
    """`run --migrate` at boot, the database not up yet: it exited 1 at once (systemd gave
    up on the unit within a minute); it waits as the service does, then migrates."""
    from stream_supervisor.service import migrate_waiting

    target = psycopg.conninfo.conninfo_to_dict(empty_database_url)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    late = psycopg.conninfo.make_conninfo(empty_database_url, host="127.0.0.1", port=port)
    slept: list[float] = []

    def sleep(delay: float) -> None:
        slept.append(delay)
        if len(slept) == 2:  # the server comes up after the second wait
            listener.listen()
            threading.Thread(target=_forward, args=(listener, target), daemon=True).start()

    try:
        applied = migrate_waiting(late, sleep=sleep, rng=random.Random(0))
    finally:
        listener.close()
    assert len(slept) == 2 and applied == [m.version for m in load_migrations(find_migrations_dir())]


def test_an_upgrade_repairs_what_earlier_versions_left_behind(
        empty_database_url: str, tmp_path: Path) -> None:
    """A database written before 0006 held an option position at multiplier 1 (closed
    now, it realized a hundredth of the money), and one reconciled before 0008 had no
    `reconciled_at` (a fill it already took, replayed after the upgrade, counted again).
    0010 repairs both, and nothing else."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for path in sorted(REPO_MIGRATIONS.glob("*.sql")):
        if path.name < "0010":
            shutil.copy(path, earlier / path.name)
    apply_migrations(empty_database_url, earlier)
    opened = "2026-01-05 15:00+00"
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        for symbol, cls in (("AAPL250117C00150000", None), ("AAPL", None),
                            ("MSFT250117P00300000", "us_option")):
            conn.execute(
                "INSERT INTO active_positions (account_id, symbol, side, qty, avg_entry_price,"
                " alpaca_order_id, status, realized_pnl, opened_at, peak_qty, asset_class)"
                " VALUES ('A', %s, 'long', 2, 3, 'o-' || %s, 'open', 0.04, %s, 2, %s)",
                [symbol, symbol, opened, cls])
        conn.execute(
            "INSERT INTO baseline_moments (account_id, symbol, moment) VALUES"
            " ('A', 'XYZ', '2026-01-05 16:00+00'), ('A', 'QQQ', '2026-01-05 16:00+00'),"
            " ('A', 'IBM', '2026-01-05 16:00+00'), ('A', '', '2026-01-05 14:00+00')")
        conn.execute(
            "INSERT INTO position_adjustments (account_id, symbol, reason, qty_before,"
            " qty_after, taken_at) VALUES"
            " ('A', 'XYZ', 'reconcile', 10, 15, '2026-01-05 16:00:01+00'),"
            " ('A', 'QQQ', 'reconcile', 1, 2, '2026-01-05 16:00:01+00'),"
            " ('A', 'QQQ', 'rebaseline', 2, 3, '2026-01-05 17:00+00'),"
            " ('A', 'IBM', 'baseline', 0, 5, '2026-01-05 16:00:01+00')")

    assert apply_migrations(empty_database_url) == ["0010_upgrade_repairs"]
    with psycopg.connect(empty_database_url) as conn:
        rows = conn.execute("SELECT symbol, asset_class, multiplier, realized_pnl"
                            " FROM active_positions ORDER BY symbol").fetchall()
        assert [(s, c, float(m), float(p)) for s, c, m, p in rows] == [
            ("AAPL", None, 1.0, 0.04),
            ("AAPL250117C00150000", "us_option", 100.0, 4.0),
            ("MSFT250117P00300000", "us_option", 1.0, 0.04)]  # 0006's own rows: theirs
        moments: dict[str, bool] = dict(conn.execute("SELECT symbol, reconciled_at IS NOT NULL"
                                    " FROM baseline_moments").fetchall())
        assert moments == {"XYZ": True, "QQQ": False, "IBM": False, "": False}


SUPERSEDED = Path(__file__).parent / "fixtures" / "superseded-migrations"


def _schema(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every column, constraint and index of the public schema: what code relies on."""
    with psycopg.connect(url) as conn:
        return {
            "columns": conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable, column_default"
                " FROM information_schema.columns WHERE table_schema = 'public'"
                " ORDER BY 1, 2").fetchall(),
            "constraints": conn.execute(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
                " FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
                " ORDER BY 1, 2").fetchall(),
            "indexes": conn.execute(
                "SELECT tablename, indexname, indexdef FROM pg_indexes"
                " WHERE schemaname = 'public' ORDER BY 1, 2").fetchall(),
        }


@pytest.mark.parametrize("forms", [
    ("0003_dead_letter_replay@8f8ef94", "0004_real_accounts@c8ee935",
     "0005_many_accounts@f0a0e94", "0007_activity_baseline@2eb1892",
     "0008_reconcile_moments@eacf924"),
    ("0007_activity_baseline@1d024d5", "0008_reconcile_moments@75e83c7"),
    ("0008_reconcile_moments@f54e016",),
])
def test_a_database_an_earlier_main_migrated_upgrades_to_the_schema_of_today(
        empty_database_url: str, database_url: str, tmp_path: Path,
        forms: tuple[str, ...]) -> None:
    """Main once changed applied files (0003, 0004, 0005, 0007) and renamed 0008: a
    database migrated then was refused (a changed checksum) or failed (a column already
    there), and the service stopped at "run migrate". Each earlier form is repaired to
    what today's file makes: the schema ends as a fresh install's, every file recorded."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    replaced = {form.split("@")[0]: form for form in forms}
    for path in sorted(REPO_MIGRATIONS.glob("*.sql")):
        version = path.stem
        if version >= "0008":
            continue
        source = SUPERSEDED / f"{replaced[version]}.sql" if version in replaced else path
        shutil.copy(source, earlier / path.name)
    for version, form in replaced.items():
        if version.startswith("0008"):
            shutil.copy(SUPERSEDED / f"{form}.sql", earlier / f"{version}.sql")
    apply_migrations(empty_database_url, earlier)
    assert apply_migrations(empty_database_url) == ["0009_stats_currency",
                                                    "0010_upgrade_repairs"]
    assert _schema(empty_database_url) == _schema(database_url)
    with psycopg.connect(empty_database_url) as conn:
        recorded: dict[str, str] = dict(conn.execute(
            "SELECT version, checksum FROM stream_supervisor_migrations").fetchall())
    for m in load_migrations(find_migrations_dir()):
        assert recorded[m.version] == m.checksum
    assert apply_migrations(empty_database_url) == []


def test_a_migration_behind_a_long_reader_lets_go_and_tries_again(
        empty_database_url: str, migrations: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A migration waiting for a table a long transaction reads held every later query
    of that table (the running service's) queued behind it, for as long as the reader
    lasted. It now waits a bounded time, lets go, and tries again until it gets through."""
    from stream_supervisor import migrate

    monkeypatch.setattr(migrate, "STEP_LOCK_TIMEOUT_MS", 200)
    apply_migrations(empty_database_url, migrations)
    (migrations / "0099_more.sql").write_text(
        "ALTER TABLE dead_letters ADD COLUMN more int;\n"
        "COMMENT ON COLUMN dead_letters.more IS 'A test''s.';\n")
    reader = psycopg.connect(empty_database_url)
    reader.execute("SELECT count(*) FROM dead_letters")  # holds ACCESS SHARE until the end

    def finish() -> None:
        reader.rollback()
        reader.close()

    timer = threading.Timer(1.5, finish)
    timer.start()
    try:
        assert apply_migrations(empty_database_url, migrations) == ["0099_more"]
    finally:
        timer.join()
    assert "0099_more.sql waits for a table lock" in capsys.readouterr().err
