"""structlog configuration: JSON lines when not on a terminal, console on one.

Configured once at start. Standard-library loggers (trio-websocket, psycopg, httpx) go
through the same processors, and a redaction processor removes every registered secret
and any password in a DSN before anything is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Final, TextIO

import structlog

REDACTED: Final = "[REDACTED]"
_DSN_PASSWORD: Final = re.compile(r"(?P<pre>\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?=@)")
_KV_PASSWORD: Final = re.compile(
    r"""(?P<pre>\bpassword\s*=\s*)(?P<pw>'[^']*'|[^\s"\\]+)""", re.IGNORECASE
)


class Redactor:
    """A structlog processor that scrubs secrets from every string in an event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        for s in secrets:
            # Very short values would redact half the log; real keys are long.
            if s and len(s) >= 4 and s not in self._secrets:
                self._secrets.append(s)
        self._secrets.sort(key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, REDACTED)
        text = _DSN_PASSWORD.sub(lambda m: m.group("pre") + REDACTED, text)
        return _KV_PASSWORD.sub(lambda m: m.group("pre") + REDACTED, text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            event_dict[key] = self._clean(value)
        return event_dict


#: The process-wide redactor; `configure_logging` registers the configured secrets.
redactor: Final = Redactor()


def _scrub_rendered(logger: Any, method: str, event_dict: Any) -> Any:
    # Tracebacks are rendered into strings by format_exc_info: scrub them after that.
    if isinstance(event_dict, str):
        return redactor.scrub(event_dict)
    return event_dict


def configure_logging(
    *,
    fmt: str = "auto",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and the standard library's root logger. Safe to call again."""
    out = stream if stream is not None else sys.stdout
    redactor.add(secrets)
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if fmt == "json":
        renderer: Any = structlog.processors.JSONRenderer()
        tail: list[Any] = [structlog.processors.format_exc_info, redactor, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        tail = [redactor, renderer]
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail,
                    _scrub_rendered],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Chatty libraries: their debug lines are per frame or per query.
    for name in ("trio-websocket", "trio_websocket", "httpx", "httpcore", "psycopg", "hpack",
                 "pgserver"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A lazy logger: it picks up `configure_logging` even when created at import time."""
    return structlog.get_logger(name or "stream_supervisor", **bound)
