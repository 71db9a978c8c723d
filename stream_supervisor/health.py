"""Health of a running supervisor: what "alive" and "ready" mean, and nothing else.

`HealthMonitor` is the one definition of liveness, used by `/healthz` and by the systemd
watchdog; `readiness` is `/readyz`'s verdict (`SupervisorState.ready`) and its parts. The
HTTP endpoints that say it are in `endpoints.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from .metrics import Metrics
from .settings import Settings
from .state import SupervisorState

#: Slack added to every time limit below: scheduling delay, a slow DNS answer, GC.
GRACE: Final = 10.0
#: A writer with queued work shows progress (a commit or a retry) at least this often.
MIN_STALL_LIMIT: Final = 60.0
#: Connection phases in which the socket is open and the pinger runs.
CONNECTED: Final = frozenset({"authorized", "listening", "backfilling", "streaming"})
#: (channel, the actor that consumes it): queued items and a silent consumer is a stall.
CONSUMERS: Final = (("events", "dedupe"), ("new_events", "writer"))


# --------------------------------------------------------------------- liveness


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    """How long each actor may stay silent before it counts as wedged.

    A quiet stream is not a failure: the connection actor beats on every frame and every
    pong, so while connected its silence is bounded by one ping interval plus the pong
    timeout. Dedupe and writer actors may idle for ever with nothing queued for them;
    only queued work with no sign of life (a commit or a retry) for `stall_limit` is a
    stall.
    """

    connection_silence: float = 15.0 + 10.0 + GRACE
    connecting_limit: float = 10.0 + 10.0 + GRACE
    backoff_limit: float = 30.0 + 15.0 + GRACE
    stall_limit: float = MIN_STALL_LIMIT

    @classmethod
    def from_settings(cls, s: Settings) -> HealthPolicy:
        return cls(
            connection_silence=s.ping_interval + s.ping_timeout + GRACE,
            # the TCP/TLS connect and the handshake each have their own deadline
            connecting_limit=2 * s.connect_timeout + GRACE,
            backoff_limit=s.backoff.cap + s.backoff.rate_limited_floor + GRACE,
            # a commit is two statements under statement_timeout, plus a reconnect
            stall_limit=max(MIN_STALL_LIMIT, 3 * s.statement_timeout_ms / 1000 + GRACE),
        )


@dataclass(frozen=True, slots=True)
class Health:
    alive: bool
    problems: tuple[str, ...]
    detail: dict[str, Any]


class Assessor(Protocol):
    """What `/healthz` and the watchdog ask: one `HealthMonitor`, or a fleet's."""

    def assess(self, now: float | None = None) -> Health: ...


class HealthMonitor:
    """Judges liveness from `SupervisorState` (and, when given, the channel fill gauges
    and the batch-retry counter of `Metrics`).

    Alive means: the event loop runs (else nobody calls `assess`), and while the pipeline
    runs and is not draining,
      - the connection actor, when connected, beat within `connection_silence`;
      - it did not stay `connecting` beyond `connecting_limit` or in `backoff` beyond
        `backoff_limit` (both have their own deadlines, so overstaying means wedged);
      - no channel had items queued while its consumer showed no sign of life for
        `stall_limit` (the writer's retries count as life: a database outage is not a
        wedge, it is `/readyz`'s business).
    Waiting for the database or the broker before the pipeline starts is not a failure:
    restarting the process would not help.
    """

    def __init__(
        self,
        state: SupervisorState,
        policy: HealthPolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.state = state
        self.policy = policy if policy is not None else HealthPolicy()
        self.metrics = metrics
        self._phase: tuple[int, str] | None = None
        self._phase_since = 0.0
        self._connected: tuple[int, float] | None = None  # (connection_id, first seen connected)
        self._marks: dict[str, tuple[float, ...]] = {}
        self._progress_at: dict[str, float] = {}
        self._busy_since: dict[str, float | None] = {}

    def assess(self, now: float | None = None) -> Health:
        now = trio.current_time() if now is None else now
        s, p = self.state, self.policy
        problems: list[str] = []
        ages = {actor: round(now - at, 3) for actor, at in s.heartbeats.items()}
        detail: dict[str, Any] = {
            "connection": s.connection,
            "pipeline_running": s.pipeline_running,
            "draining": s.draining,
            "heartbeat_age_s": ages,
        }
        if not s.pipeline_running or s.draining:
            self._reset()
            return Health(True, (), detail)

        phase = (s.connection_id, s.connection)
        if phase != self._phase:
            self._phase, self._phase_since = phase, now
        in_phase = now - self._phase_since
        if s.connection in CONNECTED:
            if self._connected is None or self._connected[0] != s.connection_id:
                self._connected = (s.connection_id, now)
            last = max(s.heartbeats.get("connection", -math.inf), self._connected[1])
            if now - last > p.connection_silence:
                problems.append(f"connection actor silent for {now - last:.1f}s "
                                f"while {s.connection}")
        elif s.connection == "connecting" and in_phase > p.connecting_limit:
            problems.append(f"connecting for {in_phase:.1f}s")
        elif s.connection == "backoff" and in_phase > p.backoff_limit:
            problems.append(f"in reconnect backoff for {in_phase:.1f}s")

        for channel, actor in CONSUMERS:
            stalled = self._stalled(channel, actor, now)
            if stalled is not None:
                problems.append(f"{actor} made no progress for {stalled:.1f}s with "
                                f"{channel} queued")
        return Health(not problems, tuple(problems), detail)

    def _stalled(self, channel: str, actor: str, now: float) -> float | None:
        queued = self._queued(channel)
        mark = (self.state.heartbeats.get(actor, -math.inf), *self._life_counters(actor))
        if self._marks.get(actor) != mark:
            self._marks[actor] = mark
            self._progress_at[actor] = now
        if queued <= 0:
            self._busy_since[actor] = None
            return None
        busy_since = self._busy_since.get(actor)
        if busy_since is None:
            self._busy_since[actor] = busy_since = now
        idle = now - max(busy_since, self._progress_at.get(actor, now))
        return idle if idle > self.policy.stall_limit else None

    def _queued(self, channel: str) -> float:
        if self.metrics is None:
            return 0.0
        return _sample(self.metrics.channel_fill, "stream_supervisor_channel_fill",
                       channel=channel)

    def _life_counters(self, actor: str) -> tuple[float, ...]:
        if actor == "writer" and self.metrics is not None:
            return (_sample(self.metrics.batch_retries, "stream_supervisor_batch_retries_total"),)
        return ()

    def _reset(self) -> None:
        self._phase = None
        self._connected = None
        self._marks.clear()
        self._progress_at.clear()
        self._busy_since.clear()


def _sample(metric: Any, name: str, **labels: str) -> float:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def stalled(health: Health) -> list[str]:
    """The problems of `health` that are a consumer stuck with work queued (the writer
    blocked in a statement on a database that stopped answering, say)."""
    return [p for p in health.problems
            if any(p.startswith(f"{actor} made no progress") for _, actor in CONSUMERS)]


def readiness(state: SupervisorState, health: Health | None = None) -> dict[str, Any]:
    """`/readyz`'s body: the verdict and each condition it is made of. With `health`
    (the monitor's verdict now), a stuck dedupe actor or writer makes it unready too:
    `db_writable` only changes once a statement fails, and a frozen one never does."""
    stuck = stalled(health) if health is not None else []
    return {
        "ready": state.ready and not stuck,
        "stalled": stuck,
        "pipeline_running": state.pipeline_running,
        "connection": state.connection,
        "caught_up": state.caught_up,
        "db_writable": state.db_writable,
        "draining": state.draining,
        "leader": state.leader,
        # Drift does not make the service unready (it is still the best record of fills);
        # it is shown so that an operator sees it next to the verdict.
        "drifted_symbols": state.drifted_symbols,
    }


__all__ = ["Assessor", "Health", "HealthMonitor", "HealthPolicy", "readiness"]
