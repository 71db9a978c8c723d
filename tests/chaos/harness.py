"""The chaos harness: the real supervisor against the simulated broker on loopback sockets
and a real PostgreSQL, with fault hooks, a cursor watch and a verdict that names the
seed and the commands that replay a failing scenario.

In-process runs (`run_scenario`) give the tests the supervisor's metrics and state; the
process tests drive `python -m stream_supervisor run` through `SupervisorProcess`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any, Final, Self

import psycopg
import trio

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.errors import StoreError
from stream_supervisor.metrics import Metrics
from stream_supervisor.pgstore import PgStore
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import StoreSnapshot
from stream_supervisor.supervisor import EXIT_OK, Supervisor
from stream_supervisor.testing.broker import (
    ChaosConfig,
    SimConfig,
    SimServer,
    SimulatedBroker,
    serve,
)
from stream_supervisor.testing.broker.chaos import INJECTED_KINDS
from stream_supervisor.testing.verify import Mismatch, summarize, verify_against_truth
from stream_supervisor.wiring import open_supervisor, pg_store
from stream_supervisor.wsclient import websocket_connector

#: Reconnects and 429s cost milliseconds, not the production seconds.
FAST_BACKOFF: Final = BackoffPolicy(initial=0.05, factor=2.0, cap=0.5, rate_limited_floor=0.2)
#: The application_name of the test's own connections, so a fault aimed at the
#: supervisor's connection (found by its application_name) never hits the observer.
OBSERVER_APP: Final = "chaos-observer"
SUPERVISOR_APP: Final = "stream-supervisor"
#: How long the client waits for the server's close reply. Shorter than production's 2 s
#: only to keep scenarios short: when a drain cancels the connection, trio-websocket's
#: reader task is cancelled with it, the reply can never be read, and `websocket_connector`
#: waits out the whole timeout on every drain (a known latency issue, not a loss).
DISCONNECT_TIMEOUT: Final = 0.5
#: Injected frames the pipeline must dead-letter (the others are stored or ignored).
DEAD_LETTER_KINDS: Final = ("invalid_json", "data_null", "wrong_types", "oversized")
POLL: Final = 0.2
#: The simulated broker's REST limit (requests per 60 s window) for scenarios that are
#: not about the limit. At Alpaca's 200 the service's budget spaces its requests 0.67 s
#: apart (docs/design.md, section 12), and every reconnect's backfill and order refresh
#: waited on that pace: most of a scenario's time. The budget still paces, learns the
#: limit from the answers' headers and honours 429s; only the pace is faster. The tests
#: about the budget (`test_recovery_budget.py`, `tests/test_rest_http_budget.py`) keep
#: Alpaca's limit.
FAST_REST_LIMIT: Final = 60_000


def chaos_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for a chaos run: small backoff and deadlines so scenarios stay short.
    The broker URLs and keys are filled in once the simulator is serving."""
    base: dict[str, Any] = {
        "database_url": database_url,
        "base_url": "http://127.0.0.1:9",
        "ping_interval": 1.0,
        "ping_timeout": 1.0,
        "connect_timeout": 5.0,
        "backoff": FAST_BACKOFF,
        "drain_timeout": 8.0,
        "first_start_lookback": 3600.0,
        "baseline": False,  # an empty account whose session starts with the service
        "statement_timeout_ms": 5_000,
        "rest_timeout": 5.0,
        "restart_limit": 20,
    }
    base.update(overrides)
    return Settings(**base)


# --- replay hints -----------------------------------------------------------------------


def simulate_command(config: SimConfig) -> str:
    """The `stream-supervisor simulate` line that serves this very broker, to point a
    deployed supervisor at it (flags for every knob that is not at its default)."""
    parts = ["stream-supervisor simulate", f"--seed {config.seed}", f"--orders {config.orders}",
             f"--rate {config.rate:g}"]
    if config.account_id:
        parts.append(f"--account-id {config.account_id}")
    if config.rest_rate_limit != SimConfig().rest_rate_limit:
        parts.append(f"--rest-rate-limit {config.rest_rate_limit}")
    defaults = ChaosConfig()
    for f in fields(ChaosConfig):
        value = getattr(config.chaos, f.name)
        if value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, tuple):
            parts.append(f"{flag} {','.join(str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def replay_hint(node_id: str | None, config: SimConfig) -> str:
    lines = [f"seed {config.seed} ({config.scenario})"]
    if node_id:
        lines.append(f"replay: .venv/bin/pytest '{node_id}' -q")
    lines.append(f"broker:  {simulate_command(config)}")
    lines.append(f"demo:    stream-supervisor demo --chaos --seed {config.seed}"
                 "  (same order flow, the demo's own fault mix)")
    return "\n".join(lines)


# --- observing the database -------------------------------------------------------------


async def snapshot(database_url: str, account_id: str) -> StoreSnapshot:
    store = PgStore(database_url, application_name=OBSERVER_APP)
    await store.open()
    try:
        return await store.snapshot(account_id)
    finally:
        # Shielded: from a cancelled scope `aclose()` would raise Cancelled before it
        # reached the thread that closes the connection, and leak it.
        with trio.move_on_after(5, shield=True):
            await store.aclose()


async def try_verify(
    database_url: str, broker: SimulatedBroker, *, strict_prices: bool
) -> list[Mismatch] | None:
    """The mismatches now, or None while the database cannot be read."""
    try:
        snap = await snapshot(database_url, broker.account_id)
    except StoreError:
        return None
    return verify_against_truth(snap, broker.ground_truth(), strict_prices=strict_prices)


async def final_verify(database_url: str, broker: SimulatedBroker, *,
                       strict_prices: bool = True) -> list[Mismatch]:
    """The mismatches of what a stopped supervisor left behind."""
    found = await try_verify(database_url, broker, strict_prices=strict_prices)
    if found is None:
        return [Mismatch("database", "snapshot", "readable", "unreachable")]
    if not broker.finished:
        found.append(Mismatch("liveness", "market", "finished", "still trading"))
    return found


def _read_cursor(database_url: str, account_id: str) -> tuple[datetime | None, str | None] | None:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=2,
                         application_name=OBSERVER_APP) as conn:
        row = conn.execute(
            "SELECT fill_time, activity_id FROM stream_cursors WHERE account_id = %s",
            [account_id],
        ).fetchone()
    return None if row is None else (row[0], row[1])


@dataclass
class CursorWatch:
    """Samples the durable cursor while a scenario runs: it must never move backwards."""

    database_url: str
    account_id: str
    seen: list[tuple[datetime | None, str | None]] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            try:
                row = await trio.to_thread.run_sync(_read_cursor, self.database_url,
                                                    self.account_id)
            except psycopg.Error:
                row = None  # the database is the fault under test; look again later
            if row is not None:
                if self.seen:
                    prev = self.seen[-1]
                    if (prev[0] is not None and (row[0] is None or row[0] < prev[0])) or (
                        prev[1] is not None and (row[1] is None or row[1] < prev[1])
                    ):
                        self.regressions.append(f"{prev} -> {row}")
                self.seen.append(row)
            await trio.sleep(POLL)


def dead_letter_count(database_url: str, account_id: str) -> int:
    with psycopg.connect(database_url, application_name=OBSERVER_APP) as conn:
        row = conn.execute("SELECT count(*) FROM dead_letters WHERE account_id = %s",
                           [account_id]).fetchone()
    return int(row[0]) if row else 0


# --- one in-process scenario --------------------------------------------------------------


@dataclass
class Outcome:
    config: SimConfig
    broker: SimulatedBroker
    supervisor: Supervisor
    mismatches: list[Mismatch]
    exit_code: int | None
    cursor: CursorWatch
    elapsed: float
    notes: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> Metrics:
        return self.supervisor.metrics

    @property
    def truth(self) -> dict[str, Any]:
        return self.broker.ground_truth()

    def metric(self, name: str, **labels: str) -> int:
        return int(self.metrics.value(name, **labels))

    def report(self, node_id: str | None = None) -> str:
        stats = {k: v for k, v in self.truth["stats"].items() if v}
        injected = {k: v for k, v in self.truth["injected"].items() if v}
        lines = [
            replay_hint(node_id, self.config),
            f"exit code {self.exit_code}, {self.elapsed:.1f}s, fills {self.truth['fills_total']}",
            f"broker stats {stats}",
            f"injected {injected}",
            (f"reconnects {self.metric('stream_supervisor_reconnects_total')}, "
             f"batch retries {self.metric('stream_supervisor_batch_retries_total')}, "
             f"restarts {self.supervisor.state.restarts}"),
            summarize(self.mismatches),
            *self.notes,
        ]
        if self.cursor.regressions:
            lines.append(f"cursor moved backwards: {self.cursor.regressions[:5]}")
        return "\n".join(lines)

    def assert_exactly_once(self, node_id: str | None = None) -> None:
        problems = list(self.mismatches)
        ok = (not problems and self.exit_code == EXIT_OK and not self.cursor.regressions
              and self.broker.finished)
        assert ok, "exactly-once violated\n" + self.report(node_id)


Fault = Callable[["Running"], Awaitable[None]]


def caught_up(state: SupervisorState) -> bool:
    """Streaming live, with the backfill and order refresh of the latest reconnect done
    (what they forwarded may still be queued between the actors)."""
    return state.pipeline_running and state.connection == "streaming" and state.caught_up


@dataclass
class Running:
    """What a fault hook sees while the scenario runs."""

    broker: SimulatedBroker
    server: SimServer
    supervisor: Supervisor
    settings: Settings

    async def wait_committed(self, events: int, *, timeout: float = 20.0) -> None:
        with trio.fail_after(timeout):
            while self.supervisor.state.committed_events < events:
                await trio.sleep(0.02)


async def run_scenario(
    database_url: str,
    config: SimConfig,
    *,
    settings: Settings | None = None,
    strict_prices: bool = True,
    faults: Iterable[Fault] = (),
    settle: float = 0.3,
    timeout: float = 45.0,
    store_factory: Callable[[Settings], Any] | None = None,
    verify_url: str | None = None,
    give_up_when_quiet: float | None = None,
) -> Outcome:
    """Serve `config`'s broker, run the supervisor against it and the database until the
    market has finished, every fault hook has returned, the supervisor is caught up and
    the database matches the broker's truth, still matching `settle` seconds later;
    then drain, and verify once more what the drained supervisor left behind.

    `verify_url` reads the result from another URL than `settings.database_url` (a
    database created later, a failover target). `give_up_when_quiet`
    stops waiting for a match once the supervisor is caught up and has committed nothing
    for that long: for a pipeline that is expected never to match."""
    settings = settings or chaos_settings(database_url)
    verify_url = verify_url or settings.database_url
    broker = SimulatedBroker(config)
    metrics, state = Metrics(), SupervisorState()
    started = trio.current_time()
    exit_code: list[int] = []
    notes: list[str] = []
    cursor = CursorWatch(verify_url, broker.account_id)
    with trio.fail_after(timeout + settings.drain_timeout + 15):
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            settings = replace(settings, key_id=config.key_id, secret_key=config.secret_key,
                               base_url=server.rest_url, stream_url=server.ws_url)
            make_store = store_factory or pg_store
            supervisor = await stack.enter_async_context(open_supervisor(
                settings, metrics=metrics, state=state,
                connector=websocket_connector(connect_timeout=settings.connect_timeout,
                                              disconnect_timeout=DISCONNECT_TIMEOUT),
                store_factory=partial(make_store, settings),
                rng=random.Random(config.seed),
                install_signal_handlers=False,
            ))
            done = trio.Event()

            async def run_supervisor() -> None:
                try:
                    exit_code.append(await supervisor.run())
                finally:
                    done.set()

            nursery.start_soon(run_supervisor)
            nursery.start_soon(cursor.run)
            running = Running(broker, server, supervisor, settings)
            faults_done = trio.Event()

            async def run_faults() -> None:
                async with trio.open_nursery() as inner:
                    for fault in faults:
                        inner.start_soon(fault, running)
                faults_done.set()

            nursery.start_soon(run_faults)
            await nursery.start(broker.run_market)
            mismatches: list[Mismatch] | None = None
            last_commit = (state.committed_batches, trio.current_time())
            with trio.move_on_after(timeout) as waiting:
                while True:
                    await trio.sleep(POLL)
                    if done.is_set():
                        notes.append("the supervisor stopped on its own")
                        break
                    if not (broker.finished and faults_done.is_set()):
                        continue
                    if state.committed_batches != last_commit[0]:
                        last_commit = (state.committed_batches, trio.current_time())
                    elif (give_up_when_quiet is not None and state.caught_up
                          and state.connection == "streaming"
                          and trio.current_time() - last_commit[1] > give_up_when_quiet):
                        notes.append(f"caught up and quiet for {give_up_when_quiet}s")
                        break
                    if not caught_up(state):
                        continue
                    mismatches = await try_verify(verify_url, broker,
                                                  strict_prices=strict_prices)
                    if mismatches != []:
                        continue
                    # A match can come early: an order that never filled may not be
                    # stored yet while its updates are still queued (the checker cannot
                    # tell "not yet" from "never"). Let what is in flight land, and
                    # whatever the broker still sends (a late duplicate must change
                    # nothing either), then look again.
                    await trio.sleep(settle)
                    if caught_up(state) and await try_verify(
                            verify_url, broker, strict_prices=strict_prices) == []:
                        break
            if waiting.cancelled_caught:
                notes.append(f"timed out after {timeout}s waiting for the database to match")
            supervisor.request_drain("scenario finished")
            with trio.move_on_after(settings.drain_timeout + 5):
                await done.wait()
            if not done.is_set():
                notes.append("the supervisor did not stop within the drain deadline")
            await stack.aclose()
            nursery.cancel_scope.cancel()
    final = await final_verify(verify_url, broker, strict_prices=strict_prices)
    return Outcome(config, broker, supervisor, final, exit_code[0] if exit_code else None,
                   cursor, trio.current_time() - started, notes)


# --- the real process ---------------------------------------------------------------------


#: STREAM_SUPERVISOR_DRAIN_TIMEOUT of the `run` children (seconds).
PROCESS_DRAIN_TIMEOUT = 8


def process_env(database_url: str, server: SimServer, config: SimConfig,
                **extra: str) -> dict[str, str]:
    """Environment for `python -m stream_supervisor run` against a served simulator.

    libpq's own variables (PGPASSWORD, PGSSLMODE...) pass through, as they do for the
    suite itself: a CI database given as DATABASE_URL may take its password from them."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APCA_", "STREAM_SUPERVISOR_")) and k != "DATABASE_URL"}
    env.update({
        "APCA_API_KEY_ID": config.key_id,
        "APCA_API_SECRET_KEY": config.secret_key,
        "APCA_API_BASE_URL": server.rest_url,
        "APCA_API_STREAM_URL": server.ws_url,
        "DATABASE_URL": database_url,
        "PYTHONUNBUFFERED": "1",
        "STREAM_SUPERVISOR_LOG_FORMAT": "json",
        "STREAM_SUPERVISOR_LOG_LEVEL": "info",
        "STREAM_SUPERVISOR_BACKOFF_INITIAL": "0.05",
        "STREAM_SUPERVISOR_BACKOFF_CAP": "0.5",
        "STREAM_SUPERVISOR_BACKOFF_429_FLOOR": "0.2",
        "STREAM_SUPERVISOR_PING_INTERVAL": "1",
        "STREAM_SUPERVISOR_PING_TIMEOUT": "1",
        "STREAM_SUPERVISOR_DRAIN_TIMEOUT": str(PROCESS_DRAIN_TIMEOUT),
        "STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "3600",
        "STREAM_SUPERVISOR_BASELINE": "off",  # the session starts with the service
        "STREAM_SUPERVISOR_STATEMENT_TIMEOUT_MS": "5000",
    })
    env.update(extra)
    return env


class SupervisorProcess:
    """One `python -m stream_supervisor run` child: its output collected line by line.

    Use inside `async with`: the child is killed on the way out whatever happened, so a
    failing test never leaves a supervisor behind."""

    def __init__(self, env: dict[str, str], nursery: trio.Nursery, *, name: str = "run") -> None:
        self.env = env
        self.nursery = nursery
        self.name = name
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.process: trio.Process | None = None
        self._readers_done: trio.Event | None = None

    async def __aenter__(self) -> Self:
        command = [sys.executable, "-m", "stream_supervisor", "run"]
        trace = os.environ.get("STREAM_SUPERVISOR_TEST_MEMTRACE")
        if trace:  # debugging a soak's memory: stream_supervisor/testing/memtrace.py
            every = os.environ.get("STREAM_SUPERVISOR_TEST_MEMTRACE_EVERY", "60")
            command[2:3] = ["stream_supervisor.testing.memtrace", f"{trace}.{self.name}",
                            every, "--"]
            mode = os.environ.get("STREAM_SUPERVISOR_TEST_MEMTRACE_MODE", "tracemalloc")
            self.env = {**self.env, "STREAM_SUPERVISOR_TEST_MEMTRACE_MODE": mode}
        self.process = await trio.lowlevel.open_process(
            command,
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        done = self._readers_done = trio.Event()
        pending = [2]

        async def read(stream: trio.abc.ReceiveStream, sink: list[str]) -> None:
            buffer = b""
            try:
                async for chunk in stream:
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    sink.extend(line.decode("utf-8", "replace") for line in lines)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            if buffer:
                sink.append(buffer.decode("utf-8", "replace"))
            pending[0] -= 1
            if pending[0] == 0:
                done.set()

        assert self.process.stdout is not None and self.process.stderr is not None
        self.nursery.start_soon(read, self.process.stdout, self.stdout)
        self.nursery.start_soon(read, self.process.stderr, self.stderr)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            self.kill()
            await self.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, *, timeout: float) -> int:
        """The exit code; fails the test if the child is still running after `timeout`."""
        assert self.process is not None
        with trio.fail_after(timeout):
            code = await self.process.wait()
            if self._readers_done is not None:
                await self._readers_done.wait()
        return code

    def events(self) -> list[dict[str, Any]]:
        """Every stdout line parsed as JSON (raises on the first that is not)."""
        return [json.loads(line) for line in self.stdout if line.strip()]

    async def wait_for_event(self, name: str, *, timeout: float, count: int = 1) -> None:
        with trio.fail_after(timeout):
            while sum(1 for line in self.stdout if f'"event": "{name}"' in line) < count:
                if self.returncode is not None:
                    raise AssertionError(f"{self.name} exited ({self.returncode}) before "
                                         f"logging {name}:\n" + self.tail())
                await trio.sleep(0.05)

    def tail(self, lines: int = 40) -> str:
        return "\n".join([*self.stdout[-lines:], "--- stderr ---", *self.stderr[-lines:]])

    async def match_then_drain(self, database_url: str, broker: SimulatedBroker, *,
                               timeout: float = 60.0) -> tuple[list[Mismatch], int, str]:
        """Wait (while this child runs) until the database matches the broker, then
        SIGTERM it: the mismatches left (empty on success), its exit code, its tail."""
        mismatches = await wait_until_matches(database_url, broker, timeout=timeout,
                                              alive=lambda: self.returncode is None)
        self.terminate()
        code = await self.wait(timeout=PROCESS_DRAIN_TIMEOUT + 10)
        return mismatches, code, self.tail()


# --- database fault helpers -----------------------------------------------------------------


def backend_pids(admin_uri: str, dbname: str, application_name: str = SUPERVISOR_APP) -> list[int]:
    with psycopg.connect(admin_uri, autocommit=True, application_name=OBSERVER_APP) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            [dbname, application_name],
        ).fetchall()
    return [int(r[0]) for r in rows]


def terminate_backends(admin_uri: str, dbname: str,
                       application_name: str | None = SUPERVISOR_APP) -> int:
    """`pg_terminate_backend` every connection to `dbname` (of `application_name`, or all
    but our own when None). Returns how many were terminated."""
    with psycopg.connect(admin_uri, autocommit=True, application_name=OBSERVER_APP) as conn:
        if application_name is None:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", [dbname]).fetchall()
        else:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s",
                [dbname, application_name]).fetchall()
    return sum(1 for r in rows if r[0])


def dbname_of(uri: str) -> str:
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(uri).get("dbname")
    assert name, uri
    return str(name)


def admin_uri_of(uri: str) -> str:
    """The same server, database `postgres` (for ALTER/DROP DATABASE and pg_stat_activity)."""
    from stream_supervisor.embedded import database_uri

    return database_uri(uri, "postgres")


def seeded_moments(seed: int, count: int, low: float, high: float) -> list[float]:
    rng = random.Random(f"{seed}/chaos/moments")
    return sorted(rng.uniform(low, high) for _ in range(count))


def injected_dead_letters(truth: dict[str, Any]) -> int:
    return sum(truth["injected"].get(k, 0) for k in DEAD_LETTER_KINDS)


assert set(DEAD_LETTER_KINDS) <= set(INJECTED_KINDS)


class TableLock:
    """`LOCK TABLE ... IN ACCESS EXCLUSIVE MODE` held by a connection of the test's own
    until the block ends: every batch of the writer blocks on it (each batch locks the
    open positions it touches), mid-transaction, keys already claimed."""

    def __init__(self, database_url: str, table: str = "active_positions") -> None:
        self.database_url = database_url
        self.table = table
        self._conn: psycopg.Connection[Any] | None = None

    def _lock(self) -> None:
        conn = psycopg.connect(self.database_url, application_name=OBSERVER_APP,
                               connect_timeout=5)
        conn.execute(f"LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")  # opens a txn
        self._conn = conn

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.rollback()
            finally:
                conn.close()

    async def __aenter__(self) -> Self:
        await trio.to_thread.run_sync(self._lock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._release)


def _blocked_writers(admin_uri: str, dbname: str) -> list[int]:
    with psycopg.connect(admin_uri, autocommit=True, application_name=OBSERVER_APP) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s "
            "AND wait_event_type = 'Lock'", [dbname, SUPERVISOR_APP]).fetchall()
    return [int(r[0]) for r in rows]


async def wait_for_blocked_writer(admin_uri: str, dbname: str, *, timeout: float) -> list[int]:
    """Pids of the supervisor's connections waiting on a lock (a batch stuck mid-way)."""
    with trio.fail_after(timeout):
        while True:
            pids = await trio.to_thread.run_sync(_blocked_writers, admin_uri, dbname)
            if pids:
                return pids
            await trio.sleep(0.02)


def with_password(database_url: str) -> tuple[str, str]:
    """The URI with a password in it, so a test can check it never reaches the output. A
    local test server authenticates by trust and ignores it; a URI that already has one
    keeps it."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(database_url)
    if parts.password:
        return database_url, parts.password
    password = "chaos-pw-" + os.urandom(8).hex()
    netloc = f"{quote(parts.username or 'postgres')}:{password}@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)), password


async def wait_until_matches(database_url: str, broker: SimulatedBroker, *, timeout: float,
                             strict_prices: bool = True, stable_for: float = 1.5,
                             alive: Callable[[], bool] = lambda: True) -> list[Mismatch]:
    """Poll until the market is finished and the database has matched its truth for
    `stable_for` seconds on end (a supervisor in another process cannot say it is caught
    up; a match that holds while nothing new arrives can); returns the last mismatches
    (empty on success) when `timeout` passes or `alive()` turns false."""
    mismatches: list[Mismatch] = [Mismatch("liveness", "market", "finished", "still trading")]
    matched_since: float | None = None
    with trio.move_on_after(timeout):
        while alive():
            if broker.finished:
                found = await try_verify(database_url, broker, strict_prices=strict_prices)
                if found is not None:
                    mismatches = found
                    if found:
                        matched_since = None
                    elif matched_since is None:
                        matched_since = trio.current_time()
                    elif trio.current_time() - matched_since >= stable_for:
                        break
            await trio.sleep(POLL)
    return mismatches


def committed_rows(database_url: str, account_id: str) -> int:
    with psycopg.connect(database_url, application_name=OBSERVER_APP, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM alpaca_event_dedupe WHERE account_id = %s",
                           [account_id]).fetchone()
    return int(row[0]) if row else 0


def fill_paths(database_url: str, broker: SimulatedBroker, symbols: Iterable[str]) -> str:
    """For each symbol, the broker's fills in its own order (time, then each order's
    cumulative quantity: two fills of one order in one millisecond sort by uuid in their
    ids) beside the order the store applied them in (the dedupe table's `seq`), where
    they differ: what explains a path figure (average entry, realized P&L) that does."""
    truth = broker.ground_truth()
    lines: list[str] = []
    with psycopg.connect(database_url, autocommit=True, application_name=OBSERVER_APP) as conn:
        applied = conn.execute(
            "SELECT event_key, source, seq FROM alpaca_event_dedupe"
            " WHERE account_id = %s AND event_key LIKE 'fill:%%' ORDER BY seq",
            [truth["account_id"]]).fetchall()
    for symbol in symbols:
        ours = {oid for oid, o in truth["orders"].items() if o["symbol"] == symbol}
        want = sorted(((f["activity_id"], oid, f) for oid, o in truth["orders"].items()
                       if oid in ours for f in o["fills"]),
                      key=lambda t: (t[0][:17], t[1], Decimal(t[2]["cum_qty"])))
        want_keys = [(oid, Decimal(f["cum_qty"])) for _, oid, f in want]
        got = [row for row in applied if row[0].split(":")[1] in ours]
        got_keys = [(row[0].split(":")[1], Decimal(row[0].split(":")[2])) for row in got]
        differ = [i for i in range(max(len(want_keys), len(got_keys)))
                  if i >= len(want_keys) or i >= len(got_keys) or want_keys[i] != got_keys[i]]
        lines.append(f"{symbol}: {len(want_keys)} broker fills, {len(got_keys)} applied,"
                     f" {len(differ)} in another place; missing"
                     f" {sorted(set(want_keys) - set(got_keys))[:5]}")
        shown: set[int] = set()
        for first in differ[:6]:
            for i in range(max(0, first - 2), first + 3):
                if i in shown or i >= max(len(want), len(got)):
                    continue
                shown.add(i)
                w = (f"{want[i][0][:17]} {want[i][1][:8]}@{want_keys[i][1]}"
                     f" qty {want[i][2]['qty']} @ {want[i][2]['price']}"
                     f" streamed={want[i][2]['streamed']}" if i < len(want) else "-")
                g = (f"{got_keys[i][0][:8]}@{got_keys[i][1]} {got[i][1]} seq {got[i][2]}"
                     if i < len(got) else "-")
                lines.append(f"  {i}: broker {w} | applied {g}")
    return "\n".join(lines)
