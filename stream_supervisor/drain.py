"""The drain, as both supervisors do it (docs/design.md, section 3, "Drain"): the account's
`Supervisor` and the events stream's `EventsSupervisor` stop reading, let dedupe and the
writer commit what they hold within the deadline, then exit.

One implementation for both: a drain that works one way for an account and another for
the events stream would be a bug waiting in the one less tested.
"""

from __future__ import annotations

from typing import Any

import trio

from .state import SupervisorState


class Drains:
    """What a supervisor needs to be drained. The class sets `state`, `_drain_requested`,
    `_conn_scope` and `_pipeline_scope` in its `__init__`, keeps them current while it
    runs (the scopes are None when no connection or pipeline runs), says which logger
    reports the drain (`_drain_log`) and the deadline in seconds (`_drain_timeout`)."""

    state: SupervisorState
    _drain_requested: trio.Event
    _conn_scope: trio.CancelScope | None
    _pipeline_scope: trio.CancelScope | None
    _drain_log: Any

    @property
    def _drain_timeout(self) -> float:
        raise NotImplementedError

    def request_drain(self, why: str = "requested") -> None:
        """Stop reading, flush and commit what is held, then exit (within the deadline)."""
        if self.state.draining:
            return
        self._drain_log.info("draining", why=why, deadline_s=self._drain_timeout)
        self.state.draining = True
        self._drain_requested.set()
        if self._conn_scope is not None:
            self._conn_scope.cancel()
        self._set_pipeline_deadline()

    def _set_pipeline_deadline(self) -> None:
        """The pipeline (dedupe and writer) gets the drain deadline from now to commit what
        it holds; past it, it is cancelled."""
        if self._pipeline_scope is not None:
            self._pipeline_scope.deadline = trio.current_time() + self._drain_timeout
