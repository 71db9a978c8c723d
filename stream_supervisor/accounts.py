"""The accounts file: several accounts served by one process (docs/design.md, section 11).

A TOML file (path in `STREAM_SUPERVISOR_ACCOUNTS_FILE`) names each account and says where
its credentials come from: an environment variable or a file (systemd credentials, ECS
secrets), never the secret itself. Parsing is pure apart from reading those variables
and files, which happens here once at start; every problem names the account, and the
variable or file to fix.
"""

from __future__ import annotations

import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError
from .settings import check_stream_url

ACCOUNTS_FILE_VARIABLE: Final = "STREAM_SUPERVISOR_ACCOUNTS_FILE"
SOURCES: Final = ("websocket", "broker-events")
#: Keys an account table may have. `key_id` and `secret_key` themselves are refused: a
#: secret in a file that is checked in, copied to every host and shown in `ps` output of
#: `cat` is how keys leak.
_ACCOUNT_KEYS: Final = frozenset({
    "key_id_env", "secret_key_env", "key_id_file", "secret_key_file",
    "account_id", "base_url", "stream_url", "source",
})
_DEFAULT_KEYS: Final = frozenset({"base_url", "stream_url", "source"})


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """One account of the file, with its credentials resolved (or why they could not be)."""

    name: str
    key_id: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    #: Where the credentials came from, for messages: `env MOMENTUM_KEY, env MOMENTUM_SECRET`.
    credentials_from: str = ""
    account_id: str | None = None
    base_url: str | None = None
    stream_url: str | None = None
    source: str = "websocket"
    #: Set when the credentials could not be read: the account is reported failed with
    #: this message, and the others run (one account's bad setup never stops them).
    problem: str | None = None


def load_accounts_file(path: str | Path, env: Mapping[str, str]) -> list[AccountSpec]:
    """Read and check the accounts file. A file that cannot be used at all (missing, not
    TOML, no accounts, unknown keys, a secret written inline) is a ConfigError; an account
    whose variable or file is missing is returned with `problem` set."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{ACCOUNTS_FILE_VARIABLE}={str(p)!r}: cannot read the accounts "
                          f"file ({exc.strerror or exc})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{ACCOUNTS_FILE_VARIABLE}={str(p)!r} is not valid TOML: {exc}") from None
    return parse_accounts(doc, env, where=str(p), base_dir=p.parent)


def parse_accounts(doc: Mapping[str, Any], env: Mapping[str, str], *, where: str = "accounts",
                   base_dir: Path | None = None) -> list[AccountSpec]:
    unknown = set(doc) - {"defaults", "accounts"}
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {sorted(unknown)}; "
                          "use [defaults] and [accounts.NAME]")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: [defaults] must be a table")
    bad = set(defaults) - _DEFAULT_KEYS
    if bad:
        raise ConfigError(f"{where}: [defaults] may set {sorted(_DEFAULT_KEYS)}, not {sorted(bad)}")
    accounts = doc.get("accounts")
    if not isinstance(accounts, dict) or not accounts:
        raise ConfigError(f"{where}: no accounts; add an [accounts.NAME] table per account")
    out: list[AccountSpec] = []
    for name, table in accounts.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: accounts.{name} must be a table")
        out.append(_account(name, {**defaults, **table}, env, where, base_dir))
    return out


def _account(name: str, t: dict[str, Any], env: Mapping[str, str], where: str,
             base_dir: Path | None) -> AccountSpec:
    label = f"{where}: accounts.{name}"
    inline = {"key_id", "secret_key"} & set(t)
    if inline:
        raise ConfigError(
            f"{label} holds {' and '.join(sorted(inline))} inline; secrets never go in the "
            "accounts file: name an environment variable (key_id_env, secret_key_env) or "
            "a file (key_id_file, secret_key_file, e.g. a systemd credential)")
    bad = set(t) - _ACCOUNT_KEYS
    if bad:
        raise ConfigError(f"{label}: unknown key(s) {sorted(bad)}; allowed: {sorted(_ACCOUNT_KEYS)}")
    for key in _ACCOUNT_KEYS:
        if key in t and not isinstance(t[key], str):
            raise ConfigError(f"{label}.{key} must be a string")
    if t.get("stream_url"):
        check_stream_url(t["stream_url"], f"{label}.stream_url")
    source = t.get("source", "websocket")
    if source not in SOURCES:
        raise ConfigError(f"{label}.source must be one of {list(SOURCES)}, got {source!r}")
    values: dict[str, str] = {}
    origins: list[str] = []
    problems: list[str] = []
    for what in ("key_id", "secret_key"):
        var, file = t.get(f"{what}_env"), t.get(f"{what}_file")
        if (var is None) == (file is None):
            raise ConfigError(f"{label}: set exactly one of {what}_env or {what}_file")
        if var is not None:
            origins.append(f"env {var}")
            value = env.get(var, "")
            if not value:
                problems.append(f"environment variable {var} ({what} of account {name!r}) "
                                "is not set")
            values[what] = value
        else:
            assert file is not None
            # `${CREDENTIALS_DIRECTORY}/momentum-key` (systemd's LoadCredential=): the
            # variables of the environment are expanded; an unknown one stays as written.
            path = Path(string.Template(file).safe_substitute(env))
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            origins.append(f"file {path}")
            try:
                values[what] = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                values[what] = ""
                problems.append(f"cannot read {what} of account {name!r} from file {path} "
                                f"({exc.strerror or exc})")
            else:
                if not values[what]:
                    problems.append(f"file {path} ({what} of account {name!r}) is empty")
    return AccountSpec(
        name=name,
        key_id=values["key_id"],
        secret_key=values["secret_key"],
        credentials_from=", ".join(origins),
        account_id=t.get("account_id") or None,
        base_url=t.get("base_url"),
        stream_url=t.get("stream_url"),
        source=source,
        problem="; ".join(problems) or None,
    )


__all__ = ["ACCOUNTS_FILE_VARIABLE", "AccountSpec", "load_accounts_file", "parse_accounts"]
