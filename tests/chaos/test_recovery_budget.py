"""Recovery that keeps up, within the broker's REST limit (docs/design.md, section 12),
against the simulated broker enforcing Alpaca's 200 requests a minute on loopback and a
real PostgreSQL: a socket closed mid-recovery is noticed at once with the pages read so
far committed; a process killed with SIGKILL mid-recovery restarts from them; and a
two-minute soak with disconnects never meets a 429, never takes more than its share,
leaves the user's bot its own, and ends with the database equal to the ground truth."""

from __future__ import annotations

import math
import os
import random
import signal
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

from stream_supervisor.metrics import Metrics
from stream_supervisor.state import SupervisorState
from stream_supervisor.testing.broker import (
    USER_BOT_AGENT,
    ChaosConfig,
    SimConfig,
    SimServer,
    SimulatedBroker,
    run_user_bot,
    serve,
)
from stream_supervisor.testing.running import rss_mb, start_supervising
from stream_supervisor.testing.verify import summarize
from stream_supervisor.wiring import open_supervisor, pg_store
from stream_supervisor.wsclient import websocket_connector

from .harness import (
    DISCONNECT_TIMEOUT,
    SupervisorProcess,
    chaos_settings,
    committed_rows,
    fill_paths,
    final_verify,
    process_env,
    wait_until_matches,
)

pytestmark = pytest.mark.chaos

SERVICE = "stream-supervisor"
START_TIMEOUT = 60.0
LIMIT = 200  # Alpaca's
SHARE = 0.5  # the default


def backlog(config: SimConfig, fills: int) -> SimulatedBroker:
    """A broker whose account made `fills` fills nobody streamed (REST only) in the
    minutes up to now, then trades on from now."""
    probe = SimulatedBroker(config)
    while probe.fills_total < fills and probe.step() is not None:
        pass
    took = timedelta(seconds=probe.updates_total / config.rate)
    broker = SimulatedBroker(replace(config, start_time=datetime.now(UTC) - took))
    while broker.fills_total < fills and broker.step() is not None:
        pass
    return broker


async def run_in_process(database_url: str, broker: SimulatedBroker, body: Any,
                         **overrides: Any) -> tuple[Metrics, SupervisorState]:
    """The supervisor against `broker` served on loopback while `body(state, metrics)`
    runs; drained afterwards."""
    metrics, state = Metrics(), SupervisorState()
    async with trio.open_nursery() as nursery:
        server: SimServer = await nursery.start(serve, broker)
        settings = replace(chaos_settings(database_url, **overrides),
                           key_id=broker.config.key_id, secret_key=broker.config.secret_key,
                           base_url=server.rest_url, stream_url=server.ws_url)
        async with open_supervisor(
                settings, metrics=metrics, state=state,
                connector=websocket_connector(connect_timeout=settings.connect_timeout,
                                              disconnect_timeout=DISCONNECT_TIMEOUT),
                store_factory=lambda: pg_store(settings), rng=random.Random(7),
                install_signal_handlers=False) as sup:
            done = start_supervising(sup, nursery)
            await body(nursery, state, metrics)
            sup.request_drain("test done")
            with trio.fail_after(settings.drain_timeout + 10):
                await done.wait()
        nursery.cancel_scope.cancel()
    return metrics, state


async def test_a_socket_closed_mid_recovery_is_noticed_at_once_and_pages_stay_committed(
        database_url: str) -> None:
    # 2,000 fills before the service starts: 20 pages, half a minute at its 90 a minute.
    # The broker drops the socket 150 updates into the backfill.
    config = SimConfig(seed=1901, orders=900, rate=60.0, scenario="closure-mid-recovery",
                       chaos=ChaosConfig(disconnect_at=(150,)))  # the 150th frame streamed
    broker = backlog(config, 2_000)
    pages_needed = math.ceil(broker.fills_total / 100)
    seen: dict[str, Any] = {}

    async def body(nursery: trio.Nursery, state: SupervisorState, metrics: Metrics) -> None:
        with trio.fail_after(30):
            while state.connection != "backfilling":
                await trio.sleep(0.02)
        await nursery.start(broker.run_market)
        with trio.fail_after(60):
            while broker.stats["disconnects"] == 0:
                await trio.sleep(0.02)
            # The next connection begins while the first backfill had pages to go.
            while broker.stats["connections"] < 2:
                await trio.sleep(0.02)
        seen["activity_requests"] = broker.rate_limiter.requests.get("activities", 0)
        seen["rows"] = await trio.to_thread.run_sync(committed_rows, database_url,
                                                     broker.account_id)
        mismatches = await wait_until_matches(database_url, broker, timeout=150)
        seen["mismatches"] = mismatches

    with trio.fail_after(240):
        await run_in_process(database_url, broker, body)
    assert seen["activity_requests"] < pages_needed, seen
    assert seen["rows"] > 0, "pages read before the closure were not committed"
    assert seen["mismatches"] == [], summarize(seen["mismatches"])
    assert broker.rate_limiter.refused == {}
    assert broker.rate_limiter.peak_in_window[SERVICE] <= LIMIT * SHARE


async def test_sigkill_mid_recovery_keeps_the_committed_pages_and_a_restart_matches(
        database_url: str) -> None:
    config = SimConfig(seed=1902, orders=900, rate=50.0, scenario="sigkill-mid-recovery")
    broker = backlog(config, 2_000)
    pages_needed = math.ceil(broker.fills_total / 100)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            # A short overlap, so the restart's start shows where the kill left the cursor.
            env = process_env(database_url, server, config,
                              STREAM_SUPERVISOR_BACKFILL_OVERLAP="5")
            async with SupervisorProcess(env, nursery, name="first") as first:
                await first.wait_for_event("backfill_started", timeout=START_TIMEOUT)
                with trio.fail_after(60):
                    while await trio.to_thread.run_sync(
                            committed_rows, database_url, broker.account_id) < 300:
                        await trio.sleep(0.1)
                read_before_kill = broker.rate_limiter.requests.get("activities", 0)
                first.kill()
                code = await first.wait(timeout=10)
                rows = await trio.to_thread.run_sync(committed_rows, database_url,
                                                     broker.account_id)
                assert code == -signal.SIGKILL, first.tail()
            # Committed while pages were still to be read: progress a kill cannot undo.
            assert read_before_kill < pages_needed, (read_before_kill, pages_needed)
            assert 300 <= rows < broker.fills_total
            async with SupervisorProcess(env, nursery, name="restart") as second:
                await second.wait_for_event("listening", timeout=START_TIMEOUT)
                await nursery.start(broker.run_market)
                mismatches, code, tail = await second.match_then_drain(
                    database_url, broker, timeout=180)
                restart_from = next(e for e in second.events()
                                    if e["event"] == "backfill_started")["after"]
            nursery.cancel_scope.cancel()
    mismatches = mismatches or await final_verify(database_url, broker)
    assert mismatches == [], summarize(mismatches) + "\n" + tail
    assert code == 0, tail
    first_fill = broker.market.activities[0]["transaction_time"]
    assert restart_from > first_fill, "the restart read the whole range again"
    assert broker.rate_limiter.refused == {}
    assert broker.rate_limiter.peak_in_window[SERVICE] <= LIMIT * SHARE


#: The soak's warm-up ends this long after the first reconnect's recovery is done: the
#: live buffer it held has gone through the pipeline and its memory back to the system
#: (stream_supervisor/heap.py).
WARM_SETTLE = 10.0
#: The issue's rule: the resident set after warm-up stays within this of the warm level.
RSS_FLAT = 1.15


def soak_recoveries(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each backfill's start and end (the service's own log): how long it took, fills
    and pages read."""
    out: list[dict[str, Any]] = []
    started: datetime | None = None
    for e in events:
        if e["event"] == "backfill_started":
            started = datetime.fromisoformat(e["timestamp"])
            after = datetime.fromisoformat(e["after"])
        elif e["event"] == "backfill_done" and started is not None:
            took = datetime.fromisoformat(e["timestamp"]) - started
            out.append({"at": started.strftime("%H:%M:%S"),
                        # How far before its start the backfill began reading.
                        "reads_back_s": round((started - after).total_seconds(), 1),
                        "took_s": round(took.total_seconds(), 1), "fills": e["fills"],
                        "pages": e["pages"], "order_requests": e["order_requests"]})
            started = None
    return out


async def test_two_minute_soak_within_the_budget(database_url: str) -> None:
    """Two minutes at 200 updates/s against the real `run` process, the broker dropping
    the stream every 40 s and refusing it for 5 s after each (only REST covers those),
    the user's bot spending its 100 requests a minute throughout.

    Memory: after warm-up the service's resident set stays within 15% of the warm level
    (the issue's rule). Warm-up runs until `WARM_SETTLE` seconds after the first
    reconnect's recovery is done, so the warm level includes one whole recovery's live
    buffer at this load: every later recovery covers an outage of the same length, and
    must not need more. With the small LRU set below (5,000 keys) and the recovery
    maps' bounds (`recovery.SEEN_ORDERS`, `FORWARDED_ORDERS`: 50,000 and 20,000 orders,
    not reached at CI's 200 updates/s), the working set is reached by then.

    The long soak of the service alone (its own process, so its resident set apart from
    the simulated broker's books) is this test with `STREAM_SUPERVISOR_SOAK_SECONDS` and
    `STREAM_SUPERVISOR_SOAK_RATE` (and `STREAM_SUPERVISOR_SOAK_DISCONNECT_EVERY`, seconds
    of the market's frames) set (BENCHMARKS.md, section Recovery). Runs longer than two
    minutes give the service a 5 s ping timeout (`STREAM_SUPERVISOR_SOAK_PING_TIMEOUT`
    overrides): the harness's 1 s is for short scenarios, and a loaded machine can hold
    a pong that long on the simulated broker's loop."""
    rate = float(os.environ.get("STREAM_SUPERVISOR_SOAK_RATE", "200"))
    seconds = float(os.environ.get("STREAM_SUPERVISOR_SOAK_SECONDS", "120"))
    every = float(os.environ.get("STREAM_SUPERVISOR_SOAK_DISCONNECT_EVERY", "40"))
    ping_timeout = os.environ.get("STREAM_SUPERVISOR_SOAK_PING_TIMEOUT",
                                  "1" if seconds <= 120 else "5")
    config = SimConfig(seed=1903, orders=int(rate * seconds / 5), rate=rate, scenario="soak",
                       start_time=datetime.now(UTC),
                       chaos=ChaosConfig(disconnect_every=int(rate * every),
                                         outage_after_disconnect=5.0))
    broker = SimulatedBroker(config)
    rss: list[float] = []
    warm_end: list[int] = []  # the sample at which warm-up ended
    with trio.fail_after(seconds + 360):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            await nursery.start(run_user_bot, broker, LIMIT * (1 - SHARE))
            # A small LRU, so memory reaches its working size early in two minutes.
            env = process_env(database_url, server, config,
                              STREAM_SUPERVISOR_FIRST_START_LOOKBACK="60",
                              STREAM_SUPERVISOR_LRU_SIZE="5000",
                              STREAM_SUPERVISOR_PING_TIMEOUT=ping_timeout)
            async with SupervisorProcess(env, nursery, name="soak") as proc:
                # The market's clock starts with it: started now, its times are the wall
                # clock's, as the broker's are.
                await nursery.start(broker.run_market)

                async def sample() -> None:
                    settled_at: float | None = None
                    while True:
                        rss.append(rss_mb(proc.pid))
                        if settled_at is None and sum(
                                '"event": "backfill_done"' in line
                                for line in proc.stdout) >= 2:
                            settled_at = trio.current_time() + WARM_SETTLE
                        if (not warm_end and settled_at is not None
                                and trio.current_time() >= settled_at):
                            warm_end.append(len(rss))
                        await trio.sleep(1.0)

                nursery.start_soon(sample)
                # Quantities and every order's values first; then the per-symbol
                # average entry and realized P&L, path figures (docs/design.md, section
                # 8) that are exact here: this market neither reorders nor skips fills,
                # and every fill REST brings continues from what was forwarded before it
                # or is priced from its order's cumulative average (section 12).
                mismatches = await wait_until_matches(
                    database_url, broker, timeout=seconds + 240, strict_prices=False,
                    alive=lambda: proc.returncode is None)
                path_figures = await final_verify(database_url, broker)
                paths = await trio.to_thread.run_sync(
                    fill_paths, database_url, broker,
                    {m.subject for m in path_figures}) if path_figures else ""
                tail = proc.tail()
                events = proc.events()
                if os.environ.get("STREAM_SUPERVISOR_SOAK_LOG"):  # the service's log, kept
                    await trio.Path(os.environ["STREAM_SUPERVISOR_SOAK_LOG"]).write_text(
                        "\n".join(proc.stdout) + "\n")
            nursery.cancel_scope.cancel()
    gaps = [e for e in events if e["event"] == "fill_gap"]
    limiter = broker.rate_limiter
    print("soak RSS (MB, every 5 s):", [round(r, 1) for r in rss[::5]])  # for the record
    print("soak recoveries:", soak_recoveries(events))
    print("soak memory released after recoveries (RSS MB before, after):",
          [(e["rss_mb_before"], e["rss_mb_after"]) for e in events
           if e["event"] == "freed_memory_released"])
    print("soak:", {"rate": rate, "seconds": seconds, "fills": broker.fills_total,
                    "disconnects": broker.stats["disconnects"],
                    "service_requests": limiter.by_caller.get(SERVICE, 0),
                    "service_peak_in_window": limiter.peak_in_window[SERVICE],
                    "refused": limiter.refused, "warm_end_s": warm_end[:1],
                    "peak_rss_mb": round(max(rss), 1),
                    "over_budget_warnings": sum(e["event"] == "recovery_over_budget"
                                                for e in events)})
    assert broker.stats["disconnects"] >= 2
    assert mismatches == [], summarize(mismatches) + "\n" + tail
    assert path_figures == [], summarize(path_figures) + "\n" + paths + "\n" + tail
    assert gaps == [], gaps  # no fill priced past a gap without its order's average
    assert limiter.refused == {}, limiter.refused  # no 429, for us or the user's bot
    assert limiter.peak_in_window[SERVICE] <= LIMIT * SHARE
    assert limiter.by_caller[USER_BOT_AGENT] >= seconds / 60 * LIMIT * (1 - SHARE) * 0.9
    # The service's memory is flat after warm-up (the rule; see the docstring
    # for the warm-up), and there is an after: at least one more recovery's worth.
    assert warm_end, "the first reconnect's recovery never finished"
    warm, after = max(rss[:warm_end[0]]), rss[warm_end[0]:]
    assert len(soak_recoveries(events)) >= 3, soak_recoveries(events)
    assert max(after) <= warm * RSS_FLAT, (warm, max(after), [round(r) for r in rss[::5]])


async def test_a_live_buffer_full_during_recovery_drops_the_socket_and_rest_covers_it(
        database_url: str) -> None:
    config = SimConfig(seed=1904, orders=600, rate=60.0, scenario="buffer-overflow")
    broker = backlog(config, 1_000)
    reasons: set[str] = set()

    async def body(nursery: trio.Nursery, state: SupervisorState, metrics: Metrics) -> None:
        with trio.fail_after(30):
            while state.connection != "backfilling":
                await trio.sleep(0.02)
        await nursery.start(broker.run_market)

        async def watch() -> None:
            while True:
                reasons.add(state.last_disconnect_reason or "")
                await trio.sleep(0.05)

        nursery.start_soon(watch)
        mismatches = await wait_until_matches(database_url, broker, timeout=180)
        assert mismatches == [], summarize(mismatches)

    with trio.fail_after(300):
        # 50 live updates: under a second of this market, while recovery takes longer.
        await run_in_process(database_url, broker, body, live_buffer=50)
    assert any("live buffer full (50) during recovery" in r for r in reasons), reasons
    assert broker.rate_limiter.refused == {}


async def test_a_reconnect_reads_from_where_the_stream_left_off(database_url: str) -> None:
    """After half a minute of healthy streaming, a reconnect's backfill re-reads the 5 s
    before the newest fill the stream delivered (the disorder it showed, doubled, at
    least 5 s), plus the outage: not the 300 s overlap before the cursor, which here
    is the whole half minute again (docs/design.md, section 12, the stream's edge)."""
    rate = 100.0
    config = SimConfig(seed=1905, orders=1_000, rate=rate, scenario="edge",
                       chaos=ChaosConfig(disconnect_at=(int(rate * 30),),
                                         outage_after_disconnect=2.0))
    broker = SimulatedBroker(config)
    seen: dict[str, Any] = {}

    async def body(nursery: trio.Nursery, state: SupervisorState, metrics: Metrics) -> None:
        with trio.fail_after(30):
            while state.connection != "streaming":
                await trio.sleep(0.02)
        broker.market.start_clock(datetime.now(UTC))
        await nursery.start(broker.run_market)
        with trio.fail_after(90):
            while broker.stats["disconnects"] == 0:
                await trio.sleep(0.02)
            seen["fills_before"] = broker.fills_total
            seen["pages_before"] = broker.rate_limiter.requests.get("activities", 0)
            connection = state.connection_id
            while not (state.connection_id > connection and state.connection == "streaming"
                       and state.caught_up):
                await trio.sleep(0.02)
        seen["pages_after"] = broker.rate_limiter.requests.get("activities", 0)
        seen["fills_at_reconnect"] = broker.fills_total
        seen["mismatches"] = await wait_until_matches(database_url, broker, timeout=120)

    with trio.fail_after(240):
        await run_in_process(database_url, broker, body)
    assert seen["mismatches"] == [], summarize(seen["mismatches"])
    assert seen["fills_before"] > 1_000  # half a minute of fills before the disconnect
    # The outage and the margins: fills made while away, and 10 s of fills either side.
    away = seen["fills_at_reconnect"] - seen["fills_before"]
    margins = 10 * seen["fills_before"] / 30
    pages = seen["pages_after"] - seen["pages_before"]
    assert pages <= math.ceil((away + margins) / 100) + 2, (pages, seen)
    assert pages < math.ceil(seen["fills_before"] / 100), (pages, seen)
    assert broker.rate_limiter.refused == {}
