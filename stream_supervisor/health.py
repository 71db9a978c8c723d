"""Health of a running supervisor: what "alive" means, and the HTTP endpoints that say it.

`HealthMonitor` is the one definition of liveness, used by `/healthz` and by the systemd
watchdog. `/readyz` is `SupervisorState.ready`; `/metrics` is prometheus_client's own
exposition. `stream-supervisor health` asks `/healthz` (or `/readyz`) and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
from dataclasses import dataclass
from typing import Any, Final

import h11
import trio
from prometheus_client.exposition import choose_encoder

from .logs import get_logger
from .metrics import Metrics
from .settings import ENV_PREFIX, ConfigError, Settings
from .state import SupervisorState

log = get_logger("stream_supervisor.health")

HTTP_ADDR_ENV: Final = ENV_PREFIX + "HTTP_ADDR"
#: Slack added to every time limit below: scheduling delay, a slow DNS answer, GC.
GRACE: Final = 10.0
#: A writer with queued work shows progress (a commit or a retry) at least this often.
MIN_STALL_LIMIT: Final = 60.0
#: Connection phases in which the socket is open and the pinger runs.
CONNECTED: Final = frozenset({"authorized", "listening", "backfilling", "streaming"})
#: (channel, the actor that consumes it): queued items and a silent consumer is a stall.
CONSUMERS: Final = (("events", "dedupe"), ("new_events", "writer"))

HTTP_MAX_CONNECTIONS: Final = 16
HTTP_IO_TIMEOUT: Final = 5.0
HTTP_MAX_REQUEST: Final = 16 * 1024
DEFAULT_HEALTH_TIMEOUT: Final = 3.0


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


def readiness(state: SupervisorState) -> dict[str, Any]:
    """`/readyz`'s body: the verdict and each condition it is made of."""
    return {
        "ready": state.ready,
        "pipeline_running": state.pipeline_running,
        "connection": state.connection,
        "caught_up": state.caught_up,
        "db_writable": state.db_writable,
        "draining": state.draining,
        "leader": state.leader,
    }


# --------------------------------------------------------------------- HTTP server


def parse_http_addr(addr: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (loopback) -> (host, port)."""
    text = addr.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{HTTP_ADDR_ENV}={addr!r} must be HOST:PORT, e.g. 127.0.0.1:9108")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port_text)


async def open_health_listeners(addr: str) -> list[trio.SocketListener]:
    """Bind the health address now, so a bad one fails at start-up (exit 78)."""
    host, port = parse_http_addr(addr)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"{HTTP_ADDR_ENV}={addr!r}: cannot listen: {exc.strerror or exc}") from None


def bound_port(listeners: list[trio.SocketListener]) -> int:
    port = listeners[0].socket.getsockname()[1]
    assert isinstance(port, int)
    return port


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"


class HealthServer:
    """`/healthz`, `/readyz` and `/metrics`: one request per connection, GET or HEAD."""

    def __init__(self, state: SupervisorState, metrics: Metrics, monitor: HealthMonitor) -> None:
        self.state = state
        self.metrics = metrics
        self.monitor = monitor
        self._slots = trio.CapacityLimiter(HTTP_MAX_CONNECTIONS)

    def answer(self, method: str, target: str, accept: str = "") -> _Response:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _Response(405, b'{"error":"method not allowed"}\n')
        if path == "/healthz":
            health = self.monitor.assess()
            body = {"alive": health.alive, "problems": list(health.problems), **health.detail}
            return _Response(200 if health.alive else 503, _json(body))
        if path == "/readyz":
            ready = readiness(self.state)
            return _Response(200 if ready["ready"] else 503, _json(ready))
        if path == "/metrics":
            # The library's own negotiation: classic text format (generate_latest) unless
            # the scraper asks for OpenMetrics.
            encode, content_type = choose_encoder(accept)
            return _Response(200, encode(self.metrics.registry), content_type)
        return _Response(404, b'{"error":"not found","paths":["/healthz","/readyz","/metrics"]}\n')

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            if self._slots.borrowed_tokens >= self._slots.total_tokens:
                return  # a flood of connections: drop the extra ones rather than queue them
            async with self._slots:
                with trio.move_on_after(HTTP_IO_TIMEOUT):
                    await self._serve_one(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.move_on_after(1.0) as scope:
                scope.shield = True
                await stream.aclose()

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HTTP_MAX_REQUEST)
        request: h11.Request | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(4096))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    break
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
            assert request is not None
            accept = b",".join(v for k, v in request.headers if k == b"accept")
            response = self.answer(request.method.decode("ascii", "replace"),
                                   request.target.decode("ascii", "replace"),
                                   accept.decode("latin-1"))
        except h11.RemoteProtocolError as exc:
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            response = _Response(exc.error_status_hint, b'{"error":"bad request"}\n')
        headers = [
            (b"Content-Type", response.content_type.encode()),
            (b"Content-Length", str(len(response.body)).encode()),
            (b"Cache-Control", b"no-store"),
            (b"Connection", b"close"),
        ]
        out = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if request is None or request.method != b"HEAD":
            out += conn.send(h11.Data(data=response.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


async def serve_health(
    listeners: list[trio.SocketListener],
    state: SupervisorState,
    metrics: Metrics,
    monitor: HealthMonitor,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started` gets the bound port."""
    port = bound_port(listeners)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, HealthServer(state, metrics, monitor),
                            listeners)
        host = listeners[0].socket.getsockname()[0]
        log.info("health_listening", host=host, port=port)
        task_status.started(port)


# --------------------------------------------------------------------- `health` command


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-addr", help=f"where `run` serves health (env {HTTP_ADDR_ENV})")
    p.add_argument("--ready", action="store_true",
                   help="check /readyz (streaming, caught up, database writable) instead of "
                        "/healthz (process and actors alive)")
    p.add_argument("--timeout", type=float, default=DEFAULT_HEALTH_TIMEOUT,
                   help=f"seconds to wait for the answer (default {DEFAULT_HEALTH_TIMEOUT:g})")


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 if the running service answers 200 on /healthz (or /readyz), else 1.

    Liveness is the default because a container health check that fails restarts the
    task: a standby replica, a long backfill or a broker outage are not ready, yet a
    restart would not help (and a reconnect storm earns HTTP 429s)."""
    path = "/readyz" if args.ready else "/healthz"
    if not settings.http_addr:
        print(f"unhealthy: {HTTP_ADDR_ENV} is not set, so `run` serves no health endpoint")
        return 1
    try:
        host, port = parse_http_addr(settings.http_addr)
    except ConfigError as exc:
        print(f"unhealthy: {exc}")
        return 1
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "stream-supervisor-health"})
        response = conn.getresponse()
        body = response.read(4096).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        print(f"unhealthy: {path} on {host}:{port}: {exc}")
        return 1
    finally:
        conn.close()
    verdict = "healthy" if response.status == 200 else "unhealthy"
    print(f"{verdict}: {path} {response.status} {body}")
    return 0 if response.status == 200 else 1


__all__ = [
    "Health",
    "HealthMonitor",
    "HealthPolicy",
    "HealthServer",
    "add_health_arguments",
    "cmd_health",
    "open_health_listeners",
    "parse_http_addr",
    "readiness",
    "serve_health",
]
