"""Process faults: the real `python -m stream_supervisor run`, SIGKILLed at seeded moments
(one of them provably mid-transaction) and restarted, then SIGTERMed during a batch.
After catch-up, every invariant holds against the simulated broker's truth.

The simulator is served in the test process on loopback; each child gets it through
APCA_API_BASE_URL / APCA_API_STREAM_URL, exactly as a deployed supervisor would.
"""

from __future__ import annotations

import random
import signal

import pytest
import trio

from stream_supervisor.testing.broker import (
    ChaosConfig,
    SimConfig,
    SimServer,
    SimulatedBroker,
    serve,
)
from stream_supervisor.testing.verify import summarize

from .harness import (
    FAST_REST_LIMIT,
    PROCESS_DRAIN_TIMEOUT,
    CursorWatch,
    SupervisorProcess,
    TableLock,
    admin_uri_of,
    committed_rows,
    dbname_of,
    final_verify,
    process_env,
    replay_hint,
    wait_for_blocked_writer,
)

pytestmark = pytest.mark.chaos

DRAIN_TIMEOUT = PROCESS_DRAIN_TIMEOUT
START_TIMEOUT = 60.0  # a cold interpreter on a busy 2-core machine


@pytest.mark.parametrize("seed", [201, 202])
async def test_sigkill_at_seeded_moments_then_restart_catches_up(
    seed: int, database_url: str, pg_admin_uri: str, node_id: str
) -> None:
    config = SimConfig(seed=seed, orders=45, rate=40.0, scenario="sigkill",
                       rest_rate_limit=FAST_REST_LIMIT,
                       chaos=ChaosConfig(duplicate_prob=0.1, duplicate_burst=3,
                                         disconnect_every=70, abrupt_prob=0.5))
    broker = SimulatedBroker(config)
    rng = random.Random(f"{seed}/chaos/kills")
    admin, dbname = admin_uri_of(pg_admin_uri), dbname_of(database_url)
    kills: list[str] = []
    hint = replay_hint(node_id, config)
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            watch = CursorWatch(database_url, broker.account_id)
            nursery.start_soon(watch.run)
            env = process_env(database_url, server, config)
            for life in range(3):
                async with SupervisorProcess(env, nursery, name=f"life {life + 1}") as proc:
                    await proc.wait_for_event("listening", timeout=START_TIMEOUT)
                    if life == 0:
                        await nursery.start(broker.run_market)
                    if life == 1:
                        # Provably mid-transaction: the batch holds claimed keys and waits
                        # for a lock when the process dies.
                        await trio.sleep(0.3)
                        async with TableLock(database_url):
                            await wait_for_blocked_writer(admin, dbname, timeout=20)
                            proc.kill()
                            await proc.wait(timeout=10)
                        moment = "mid-batch"
                    else:
                        delay = rng.uniform(0.2, 1.2)
                        await trio.sleep(delay)
                        proc.kill()
                        moment = f"{delay:.2f}s after listening"
                    code = await proc.wait(timeout=10)
                    rows = await trio.to_thread.run_sync(committed_rows, database_url,
                                                         broker.account_id)
                    kills.append(f"life {life + 1}: SIGKILL {moment}, exit {code}, "
                                 f"{rows} dedupe rows, market "
                                 f"{'done' if broker.finished else 'trading'}")
                    assert code == -signal.SIGKILL, proc.tail()
            async with SupervisorProcess(env, nursery, name="final life") as proc:
                # Listening, so its SIGTERM handler is installed: the database may already
                # match what the third life left, and a SIGTERM during a slow start-up
                # would find Python's default action (exit -15) instead of a drain.
                await proc.wait_for_event("listening", timeout=START_TIMEOUT)
                mismatches, code, tail = await proc.match_then_drain(database_url, broker)
            nursery.cancel_scope.cancel()
    # What the drained process left behind, not only what was seen while it ran.
    mismatches = mismatches or await final_verify(database_url, broker)
    report = "\n".join([hint, *kills, summarize(mismatches)])
    print(report)
    assert mismatches == [], report + "\n" + tail
    assert code == 0, report + "\n" + tail
    assert not watch.regressions, f"cursor moved backwards: {watch.regressions}\n{report}"
    assert len(watch.seen) > 1


async def test_sigterm_during_a_batch_drains_exits_0_and_a_restart_resumes(
    database_url: str, pg_admin_uri: str, node_id: str
) -> None:
    config = SimConfig(seed=210, orders=40, rate=60.0, scenario="sigterm",
                       rest_rate_limit=FAST_REST_LIMIT,
                       chaos=ChaosConfig(duplicate_prob=0.1, duplicate_burst=3,
                                         disconnect_every=60))
    broker = SimulatedBroker(config)
    admin, dbname = admin_uri_of(pg_admin_uri), dbname_of(database_url)
    hint = replay_hint(node_id, config)
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            watch = CursorWatch(database_url, broker.account_id)
            nursery.start_soon(watch.run)
            env = process_env(database_url, server, config)
            async with SupervisorProcess(env, nursery, name="first") as first:
                await first.wait_for_event("listening", timeout=START_TIMEOUT)
                await nursery.start(broker.run_market)
                async with TableLock(database_url):
                    await wait_for_blocked_writer(admin, dbname, timeout=20)
                    before = await trio.to_thread.run_sync(committed_rows, database_url,
                                                           broker.account_id)
                    first.terminate()
                    signalled = trio.current_time()
                    await trio.sleep(1.0)
                    # Still draining: the batch stuck behind the lock is not abandoned.
                    assert first.returncode is None, first.tail()
                code = await first.wait(timeout=DRAIN_TIMEOUT + 5)
                took = trio.current_time() - signalled
                after = await trio.to_thread.run_sync(committed_rows, database_url,
                                                      broker.account_id)
                names = [e["event"] for e in first.events()]
                first_tail = first.tail()
            assert code == 0, first_tail
            assert took < DRAIN_TIMEOUT + 2, f"exited {took:.1f}s after SIGTERM"
            assert "draining" in names and "drained" in names, first_tail
            assert after > before, "the batch in flight at SIGTERM was not committed"
            assert not broker.finished, "the market should still be trading at the restart"

            async with SupervisorProcess(env, nursery, name="restart") as second:
                await second.wait_for_event("listening", timeout=START_TIMEOUT)
                mismatches, code, second_tail = await second.match_then_drain(
                    database_url, broker)
            nursery.cancel_scope.cancel()
    mismatches = mismatches or await final_verify(database_url, broker)
    report = "\n".join([hint, summarize(mismatches)])
    assert mismatches == [], report + "\n" + second_tail
    assert code == 0, second_tail
    assert not watch.regressions, f"cursor moved backwards: {watch.regressions}"
