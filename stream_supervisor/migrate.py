"""Schema migrations: `migrations/*.sql` applied in filename order, once each.

Each file runs in its own transaction and is recorded in `stream_supervisor_migrations`
with the sha256 of its bytes; an applied file whose bytes changed is refused by name.
The table is named for this project so a database other tools share (golang-migrate,
dbmate and Rails all keep a `schema_migrations`) works; an install from before the rename
has its records moved out of our old `schema_migrations` (docs/design.md, section 9).
The whole run holds a session advisory lock, so concurrent `migrate` runs serialise: the
second waits, then finds nothing left to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg

from . import pgconn
from .errors import MigrationError

#: `pg_advisory_lock` key held for a whole migrate run: the bytes "ss-migr8" as a bigint.
#: Fixed and documented so operators can see (pg_locks.objid) who holds it.
MIGRATION_LOCK_KEY: Final = int.from_bytes(b"ss-migr8", "big")
MIGRATIONS_DIR_ENV: Final = "STREAM_SUPERVISOR_MIGRATIONS_DIR"
#: How long a second `migrate` waits for the first before giving up.
DEFAULT_LOCK_WAIT_S: Final = 300.0

#: Where applied migrations are recorded.
MIGRATIONS_TABLE: Final = "stream_supervisor_migrations"
#: Where they were recorded before it (a name other tools use too).
OLD_MIGRATIONS_TABLE: Final = "schema_migrations"
_CREATE_TABLE: Final = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    version     text PRIMARY KEY,
    filename    text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_COMMENT: Final = (
    f"COMMENT ON TABLE {MIGRATIONS_TABLE} IS "
    "'Migrations applied by stream-supervisor migrate: one row per migrations/*.sql file, "
    "with the sha256 of its bytes (a changed applied file is refused).'"
)
# Our old table is recognised by its exact columns (a foreign one has no checksum) and
# by holding our first migration; anything else named schema_migrations is another
# tool's and is never touched.
_OLD_IS_OURS: Final = f"""
SELECT to_regclass('{OLD_MIGRATIONS_TABLE}') IS NOT NULL AND (
    SELECT array_agg(attname::text ORDER BY attname) FROM pg_attribute
    WHERE attrelid = to_regclass('{OLD_MIGRATIONS_TABLE}') AND attnum > 0
      AND NOT attisdropped
) = ARRAY['applied_at', 'checksum', 'filename', 'version']
"""
_MOVE_OLD: Final = f"""
INSERT INTO {MIGRATIONS_TABLE} (version, filename, checksum, applied_at)
SELECT version, filename, checksum, applied_at FROM {OLD_MIGRATIONS_TABLE}
ON CONFLICT (version) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class _Superseded:
    """A migration file as it was applied by an earlier version of this project, before
    it was changed (on main, while "never edit an applied migration" was not kept) or
    renamed: `repair` is idempotent SQL that brings such a database to what the current
    file `becomes` makes (its COMMENT statements are run again too), after which the
    current file is recorded as applied. Without it `migrate` refused the database (a
    changed checksum) or failed on the renamed file (a column already there)."""

    version: str
    checksums: frozenset[str]
    becomes: str
    repair: str


#: Every earlier form of an applied file main has carried (sha256 of its bytes).
_SUPERSEDED: Final = (
    _Superseded(
        "0003_dead_letter_replay",
        frozenset({"5bf320e183b2af077bcc0ef4e4eb05dcc3df0732899faf5c78c930af2a561787"}),
        "0003_dead_letter_replay",
        "ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS letter_key text;"
        " CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_letter_key"
        " ON dead_letters (letter_key);"),
    _Superseded(
        "0004_real_accounts",
        frozenset({"6bb00dd5ba45ea8e11956336adc85bceae7cfc6c22c7a1b866fbd1d3a5a8269b"}),
        "0004_real_accounts",
        # Its constraint was `baseline_qty` within `filled_qty`; the file now names it as
        # not negative (which 0008 drops: the repair runs before 0008 can).
        "ALTER TABLE broker_orders DROP CONSTRAINT IF EXISTS"
        " broker_orders_baseline_within_filled;"
        " ALTER TABLE broker_orders ADD CONSTRAINT broker_orders_baseline_not_negative"
        " CHECK (baseline_qty >= 0);"),
    _Superseded(
        "0005_many_accounts",
        frozenset({"85592f845bd1cc785227b6f77ed3d3c8ab6c6b5b510b9ec956bed64f2a5f97a2"}),
        "0005_many_accounts",
        "CREATE TABLE IF NOT EXISTS event_stream_positions (stream text PRIMARY KEY,"
        " event_id text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());"),
    _Superseded(
        "0007_activity_baseline",
        frozenset({"6bd6c8dffed0066d852ebca44629fd73cfe5c47e7ff1fc22e886fc3a08c9fcea",
                   "b000a2c7cc89c85893ffa8150efcf5cd54e9d43f78e97420718fce684818a496"}),
        "0007_activity_baseline",
        ""),  # its comments only
    _Superseded(
        "0008_reconcile_moments",
        frozenset({"f342be719f3db19a378e4bccdc22c5c026f8573820117a030da19a5656daca26",
                   "22cdb8e3281ef2e4574931875f7de3daf485818232f8728ffb7fc642ebbf7316",
                   "8b66e3df755f3fb7647f59522ffebe601c26ecd6f5d85a37058cbda15055af3b"}),
        "0008_reconcile_and_replicas",
        "ALTER TABLE baseline_moments ADD COLUMN IF NOT EXISTS reconciled_at timestamptz;"
        " ALTER TABLE broker_orders DROP CONSTRAINT IF EXISTS"
        " broker_orders_baseline_not_negative;"
        " ALTER TABLE stream_supervisor_replicas ADD COLUMN IF NOT EXISTS"
        " account_names text[];"),
)
#: A COMMENT statement of a migration file (its text a SQL string, quotes doubled).
_COMMENT_STATEMENT: Final = re.compile(r"^COMMENT ON .*? IS\s*'(?:[^']|'')*';", re.MULTILINE | re.DOTALL)
#: How long one migration waits for a table lock before it lets go and tries again: a
#: migration queued behind a long reader holds every later query of its tables (the
#: running service's too) for as long as it waits.
STEP_LOCK_TIMEOUT_MS: Final = 5_000


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # the file name without `.sql`, e.g. "0001_initial"
    path: Path
    sql: str
    checksum: str


def find_migrations_dir(directory: Path | None = None) -> Path:
    """Explicit argument, else `$STREAM_SUPERVISOR_MIGRATIONS_DIR`, else the
    `migrations/` directory beside the package (the repository root)."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(MIGRATIONS_DIR_ENV)
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parent.parent / "migrations"
    if beside.is_dir():  # a source checkout or editable install
        return beside
    # A wheel install ships them as data files under the environment's prefix.
    return Path(sys.prefix) / "share" / "stream-supervisor" / "migrations"


def load_migrations(directory: Path) -> list[Migration]:
    if not directory.is_dir():
        raise MigrationError(
            f"migrations directory not found: {directory} "
            f"(pass --dir or set {MIGRATIONS_DIR_ENV})"
        )
    out = []
    for path in sorted(directory.glob("*.sql"), key=lambda p: p.name):
        raw = path.read_bytes()
        out.append(
            Migration(
                version=path.name.removesuffix(".sql"),
                path=path,
                sql=raw.decode("utf-8"),
                checksum=hashlib.sha256(raw).hexdigest(),
            )
        )
    return out


def apply_migrations(
    conninfo: str,
    directory: Path | None = None,
    *,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> list[str]:
    """Apply pending migrations; return the versions applied by this call (in order).

    Safe to run any number of times and concurrently. Raises `MigrationError` (a changed
    or failing file, by name), `store.StoreUnavailable` (cannot connect) or
    `settings.ConfigError` (unusable conninfo); messages never hold the password.
    """
    migrations = load_migrations(find_migrations_dir(directory))
    conn = pgconn.connect(
        conninfo, autocommit=True, application_name="stream-supervisor migrate",
        prepare_threshold=None,
    )
    try:
        _lock(conn, lock_wait_s)
        return _apply(conn, migrations, conninfo)
    except psycopg.Error as exc:
        raise MigrationError(pgconn.error_text(exc, conninfo)) from None
    finally:
        conn.close()  # also releases the advisory lock


def _lock(conn: psycopg.Connection[Any], wait_s: float) -> None:
    conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{int(wait_s * 1000)}ms"])
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_KEY])
    except psycopg.errors.LockNotAvailable:
        raise MigrationError(
            f"another migrate run has held the migration lock ({MIGRATION_LOCK_KEY}) for "
            f"more than {wait_s:g} s"
        ) from None
    # The migrations themselves may wait for the running service's batch to finish.
    conn.execute("SELECT set_config('lock_timeout', '0', false)")


def _apply(conn: psycopg.Connection[Any], migrations: list[Migration], conninfo: str) -> list[str]:
    with conn.transaction():
        exists = conn.execute(f"SELECT to_regclass('{MIGRATIONS_TABLE}') IS NOT NULL").fetchone()
        if not (exists and exists[0]):
            conn.execute(_CREATE_TABLE)
            conn.execute(_COMMENT)
        old = conn.execute(_OLD_IS_OURS).fetchone()
        if old and old[0]:
            # An install from before the rename: its records move, in one transaction.
            ours = conn.execute(
                f"SELECT bool_or(version = '0001_initial') FROM {OLD_MIGRATIONS_TABLE}"
            ).fetchone()
            if ours and ours[0]:
                conn.execute(_MOVE_OLD)
                conn.execute(f"DROP TABLE {OLD_MIGRATIONS_TABLE}")
    applied = dict(
        conn.execute(f"SELECT version, checksum FROM {MIGRATIONS_TABLE}").fetchall()
    )
    _repair_superseded(conn, migrations, applied, conninfo)
    done: list[str] = []
    for m in migrations:
        stored = applied.get(m.version)
        if stored is not None:
            if stored != m.checksum:
                raise MigrationError(
                    f"migration {m.path.name} was changed after it was applied "
                    f"(checksum {stored[:12]}... in {MIGRATIONS_TABLE}, {m.checksum[:12]}... "
                    f"on disk): restore the file and put the change in a new migration"
                )
            continue
        def step(m: Migration = m) -> None:
            conn.execute(m.sql)
            conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, filename, checksum) "
                "VALUES (%s, %s, %s)",
                [m.version, m.path.name, m.checksum],
            )

        _in_turn(conn, m.path.name, conninfo, step)
        done.append(m.version)
    return done


def _repair_superseded(conn: psycopg.Connection[Any], migrations: list[Migration],
                       applied: dict[str, str], conninfo: str) -> None:
    """Bring a database migrated with an earlier form of a file (`_SUPERSEDED`) to what
    the current file makes, and record that file as applied: in version order, each in
    a transaction of its own, before anything new is applied."""
    current = {m.version: m for m in migrations}
    for old in _SUPERSEDED:
        if applied.get(old.version) not in old.checksums or old.becomes not in current:
            continue
        if old.becomes != old.version and old.becomes in applied:
            continue
        target = current[old.becomes]
        comments = "\n".join(_COMMENT_STATEMENT.findall(target.sql))

        def step(old: _Superseded = old, target: Migration = target,
                 comments: str = comments) -> None:
            if old.repair:
                conn.execute(old.repair)
            if comments:
                conn.execute(comments)
            conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, filename, checksum) "
                "VALUES (%s, %s, %s) ON CONFLICT (version) DO UPDATE"
                " SET filename = EXCLUDED.filename, checksum = EXCLUDED.checksum",
                [target.version, target.path.name, target.checksum])

        _in_turn(conn, f"{target.path.name} (repairing {old.version} as applied earlier)",
                 conninfo, step)
        applied[target.version] = target.checksum
        print(f"migrate: {old.version} was applied in an earlier form: repaired to "
              f"{target.path.name}", file=sys.stderr)


def _in_turn(conn: psycopg.Connection[Any], name: str, conninfo: str,
             step: Callable[[], object], *, patience_s: float = DEFAULT_LOCK_WAIT_S) -> None:
    """`step()` in a transaction of its own, waiting at most `STEP_LOCK_TIMEOUT_MS` for
    each lock: behind a long reader it lets go (so the running service's queries of the
    same tables are not queued behind it) and tries again, for `patience_s` in all."""
    started = time.monotonic()
    pause = 0.5
    while True:
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{STEP_LOCK_TIMEOUT_MS}ms'")
                step()
            return
        except psycopg.errors.LockNotAvailable:
            if time.monotonic() - started > patience_s:
                raise MigrationError(
                    f"migration {name} waited {patience_s:g} s for its tables' locks (a "
                    "long transaction holds them; pg_stat_activity shows it): nothing "
                    "applied, run it again") from None
            print(f"migrate: {name} waits for a table lock (another transaction holds "
                  f"it); trying again in {pause:g} s", file=sys.stderr)
            time.sleep(pause)
            pause = min(pause * 2, 10.0)
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration {name} failed and was rolled back: "
                f"{pgconn.error_text(exc, conninfo)}"
            ) from None
