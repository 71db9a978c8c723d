"""Settings from the environment: defaults, derived URLs, errors that name the variable,
and secrets that never show up in a repr."""

from __future__ import annotations

import pytest

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.bounds import TRANSPORT_MAX_MESSAGE
from stream_supervisor.errors import ConfigError
from stream_supervisor.settings import (
    DEFAULT_CHANNEL_SIZE,
    DEFAULT_FUTURE_TOLERANCE,
    DEFAULT_LRU_SIZE,
    DEFAULT_MAX_BATCH,
    PAPER_BASE_URL,
    Settings,
    load_settings,
)

KEY = "PKTESTKEY1234567890"
SECRET = "sEcReT-abcdefghijklmnopqrstuvwxyz0123"
DB_PASSWORD = "hunter2-db-pass"
FULL_ENV = {
    "APCA_API_KEY_ID": KEY,
    "APCA_API_SECRET_KEY": SECRET,
    "DATABASE_URL": f"postgresql://trader:{DB_PASSWORD}@db.internal:5432/trading",
}


def test_defaults() -> None:
    s = load_settings(env={})
    assert s.base_url == PAPER_BASE_URL
    assert s.stream_url == "wss://paper-api.alpaca.markets/stream"
    assert (s.max_batch, s.channel_size, s.lru_size) == (
        DEFAULT_MAX_BATCH,
        DEFAULT_CHANNEL_SIZE,
        DEFAULT_LRU_SIZE,
    )
    assert s.backoff == BackoffPolicy()
    assert s.key_id == s.secret_key == s.database_url == ""
    assert s.account_id is None and s.first_start_lookback is None
    assert s.claim_ahead is None and s.claims_ahead is True
    assert s.secrets() == []


@pytest.mark.parametrize(
    ("base", "stream"),
    [
        ("https://paper-api.alpaca.markets", "wss://paper-api.alpaca.markets/stream"),
        ("https://api.alpaca.markets/", "wss://api.alpaca.markets/stream"),
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/stream"),
        ("https://broker.example/v2", "wss://broker.example/stream"),
    ],
)
def test_stream_url_is_derived_from_the_base_url(base: str, stream: str) -> None:
    s = load_settings(env={"APCA_API_BASE_URL": base})
    assert s.stream_url == stream
    assert s.base_url == base.rstrip("/")


def test_explicit_stream_url_wins() -> None:
    s = load_settings(
        env={
            "APCA_API_BASE_URL": "http://127.0.0.1:1",
            "APCA_API_STREAM_URL": "ws://127.0.0.1:2/custom",
        }
    )
    assert s.stream_url == "ws://127.0.0.1:2/custom"


def test_overrides_win_over_the_environment_and_none_is_ignored() -> None:
    s = load_settings(env={"STREAM_SUPERVISOR_MAX_BATCH": "10"}, max_batch=3, lru_size=None)
    assert s.max_batch == 3 and s.lru_size == DEFAULT_LRU_SIZE
    assert s.with_overrides(max_batch=None, channel_size=5).channel_size == 5
    assert s.with_overrides(max_batch=None).max_batch == 3


def test_prefixed_variables_are_parsed() -> None:
    s = load_settings(
        env={
            "STREAM_SUPERVISOR_MAX_BATCH": " 250 ",
            "STREAM_SUPERVISOR_PING_INTERVAL": "2.5",
            "STREAM_SUPERVISOR_ACCOUNT_ID": "acct-7",
            "STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "3600",
            "STREAM_SUPERVISOR_LOG_FORMAT": "json",
            "STREAM_SUPERVISOR_BACKOFF_INITIAL": "0.25",
            "STREAM_SUPERVISOR_BACKOFF_CAP": "9",
            "STREAM_SUPERVISOR_BACKOFF_429_FLOOR": "20",
            "STREAM_SUPERVISOR_CLAIM_AHEAD": "off",
        }
    )
    assert s.claim_ahead is False and not s.claims_ahead
    assert s.max_batch == 250 and s.ping_interval == 2.5 and s.account_id == "acct-7"
    assert s.first_start_lookback == 3600.0 and s.log_format == "json"
    assert s.backoff == BackoffPolicy(initial=0.25, cap=9.0, rate_limited_floor=20.0)
    assert (
        load_settings(env={"STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "today"}).first_start_lookback
        is None
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("STREAM_SUPERVISOR_MAX_BATCH", "abc"),
        ("STREAM_SUPERVISOR_MAX_BATCH", "1.5"),
        ("STREAM_SUPERVISOR_MAX_BATCH", "0"),
        ("STREAM_SUPERVISOR_CHANNEL_SIZE", "-1"),
        ("STREAM_SUPERVISOR_LRU_SIZE", "-1"),
        ("STREAM_SUPERVISOR_PING_INTERVAL", "fast"),
        ("STREAM_SUPERVISOR_PING_TIMEOUT", "-3"),
        ("STREAM_SUPERVISOR_CONNECT_TIMEOUT", "nan"),
        ("STREAM_SUPERVISOR_DRAIN_TIMEOUT", ""),
        ("STREAM_SUPERVISOR_FIRST_START_LOOKBACK", "yesterday"),
        ("STREAM_SUPERVISOR_BACKOFF_FACTOR", "x2"),
        ("STREAM_SUPERVISOR_LOG_FORMAT", "xml"),
        ("STREAM_SUPERVISOR_CLAIM_AHEAD", "sometimes"),
    ],
)
def test_a_bad_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={var: value})
    assert var.removeprefix("STREAM_SUPERVISOR_") in str(info.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        # No deadline at all is not a number an operator means to set.
        ("STREAM_SUPERVISOR_CONNECT_TIMEOUT", "inf"),
        ("STREAM_SUPERVISOR_PING_TIMEOUT", "1e999"),
        # A negative frame limit dead-letters every frame; a negative timeout or retry
        # count fails far from its cause.
        ("STREAM_SUPERVISOR_MAX_FRAME_BYTES", "-1"),
        ("STREAM_SUPERVISOR_STATEMENT_TIMEOUT_MS", "-5"),
        ("STREAM_SUPERVISOR_REST_RETRIES", "-1"),
        ("STREAM_SUPERVISOR_RESTART_LIMIT", "-2"),
    ],
)
def test_infinite_or_negative_numbers_are_refused(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={var: value})
    assert var in str(info.value)


def test_inconsistent_backoff_names_the_variables() -> None:
    with pytest.raises(ConfigError, match="BACKOFF"):
        load_settings(
            env={"STREAM_SUPERVISOR_BACKOFF_INITIAL": "10", "STREAM_SUPERVISOR_BACKOFF_CAP": "1"}
        )


def test_bad_base_url_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="APCA_API_BASE_URL"):
        load_settings(env={"APCA_API_BASE_URL": "ftp://paper-api.alpaca.markets"})
    with pytest.raises(ConfigError, match="APCA_API_BASE_URL"):
        load_settings(env={"APCA_API_BASE_URL": "paper-api.alpaca.markets"})


@pytest.mark.parametrize("url", [
    "https://paper-api.alpaca.markets/stream",  # REST's scheme: the transport refused it
    "wss://paper-api.alpaca.markets:99999/stream",  # raised a bare ValueError at connect
    "wss://paper-api.alpaca.markets:0/stream",
    "wss://paper-api.alpaca.markets:port/stream",
    "wss:///stream",
    "paper-api.alpaca.markets/stream",
])
def test_a_stream_url_the_transport_cannot_open_is_a_configuration_error(url: str) -> None:
    """Not a connection failure retried for ever, nor a crash: exit 78 naming it."""
    with pytest.raises(ConfigError, match="APCA_API_STREAM_URL"):
        load_settings(env={"APCA_API_STREAM_URL": url})
    with pytest.raises(ConfigError, match="APCA_API_STREAM_URL"):
        Settings(stream_url=url)


def test_a_base_url_port_out_of_range_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="APCA_API_BASE_URL"):
        load_settings(env={"APCA_API_BASE_URL": "https://paper-api.alpaca.markets:70000"})


def test_require_run_names_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}).require_run()
    message = str(info.value)
    for name in ("APCA_API_KEY_ID", "APCA_API_SECRET_KEY", "DATABASE_URL"):
        assert name in message


@pytest.mark.parametrize("missing", sorted(FULL_ENV))
def test_require_run_names_exactly_what_is_missing(missing: str) -> None:
    env = {k: v for k, v in FULL_ENV.items() if k != missing}
    with pytest.raises(ConfigError) as info:
        load_settings(env=env).require_run()
    message = str(info.value)
    assert missing in message
    for present in set(FULL_ENV) - {missing}:
        assert present not in message
    for secret in (KEY, SECRET, DB_PASSWORD):
        assert secret not in message


def test_require_run_passes_with_everything_set() -> None:
    load_settings(env=FULL_ENV).require_run()


def test_secrets_include_keys_and_the_dsn_password() -> None:
    assert set(load_settings(env=FULL_ENV).secrets()) == {KEY, SECRET, DB_PASSWORD}
    conninfo = {**FULL_ENV, "DATABASE_URL": f"host=db user=trader password={DB_PASSWORD}"}
    assert DB_PASSWORD in load_settings(env=conninfo).secrets()
    quoted = {**FULL_ENV, "DATABASE_URL": f"host=db password='{DB_PASSWORD}' dbname=x"}
    assert DB_PASSWORD in load_settings(env=quoted).secrets()
    no_password = {**FULL_ENV, "DATABASE_URL": "postgresql://trader@db/trading"}
    assert set(load_settings(env=no_password).secrets()) == {KEY, SECRET}


def test_repr_does_not_show_secrets() -> None:
    s = load_settings(env=FULL_ENV)
    for text in (repr(s), str(s), repr(s.with_overrides(max_batch=3))):
        for secret in (KEY, SECRET, DB_PASSWORD, FULL_ENV["DATABASE_URL"]):
            assert secret not in text
    assert "max_batch" in repr(s)  # the rest is still there to debug with


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.max_batch = 3  # type: ignore[misc]


def test_the_future_tolerance_is_a_setting() -> None:
    assert load_settings({}).future_tolerance == DEFAULT_FUTURE_TOLERANCE
    env = {"STREAM_SUPERVISOR_FUTURE_TOLERANCE": "30.5"}
    assert load_settings(env).future_tolerance == 30.5
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_FUTURE_TOLERANCE"):
        load_settings({"STREAM_SUPERVISOR_FUTURE_TOLERANCE": "-1"})


def test_a_frame_limit_beyond_what_the_transport_holds_is_refused() -> None:
    # Issue 13, observation 4: above 16 MiB the limit could never be honoured.
    ok = {"STREAM_SUPERVISOR_MAX_FRAME_BYTES": str(TRANSPORT_MAX_MESSAGE)}
    assert load_settings(ok).max_frame_bytes == TRANSPORT_MAX_MESSAGE
    for value in (TRANSPORT_MAX_MESSAGE + 1, 0):
        with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_MAX_FRAME_BYTES"):
            load_settings({"STREAM_SUPERVISOR_MAX_FRAME_BYTES": str(value)})


def test_claim_ahead_is_on_for_one_account_and_asked_for_in_a_fleet() -> None:
    one = load_settings(env={"STREAM_SUPERVISOR_CLAIM_AHEAD": "auto"})
    assert one.claim_ahead is None and one.claims_ahead
    fleet = load_settings(env={"STREAM_SUPERVISOR_ACCOUNTS_FILE": "/etc/accounts.toml"})
    assert not fleet.claims_ahead
    asked = load_settings(env={"STREAM_SUPERVISOR_ACCOUNTS_FILE": "/etc/accounts.toml",
                               "STREAM_SUPERVISOR_CLAIM_AHEAD": "on"})
    assert asked.claims_ahead


@pytest.mark.parametrize("name", ["PING_INTERVAL", "PING_TIMEOUT", "CONNECT_TIMEOUT",
                                  "DRAIN_TIMEOUT", "REST_TIMEOUT", "STATEMENT_TIMEOUT_MS"])
def test_a_timeout_of_zero_is_refused_by_name(name: str) -> None:
    """0 was taken: a connect that never succeeds, every stop past its deadline, the
    statement bound lifted. Refused at start, naming the variable."""
    with pytest.raises(ConfigError, match=f"STREAM_SUPERVISOR_{name} must be greater than 0"):
        load_settings({f"STREAM_SUPERVISOR_{name}": "0"})


def test_an_unknown_log_level_is_refused_not_read_as_info() -> None:
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_LOG_LEVEL='verbose' must be one"):
        load_settings({"STREAM_SUPERVISOR_LOG_LEVEL": "verbose"})
    assert load_settings({"STREAM_SUPERVISOR_LOG_LEVEL": "DEBUG"}).log_level == "DEBUG"
