"""The drain request (drain.py): one implementation for the account's supervisor and the
events stream's, and what it does to a running pipeline."""

from __future__ import annotations

from typing import Any

import trio

from stream_supervisor.broker_events import EventsSettings, EventsSupervisor
from stream_supervisor.drain import Drains
from stream_supervisor.state import SupervisorState
from stream_supervisor.supervisor import Supervisor


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
