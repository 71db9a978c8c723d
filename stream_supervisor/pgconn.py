"""Opening PostgreSQL connections without ever leaking the password.

Shared by the store, `migrate` and `check`: one place that turns a conninfo into a
connection and any failure into a message that names the server but not the secret.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final
from urllib.parse import quote, unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import ConfigError, StoreUnavailable

#: TCP keepalives, unless the conninfo says otherwise: a peer that vanished mid-query
#: is noticed in ~25 s even though the server-side statement_timeout cannot help. And
#: data we sent left unacknowledged for 30 s (a network that drops everything: keepalives
#: only start once nothing is in flight) ends the connection, not 15 minutes of TCP
#: retransmissions (Linux; libpq ignores it elsewhere and on a Unix socket).
KEEPALIVE_DEFAULTS: Final = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}

#: libpq's answers to a conninfo that cannot work however long one waits: an option
#: value it refuses. (A database or role the server does not have yet is waited for: it
#: may be being created, tests/chaos/test_database_faults.py.)
_UNUSABLE: Final = re.compile(
    r'invalid (?:integer |boolean )?(?:\w+ )?value|invalid connection option')
_URI_USERINFO: Final = re.compile(r"(postgres(?:ql)?://[^:/@\s]*):([^@\s]*)@", re.IGNORECASE)
_KV_PASSWORD: Final = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_QUERY_PASSWORD: Final = re.compile(r"([?&]password=)([^&\s]*)", re.IGNORECASE)


def conninfo_secrets(conninfo: str) -> list[str]:
    """Every form in which the conninfo's password could appear in a message."""
    found: set[str] = set()
    try:
        password = conninfo_to_dict(conninfo).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.add(str(password))
    for m in _URI_USERINFO.finditer(conninfo):
        if m.group(2):
            found.add(m.group(2))
            found.add(unquote(m.group(2)))
    for m in _KV_PASSWORD.finditer(conninfo):
        found.add(m.group(2).strip("'"))
    for m in _URI_QUERY_PASSWORD.finditer(conninfo):
        if m.group(2):
            found.add(m.group(2))
            found.add(unquote(m.group(2)))
    extra = {quote(s, safe="") for s in found}
    return sorted((s for s in found | extra if s), key=len, reverse=True)


def scrub(text: str, conninfo: str) -> str:
    """`text` with the conninfo's password, and anything shaped like one, masked."""
    for secret in conninfo_secrets(conninfo):
        text = text.replace(secret, "***")
    text = _URI_USERINFO.sub(r"\1:***@", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    return _URI_QUERY_PASSWORD.sub(r"\1***", text)


def describe(conninfo: str) -> str:
    """`host=... port=... dbname=... user=...` for messages: never the password."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return "(unparsable conninfo)"
    keys = ("host", "hostaddr", "port", "dbname", "user")
    shown = [f"{k}={params[k]}" for k in keys if params.get(k)]
    return " ".join(shown) or "(libpq defaults)"


def error_text(exc: BaseException, conninfo: str) -> str:
    """One line for a psycopg error, scrubbed, trimmed of libpq's trailing newlines."""
    text = " ".join(str(exc).split())
    return scrub(f"{type(exc).__name__}: {text}", conninfo)[:1000]


def connect(
    conninfo: str,
    *,
    connect_timeout_s: float = 5.0,
    application_name: str = "stream-supervisor",
    autocommit: bool = False,
    prepare_threshold: int | None = 5,
) -> psycopg.Connection[Any]:
    """Connect, raising `StoreUnavailable` (unreachable) or `ConfigError` (unusable
    conninfo) with a scrubbed message; the psycopg error is not chained, since its text
    may echo parts of the conninfo."""
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise ConfigError(f"invalid database conninfo: {error_text(exc, conninfo)}") from None
    extra: dict[str, Any] = {k: v for k, v in KEEPALIVE_DEFAULTS.items() if k not in given}
    if "connect_timeout" not in given:
        # libpq takes whole seconds and treats 1 as 2; round up, never down to "forever".
        extra["connect_timeout"] = max(2, math.ceil(connect_timeout_s))
    if "application_name" not in given:
        extra["application_name"] = application_name
    try:
        return psycopg.Connection.connect(
            conninfo, autocommit=autocommit, prepare_threshold=prepare_threshold, **extra
        )
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid database conninfo: {error_text(exc, conninfo)}") from None
    except psycopg.Error as exc:
        text = error_text(exc, conninfo)
        if _UNUSABLE.search(text):
            # Waiting would not end it: a value libpq refuses.
            raise ConfigError(f"DATABASE_URL ({describe(conninfo)}) cannot work: {text}") from None
        raise StoreUnavailable(
            f"cannot connect to PostgreSQL ({describe(conninfo)}): {text}"
        ) from None
