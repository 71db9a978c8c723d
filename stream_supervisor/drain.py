"""The drain, as both supervisors do it (docs/design.md, section 3, "Drain"): the account's
`Supervisor` and the events stream's `EventsSupervisor` stop reading, let dedupe and the
writer commit what they hold within the deadline, then exit.

One implementation for both: a drain that works one way for an account and another for
the events stream would be a bug waiting in the one less tested.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Final

import trio

from .logs import get_logger
from .state import SupervisorState

log = get_logger("stream_supervisor.drain")

#: How long past the drain deadline the process may take to exit before the backstop
#: ends it: the unit's stop timeout (45 s) is beyond the deadline (20 s) plus this.
BACKSTOP_GRACE: Final = 10.0


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


async def exit_backstop(draining: Callable[[], bool], deadline: float, *,
                        grace: float = BACKSTOP_GRACE, poll: float = 0.5,
                        exit: Callable[[int], None] = os._exit) -> None:
    """For a `run` process, once a drain starts: if the process is still here `deadline`
    plus `grace` seconds later, exit 1 at once. The drain deadline cancels the pipeline,
    but not a worker thread blocked in a statement to a database that stopped answering
    (frozen, with its sockets open: no timeout of TCP's or the server's fires); the
    process waited for it for ever, past the unit's stop timeout. What that batch held
    was not committed, and lies within the next start's backfill; the server rolls back
    its transaction when the connection goes."""
    while not draining():
        await trio.sleep(poll)

    def give_up() -> None:
        log.error("drain_backstop_exit", waited_s=deadline + grace)
        exit(1)

    timer = threading.Timer(deadline + grace, give_up)
    timer.daemon = True  # a process that exits in time does not wait for it
    timer.start()
    try:
        await trio.sleep_forever()
    finally:
        timer.cancel()
