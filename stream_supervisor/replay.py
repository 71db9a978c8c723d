"""Replaying a dead letter: its payload decoded again with today's code, committed
exactly once through the store contract, the outcome recorded on its row.

Shared by `stream-supervisor dead-letters --replay` (`deadletters.py`, when no service
holds the account's writer lock) and the running leader (`supervisor.py`, for rows the
command marked). The caller holds the writer lock (docs/design.md, section 4).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from .bounds import not_after_ns
from .errors import StoreDataError
from .events import DeadLetter, Event
from .protocol import decode_stored
from .settings import Settings
from .store import (
    REPLAY_ALREADY_STORED,
    REPLAY_STORED,
    Batch,
    ReplayMark,
    Store,
    StoredDeadLetter,
)

#: Outcomes that mean the update is stored now.
REPLAYED: Final = frozenset({REPLAY_STORED, REPLAY_ALREADY_STORED})
STILL_REFUSED: Final = "still refused: "


def replay_batch(letter: StoredDeadLetter, decoded: Event | DeadLetter) -> Batch:
    """The batch that replays `letter`: its update (if it decodes now) and the mark that
    records the outcome on its row, in one transaction."""
    if isinstance(decoded, DeadLetter):
        mark = ReplayMark(letter.id, None, (STILL_REFUSED + decoded.reason)[:1000])
        return Batch(letter.account_id, [], (), [mark])
    return Batch(letter.account_id, [decoded], (), [ReplayMark(letter.id, decoded.key)])


def decode_letter(letter: StoredDeadLetter, settings: Settings,
                  now: datetime) -> Event | DeadLetter:
    """The payload decoded with today's code and today's bounds."""
    return decode_stored(letter.payload, letter.source, max_bytes=settings.max_frame_bytes,
                         not_after_ns=not_after_ns(now, settings.future_tolerance))


async def replay_with(store: Store, letter: StoredDeadLetter, settings: Settings,
                      now: datetime) -> str:
    """Replay one dead letter through `store.commit_batch` (the caller holds the writer
    lock); returns the outcome recorded on its row."""
    batch = replay_batch(letter, decode_letter(letter, settings, now))
    try:
        result = await store.commit_batch(batch)
    except StoreDataError as exc:
        outcome = f"refused by the database [{exc.sqlstate}]: {exc.detail}"[:1000]
        await store.commit_batch(Batch(letter.account_id, [], (),
                                       [ReplayMark(letter.id, None, outcome)]))
        return outcome
    mark = batch.replays[0]
    if mark.outcome is not None:
        return mark.outcome
    return REPLAY_STORED if mark.event_key in result.applied_keys else REPLAY_ALREADY_STORED


__all__ = ["REPLAYED", "STILL_REFUSED", "decode_letter", "replay_batch", "replay_with"]
