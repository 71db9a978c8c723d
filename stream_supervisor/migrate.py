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
import sys
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
        try:
            with conn.transaction():
                conn.execute(m.sql)
                conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version, filename, checksum) "
                    "VALUES (%s, %s, %s)",
                    [m.version, m.path.name, m.checksum],
                )
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration {m.path.name} failed and was rolled back: "
                f"{pgconn.error_text(exc, conninfo)}"
            ) from None
        done.append(m.version)
    return done
