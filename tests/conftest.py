"""Shared fixtures: a real PostgreSQL for the whole session, a fresh database per test.

`DATABASE_URL`, when set, names a server where the tests may create and drop databases;
otherwise an embedded pgserver starts in a temporary directory (unix socket only) and
stops at the end. Each test gets its own database, cloned from a migrated template so
that a test costs one CREATE DATABASE, not a migration run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from hypothesis import settings

from stream_supervisor.embedded import (
    create_database,
    drop_database,
    throwaway_embedded_postgres,
)
from stream_supervisor.migrate import apply_migrations

settings.register_profile("stream-supervisor", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "stream-supervisor"))


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pg_admin_uri() -> Iterator[str]:
    """A connection string with the right to CREATE DATABASE."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield given
        return
    with throwaway_embedded_postgres("session") as server:
        # A throwaway server: trade durability for speed (tests never crash the host).
        with psycopg.connect(server.uri, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            conn.execute("ALTER SYSTEM SET full_page_writes = off")
            conn.execute("SELECT pg_reload_conf()")
        yield server.uri


@pytest.fixture(scope="session")
def migrated_template(pg_admin_uri: str) -> Iterator[str]:
    """Name of a database holding the migrated schema, to clone per test."""
    name = _unique("ss_template")
    apply_migrations(create_database(pg_admin_uri, name))
    try:
        yield name
    finally:
        drop_database(pg_admin_uri, name)


class _DatabasePool:
    """Clones of the template, made one ahead in a background thread: a test finds its
    database ready instead of waiting for CREATE DATABASE; drops happen behind it too."""

    def __init__(self, admin_uri: str, template: str) -> None:
        self._admin_uri = admin_uri
        self._template = template
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="test-databases")
        self._next = self._worker.submit(self._create)

    def _create(self) -> tuple[str, str]:
        name = _unique("ss_test")
        return name, create_database(self._admin_uri, name, template=self._template)

    def take(self) -> tuple[str, str]:
        ready, self._next = self._next, self._worker.submit(self._create)
        return ready.result(timeout=120)

    def release(self, name: str) -> None:
        self._worker.submit(drop_database, self._admin_uri, name)

    def close(self) -> None:
        name, _ = self._next.result(timeout=120)
        self.release(name)
        self._worker.shutdown(wait=True)


@pytest.fixture(scope="session")
def _database_pool(pg_admin_uri: str, migrated_template: str) -> Iterator[_DatabasePool]:
    pool = _DatabasePool(pg_admin_uri, migrated_template)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def database_url(_database_pool: _DatabasePool) -> Iterator[str]:
    """A fresh, migrated database for this test, dropped afterwards."""
    name, uri = _database_pool.take()
    try:
        yield uri
    finally:
        _database_pool.release(name)


@pytest.fixture
def empty_database_url(pg_admin_uri: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = _unique("ss_empty")
    uri = create_database(pg_admin_uri, name)
    try:
        yield uri
    finally:
        drop_database(pg_admin_uri, name)

