"""The embedded server `demo` and the tests run on: unix socket only, databases on demand."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from stream_supervisor.embedded import (
    create_database,
    database_uri,
    default_data_dir,
    drop_database,
)


def test_default_data_dir_is_under_the_user_data_dir() -> None:
    path = default_data_dir()
    assert path.parts[-2:] == ("stream-supervisor", "pgdata")
    assert path.is_absolute()


def test_database_uri_keeps_the_form_it_was_given() -> None:
    uri = database_uri("postgresql://postgres:@/postgres?host=/tmp/pg", "ss test")
    assert uri == "postgresql://postgres:@/ss%20test?host=/tmp/pg"
    assert conninfo_to_dict(uri)["dbname"] == "ss test"
    kv = database_uri("host=/tmp/pg user=postgres dbname=postgres", "other")
    assert conninfo_to_dict(kv) == {"host": "/tmp/pg", "user": "postgres", "dbname": "other"}


@pytest.mark.skipif(bool(os.environ.get("DATABASE_URL")), reason="needs the embedded server")
def test_embedded_server_listens_on_a_unix_socket_only(pg_admin_uri: str) -> None:
    host = conninfo_to_dict(pg_admin_uri)["host"]
    assert host is not None and Path(str(host)).is_dir()
    with psycopg.connect(pg_admin_uri) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)


def test_create_and_drop_a_database(pg_admin_uri: str) -> None:
    uri = create_database(pg_admin_uri, "ss_embedded_probe")
    try:
        with psycopg.connect(uri) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("ss_embedded_probe",)
    finally:
        drop_database(pg_admin_uri, "ss_embedded_probe")
    with psycopg.connect(pg_admin_uri) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname = 'ss_embedded_probe'"
        ).fetchone()
    assert found == (0,)
