"""Liveness, readiness and metrics over real HTTP on loopback, and the `health` command."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from stream_supervisor.cli import cmd_health
from stream_supervisor.endpoints import open_health_listeners, parse_http_addr, serve_health
from stream_supervisor.errors import ConfigError
from stream_supervisor.health import HealthMonitor, HealthPolicy
from stream_supervisor.metrics import Metrics
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState

POLICY = HealthPolicy(connection_silence=35.0, connecting_limit=30.0, backoff_limit=55.0,
                      stall_limit=60.0)


# --------------------------------------------------------------------- liveness rules


def running(connection: str = "streaming") -> SupervisorState:
    return SupervisorState(account_id="acct", connection=connection, connection_id=1,
                           caught_up=connection == "streaming", db_writable=True,
                           pipeline_running=True)


def test_a_quiet_stream_is_alive_while_pongs_arrive() -> None:
    state = running()
    monitor = HealthMonitor(state, POLICY, Metrics())
    for t in range(0, 3600, 15):  # an hour without a frame, a pong every 15 s
        state.beat("connection", float(t))
        assert monitor.assess(float(t) + 14.0).alive


def test_a_silent_connection_actor_is_not_alive() -> None:
    state = running()
    monitor = HealthMonitor(state, POLICY)
    state.beat("connection", 100.0)
    assert monitor.assess(100.0).alive
    assert monitor.assess(135.0).alive
    health = monitor.assess(136.0)
    assert not health.alive
    assert "connection actor silent for 36.0s while streaming" in health.problems


def test_a_new_connection_gets_its_own_silence_allowance() -> None:
    state = running("connecting")
    monitor = HealthMonitor(state, POLICY)
    state.beat("connection", 0.0)  # the previous connection's last pong
    assert monitor.assess(50.0).alive  # a new connecting phase starts here
    state.connection_id, state.connection = 2, "authorized"
    assert monitor.assess(55.0).alive  # old beat, but connected only since 55
    assert monitor.assess(90.0).alive
    assert not monitor.assess(91.0).alive


def test_overstaying_connecting_or_backoff_is_not_alive() -> None:
    state = running("connecting")
    monitor = HealthMonitor(state, POLICY)
    assert monitor.assess(0.0).alive
    assert monitor.assess(30.0).alive
    assert monitor.assess(31.0).problems == ("connecting for 31.0s",)
    state.connection = "backoff"
    assert monitor.assess(40.0).alive
    assert monitor.assess(96.0).problems == ("in reconnect backoff for 56.0s",)


def test_an_idle_writer_is_alive_but_a_stalled_one_is_not() -> None:
    state = running()
    metrics = Metrics()
    monitor = HealthMonitor(state, POLICY, metrics)
    state.beat("connection", 0.0)
    state.beat("writer", 0.0)
    state.beat("dedupe", 0.0)
    for t in (10.0, 20.0, 30.0):
        state.beat("connection", t)
    assert monitor.assess(30.0).alive  # nothing queued: idle for ever is fine
    metrics.channel_fill.labels("new_events").set(12)
    assert monitor.assess(30.0).alive
    state.beat("connection", 85.0)
    assert monitor.assess(90.0).alive  # busy for 60 s exactly
    health = monitor.assess(91.0)
    assert health.problems == ("writer made no progress for 61.0s with new_events queued",)
    state.beat("writer", 92.0)  # a commit
    assert monitor.assess(92.0).alive


def test_a_writer_retrying_against_a_database_outage_is_alive() -> None:
    state = running()
    metrics = Metrics()
    monitor = HealthMonitor(state, POLICY, metrics)
    state.beat("writer", 0.0)
    metrics.channel_fill.labels("new_events").set(500)
    for t in range(0, 600, 5):
        state.beat("connection", float(t))
        metrics.batch_retries.inc()  # batch_retry every 5 s, no commit
        assert monitor.assess(float(t)).alive


def test_a_stalled_dedupe_actor_is_not_alive() -> None:
    state = running()
    metrics = Metrics()
    monitor = HealthMonitor(state, POLICY, metrics)
    metrics.channel_fill.labels("events").set(1000)
    state.beat("connection", 0.0)
    assert monitor.assess(0.0).alive
    state.beat("connection", 61.0)
    assert monitor.assess(61.0).problems == (
        "dedupe made no progress for 61.0s with events queued",)


def test_waiting_before_the_pipeline_and_draining_are_alive() -> None:
    state = SupervisorState()  # waiting for the database, the broker, or the writer lock
    monitor = HealthMonitor(state, POLICY)
    assert monitor.assess(10_000.0).alive
    state = running()
    state.draining = True
    state.beat("connection", 0.0)
    assert HealthMonitor(state, POLICY).assess(10_000.0).alive


def test_policy_follows_settings() -> None:
    policy = HealthPolicy.from_settings(Settings(ping_interval=5.0, ping_timeout=3.0,
                                                 statement_timeout_ms=30_000))
    assert policy.connection_silence == 5.0 + 3.0 + 10.0
    assert policy.stall_limit == 100.0


# --------------------------------------------------------------------- HTTP


@asynccontextmanager
async def health_server(
    state: SupervisorState, metrics: Metrics, policy: HealthPolicy = POLICY
) -> AsyncIterator[tuple[int, httpx.AsyncClient]]:
    listeners = await open_health_listeners("127.0.0.1:0")
    monitor = HealthMonitor(state, policy, metrics)
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_health, listeners, state, metrics, monitor)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            yield port, client
        nursery.cancel_scope.cancel()


async def test_readyz_is_not_ready_until_backfill_completes() -> None:
    state = SupervisorState()
    with trio.fail_after(10):
        async with health_server(state, Metrics()) as (_, client):
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["ready"] is False

            # The pipeline runs, authorized and listening, backfilling from the cursor.
            state.pipeline_running, state.db_writable = True, True
            for phase in ("authorized", "listening", "backfilling"):
                state.connection = phase
                r = await client.get("/readyz")
                assert r.status_code == 503, phase
                assert r.json()["connection"] == phase

            state.connection, state.caught_up = "streaming", True  # backfill_done
            r = await client.get("/readyz")
            assert r.status_code == 200
            assert r.json() == {"ready": True, "stalled": [], "pipeline_running": True,
                                "connection": "streaming", "caught_up": True,
                                "db_writable": True, "draining": False, "leader": False,
                                "drifted_symbols": None}

            state.db_writable = False  # a batch failed: retrying
            assert (await client.get("/readyz")).status_code == 503
            state.db_writable = True
            state.draining = True
            assert (await client.get("/readyz")).status_code == 503


async def test_healthz_reports_problems_with_503() -> None:
    state = running()
    state.beat("connection", trio.current_time())
    policy = HealthPolicy(connection_silence=0.2)
    with trio.fail_after(10):
        async with health_server(state, Metrics(), policy) as (_, client):
            r = await client.get("/healthz")
            assert r.status_code == 200
            assert r.json()["alive"] is True and r.json()["problems"] == []
            await trio.sleep(0.3)  # no pong, no frame
            r = await client.get("/healthz")
            assert r.status_code == 503
            assert r.json()["problems"][0].startswith("connection actor silent")


async def test_metrics_parse_and_match_what_was_counted() -> None:
    metrics = Metrics()
    metrics.duplicates_dropped.labels("lru").inc(3)
    metrics.duplicates_dropped.labels("inflight").inc(1)
    metrics.duplicates_dropped.labels("database").inc(2)
    metrics.events_received.labels("fill", "stream").inc(40)
    metrics.events_received.labels("partial_fill", "rest").inc(5)
    metrics.batch_size.observe(7)
    metrics.commit_seconds.observe(0.003)
    metrics.channel_fill.labels("events").set(4)
    metrics.reconnects.labels("rate_limited").inc()
    with trio.fail_after(10):
        async with health_server(SupervisorState(), metrics) as (_, client):
            r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    async with health_server(SupervisorState(), metrics) as (_, client):
        om = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    dup = "stream_supervisor_duplicates_dropped_total"
    assert samples[(dup, (("layer", "lru"),))] == 3
    assert samples[(dup, (("layer", "inflight"),))] == 1
    assert samples[(dup, (("layer", "database"),))] == 2
    received = "stream_supervisor_events_received_total"
    assert samples[(received, (("event", "fill"), ("source", "stream")))] == 40
    assert samples[(received, (("event", "partial_fill"), ("source", "rest")))] == 5
    assert samples[("stream_supervisor_batch_size_count", ())] == 1
    assert samples[("stream_supervisor_batch_size_sum", ())] == 7
    assert samples[("stream_supervisor_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("stream_supervisor_channel_fill", (("channel", "events"),))] == 4
    assert samples[("stream_supervisor_reconnects_total", (("reason", "rate_limited"),))] == 1
    assert samples[("stream_supervisor_leader", ())] == 0


async def test_other_paths_methods_and_garbage() -> None:
    with trio.fail_after(10):
        async with health_server(SupervisorState(), Metrics()) as (port, client):
            assert (await client.get("/")).status_code == 404
            assert (await client.post("/readyz")).status_code == 405
            head = await client.head("/readyz")
            assert head.status_code == 503 and head.content == b""
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
                reply = await stream.receive_some(4096)
            assert reply.startswith(b"HTTP/1.1 400")
            # A client that connects and says nothing does not hold the server.
            async with await trio.open_tcp_stream("127.0.0.1", port):
                assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    ("addr", "expected"),
    [("127.0.0.1:9108", ("127.0.0.1", 9108)), ("[::1]:9108", ("::1", 9108)),
     (":9108", ("127.0.0.1", 9108)), ("0.0.0.0:0", ("0.0.0.0", 0))],
)
def test_parse_http_addr(addr: str, expected: tuple[str, int]) -> None:
    assert parse_http_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9108", "host:", "host:port", "127.0.0.1:70000"])
def test_bad_http_addr_names_the_variable(addr: str) -> None:
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_HTTP_ADDR"):
        parse_http_addr(addr)


async def test_a_taken_port_is_a_configuration_error() -> None:
    listeners = await open_health_listeners("127.0.0.1:0")
    port = listeners[0].socket.getsockname()[1]
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            await open_health_listeners(f"127.0.0.1:{port}")
    finally:
        for listener in listeners:
            await listener.aclose()


# --------------------------------------------------------------------- `health` command


def _health_args(*, ready: bool = False) -> argparse.Namespace:
    return argparse.Namespace(ready=ready, timeout=2.0, http_addr=None)


async def test_health_command_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    state = running()
    state.beat("connection", trio.current_time())
    state.connection = "backfilling"
    with trio.fail_after(20):
        async with health_server(state, Metrics()) as (port, _):
            settings = Settings(http_addr=f"127.0.0.1:{port}")
            alive = await trio.to_thread.run_sync(cmd_health, _health_args(), settings)
            ready = await trio.to_thread.run_sync(cmd_health, _health_args(ready=True), settings)
            state.connection, state.caught_up = "streaming", True
            ready_now = await trio.to_thread.run_sync(cmd_health, _health_args(ready=True),
                                                      settings)
    assert (alive, ready, ready_now) == (0, 1, 0)
    out = [line for line in capsys.readouterr().out.splitlines() if "health_listening" not in line]
    assert out[0].startswith("healthy: /healthz 200")
    assert out[1].startswith("unhealthy: /readyz 503")
    # Nothing listening there any more; and no address configured at all.
    gone = await trio.to_thread.run_sync(cmd_health, _health_args(), settings)
    unset = await trio.to_thread.run_sync(cmd_health, _health_args(), Settings())
    assert (gone, unset) == (1, 1)
    assert "STREAM_SUPERVISOR_HTTP_ADDR is not set" in capsys.readouterr().out


def test_health_subcommand_is_wired() -> None:
    from stream_supervisor.cli import build_parser

    args = build_parser().parse_args(["health", "--ready", "--http-addr", "127.0.0.1:1"])
    assert args.ready and args.http_addr == "127.0.0.1:1"


async def test_serve_wiring_starts_health_and_rejects_a_bad_address() -> None:
    from stream_supervisor.service import serve

    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_HTTP_ADDR"):
        await serve(Settings(http_addr="nonsense", key_id="k" * 8, secret_key="s" * 8,
                             database_url="postgresql://nobody@127.0.0.1:9/x"), environ={})
