"""Fixtures of the chaos suite: the running test's node id (for replay hints) and a
PostgreSQL server of the suite's own, which a test may stop and start at will."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from stream_supervisor.embedded import (
    EmbeddedPostgres,
    create_database,
    drop_database,
    throwaway_embedded_postgres,
)
from stream_supervisor.migrate import apply_migrations


@pytest.fixture
def node_id(request: pytest.FixtureRequest) -> str:
    return str(request.node.nodeid)


@dataclass
class OwnServer:
    """An embedded server that belongs to one test module: stopping it hurts nobody else
    (the session server behind `database_url` is shared by every test)."""

    embedded: EmbeddedPostgres

    @property
    def uri(self) -> str:
        return self.embedded.uri

    @property
    def _server(self) -> Any:
        return self.embedded._server  # pgserver's handle: it knows how to start again

    def stop(self) -> None:
        """Crash-stop (`pg_ctl stop -m immediate`): clients see their connections die."""
        from pgserver import _commands  # pg_ctl is generated at import, one per binary

        server = self._server
        _commands.pg_ctl(["-w", "-m", "immediate", "stop"],  # type: ignore[attr-defined]
                         pgdata=server.pgdata, user=server.system_user, timeout=30)

    def start(self) -> None:
        self._server.ensure_postgres_running()


@pytest.fixture(scope="module")
def own_server() -> Iterator[OwnServer]:
    with throwaway_embedded_postgres("own") as embedded:
        own = OwnServer(embedded)
        # fsync off is safe here: the tests crash the server, never the machine. Unlike
        # the session server, synchronous_commit stays on: after a crash-stop a durable
        # server must still hold every commit it acknowledged.
        with psycopg.connect(embedded.uri, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("SELECT pg_reload_conf()")
        try:
            yield own
        finally:
            own.start()  # a test that failed mid-outage: bring it back so it stops cleanly


@pytest.fixture
def own_database_url(own_server: OwnServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh migrated database on the module's own server."""
    import uuid

    name = f"ss_own_{uuid.uuid4().hex[:12]}"
    uri = create_database(own_server.uri, name)
    apply_migrations(uri)
    try:
        yield uri
    finally:
        own_server.start()
        drop_database(own_server.uri, name)

