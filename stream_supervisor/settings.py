"""One frozen settings object, built once at start from the environment and flags.

Actors never read the environment: they get the slice of `Settings` they need. Every
default is a named constant here, and every bad value fails with the variable's name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from .backoff import BackoffPolicy
from .bounds import DEFAULT_FUTURE_TOLERANCE as DEFAULT_FUTURE_TOLERANCE  # noqa: PLC0414 - re-exported
from .bounds import DEFAULT_MAX_FRAME_BYTES, TRANSPORT_MAX_MESSAGE
from .budget import DEFAULT_SHARE as DEFAULT_REST_BUDGET_SHARE
from .budget import check_share
from .errors import ConfigError
from .strategy import DEFAULT_STRATEGY_PATTERN, PATTERN_VARIABLE, PatternError, StrategyPattern

PAPER_BASE_URL: Final = "https://paper-api.alpaca.markets"
LIVE_BASE_URL: Final = "https://api.alpaca.markets"
ENV_PREFIX: Final = "STREAM_SUPERVISOR_"

DEFAULT_MAX_BATCH: Final = 1_000
DEFAULT_CHANNEL_SIZE: Final = 2_000
DEFAULT_LRU_SIZE: Final = 100_000
DEFAULT_PING_INTERVAL: Final = 15.0
DEFAULT_PING_TIMEOUT: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_BACKFILL_OVERLAP: Final = 300.0
DEFAULT_ORDER_REFRESH_INTERVAL: Final = 60.0
#: Non-trade activities (fees, expiries, splits) post late: a pass this often (section 10).
DEFAULT_ACTIVITY_INTERVAL: Final = 600.0
DEFAULT_DRAIN_TIMEOUT: Final = 20.0
DEFAULT_RESTART_LIMIT: Final = 5
DEFAULT_RESTART_WINDOW: Final = 60.0
DEFAULT_STATEMENT_TIMEOUT_MS: Final = 10_000
DEFAULT_REST_TIMEOUT: Final = 10.0
#: Live updates held while recovery runs (about 1.4 KB each, so at most ~140 MB). It
#: must hold the stream for as long as REST takes to read the outage within the budget:
#: at 500 updates/s a 60 s outage is ~19,000 fills, 190 pages, over two minutes at 90
#: requests a minute (docs/design.md, section 12). Full during recovery: the connection
#: is dropped on purpose and REST covers the range.
DEFAULT_LIVE_BUFFER: Final = 100_000
DEFAULT_REST_RETRIES: Final = 8
#: `stats` recomputes yesterday and this many days before it (closes can land late).
DEFAULT_STATS_LOOKBACK_DAYS: Final = 3
#: A start whose cursor is older than this takes a new baseline (docs/design.md,
#: section 9): the broker's activities may no longer reach back to it. 0 = never.
DEFAULT_ACTIVITIES_WINDOW: Final = 30 * 86_400.0
#: How often the running service compares positions with the broker while the market
#: is open (GET /v2/clock); 0 = never.
DEFAULT_RECONCILE_INTERVAL: Final = 300.0


def derive_stream_url(base_url: str) -> str:
    """`https://paper-api.alpaca.markets` -> `wss://paper-api.alpaca.markets/stream`."""
    parts = urlsplit(base_url)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme)
    if scheme is None or not _host_and_port_ok(parts.netloc):
        raise ConfigError("APCA_API_BASE_URL must be an http(s) URL with a host (and a "
                          f"port from 1 to 65535, if any), got {base_url!r}")
    return urlunsplit((scheme, parts.netloc, "/stream", "", ""))


def check_stream_url(url: str, name: str = "APCA_API_STREAM_URL") -> None:
    """A stream URL the transport can open, or ConfigError naming where it was set: a
    wrong one would otherwise be retried for ever as a connection failure."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not _host_and_port_ok(parts.netloc):
        raise ConfigError(f"{name} must be a ws:// or wss:// URL with a host (and a port "
                          f"from 1 to 65535, if any), got {url!r}")


def _host_and_port_ok(netloc: str) -> bool:
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port  # ValueError when not a number or out of range
    except ValueError:
        return False
    return bool(parts.hostname) and port != 0


@dataclass(frozen=True, slots=True)
class Settings:
    key_id: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    base_url: str = PAPER_BASE_URL
    stream_url: str = ""
    database_url: str = field(default="", repr=False)
    account_id: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    #: Claim the next batch's keys while one commits, on two more connections per
    #: account while busy (docs/design.md, section 4, "Claim ahead"). None: on for one
    #: account, off with an accounts file (see `claims_ahead`).
    claim_ahead: bool | None = None
    channel_size: int = DEFAULT_CHANNEL_SIZE
    lru_size: int = DEFAULT_LRU_SIZE
    ping_interval: float = DEFAULT_PING_INTERVAL
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    backfill_overlap: float = DEFAULT_BACKFILL_OVERLAP
    order_refresh_interval: float = DEFAULT_ORDER_REFRESH_INTERVAL
    activity_interval: float = DEFAULT_ACTIVITY_INTERVAL
    #: First start without a cursor: seconds to look back, or None for the start of the
    #: current US/Eastern trading day.
    first_start_lookback: float | None = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    restart_limit: int = DEFAULT_RESTART_LIMIT
    restart_window: float = DEFAULT_RESTART_WINDOW
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    future_tolerance: float = DEFAULT_FUTURE_TOLERANCE
    rest_timeout: float = DEFAULT_REST_TIMEOUT
    rest_retries: int = DEFAULT_REST_RETRIES
    #: Of the account's REST limit (Alpaca: 200 a minute), the most the service spends;
    #: the rest is the user's own trading (docs/design.md, section 12).
    rest_budget_share: float = DEFAULT_REST_BUDGET_SHARE
    live_buffer: int = DEFAULT_LIVE_BUFFER
    log_format: str = "auto"
    log_level: str = "info"
    http_addr: str | None = None  # health/metrics listener, e.g. 127.0.0.1:9108; None = off
    strategy_pattern: str = DEFAULT_STRATEGY_PATTERN  # `stats`: client_order_id -> strategy
    stats_lookback_days: int = DEFAULT_STATS_LOOKBACK_DAYS
    #: Take the broker's positions and open orders as the starting state on a first
    #: start and after the activities window (docs/design.md, section 9).
    baseline: bool = True
    activities_window: float = DEFAULT_ACTIVITIES_WINDOW
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL
    #: The scheduled reconcile writes adjustments itself (otherwise it only reports).
    reconcile_apply: bool = False
    #: Several accounts in one process (docs/design.md, section 11); None: the one
    #: account of APCA_API_KEY_ID / APCA_API_SECRET_KEY.
    accounts_file: str | None = None
    #: Serve only this account of the file (the systemd template unit's instance name).
    account_name: str | None = None

    @property
    def claims_ahead(self) -> bool:
        """Whether the writer claims ahead: as set, or by default for one account only.
        A fleet's database is sized by connections per account, and claiming ahead
        takes two more per busy account: there it is asked for, never assumed."""
        return self.claim_ahead if self.claim_ahead is not None else self.accounts_file is None

    def __post_init__(self) -> None:
        if not self.stream_url and self.base_url:
            object.__setattr__(self, "stream_url", derive_stream_url(self.base_url))
        elif self.stream_url:
            check_stream_url(self.stream_url)
        if self.max_batch < 1:
            raise ConfigError(f"{ENV_PREFIX}MAX_BATCH must be at least 1")
        if self.channel_size < 1:
            raise ConfigError(f"{ENV_PREFIX}CHANNEL_SIZE must be at least 1")
        if self.lru_size < 0:
            raise ConfigError(f"{ENV_PREFIX}LRU_SIZE must not be negative")
        if not 1 <= self.max_frame_bytes <= TRANSPORT_MAX_MESSAGE:
            # The transport never holds more of one message than this in memory; a larger
            # limit could not be honoured (docs/design.md, section 8, malformed frame).
            raise ConfigError(f"{ENV_PREFIX}MAX_FRAME_BYTES must be between 1 and "
                              f"{TRANSPORT_MAX_MESSAGE} (16 MiB), got {self.max_frame_bytes}")
        if self.live_buffer < 1:
            raise ConfigError(f"{ENV_PREFIX}LIVE_BUFFER must be at least 1")
        try:
            check_share(self.rest_budget_share)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}REST_BUDGET_SHARE {exc} (the fraction of the "
                              "account's REST limit the service may use, e.g. 0.5)") from None
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError(f"{ENV_PREFIX}LOG_FORMAT must be auto, json or console")
        if self.log_level.lower() not in LOG_LEVELS:
            # An unknown level was read as info: debug asked for, and silently not given.
            raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL={self.log_level!r} must be one of "
                              f"{', '.join(LOG_LEVELS)}")
        for name, value in (("PING_INTERVAL", self.ping_interval),
                            ("PING_TIMEOUT", self.ping_timeout),
                            ("CONNECT_TIMEOUT", self.connect_timeout),
                            ("DRAIN_TIMEOUT", self.drain_timeout),
                            ("REST_TIMEOUT", self.rest_timeout),
                            ("STATEMENT_TIMEOUT_MS", self.statement_timeout_ms)):
            # 0 is no "off" here: a connect or a REST call could never succeed, every stop
            # would miss its deadline, PostgreSQL's statement bound would be lifted.
            if value <= 0:
                raise ConfigError(f"{ENV_PREFIX}{name} must be greater than 0, got {value}")

    def strategy(self) -> StrategyPattern:
        """The checked strategy pattern (ConfigError naming the variable if unusable).

        Checked when `stats` starts, not in every command: the service shares its
        environment file with the statistics job, and a typo in a reporting setting must
        not keep the writer from starting."""
        try:
            return StrategyPattern.parse(self.strategy_pattern)
        except PatternError as exc:
            raise ConfigError(f"{PATTERN_VARIABLE}={self.strategy_pattern!r} {exc}") from None

    def secrets(self) -> list[str]:
        """Values that must never reach a log line or an error message."""
        out = [s for s in (self.key_id, self.secret_key) if s]
        password = _dsn_password(self.database_url)
        if password:
            out.append(password)
        return out

    def require_run(self) -> None:
        """`run` refuses to start without credentials and a database, naming each gap.
        With an accounts file, the credentials come from it instead."""
        missing = [
            name
            for name, value in (
                ("APCA_API_KEY_ID", self.key_id or self.accounts_file),
                ("APCA_API_SECRET_KEY", self.secret_key or self.accounts_file),
                ("DATABASE_URL", self.database_url),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                "missing required configuration: "
                + ", ".join(missing)
                + " (set them in the environment or pass the matching flags)"
            )

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _dsn_password(dsn: str) -> str | None:
    if not dsn:
        return None
    if "://" in dsn:
        try:
            return urlsplit(dsn).password
        except ValueError:
            return None
    for part in dsn.split():
        if part.startswith("password="):
            return part.split("=", 1)[1].strip("'")
    return None


# Environment variable -> (field, parser) for everything under the STREAM_SUPERVISOR_ prefix.
_PREFIXED: Final[dict[str, str]] = {
    "ACCOUNT_ID": "account_id",
    "MAX_BATCH": "max_batch",
    "CLAIM_AHEAD": "claim_ahead",
    "CHANNEL_SIZE": "channel_size",
    "LRU_SIZE": "lru_size",
    "PING_INTERVAL": "ping_interval",
    "PING_TIMEOUT": "ping_timeout",
    "CONNECT_TIMEOUT": "connect_timeout",
    "BACKFILL_OVERLAP": "backfill_overlap",
    "ORDER_REFRESH_INTERVAL": "order_refresh_interval",
    "ACTIVITY_INTERVAL": "activity_interval",
    "FIRST_START_LOOKBACK": "first_start_lookback",
    "DRAIN_TIMEOUT": "drain_timeout",
    "RESTART_LIMIT": "restart_limit",
    "RESTART_WINDOW": "restart_window",
    "STATEMENT_TIMEOUT_MS": "statement_timeout_ms",
    "MAX_FRAME_BYTES": "max_frame_bytes",
    "FUTURE_TOLERANCE": "future_tolerance",
    "REST_TIMEOUT": "rest_timeout",
    "REST_RETRIES": "rest_retries",
    "REST_BUDGET_SHARE": "rest_budget_share",
    "LIVE_BUFFER": "live_buffer",
    "LOG_FORMAT": "log_format",
    "LOG_LEVEL": "log_level",
    "HTTP_ADDR": "http_addr",
    "STRATEGY_PATTERN": "strategy_pattern",
    "STATS_LOOKBACK_DAYS": "stats_lookback_days",
    "BASELINE": "baseline",
    "ACTIVITIES_WINDOW": "activities_window",
    "RECONCILE_INTERVAL": "reconcile_interval",
    "RECONCILE_APPLY": "reconcile_apply",
    "ACCOUNTS_FILE": "accounts_file",
    "ACCOUNT_NAME": "account_name",
}
_BACKOFF: Final[dict[str, str]] = {
    "BACKOFF_INITIAL": "initial",
    "BACKOFF_FACTOR": "factor",
    "BACKOFF_CAP": "cap",
    "BACKOFF_429_FLOOR": "rate_limited_floor",
    "HEALTHY_AFTER": "healthy_after",
}

_TYPES: Final = {f.name: f.type for f in fields(Settings)}


#: What `STREAM_SUPERVISOR_LOG_LEVEL` (and `--log-level`) may say.
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def _parse(var: str, raw: str, kind: object) -> Any:
    text = raw.strip()
    try:
        if kind in ("bool", bool):
            words = {"1": True, "true": True, "on": True, "yes": True,
                     "0": False, "false": False, "off": False, "no": False}
            if text.lower() not in words:
                raise ValueError("must be on or off (true/false, 1/0, yes/no)")
            return words[text.lower()]
        if kind in ("int", int):
            number = int(text)
            if number < 0:
                raise ValueError("must not be negative")
            return number
        if kind in ("float", float):
            value = float(text)
            if not math.isfinite(value) or value < 0:
                raise ValueError("must be a finite, non-negative number")
            return value
        if kind == "bool | None":
            return None if text.lower() in ("", "auto") else _parse(var, text, bool)
        if kind == "float | None":
            return None if text.lower() in ("", "today") else _parse(var, text, float)
        if kind == "str | None":
            return text or None
        return text
    except ValueError as exc:
        raise ConfigError(f"{var}={raw!r} is not valid: {exc}") from None


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from `env` (default: os.environ), then apply non-None overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {
        "key_id": env.get("APCA_API_KEY_ID", ""),
        "secret_key": env.get("APCA_API_SECRET_KEY", ""),
        "base_url": env.get("APCA_API_BASE_URL", PAPER_BASE_URL).rstrip("/"),
        "stream_url": env.get("APCA_API_STREAM_URL", ""),
        "database_url": env.get("DATABASE_URL", ""),
    }
    for suffix, name in _PREFIXED.items():
        var = ENV_PREFIX + suffix
        if var in env:
            values[name] = _parse(var, env[var], _TYPES[name])
    backoff: dict[str, float] = {}
    for suffix, name in _BACKOFF.items():
        var = ENV_PREFIX + suffix
        if var in env:
            backoff[name] = _parse(var, env[var], float)
    if backoff:
        try:
            values["backoff"] = BackoffPolicy(**backoff)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}BACKOFF_*: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not values.get("stream_url"):
        values["stream_url"] = derive_stream_url(values["base_url"])
    return Settings(**values)
