"""Recovery of the broker's non-trade activities: the second source of keyed events.

Expiries, assignments, splits, crypto fees and transfers reach the account as activities
that post late (crypto fees at the end of the day), never on the stream. On every
backfill and on a schedule this pages `GET /v2/account/activities` for the
position-changing types from their own durable cursor (the newest activity id stored,
minus a re-read window) and forwards each as an event keyed by its activity id into the
same dedupe/writer path as fills (docs/design.md, section 10). It also gives REST fills
of crypto pairs their stored spelling, asking the broker's asset record once per symbol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import msgspec
import trio

from .activities import (
    POSITION_TYPES,
    UndecodableNonTrade,
    WireNonTrade,
    non_trade_to_event,
)
from .bounds import DEAD_LETTER_KEEP_BYTES, not_after_ns
from .errors import BrokerUnavailable, DecodeError
from .events import DeadLetter, Event, format_timestamp
from .logs import get_logger
from .messages import Item
from .rest import MAX_PAGE_SIZE
from .settings import DEFAULT_FUTURE_TOLERANCE
from .symbols import CRYPTO_QUOTES, AssetClass, canonical_symbol, parse_occ

log = get_logger("stream_supervisor.nontrade")

#: Activities post late and out of id order within a day: each pass re-reads this far
#: before the newest one stored; their keys make the overlap harmless.
REREAD: timedelta = timedelta(days=1)
EASTERN = ZoneInfo("America/New_York")
#: Pages per pass at most: a runaway guard.
MAX_PAGES: int = 1_000

Forward = Callable[[Item], Awaitable[None]]


class ActivitySource(Protocol):
    """The one `BrokerRest` call the activities backfill makes."""

    async def non_trade_activities(
        self, *, activity_types: Sequence[str], after: str | None, page_token: str | None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> list[WireNonTrade]: ...


class AssetSource(Protocol):
    """The one `BrokerRest` call the asset book makes."""

    async def asset(self, symbol: str) -> dict[str, Any] | None: ...


def activity_time(activity_id: str) -> datetime | None:
    """The time an activity id starts with (`<YYYYMMDDHHMMSSmmm>::<uuid>`, US/Eastern
    local time, as the broker writes it), if it does."""
    digits = activity_id.split("::", 1)[0]
    if len(digits) != 17 or not digits.isdigit():
        return None
    try:
        stamp = datetime.strptime(digits[:14], "%Y%m%d%H%M%S").replace(tzinfo=EASTERN)
    except ValueError:
        return None
    return (stamp + timedelta(milliseconds=int(digits[14:]))).astimezone(UTC)


class ActivityRecovery:
    """Pages non-trade activities into the pipeline. `load_cursor` reads the newest
    activity id stored (`Store.load_activity_cursor`)."""

    def __init__(
        self,
        rest: ActivitySource,
        forward: Forward,
        load_cursor: Callable[[], Awaitable[str | None]],
        *,
        interval: float,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
        future_tolerance: float = DEFAULT_FUTURE_TOLERANCE,
        types: Sequence[str] = tuple(sorted(POSITION_TYPES)),
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.rest = rest
        self._forward = forward
        self.load_cursor = load_cursor
        self.interval = interval
        self.wallclock = wallclock
        self.future_tolerance = future_tolerance
        self.types = tuple(types)
        #: Whether a scheduled pass may run now: only while streaming and caught up, so
        #: the fills before an activity are ahead of it on the way to the writer.
        self.ready = ready
        #: Where a pass starts while no activity is stored: the first backfill's start.
        self._first_start: datetime | None = None

    def note_start(self, first_start: datetime) -> None:
        """Where a pass starts while no activity is stored: the first fills backfill's."""
        if self._first_start is None:
            self._first_start = first_start

    async def backfill(self, first_start: datetime) -> int:
        """One pass: every activity since the cursor (minus `REREAD`), or since
        `first_start` when none is stored yet. Returns how many were forwarded."""
        if self._first_start is None:
            self._first_start = first_start
        cursor = await self.load_cursor()
        since = activity_time(cursor) if cursor is not None else None
        start = since - REREAD if since is not None else self._first_start
        after: str | None = format_timestamp(start)
        page_token: str | None = None
        forwarded = pages = 0
        seen: set[str] = set()
        while pages < MAX_PAGES:
            page = await self.rest.non_trade_activities(
                activity_types=self.types, after=after, page_token=page_token,
                page_size=MAX_PAGE_SIZE)
            pages += 1
            fresh = [a for a in page if a.id not in seen]
            if not fresh:
                break
            latest = not_after_ns(self.wallclock(), self.future_tolerance)
            for activity in fresh:
                seen.add(activity.id)
                try:
                    event = non_trade_to_event(activity, not_after_ns=latest)
                except (DecodeError, ValueError) as exc:
                    # One that did not decode is kept as it came (`UndecodableNonTrade`).
                    payload = (activity.raw if isinstance(activity, UndecodableNonTrade)
                               else msgspec.json.encode(activity))
                    await self._forward(DeadLetter(
                        reason=f"invalid activity {activity.id[:128]}: {exc}"[:500],
                        payload=payload[:DEAD_LETTER_KEEP_BYTES], source="rest"))
                    continue
                await self._forward(event)
                forwarded += 1
            if len(page) < MAX_PAGE_SIZE:
                break
            # The last activity with an id: one that did not decode may have none.
            token = next((a.id for a in reversed(page) if a.id), None)
            if token is None:
                break
            page_token, after = token, None
        log.info("activities_backfilled", activities=forwarded, pages=pages)
        return forwarded

    async def run_periodically(self) -> None:
        """While the pipeline runs: a pass every `interval` seconds (fees post late).

        Only while streaming and caught up: an activity must reach the writer after every
        fill before it, which the stream has then delivered, unless it stalls for longer
        than the activity took to post (hours for an expiry or a split, the rest of the
        day for a crypto fee; docs/design.md, section 10)."""
        if self.interval <= 0:
            return
        while True:
            await trio.sleep(self.interval)
            if self._first_start is None or not self.ready():
                continue  # the connection's backfill runs a pass first, in order
            try:
                await self.backfill(self._first_start)
            except (BrokerUnavailable, DecodeError) as exc:
                log.warning("activities_backfill_failed", error=str(exc)[:300])


def looks_compact_crypto(symbol: str) -> bool:
    """`BTCUSD`-shaped: no slash, not an option, ending in a crypto quote currency. Only
    these need the asset record (`AAPL` never does, so equities cost no request)."""
    if "/" in symbol or parse_occ(symbol) is not None:
        return False
    return any(symbol.endswith(q) and len(symbol) > len(q) + 1 for q in CRYPTO_QUOTES)


class AssetBook:
    """The broker's asset records (`GET /v2/assets/{symbol}`), cached for the process."""

    def __init__(self, rest: AssetSource) -> None:
        self.rest = rest
        self._classes: dict[str, str | None] = {}

    async def asset_class(self, symbol: str) -> str | None:
        if symbol not in self._classes:
            record = await self.rest.asset(symbol)
            cls = record.get("class") if record is not None else None
            self._classes[symbol] = str(cls) if cls else None
        return self._classes[symbol]

    async def spelled(self, events: Sequence[Event]) -> list[Event]:
        """REST fills with the stored spelling of their symbol: a FILL activity names a
        crypto pair without its slash (`BTCUSD`), the stream with it (`BTC/USD`)."""
        out = []
        for ev in events:
            if looks_compact_crypto(ev.symbol) and \
                    await self.asset_class(ev.symbol) == AssetClass.CRYPTO.value:
                ev = msgspec.structs.replace(
                    ev, symbol=canonical_symbol(ev.symbol, AssetClass.CRYPTO))
            out.append(ev)
        return out
