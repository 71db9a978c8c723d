"""The drain request (drain.py): one implementation for the account's supervisor and the
events stream's, and what it does to a running pipeline."""

from __future__ import annotations

import random
from typing import Any

import trio
import trio.testing

from stream_supervisor.broker_events import EventsSettings, EventsSupervisor
from stream_supervisor.drain import Drains
from stream_supervisor.errors import BrokerUnavailable
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.supervisor import EXIT_OK, Dependencies, Supervisor
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore


def test_both_supervisors_drain_through_the_one_implementation() -> None:
    assert Supervisor.request_drain is Drains.request_drain
    assert EventsSupervisor.request_drain is Drains.request_drain


class _Recorder:
    def __init__(self, into: list[dict[str, Any]]) -> None:
        self.into = into

    def info(self, event: str, **fields: Any) -> None:
        self.into.append({"event": event, **fields})


def _events_supervisor(drain_timeout: float) -> EventsSupervisor:
    def no_store() -> Any:
        raise AssertionError("the store is not opened by a drain request")

    return EventsSupervisor(EventsSettings(stream="partner", drain_timeout=drain_timeout),
                            connector=None,  # type: ignore[arg-type]  # never connects here
                            store_factory=no_store, state=SupervisorState())


async def test_a_drain_stops_the_connection_and_gives_the_pipeline_its_deadline() -> None:
    sup = _events_supervisor(drain_timeout=7.0)
    conn, pipeline = trio.CancelScope(), trio.CancelScope()  # a running pipeline's scopes
    sup._conn_scope, sup._pipeline_scope = conn, pipeline
    logs: list[dict[str, Any]] = []
    # The supervisor's own logger may be cached by an earlier test's logging setup, where
    # structlog's capture_logs cannot see it: record what the drain reports directly.
    sup._drain_log = _Recorder(logs)
    before = trio.current_time()
    sup.request_drain("SIGTERM")
    sup.request_drain("again")  # a second request changes nothing
    assert sup.state.draining and sup._drain_requested.is_set()
    assert conn.cancel_called and not pipeline.cancel_called
    assert before + 7.0 <= pipeline.deadline <= trio.current_time() + 7.0
    assert [(e["event"], e["why"], e["deadline_s"]) for e in logs] == [
        ("draining", "SIGTERM", 7.0)]


async def test_a_drain_before_the_pipeline_runs_only_marks_it() -> None:
    sup = _events_supervisor(drain_timeout=3.0)
    sup.request_drain("early")
    assert sup.state.draining and sup._drain_requested.is_set()
    assert sup._conn_scope is None and sup._pipeline_scope is None


class _SlowBroker:
    """A broker whose REST keeps failing: each call takes `delay` seconds (its retries)
    and fails, as the client's retries of a broker that is down would."""

    def __init__(self, delay: float, *, account: bool) -> None:
        self.delay = delay
        self.account = account
        self.calls = 0

    async def account_id(self) -> str:
        self.calls += 1
        if self.account:
            return "acct-slow"
        await trio.sleep(self.delay)
        raise BrokerUnavailable("broker REST /v2/account failed after 9 attempts")

    async def clock(self) -> dict[str, Any]:
        self.calls += 1
        await trio.sleep(self.delay)
        raise BrokerUnavailable("broker REST /v2/clock failed after 9 attempts")

    def __getattr__(self, name: str) -> Any:
        async def failing(*_: Any, **__: Any) -> Any:
            self.calls += 1
            await trio.sleep(self.delay)
            raise BrokerUnavailable(f"broker REST {name} failed after 9 attempts")
        return failing


def _before_the_pipeline(rest: _SlowBroker, store: MemoryStore | None) -> Supervisor:
    def factory() -> MemoryStore:
        assert store is not None, "the store is not opened before the account is known"
        return store

    settings = Settings(key_id="k", secret_key="s", database_url="x", account_id=None,
                        drain_timeout=5.0)
    return Supervisor(settings, Dependencies(
        connector=None,  # type: ignore[arg-type]  # never reached
        rest=rest,
        store_factory=factory, rng=random.Random(1), install_signal_handlers=False))


async def _stops_within(sup: Supervisor, after: float, limit: float) -> int:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup.run)
        await trio.sleep(after)
        sup.request_drain("SIGTERM")
        asked = trio.current_time()
        with trio.fail_after(limit):
            while sup.exit_code is None:
                await trio.sleep(0.01)
        assert trio.current_time() - asked < limit
    assert sup.exit_code is not None
    return sup.exit_code


async def test_a_drain_while_the_account_lookup_fails_stops_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    """SIGTERM while `GET /v2/account` kept failing: the lookup went on for ever and the
    unit's stop timeout killed the process. It stops now, exit 0, store never opened."""
    rest = _SlowBroker(30.0, account=False)
    assert await _stops_within(_before_the_pipeline(rest, None), 100.0, 1.0) == EXIT_OK


async def test_a_drain_during_a_first_start_baseline_stops_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    """A first start with the broker's REST failing slowly: the baseline's reads took
    their retries one after another (past the stop timeout) after SIGTERM. It stops now,
    nothing adjusted, the writer lock released."""
    store = MemoryStore(MemoryDatabase())
    rest = _SlowBroker(30.0, account=True)
    assert await _stops_within(_before_the_pipeline(rest, store), 45.0, 1.0) == EXIT_OK
    assert (await MemoryStore(store.db).snapshot("acct-slow")).adjustments == []


class _RefusingStore(MemoryStore):
    """A database that refuses a value of what the pipeline writes as it starts."""

    async def load_cursor(self, account_id: str) -> Any:
        from stream_supervisor.errors import StoreDataError

        raise StoreDataError("baseline: numeric field overflow", sqlstate="22003",
                             detail="numeric field overflow")


async def test_a_refusal_as_the_pipeline_starts_counts_toward_the_restart_limit(
        autojump_clock: trio.testing.MockClock) -> None:
    """A value the database refuses as the pipeline starts (a broker's mark it cannot
    hold) was taken for an outage and retried for ever, never counted, never streaming.
    It is a crash: past the restart limit the process exits 1 for a person to look."""
    from stream_supervisor.supervisor import EXIT_FAILURE

    db = MemoryDatabase()
    settings = Settings(key_id="k", secret_key="s", database_url="x", account_id="acct",
                        baseline=False, restart_limit=2, restart_window=1000.0)
    sup = Supervisor(settings, Dependencies(
        connector=None,  # type: ignore[arg-type]  # never reached
        rest=_SlowBroker(1.0, account=True),
        store_factory=lambda: _RefusingStore(db), rng=random.Random(1),
        install_signal_handlers=False))
    with trio.fail_after(600):
        assert await sup.run() == EXIT_FAILURE
    assert sup.state.restarts == 3
