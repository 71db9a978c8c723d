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
from .nontrade import AssetBook, looks_compact_crypto
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


async def spelled_letter(letter: StoredDeadLetter, decoded: Event | DeadLetter,
                         assets: AssetBook | None) -> Event | DeadLetter:
    """A REST fill's symbol as the stream and the store spell it (`AssetBook.spelled`: a
    FILL activity names a crypto pair `BTCUSD`, positions `BTC/USD`), as backfill spells
    it. One that may be a crypto pair, with no asset records to ask, is not guessed at:
    it stays a dead letter, saying what would let it through."""
    if letter.source != "rest" or not isinstance(decoded, Event) \
            or not looks_compact_crypto(decoded.symbol):
        return decoded
    if assets is None:
        return DeadLetter(f"{decoded.symbol} may be a crypto pair, which positions spell "
                          "with a slash: replay it with APCA_API_KEY_ID and "
                          "APCA_API_SECRET_KEY set (the broker's asset records say), or "
                          "let the running service replay it", letter.payload, source="rest")
    return (await assets.spelled([decoded]))[0]


async def replay_with(store: Store, letter: StoredDeadLetter, settings: Settings,
                      now: datetime, assets: AssetBook | None = None) -> str:
    """Replay one dead letter through `store.commit_batch` (the caller holds the writer
    lock); returns the outcome recorded on its row. `assets` spells a REST fill's symbol
    (`spelled_letter`)."""
    decoded = await spelled_letter(letter, decode_letter(letter, settings, now), assets)
    batch = replay_batch(letter, decoded)
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


__all__ = ["REPLAYED", "STILL_REFUSED", "decode_letter", "replay_batch", "replay_with",
           "spelled_letter"]
