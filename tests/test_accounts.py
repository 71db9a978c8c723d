"""The accounts file (stream_supervisor/accounts.py): credentials by reference only, and
every problem named with the variable, file or key to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_supervisor.accounts import load_accounts_file, parse_accounts
from stream_supervisor.errors import ConfigError
from stream_supervisor.settings import load_settings

ENV = {"MOM_KEY": "PKMOM", "MOM_SECRET": "mom-secret"}


def test_credentials_come_from_variables_and_files(tmp_path: Path) -> None:
    (tmp_path / "hedge.key").write_text("PKHEDGE\n")
    (tmp_path / "hedge.secret").write_text("hedge-secret\n")
    path = tmp_path / "accounts.toml"
    path.write_text("""
[defaults]
base_url = "https://paper-api.alpaca.markets"

[accounts.momentum]
key_id_env = "MOM_KEY"
secret_key_env = "MOM_SECRET"

[accounts.hedge]
base_url = "https://api.alpaca.markets"
key_id_file = "hedge.key"
secret_key_file = "hedge.secret"
account_id = "acct-hedge"

[accounts.partner]
key_id_env = "MOM_KEY"
secret_key_env = "MOM_SECRET"
source = "broker-events"
""")
    momentum, hedge, partner = load_accounts_file(path, ENV)
    assert (momentum.name, momentum.key_id, momentum.secret_key) == ("momentum", "PKMOM",
                                                                     "mom-secret")
    assert momentum.base_url == "https://paper-api.alpaca.markets"
    assert momentum.credentials_from == "env MOM_KEY, env MOM_SECRET"
    assert (hedge.key_id, hedge.secret_key, hedge.account_id) == ("PKHEDGE", "hedge-secret",
                                                                  "acct-hedge")
    assert hedge.base_url == "https://api.alpaca.markets"
    assert partner.source == "broker-events"
    assert all(a.problem is None for a in (momentum, hedge, partner))
    assert "mom-secret" not in repr(momentum)  # secrets stay out of reprs


@pytest.mark.parametrize(("table", "message"), [
    ({"key_id": "PK", "secret_key_env": "S"}, "secrets never go in the accounts file"),
    ({"key_id_env": "K"}, "set exactly one of secret_key_env or secret_key_file"),
    ({"key_id_env": "K", "key_id_file": "f", "secret_key_env": "S"},
     "set exactly one of key_id_env or key_id_file"),
    ({"key_id_env": "K", "secret_key_env": "S", "base": "x"}, "unknown key(s) ['base']"),
    ({"key_id_env": "K", "secret_key_env": "S", "source": "kafka"}, "source must be one of"),
    ({"key_id_env": "K", "secret_key_env": "S", "stream_url": "https://api.alpaca.markets"},
     "stream_url must be a ws:// or wss:// URL"),
])
def test_a_file_that_cannot_be_used_is_refused_naming_the_fix(
        table: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_accounts({"accounts": {"momentum": table}}, {})
    assert message in str(info.value) and "accounts.momentum" in str(info.value)


def test_an_account_without_its_credentials_is_reported_and_the_others_load(
        tmp_path: Path) -> None:
    doc = {"accounts": {
        "momentum": {"key_id_env": "MOM_KEY", "secret_key_env": "MOM_SECRET"},
        "missing": {"key_id_env": "NOPE_KEY", "secret_key_file": str(tmp_path / "nope")}}}
    momentum, missing = parse_accounts(doc, ENV)
    assert momentum.problem is None
    assert missing.problem is not None
    assert "NOPE_KEY" in missing.problem and str(tmp_path / "nope") in missing.problem


def test_the_file_itself_missing_or_broken_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_ACCOUNTS_FILE"):
        load_accounts_file(tmp_path / "absent.toml", {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[accounts.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_accounts_file(bad, {})
    empty = tmp_path / "empty.toml"
    empty.write_text("[defaults]\n")
    with pytest.raises(ConfigError, match="no accounts"):
        load_accounts_file(empty, {})


def test_run_needs_no_single_account_keys_with_an_accounts_file() -> None:
    settings = load_settings({"STREAM_SUPERVISOR_ACCOUNTS_FILE": "/etc/ss/accounts.toml",
                              "DATABASE_URL": "postgresql:///x"})
    settings.require_run()
    assert settings.accounts_file == "/etc/ss/accounts.toml"
    with pytest.raises(ConfigError, match="APCA_API_KEY_ID"):
        load_settings({"DATABASE_URL": "postgresql:///x"}).require_run()
