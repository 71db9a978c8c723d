"""The real `stream-supervisor run` process under a fake systemd: a notify socket the test
binds, a watchdog period, the health/metrics listener on loopback, the simulated broker
with duplicate frames, and the test database; then SIGTERM."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import sys
import uuid
from functools import partial
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from stream_supervisor.pgstore import PgStore
from stream_supervisor.testing.broker import (
    ChaosConfig,
    SimConfig,
    SimServer,
    SimulatedBroker,
    serve,
)
from stream_supervisor.testing.verify import verify_against_truth

pytestmark = pytest.mark.slow

KEY_ID = "PKE2E" + uuid.uuid4().hex[:15].upper()
SECRET_KEY = "e2e-secret-" + uuid.uuid4().hex
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
DUP_LAYERS = ("lru", "inflight", "database", "order")


def _with_password(database_url: str) -> tuple[str, str]:
    """The test database's URI with a password in it, so the test can check it never
    reaches the output. A local test server authenticates by trust or peer and ignores
    it; a server given through DATABASE_URL keeps the password it already has."""
    parts = urlsplit(database_url)
    if parts.password:
        return database_url, parts.password
    password = "e2e-pw-" + uuid.uuid4().hex
    user = parts.username or "postgres"
    host = parts.hostname or ""
    netloc = f"{quote(user)}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), password


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert isinstance(port, int)
        return port


class NotifyReceiver:
    def __init__(self) -> None:
        self.messages: list[tuple[float, dict[str, str]]] = []

    async def run(self, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((trio.current_time(), fields))

    def times(self, key: str) -> list[float]:
        return [t for t, m in self.messages if key in m]

    async def wait_for(self, key: str, timeout: float) -> float:
        with trio.fail_after(timeout):
            while not self.times(key):
                await trio.sleep(0.05)
        return self.times(key)[0]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, v2) in ls for k, v2 in labels.items()))


async def test_run_process_speaks_systemd_serves_health_and_drains(
    database_url: str, tmp_path: Path
) -> None:
    dsn, password = _with_password(database_url)
    broker = SimulatedBroker(SimConfig(
        seed=11, account_id=str(uuid.uuid4()), key_id=KEY_ID, secret_key=SECRET_KEY,
        orders=40, rate=400.0, chaos=ChaosConfig(duplicate_prob=0.3, duplicate_burst=3),
    ))
    http_port = _free_port()
    notify_path = str(tmp_path / "notify.sock")
    out_path = tmp_path / "stdout.log"
    err_path = tmp_path / "stderr.log"
    rx = NotifyReceiver()
    proc: trio.Process | None = None

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with trio.fail_after(120), sock:
        await sock.bind(notify_path)
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            nursery.start_soon(rx.run, sock)
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(tmp_path),
                "PYTHONUNBUFFERED": "1",
                "APCA_API_KEY_ID": KEY_ID,
                "APCA_API_SECRET_KEY": SECRET_KEY,
                "APCA_API_BASE_URL": server.rest_url,
                "APCA_API_STREAM_URL": server.ws_url,
                "DATABASE_URL": dsn,
                "NOTIFY_SOCKET": notify_path,
                "WATCHDOG_USEC": str(WATCHDOG_USEC),
                "STREAM_SUPERVISOR_HTTP_ADDR": f"127.0.0.1:{http_port}",
                "STREAM_SUPERVISOR_LOG_FORMAT": "json",
                "STREAM_SUPERVISOR_LOG_LEVEL": "debug",
                "STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "3600",
                "STREAM_SUPERVISOR_BASELINE": "off",  # the session starts with the service
                "STREAM_SUPERVISOR_ORDER_REFRESH_INTERVAL": "0",
                "STREAM_SUPERVISOR_PING_INTERVAL": "1",
                "STREAM_SUPERVISOR_PING_TIMEOUT": "2",
                "STREAM_SUPERVISOR_DRAIN_TIMEOUT": "10",
            }
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "stream_supervisor", "run"],
                    env=env, stdout=out, stderr=err, cwd=str(tmp_path),
                )
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}",
                                             timeout=5.0) as http:
                    await _scenario(broker, proc, rx, http, dsn, nursery)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    with trio.move_on_after(10) as cleanup:
                        cleanup.shield = True
                        await proc.wait()
            nursery.cancel_scope.cancel()

    output = out_path.read_text() + err_path.read_text()
    assert proc is not None and proc.returncode == 0, output[-3000:]
    for secret in (KEY_ID, SECRET_KEY, password):
        assert secret not in output
    events = [json.loads(line)["event"] for line in out_path.read_text().splitlines()
              if line.startswith("{")]
    for expected in ("health_listening", "systemd_ready", "draining", "drained", "stopped"):
        assert expected in events, expected


async def _scenario(
    broker: SimulatedBroker,
    proc: trio.Process,
    rx: NotifyReceiver,
    http: httpx.AsyncClient,
    dsn: str,
    nursery: trio.Nursery,
) -> None:
    # READY=1 once authorized, listening, backfilled and the database writable.
    ready_at = await rx.wait_for("READY", timeout=60)
    assert proc.returncode is None
    assert (await http.get("/readyz")).status_code == 200
    assert (await http.get("/healthz")).json()["alive"] is True

    await nursery.start(broker.run_market)
    account = broker.account()["id"]
    with trio.fail_after(60):
        while True:
            await trio.sleep(0.25)
            if not broker.finished:
                continue
            samples = _samples((await http.get("/metrics")).text)
            dropped = sum(_total(samples, "stream_supervisor_duplicates_dropped_total",
                                 layer=layer) for layer in DUP_LAYERS)
            if dropped < broker.stats["dup_frames"]:
                continue
            store = PgStore(dsn)
            await store.open()
            try:
                mismatches = verify_against_truth(await store.snapshot(account),
                                                  broker.ground_truth())
            finally:
                await store.aclose()
            if not mismatches:
                break

    # Duplicates dropped, per layer, add up to exactly the duplicate frames sent; every
    # frame sent was received.
    stats = broker.stats
    assert stats["dup_frames"] > 20
    assert dropped == stats["dup_frames"]
    assert _total(samples, "stream_supervisor_duplicates_dropped_total", layer="order") == 0
    assert _total(samples, "stream_supervisor_events_received_total",
                  source="stream") == stats["frames_sent"]
    assert _total(samples, "stream_supervisor_batches_total") >= 1
    assert _total(samples, "stream_supervisor_dead_letters_total") == 0

    # Periodic WATCHDOG=1 at half of WATCHDOG_USEC while healthy.
    with trio.fail_after(10):
        while len(pings := [t for t in rx.times("WATCHDOG") if t >= ready_at]) < 5:
            await trio.sleep(0.1)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 2.0, gaps  # 0.5 s nominal; generous for a loaded machine
    assert [m["STATUS"] for _, m in rx.messages if "STATUS" in m]

    # SIGTERM: STOPPING=1, then exit 0 within the drain deadline.
    proc.send_signal(signal.SIGTERM)
    await rx.wait_for("STOPPING", timeout=10)
    with trio.fail_after(20):
        await proc.wait()
    assert proc.returncode == 0
    assert len(rx.times("READY")) == 1


async def test_watchdog_pings_stop_while_the_writer_is_wedged(database_url: str) -> None:
    """The real pipeline in-process (simulated broker, PostgreSQL) with the notify loop
    wired as `serve` wires it, a short stall limit, and the writer wedged on a table lock
    held by the test: pings stop while it is stuck with work queued, resume once the lock
    goes, and nothing is lost or doubled."""
    from stream_supervisor.health import HealthMonitor, HealthPolicy, readiness
    from stream_supervisor.metrics import Metrics
    from stream_supervisor.rest_http import HttpBrokerRest, RestSettings
    from stream_supervisor.sdnotify import Notifier, notify_loop
    from stream_supervisor.settings import Settings
    from stream_supervisor.state import SupervisorState
    from stream_supervisor.supervisor import EXIT_OK, Dependencies, Supervisor
    from stream_supervisor.wsclient import websocket_connector

    broker = SimulatedBroker(SimConfig(seed=23, account_id=str(uuid.uuid4()), orders=150,
                                       rate=250.0))
    state, metrics = SupervisorState(), Metrics()
    policy = HealthPolicy(connection_silence=5.0, connecting_limit=10.0, backoff_limit=10.0,
                          stall_limit=1.5)
    monitor = HealthMonitor(state, policy, metrics)
    name = f"stream-supervisor-e2e-{uuid.uuid4().hex}"
    rx = NotifyReceiver()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    exit_codes: list[int] = []
    with trio.fail_after(90), sock:
        await sock.bind(b"\0" + name.encode())
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            nursery.start_soon(rx.run, sock)
            # A statement timeout far beyond the test: the blocked INSERT waits, no retry.
            settings = Settings(
                key_id=broker.config.key_id, secret_key=broker.config.secret_key,
                base_url=server.rest_url, stream_url=server.ws_url, database_url=database_url,
                first_start_lookback=3600.0, baseline=False,
                statement_timeout_ms=120_000, ping_interval=1.0,
                ping_timeout=2.0, drain_timeout=10.0, order_refresh_interval=0.0,
            )
            rest = HttpBrokerRest(RestSettings(server.rest_url, settings.key_id,
                                               settings.secret_key, timeout=5.0))
            supervisor = Supervisor(settings, Dependencies(
                connector=websocket_connector(connect_timeout=5.0), rest=rest,
                store_factory=lambda: PgStore(database_url, statement_timeout_ms=120_000),
                install_signal_handlers=False,
            ), metrics=metrics, state=state)

            async def run_supervisor() -> None:
                exit_codes.append(await supervisor.run())

            nursery.start_soon(run_supervisor)
            notifier = Notifier("@" + name)
            await nursery.start(partial(notify_loop, state, notifier, monitor, watchdog=0.1,
                                        status_interval=1.0, tick=0.02))
            await rx.wait_for("READY", timeout=30)
            await nursery.start(broker.run_market)
            with trio.fail_after(10):
                while state.committed_batches == 0:
                    await trio.sleep(0.02)

            import psycopg

            blocker = await trio.to_thread.run_sync(
                lambda: psycopg.connect(database_url, autocommit=True))
            try:
                await trio.to_thread.run_sync(blocker.execute, "BEGIN")
                await trio.to_thread.run_sync(
                    blocker.execute, "LOCK TABLE alpaca_event_dedupe IN EXCLUSIVE MODE")
                # Pings stop once the writer has had work queued and no progress for 1.5 s.
                with trio.fail_after(15):
                    while True:
                        await trio.sleep(0.1)
                        recent = [t for t in rx.times("WATCHDOG")
                                  if t > trio.current_time() - 0.6]
                        if not recent:
                            break
                problems = monitor.assess().problems
                assert any(p.startswith("writer made no progress") for p in problems), problems
                # /readyz says so too: db_writable only changes once a statement fails.
                assert state.ready and state.db_writable
                verdict = readiness(state, monitor.assess())
                assert not verdict["ready"] and verdict["stalled"], verdict
                withheld_at = trio.current_time()
                await trio.sleep(0.5)
                assert [t for t in rx.times("WATCHDOG") if t > withheld_at] == []
            finally:
                await trio.to_thread.run_sync(blocker.execute, "ROLLBACK")
                await trio.to_thread.run_sync(blocker.close)
            released_at = trio.current_time()
            with trio.fail_after(15):  # the writer commits again: pings resume
                while len([t for t in rx.times("WATCHDOG") if t > released_at]) < 3:
                    await trio.sleep(0.05)
            assert readiness(state, monitor.assess())["stalled"] == []

            account = broker.account()["id"]
            with trio.fail_after(30):
                while True:
                    await trio.sleep(0.25)
                    if not broker.finished:
                        continue
                    store = PgStore(database_url)
                    await store.open()
                    try:
                        snapshot = await store.snapshot(account)
                    finally:
                        await store.aclose()
                    if not verify_against_truth(snapshot, broker.ground_truth()):
                        break
            supervisor.request_drain("test")
            with trio.fail_after(20):
                while not exit_codes:
                    await trio.sleep(0.05)
            await rx.wait_for("STOPPING", timeout=5)
            await rest.aclose()
            notifier.close()
            nursery.cancel_scope.cancel()
    assert exit_codes == [EXIT_OK]


class FreezingProxy:
    """A TCP proxy to the test database that can freeze: it stops relaying but keeps
    every socket open, as a database host that hangs does (the kernel still acknowledges,
    so no TCP timeout fires and the server's own timeouts cannot run)."""

    def __init__(self, database_url: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        self.target = conninfo_to_dict(database_url)
        self.flowing = trio.Event()
        self.flowing.set()
        self.port = 0

    async def _open_target(self) -> trio.abc.Stream:
        host = str(self.target.get("host") or "localhost")
        port = int(self.target.get("port") or 5432)
        if host.startswith("/"):
            return await trio.open_unix_socket(f"{host}/.s.PGSQL.{port}")
        return await trio.open_tcp_stream(host, port)

    async def _pump(self, src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(65536):
                await self.flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await self._open_target()
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server)
            nursery.start_soon(self._pump, server, client)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def freeze(self) -> None:
        self.flowing = trio.Event()

    def url(self, database_url: str) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(database_url, host="127.0.0.1", port=self.port)


async def test_a_drain_the_frozen_database_holds_up_ends_the_process_by_its_deadline(
    database_url: str, tmp_path: Path
) -> None:
    """SIGTERM while the writer's statement waits on a database host that hung (sockets
    open, nothing answered): the drain deadline cancelled the pipeline but not the worker
    thread blocked in libpq, and the process never exited (killed by systemd's stop
    timeout). Now it exits 1 at the deadline plus the backstop's grace; the database then
    holds exactly what committed before the freeze (the rest lies within the backfill)."""
    from stream_supervisor.drain import BACKSTOP_GRACE

    broker = SimulatedBroker(SimConfig(seed=29, account_id=str(uuid.uuid4()), key_id=KEY_ID,
                                       secret_key=SECRET_KEY, orders=400, rate=300.0))
    proxy = FreezingProxy(database_url)
    out_path, err_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    drain_timeout = 2.0
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            await nursery.start(proxy.run)
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
                "PYTHONUNBUFFERED": "1", "APCA_API_KEY_ID": KEY_ID,
                "APCA_API_SECRET_KEY": SECRET_KEY, "APCA_API_BASE_URL": server.rest_url,
                "APCA_API_STREAM_URL": server.ws_url, "DATABASE_URL": proxy.url(database_url),
                "STREAM_SUPERVISOR_LOG_FORMAT": "json", "STREAM_SUPERVISOR_LOG_LEVEL": "debug",
                "STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "3600",
                "STREAM_SUPERVISOR_BASELINE": "off",
                "STREAM_SUPERVISOR_ORDER_REFRESH_INTERVAL": "0",
                "STREAM_SUPERVISOR_DRAIN_TIMEOUT": str(drain_timeout),
            }
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "stream_supervisor", "run"],
                    env=env, stdout=out, stderr=err, cwd=str(tmp_path))
            try:
                nursery.start_soon(broker.run_market)
                with trio.fail_after(45):
                    while b'"event": "batch_committed"' not in out_path.read_bytes():
                        assert proc.returncode is None, err_path.read_text()[-3000:]
                        await trio.sleep(0.1)
                proxy.freeze()  # the writer's next statement waits for ever
                await trio.sleep(1.0)
                proc.send_signal(signal.SIGTERM)
                asked = trio.current_time()
                with trio.fail_after(drain_timeout + BACKSTOP_GRACE + 15):
                    code = await proc.wait()
                took = trio.current_time() - asked
            finally:
                if proc.returncode is None:
                    proc.kill()
            nursery.cancel_scope.cancel()
    output = out_path.read_text()
    assert code == 1, output[-3000:]
    assert took >= drain_timeout and '"event": "drain_backstop_exit"' in output, output[-3000:]
