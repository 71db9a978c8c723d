"""An embedded PostgreSQL for `demo` and tests, from pgserver's bundled binaries.

It listens on a unix socket in its data directory only (no TCP port to collide with or
expose). As root, pgserver runs the server as a `pgserver` system user it creates.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

from psycopg import sql
from psycopg.conninfo import make_conninfo

from . import pgconn

APP_NAME = "stream-supervisor"


def default_data_dir() -> Path:
    """`<user data dir>/stream-supervisor/pgdata` (e.g. ~/.local/share/... on Linux)."""
    import platformdirs

    return Path(platformdirs.user_data_dir()) / APP_NAME / "pgdata"


class EmbeddedPostgres:
    """A running embedded server; `uri` connects as the superuser to `postgres`."""

    def __init__(self, server: Any, data_dir: Path) -> None:
        self._server = server
        self.data_dir = data_dir
        self.uri: str = server.get_uri()
        self._stopped = False

    def stop(self) -> None:
        """Stop the server (unless another process still uses this data directory)."""
        if not self._stopped:
            self._stopped = True
            self._server.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({self.data_dir})"


def start_embedded_postgres(data_dir: Path, *, delete_on_stop: bool = False) -> EmbeddedPostgres:
    """Start (initialising it on first use) a server on `data_dir`, or attach to the one
    already running there. `delete_on_stop` removes the directory on `stop()`."""
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); pgserver asks it
        # for a lock-file directory and copes with the fallback.
        warnings.simplefilter("ignore", UserWarning)
        from pgserver.postgres_server import get_server

        server = get_server(data_dir, cleanup_mode="delete" if delete_on_stop else "stop")
    return EmbeddedPostgres(server, data_dir)


@contextmanager
def throwaway_embedded_postgres(label: str) -> Iterator[EmbeddedPostgres]:
    """A server in a fresh private directory, stopped and removed on the way out.

    For tests and benchmarks. The directory comes from `mkdtemp`, never from pytest's
    numbered temporary directories: those are shared by every pytest session of the
    user and are cleaned up and reused by number by whichever session starts next, and
    pgserver kills any server it finds on a data directory it is asked to initialise.
    Two suites run at once on one machine lost their session server that way.
    """
    home = Path(tempfile.mkdtemp(prefix=f"stream-supervisor-{label}-"))
    try:
        with start_embedded_postgres(home / "data") as server:
            yield server
    finally:
        shutil.rmtree(home, ignore_errors=True)


def database_uri(admin_uri: str, name: str) -> str:
    """`admin_uri` pointed at database `name` (URI stays a URI, conninfo stays conninfo)."""
    if admin_uri.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(admin_uri)
        return urlunsplit(parts._replace(path="/" + quote(name, safe="")))
    return make_conninfo(admin_uri, dbname=name)


def create_database(admin_uri: str, name: str, *, template: str | None = None) -> str:
    """CREATE DATABASE `name` (optionally from `template`) and return a URI for it."""
    with pgconn.connect(admin_uri, autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        conn.execute(query)
    return database_uri(admin_uri, name)


def drop_database(admin_uri: str, name: str) -> None:
    """DROP DATABASE IF EXISTS `name`, disconnecting anyone still using it."""
    with pgconn.connect(admin_uri, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


__all__ = [
    "EmbeddedPostgres",
    "create_database",
    "database_uri",
    "default_data_dir",
    "drop_database",
    "start_embedded_postgres",
    "throwaway_embedded_postgres",
]
