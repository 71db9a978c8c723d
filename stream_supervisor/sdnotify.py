"""systemd's notify protocol over `$NOTIFY_SOCKET`, with no dependency.

`Notifier` sends one unix datagram per message (to a path, or to an abstract socket
when the address starts with `@`). `notify_loop` turns the supervisor's state into
`READY=1` (streaming and caught up, or a standby replica), a `STATUS=` line,
`WATCHDOG=1` (only while `HealthMonitor` finds the actors alive) and `STOPPING=1` once
a drain begins.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

import trio

from .health import Health, HealthMonitor
from .logs import get_logger
from .state import SupervisorState

log = get_logger("stream_supervisor.sdnotify")

#: How often the loop looks at the state: bounds the delay of READY=1 and STOPPING=1.
TICK: Final = 0.2
#: How often `STATUS=` is refreshed even when its phase did not change (counts move).
STATUS_INTERVAL: Final = 5.0
#: While not yet ready but alive, ask systemd for this much more start time on each
#: health check, so a long backfill, a broker outage at boot or a standby replica does
#: not hit TimeoutStartSec= while a wedged process still does.
EXTEND_FACTOR: Final = 3.0


class Notifier:
    """Sends notify messages to one socket. Never blocks and never raises: systemd may
    be gone (or never was); a lost message is logged once, not fatal."""

    def __init__(self, address: str) -> None:
        if not address or (address[0] not in "/@"):
            raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with @: {address!r}")
        self.address = address
        # `@name` is the Linux abstract namespace: a leading NUL byte on the wire.
        self._target: str | bytes = (
            b"\0" + address[1:].encode() if address.startswith("@") else address
        )
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failed = False
        self.ready_sent = False
        self.stopping_sent = False

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier systemd asked for, or None when not started with Type=notify."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        try:
            return cls(address)
        except ValueError as exc:
            log.warning("notify_socket_invalid", error=str(exc))
            return None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; False if it could not be sent."""
        message = "\n".join(assignments).encode()
        try:
            self._sock.sendto(message, self._target)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("notify_failed", address=self.address, error=str(exc))
            return False
        if self._failed:
            self._failed = False
            log.info("notify_restored", address=self.address)
        return True

    def ready(self, status: str) -> None:
        if not self.ready_sent:
            self.ready_sent = self.send("READY=1", "STATUS=" + status)

    def stopping(self, status: str) -> None:
        if not self.stopping_sent:
            self.stopping_sent = self.send("STOPPING=1", "STATUS=" + status)

    def status(self, text: str) -> None:
        self.send("STATUS=" + text)

    def close(self) -> None:
        self._sock.close()


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled
    recommends; None when the watchdog is off or meant for another process."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "").strip()
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID", "").strip()
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=usec[:40])
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


def standby(state: SupervisorState) -> bool:
    """A replica waiting for the account's writer lock: up and doing its job."""
    return state.connection == "standby" and not state.pipeline_running


def status_line(state: SupervisorState) -> str:
    """A short human line for `systemctl status`: phase first, then the counts."""
    if state.draining:
        phase = "draining"
    elif standby(state):
        phase = "standby (another replica holds the writer lock)"
    elif not state.pipeline_running:
        phase = "starting" if state.restarts == 0 else "restarting pipeline"
    elif state.connection == "backoff" and state.last_disconnect_reason:
        phase = f"reconnecting ({state.last_disconnect_reason[:80]})"
    elif state.connection == "streaming" and not state.db_writable:
        phase = "streaming, database not writable"
    else:
        phase = state.connection
    parts = [phase]
    if state.leader:
        parts.append("leader")
    parts.append(f"{state.committed_events} events in {state.committed_batches} batches")
    if state.restarts:
        parts.append(f"{state.restarts} restarts")
    return " | ".join(parts)


def watchdog_verdict(health: Health, was_alive: bool) -> bool:
    """Whether `health` lets the watchdog be pinged; a change is logged
    (`watchdog_withheld`, `health_restored`)."""
    if health.alive != was_alive:
        if health.alive:
            log.info("health_restored")
        else:
            log.warning("watchdog_withheld", problems=list(health.problems))
    return health.alive


async def notify_loop(
    state: SupervisorState,
    notifier: Notifier,
    monitor: HealthMonitor,
    *,
    watchdog: float | None = None,
    status_interval: float = STATUS_INTERVAL,
    tick: float = TICK,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Speak the notify protocol for `state` until cancelled.

    `watchdog` is the ping period (see `watchdog_interval`); a ping is sent only when
    `monitor` finds every actor alive, so a wedged pipeline makes systemd restart us.
    """
    health_every = min(watchdog or status_interval, status_interval)
    next_health = trio.current_time()
    next_status = trio.current_time() + status_interval
    last_phase = ""
    alive = True
    task_status.started()
    while True:
        now = trio.current_time()
        line = status_line(state)
        if state.draining and not notifier.stopping_sent:
            notifier.stopping(line)
        # A standby is ready as far as systemd is concerned: started, healthy, waiting
        # (`/readyz` still says 503: it does not stream).
        if (state.ready or standby(state)) and not notifier.ready_sent and not state.draining:
            notifier.ready(line)
            if notifier.ready_sent:  # else retried next tick; `notify_failed` said why
                log.info("systemd_ready", status=line)
        if now >= next_health:
            next_health = now + health_every
            alive = watchdog_verdict(monitor.assess(now), alive)
            if alive:
                fields = ["WATCHDOG=1"] if watchdog is not None else []
                if not notifier.ready_sent and not state.draining:
                    usec = int(EXTEND_FACTOR * health_every * 1_000_000)
                    fields.append(f"EXTEND_TIMEOUT_USEC={usec}")
                if fields:
                    notifier.send(*fields)
        phase = line.split(" | ", 1)[0]
        if now >= next_status or phase != last_phase:
            next_status = now + status_interval
            last_phase = phase
            notifier.status(line)
        await trio.sleep(tick)


__all__ = ["Notifier", "notify_loop", "status_line", "watchdog_interval", "watchdog_verdict"]
