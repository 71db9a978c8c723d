"""Two replicas of one account on one database: a session advisory lock elects the one
writer; when the leader dies the standby takes over and catches up, nothing lost."""

from __future__ import annotations

import random
from contextlib import AbstractAsyncContextManager
from functools import partial

import psycopg
import trio

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.metrics import Metrics
from stream_supervisor.pgstore import PgStore
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.supervisor import Supervisor
from stream_supervisor.testing.broker import SimConfig, SimServer, SimulatedBroker, serve
from stream_supervisor.testing.verify import verify_against_truth
from stream_supervisor.wiring import open_supervisor, pg_store


def _replica(name: str, settings: Settings) -> AbstractAsyncContextManager[Supervisor]:
    return open_supervisor(
        settings, metrics=Metrics(), state=SupervisorState(),
        store_factory=partial(pg_store, settings, application_name=name),
        rng=random.Random(name), install_signal_handlers=False,
    )


async def _wait(predicate: object, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.05)


async def test_standby_takes_over_when_the_leader_dies(database_url: str) -> None:
    sim = SimConfig(seed=31, orders=60, rate=300.0)
    broker = SimulatedBroker(sim)
    async with trio.open_nursery() as nursery:
        server: SimServer = await nursery.start(serve, broker)
        settings = Settings(
            key_id=sim.key_id, secret_key=sim.secret_key, base_url=server.rest_url,
            stream_url=server.ws_url, database_url=database_url,
            account_id=broker.account()["id"], first_start_lookback=3600.0, baseline=False,
            backoff=BackoffPolicy(initial=0.05, cap=0.5, rate_limited_floor=0.2),
            ping_interval=1.0, ping_timeout=1.0, drain_timeout=10.0,
        )
        async with (_replica("replica-a", settings) as leader,
                    _replica("replica-b", settings) as standby):
            leader_scope = trio.CancelScope()

            async def run_leader() -> None:
                with leader_scope:
                    await leader.run()

            nursery.start_soon(run_leader)
            await _wait(lambda: leader.state.leader)
            nursery.start_soon(standby.run)
            await _wait(lambda: standby.state.connection == "standby")
            await nursery.start(broker.run_market)
            await _wait(lambda: leader.state.committed_events > 20)
            assert not standby.state.leader
            assert standby.state.committed_events == 0  # only the leader writes

            # The leader dies abruptly, mid-stream: its process is gone, so is its session.
            leader_scope.cancel()
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE application_name = 'replica-a'")
            await _wait(lambda: standby.state.leader, timeout=15)

            async def converged() -> bool:
                store = PgStore(database_url)
                await store.open()
                try:
                    snap = await store.snapshot(broker.account()["id"])
                finally:
                    await store.aclose()
                return broker.finished and not verify_against_truth(snap, broker.ground_truth())

            with trio.fail_after(90):
                while not await converged():
                    await trio.sleep(0.25)
            assert standby.state.committed_events > 0
            standby.request_drain("test over")
            await _wait(lambda: standby.exit_code is not None, timeout=20)
        nursery.cancel_scope.cancel()
    assert standby.exit_code == 0
