"""`stream-supervisor dead-letters`: list what could not be stored, and replay one.

A replay decodes the kept payload with the code of the day (`protocol.decode_stored`) and
commits it through the store's `commit_batch`, the writer's exactly-once path: a replay
of an update already stored stores nothing, so replaying twice is harmless. The outcome
is written to the dead letter's row in the same transaction (migration 0003).

Only the holder of the account's writer lock writes (docs/design.md, section 7): when the
lock is free, this command takes it for the replay; when a service holds it, the command
marks the row (`replay_requested_at`) and the service's leader replays it through its
own store connection (`supervisor.py`), and the command waits for the outcome. The
replay itself (`replay.py`) is the same in both.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import trio

from . import pgconn
from .errors import ConfigError, StoreError
from .logs import get_logger
from .nontrade import AssetBook
from .pgstore import DEAD_LETTER_COLUMNS, PgStore, stored_dead_letter
from .replay import REPLAYED, replay_with
from .settings import Settings
from .store import StoredDeadLetter
from .wiring import http_rest

log = get_logger("stream_supervisor.deadletters")

DEFAULT_LIST_LIMIT: Final = 50
#: How long `--replay` waits for a running service to replay a row it marked.
DEFAULT_REPLAY_WAIT: Final = 30.0
#: How much of a payload the listing shows.
PREVIEW_BYTES: Final = 72

_LIST = f"""
SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters
WHERE (%(acct)s::text IS NULL OR account_id = %(acct)s)
ORDER BY id DESC LIMIT %(limit)s
"""
_ONE = f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = %s"
_REQUEST = """
UPDATE dead_letters SET replay_requested_at = now(), replayed_at = NULL, replay_result = NULL
WHERE id = %s
"""


# --- the command ----------------------------------------------------------------------


def _connect(settings: Settings) -> Any:
    return pgconn.connect(settings.database_url, autocommit=True,
                          application_name="stream-supervisor-dead-letters")


def _rows(settings: Settings, query: str, params: Any) -> list[StoredDeadLetter]:
    import psycopg

    try:
        with _connect(settings) as conn:
            return [stored_dead_letter(r) for r in conn.execute(query, params).fetchall()]
    except psycopg.Error as exc:
        raise StoreError(f"dead-letters failed: "
                         f"{pgconn.error_text(exc, settings.database_url)}") from None


def list_dead_letters(settings: Settings, account_id: str | None,
                      limit: int) -> list[StoredDeadLetter]:
    """Newest first."""
    return _rows(settings, _LIST, {"acct": account_id, "limit": limit})


def load_dead_letter(settings: Settings, letter_id: int) -> StoredDeadLetter | None:
    found = _rows(settings, _ONE, [letter_id])
    return found[0] if found else None


def request_replay(settings: Settings, letter_id: int) -> None:
    import psycopg

    try:
        with _connect(settings) as conn:
            conn.execute(_REQUEST, [letter_id])
    except psycopg.Error as exc:
        raise StoreError(f"dead-letters failed: "
                         f"{pgconn.error_text(exc, settings.database_url)}") from None


def preview(payload: bytes, limit: int = PREVIEW_BYTES) -> str:
    """The first bytes of a payload, printable on one line."""
    head = payload[:limit].decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in head)
    return text + ("..." if len(payload) > limit else "")


def as_dict(letter: StoredDeadLetter) -> dict[str, Any]:
    def iso(ts: datetime | None) -> str | None:
        return None if ts is None else ts.astimezone(UTC).isoformat()

    return {
        "id": letter.id,
        "account_id": letter.account_id,
        "received_at": iso(letter.received_at),
        "source": letter.source,
        "reason": letter.reason,
        "payload_bytes": len(letter.payload),
        "payload_head": preview(letter.payload, 200),
        "replay_requested_at": iso(letter.replay_requested_at),
        "replayed_at": iso(letter.replayed_at),
        "replay_result": letter.replay_result,
    }


def _replay_state(letter: StoredDeadLetter) -> str:
    if letter.replayed_at is not None:
        return f"replayed: {letter.replay_result}"
    if letter.replay_requested_at is not None:
        return "replay requested"
    return ""


def format_table(letters: Sequence[StoredDeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    lines = []
    for d in letters:
        when = d.received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        state = _replay_state(d)
        lines.append(f"{d.id:>8}  {when}  {d.source:<6}  {d.reason[:100]}"
                     + (f"  [{state[:80]}]" if state else ""))
        lines.append(f"{'':>8}  {preview(d.payload)}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ReplayReport:
    letter_id: int
    how: str  # "replayed" (this command held the lock), "by the service", "queued"
    outcome: str | None

    @property
    def stored(self) -> bool:
        return self.outcome in REPLAYED


async def _replay_here(store: PgStore, letter: StoredDeadLetter, settings: Settings) -> str:
    """`replay_with` in this process; with the broker's credentials set, its asset
    records spell a REST fill's crypto pair (`replay.spelled_letter`)."""
    if not (settings.key_id and settings.secret_key):
        return await replay_with(store, letter, settings, datetime.now(UTC))
    async with http_rest(settings) as rest:
        return await replay_with(store, letter, settings, datetime.now(UTC), AssetBook(rest))


async def replay(settings: Settings, letter_id: int, *, wait: float = DEFAULT_REPLAY_WAIT,
                 poll: float = 0.2) -> ReplayReport:
    """Replay one dead letter under the account's writer lock, or have the running
    service's leader do it (and wait up to `wait` seconds for its outcome)."""
    letter = await trio.to_thread.run_sync(load_dead_letter, settings, letter_id)
    if letter is None:
        raise ConfigError(f"no dead letter with id {letter_id}")
    store = PgStore(settings.database_url, statement_timeout_ms=settings.statement_timeout_ms,
                    application_name="stream-supervisor-dead-letters")
    try:
        await store.open()
        if await store.try_leadership(letter.account_id):
            # Nobody else writes this account now: replay here, under the lock.
            await trio.to_thread.run_sync(request_replay, settings, letter_id)
            outcome = await _replay_here(store, letter, settings)
            log.info("dead_letter_replayed", id=letter_id, outcome=outcome[:300], by="command")
            return ReplayReport(letter_id, "replayed", outcome)
    finally:
        await store.aclose()
    # A service holds the lock: it replays the row through its own writer.
    await trio.to_thread.run_sync(request_replay, settings, letter_id)
    log.info("dead_letter_replay_requested", id=letter_id, account_id=letter.account_id)
    with trio.move_on_after(wait):
        while True:
            await trio.sleep(poll)
            now = await trio.to_thread.run_sync(load_dead_letter, settings, letter_id)
            if now is not None and now.replayed_at is not None:
                return ReplayReport(letter_id, "by the service", now.replay_result)
    return ReplayReport(letter_id, "queued", None)


def add_dead_letters_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--account-id", help="only this account (default: all)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIST_LIMIT,
                   help=f"newest this many (default {DEFAULT_LIST_LIMIT})")
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.add_argument("--replay", type=int, metavar="ID",
                   help="decode dead letter ID again with today's code and commit it "
                        "exactly once (under the writer lock, or through the running "
                        "service); the outcome is recorded on the row")
    p.add_argument("--wait", type=float, default=DEFAULT_REPLAY_WAIT,
                   help="with --replay while a service runs: seconds to wait for it to "
                        f"replay the row (default {DEFAULT_REPLAY_WAIT:g})")


def cmd_dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set (or pass --database-url)")
    if args.replay is None:
        letters = list_dead_letters(settings, args.account_id, args.limit)
        if args.json:
            print(json.dumps([as_dict(d) for d in letters], indent=1))
        else:
            print(format_table(letters))
        return 0
    report = trio.run(lambda: replay(settings, args.replay, wait=args.wait))
    if args.json:
        print(json.dumps({"id": report.letter_id, "how": report.how,
                          "outcome": report.outcome, "stored": report.stored}))
    elif report.outcome is None:
        print(f"dead letter {report.letter_id}: replay requested; the running service has "
              f"not answered within {args.wait:g}s (it replays requested rows every "
              "few seconds; look again with `stream-supervisor dead-letters`)")
    else:
        print(f"dead letter {report.letter_id} replayed ({report.how}): {report.outcome}")
    return 0 if report.stored else 1


__all__ = [
    "ReplayReport",
    "add_dead_letters_arguments",
    "cmd_dead_letters",
    "list_dead_letters",
    "replay",
]
