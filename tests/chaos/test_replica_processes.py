"""Two replicas as real processes: `python -m stream_supervisor run` twice on one account.

One holds the account's writer lock and streams; the other waits as a standby and never
opens the stream. SIGKILL the leader: its session ends with its socket, PostgreSQL
releases the lock, the standby takes over, backfills what the leader did not commit,
and the database ends exactly as the broker's truth says.
"""

from __future__ import annotations

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
    SupervisorProcess,
    committed_rows,
    final_verify,
    process_env,
    replay_hint,
)

pytestmark = pytest.mark.chaos

START_TIMEOUT = 60.0  # a cold interpreter on a busy 2-core machine


async def test_the_standby_process_takes_over_when_the_leader_is_sigkilled(
    database_url: str, node_id: str
) -> None:
    config = SimConfig(seed=230, orders=40, rate=40.0, scenario="replicas",
                       rest_rate_limit=FAST_REST_LIMIT,
                       chaos=ChaosConfig(duplicate_prob=0.1, duplicate_burst=2))
    broker = SimulatedBroker(config)
    hint = replay_hint(node_id, config)
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            server: SimServer = await nursery.start(serve, broker)
            env = process_env(database_url, server, config)
            async with SupervisorProcess(env, nursery, name="replica a") as leader:
                await leader.wait_for_event("listening", timeout=START_TIMEOUT)
                async with SupervisorProcess(env, nursery, name="replica b") as standby:
                    await standby.wait_for_event("standby", timeout=START_TIMEOUT)
                    await nursery.start(broker.run_market)
                    with trio.fail_after(30):
                        while await trio.to_thread.run_sync(
                                committed_rows, database_url, broker.account_id) < 30:
                            await trio.sleep(0.1)
                    # While the leader lives, the standby holds no lock and no stream.
                    before = [e["event"] for e in standby.events()]
                    assert "leader_elected" not in before, standby.tail()
                    assert "connecting" not in before, standby.tail()

                    leader.kill()
                    killed = await leader.wait(timeout=10)
                    rows_at_kill = await trio.to_thread.run_sync(
                        committed_rows, database_url, broker.account_id)
                    await standby.wait_for_event("leader_elected", timeout=30)
                    await standby.wait_for_event("listening", timeout=30)
                    mismatches, code, tail = await standby.match_then_drain(
                        database_url, broker)
            nursery.cancel_scope.cancel()
    mismatches = mismatches or await final_verify(database_url, broker)
    report = "\n".join([hint, f"leader SIGKILLed with {rows_at_kill} dedupe rows committed",
                        summarize(mismatches)])
    print(report)
    assert killed == -signal.SIGKILL
    assert mismatches == [], report + "\n" + tail
    assert code == 0, report + "\n" + tail
    assert broker.finished
