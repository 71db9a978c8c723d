"""Replaying a dead letter: its payload decoded again with today's code, committed
exactly once through the store contract, the outcome recorded on its row.

Shared by `stream-supervisor dead-letters --replay` (`deadletters.py`, when no service
holds the account's writer lock) and the running leader (`supervisor.py`, for rows the
command marked). The caller holds the writer lock (docs/design.md, section 4).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec

from .activities import decode_stored_activity, non_trade_to_event
from .bounds import not_after_ns
from .errors import DecodeError, StoreDataError
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
    """The payload decoded with today's code and today's bounds: a stream frame, a REST
    FILL activity or order snapshot (`protocol.decode_stored`), or a non-trade activity
    the activities backfill kept (its JSON, source `rest`, a type other than FILL)."""
    latest = not_after_ns(now, settings.future_tolerance)
    if letter.source != "rest" and _is_broker_event(letter.payload):
        # Its account's writes go through the events stream's writer (its lock is the
        # stream's, not the account's), which does not take replays.
        return DeadLetter(
            "an event of a Broker API events stream: not replayed (its accounts are "
            "written by the stream's writer); `stream-supervisor reconcile --apply` "
            "brings the account to the broker's word", letter.payload)
    if letter.source == "rest":
        try:
            activity = decode_stored_activity(letter.payload)
        except DecodeError:
            activity = None
        if activity is not None and activity.activity_type != "FILL":
            try:
                return non_trade_to_event(activity, not_after_ns=latest)
            except ValueError as exc:  # DecodeError, OutOfBounds, TimestampError
                return DeadLetter(f"invalid activity {activity.id[:128]}: {exc}"[:500],
                                  letter.payload, source="rest")
    return decode_stored(letter.payload, letter.source, max_bytes=settings.max_frame_bytes,
                         not_after_ns=latest)


class _BrokerEventShape(msgspec.Struct, gc=False):
    event_id: str | None = None
    stream: str | None = None


_shape_decoder: Final = msgspec.json.Decoder(_BrokerEventShape)


def _is_broker_event(payload: bytes) -> bool:
    """A `data:` payload of the events stream (`event_id`, no `stream`), as its letters
    keep it, unlike a trade_updates frame."""
    try:
        shape = _shape_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return shape.event_id is not None and shape.stream is None


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
