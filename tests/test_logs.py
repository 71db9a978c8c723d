"""Logging: JSON lines that parse, and secrets that never reach them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from stream_supervisor import logs
from stream_supervisor.logs import REDACTED, configure_logging, get_logger

SECRET = "sk-live-0123456789abcdefSECRET"
KEY_ID = "PKAAAABBBBCCCCDDDD"
DB_PW = "pw"  # short on purpose: too short to register, the DSN patterns must catch it


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """JSON logging into a buffer, and the previous logging setup restored afterwards."""
    saved_structlog = structlog.get_config().copy()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    names = ("trio-websocket", "trio_websocket", "httpx", "httpcore", "psycopg", "hpack")
    saved_levels = {n: logging.getLogger(n).level for n in names}
    saved_secrets = list(logs.redactor._secrets)  # process-wide: keep other tests unaffected
    out = io.StringIO()
    configure_logging(fmt="json", level="info", stream=out, secrets=[SECRET, KEY_ID])
    try:
        yield out
    finally:
        structlog.configure(**saved_structlog)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for n, level in saved_levels.items():
            logging.getLogger(n).setLevel(level)
        logs.redactor._secrets[:] = saved_secrets


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    text = out.getvalue()
    assert text.endswith("\n")
    parsed = [json.loads(line) for line in text.splitlines()]
    for entry in parsed:
        assert isinstance(entry["event"], str) and entry["event"]
        assert entry["level"] in ("debug", "info", "warning", "error", "critical")
    return parsed


def assert_clean(out: io.StringIO) -> None:
    text = out.getvalue()
    assert SECRET not in text
    assert KEY_ID not in text
    assert f":{DB_PW}@" not in text
    assert f"password={DB_PW}" not in text


def test_every_line_is_json_with_event_and_level(captured: io.StringIO) -> None:
    log = get_logger("stream_supervisor.test", actor="writer")
    log.info("batch_committed", events=3, ms=1.5)
    log.warning("position_drift", symbol="AAPL")
    log.debug("not_shown")
    logging.getLogger("trio_websocket").warning("socket closed %s", "abruptly")
    logging.getLogger("stream_supervisor.x").info("plain stdlib line")
    entries = lines(captured)
    assert [e["event"] for e in entries] == [
        "batch_committed",
        "position_drift",
        "socket closed abruptly",
        "plain stdlib line",
    ]
    assert entries[0]["level"] == "info" and entries[0]["events"] == 3
    assert entries[0]["actor"] == "writer"
    assert entries[1]["level"] == "warning"
    assert all("timestamp" in e for e in entries)


def test_registered_secret_is_redacted_from_fields(captured: io.StringIO) -> None:
    log = get_logger()
    log.info(f"auth_sent {SECRET}", key=KEY_ID, header=f"APCA-API-SECRET-KEY: {SECRET}")
    (entry,) = lines(captured)
    assert entry["event"] == f"auth_sent {REDACTED}"
    assert entry["key"] == REDACTED
    assert entry["header"] == f"APCA-API-SECRET-KEY: {REDACTED}"
    assert_clean(captured)


def test_secret_is_redacted_from_nested_values(captured: io.StringIO) -> None:
    get_logger().info(
        "request",
        headers={"APCA-API-KEY-ID": KEY_ID, "inner": {"deeper": [f"x{SECRET}y"]}},
        args=("a", SECRET),
        items=[{"k": SECRET}],
        odd={SECRET},  # a type the redactor does not walk: the rendered line is scrubbed
        raw=SECRET.encode(),
    )
    (entry,) = lines(captured)
    assert entry["headers"]["APCA-API-KEY-ID"] == REDACTED
    assert entry["headers"]["inner"]["deeper"] == [f"x{REDACTED}y"]
    assert entry["args"] == ["a", REDACTED]
    assert entry["items"] == [{"k": REDACTED}]
    assert_clean(captured)


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://trader:{DB_PW}@db.internal:5432/trading",
        f"postgres://u:{DB_PW}@h/db",
        f"host=db user=trader password={DB_PW} dbname=trading",
        f"host=db password='{DB_PW}' dbname=trading",
        f"host=db PASSWORD = {DB_PW}",
        f"host=db user=trader password={DB_PW}",  # last in the value: the line stays JSON
    ],
)
def test_dsn_passwords_are_redacted_even_unregistered(captured: io.StringIO, dsn: str) -> None:
    get_logger().warning("db_connect_failed", dsn=dsn, error=f"could not connect: {dsn}")
    (entry,) = lines(captured)
    assert REDACTED in entry["dsn"] and REDACTED in entry["error"]
    assert "db" in entry["dsn"]  # the rest of the DSN stays useful
    assert_clean(captured)


def test_secret_is_redacted_from_exceptions_and_tracebacks(captured: io.StringIO) -> None:
    log = get_logger()
    try:
        raise ConnectionError(f"auth failed for {KEY_ID}/{SECRET} at postgresql://u:{DB_PW}@h/db")
    except ConnectionError as exc:
        log.exception("connect_failed")
        log.error("connect_failed_again", error=exc)
        log.error("connect_failed_exc_info", exc_info=exc)
    entries = lines(captured)
    assert len(entries) == 3
    assert "ConnectionError" in entries[0]["exception"]
    assert "Traceback" in entries[0]["exception"]
    assert REDACTED in entries[0]["exception"]
    assert entries[1]["error"].startswith("ConnectionError: auth failed for ")
    assert "ConnectionError" in entries[2]["exception"]
    assert_clean(captured)


def test_standard_library_loggers_are_redacted(captured: io.StringIO) -> None:
    dsn = f"postgresql://trader:{DB_PW}@db/trading"
    logging.getLogger("psycopg").warning("connection failed: %s (key %s)", dsn, KEY_ID)
    logging.getLogger("psycopg.pool").warning(f"error with password={DB_PW} and {SECRET}")
    try:
        raise RuntimeError(SECRET)
    except RuntimeError:
        logging.getLogger("httpx").exception("request to broker failed")
    entries = lines(captured)
    assert len(entries) == 3
    assert entries[0]["event"].startswith("connection failed: postgresql://trader:")
    assert entries[0]["logger"] == "psycopg"
    assert "RuntimeError" in entries[2]["exception"]
    assert_clean(captured)


def test_chatty_library_debug_lines_are_dropped(captured: io.StringIO) -> None:
    logging.getLogger("psycopg").info("per query chatter")
    logging.getLogger("trio-websocket").info("per frame chatter")
    assert captured.getvalue() == ""


def test_debug_level_shows_debug_lines() -> None:
    # Reconfiguring is allowed (configure_logging is "safe to call again").
    saved = structlog.get_config().copy()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        configure_logging(fmt="json", level="debug", stream=out)
        get_logger().debug("batch_committed", events=1)
        (entry,) = lines(out)
        assert entry["level"] == "debug"
    finally:
        structlog.configure(**saved)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for n in ("trio-websocket", "trio_websocket", "httpx", "httpcore", "psycopg", "hpack"):
            logging.getLogger(n).setLevel(logging.NOTSET)


def test_redactor_ignores_too_short_secrets() -> None:
    r = logs.Redactor(["ab", "", "long-enough-secret"])
    assert r.scrub("ab long-enough-secret") == f"ab {REDACTED}"
