"""Shared, read-mostly state of one supervisor: what readiness, health, the watchdog and
the progress line read. Each field has one writer (named in its comment); everything
else only reads. Values are plain: no locks are needed inside one Trio thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ledger import Cursor


@dataclass
class SupervisorState:
    account_id: str = ""
    # connection actor
    connection: str = "idle"  # connecting, authorized, listening, backfilling, streaming, backoff
    connection_id: int = 0
    caught_up: bool = False  # backfill after the latest (re)connect is done
    last_disconnect_reason: str | None = None
    # writer actor
    db_writable: bool = False
    committed_cursor: Cursor | None = None
    committed_events: int = 0
    committed_batches: int = 0
    # supervisor
    leader: bool = False
    draining: bool = False
    pipeline_running: bool = False
    restarts: int = 0
    # scheduled reconcile: symbols that differed from the broker's at its last run
    drifted_symbols: int | None = None
    # supervisor: the reason of the baseline this life took (baseline, rebaseline), if any
    baseline: str | None = None
    # every actor: trio.current_time() of its last sign of life (watchdog)
    heartbeats: dict[str, float] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return (
            self.pipeline_running
            and self.connection == "streaming"
            and self.caught_up
            and self.db_writable
            and not self.draining
        )

    def beat(self, actor: str, now: float) -> None:
        self.heartbeats[actor] = now
