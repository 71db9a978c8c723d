"""The service's HTTP endpoints: `/healthz` (liveness, `health.HealthMonitor`), `/readyz`
(`health.readiness`) and `/metrics` (prometheus_client's own exposition), on h11 and Trio.

One request per connection, GET or HEAD, a bounded number of connections at a time: an
orchestrator's probe, not a web server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .errors import ConfigError
from .health import Assessor, readiness
from .logs import get_logger
from .metrics import Metrics
from .settings import ENV_PREFIX
from .state import SupervisorState

log = get_logger("stream_supervisor.endpoints")

HTTP_ADDR_ENV: Final = ENV_PREFIX + "HTTP_ADDR"
HTTP_MAX_CONNECTIONS: Final = 16
HTTP_IO_TIMEOUT: Final = 5.0
HTTP_MAX_REQUEST: Final = 16 * 1024


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

    def __init__(self, state: SupervisorState, metrics: Metrics, monitor: Assessor, *,
                 ready: Callable[[], dict[str, Any]] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.state = state
        self.metrics = metrics
        self.monitor = monitor
        # Several accounts (fleet.py): their readiness by name, their metrics labelled.
        self._ready = ready
        self._registry = registry
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
            ready = (self._ready() if self._ready is not None
                     else readiness(self.state, self.monitor.assess()))
            return _Response(200 if ready["ready"] else 503, _json(ready))
        if path == "/metrics":
            # The library's own negotiation: classic text format (generate_latest) unless
            # the scraper asks for OpenMetrics.
            encode, content_type = choose_encoder(accept)
            registry = self._registry if self._registry is not None else self.metrics.registry
            return _Response(200, encode(registry), content_type)
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
    monitor: Assessor,
    *,
    ready: Callable[[], dict[str, Any]] | None = None,
    registry: CollectorRegistry | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started` gets the bound port."""
    port = bound_port(listeners)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, HealthServer(state, metrics, monitor, ready=ready,
                                                        registry=registry),
                            listeners)
        host = listeners[0].socket.getsockname()[0]
        log.info("health_listening", host=host, port=port)
        task_status.started(port)




__all__ = [
    "HTTP_ADDR_ENV",
    "HealthServer",
    "bound_port",
    "open_health_listeners",
    "parse_http_addr",
    "serve_health",
]
