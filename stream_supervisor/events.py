"""Immutable event values that flow through the pipeline, and their event keys.

Everything downstream of the decoder sees only these types: an `Event` (a trade update
from the stream, or a FILL activity from REST backfill, normalised to one shape) or a
`DeadLetter` (a frame that could not be decoded, kept with its reason).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Final, Literal

import msgspec

from .errors import TimestampError

FILL_EVENTS: Final = frozenset({"fill", "partial_fill"})

#: Events the broker documents today. Anything else is stored and ignored, never fatal.
KNOWN_EVENTS: Final = frozenset(
    {
        "new",
        "fill",
        "partial_fill",
        "canceled",
        "expired",
        "done_for_day",
        "replaced",
        "rejected",
        "pending_new",
        "stopped",
        "pending_cancel",
        "pending_replace",
        "calculated",
        "suspended",
        "order_replace_rejected",
        "order_cancel_rejected",
        "accepted",
        "restated",
        "held",
        # Broker API events (docs/design.md, section 11): a fill taken back or changed.
        "trade_bust",
        "trade_correct",
    }
)
#: Revisions of fills already reported: applied by `revisions.py`, keyed by execution.
REVISION_EVENTS: Final = frozenset({"trade_bust", "trade_correct"})

Source = Literal["stream", "rest"]


class Event(msgspec.Struct, frozen=True, gc=False):
    """One order update, from the stream or from REST backfill.

    `cum_qty` is the order's cumulative filled quantity *after* this event; for fills
    the pair (order_id, cum_qty) is the cross-source natural key.
    """

    key: str
    event: str
    source: Source
    order_id: str
    symbol: str
    side: str  # "buy" or "sell"
    status: str  # the order's status as the broker reported it with this event
    cum_qty: Decimal
    timestamp: datetime  # timezone-aware, UTC
    ts_ns: int  # the same instant in nanoseconds since the epoch (RFC 3339 keeps ns)
    client_order_id: str | None = None
    order_qty: Decimal | None = None
    cum_avg_price: Decimal | None = None
    fill_qty: Decimal | None = None
    fill_price: Decimal | None = None
    position_qty: Decimal | None = None
    activity_id: str | None = None  # REST FILL activity id, when the event came from REST
    order_type: str | None = None
    asset_class: str | None = None
    created_at: datetime | None = None
    received_at: float = 0.0  # trio.current_time() at frame receipt, for latency metrics
    #: What it was decoded from: the stream frame, or the REST activity's or order's JSON.
    #: Kept (a reference, not a copy) so that an update the database refuses can still be
    #: dead-lettered verbatim, and replayed later through the decoder of the day.
    raw: bytes = b""
    #: The Broker API's events stream (docs/design.md, section 11): the account the event
    #: belongs to (one stream carries many), and its ULID, the stream's resume cursor.
    account_id: str | None = None
    event_id: str | None = None
    #: `mleg` for a multi-leg order (docs/design.md, section 10); None for a simple one.
    order_class: str | None = None
    #: A leg's parent order (legs travel inside their parent's update, never alone).
    parent_order_id: str | None = None
    #: A multi-leg order's legs, each an update of its own order and symbol.
    legs: tuple[Event, ...] = ()
    #: A non-trade activity (`event == "activity"`): its type (`OPEXP`, `CFEE`, ...).
    activity_type: str | None = None

    @property
    def is_fill(self) -> bool:
        return self.event in FILL_EVENTS


def _letter_key() -> str:
    return uuid.uuid4().hex


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """A frame that could not be turned into an `Event` (or an update the database
    refused), kept verbatim with the reason."""

    reason: str
    payload: bytes
    source: Source = "stream"
    received_at: float = 0.0
    #: Unique per dead letter, so a batch retried after an ambiguous commit stores it once
    #: (`dead_letters.letter_key`, like event keys for updates).
    key: str = msgspec.field(default_factory=_letter_key)


def decimal_text(value: Decimal) -> str:
    """Canonical text for a decimal: `10`, `0.5`, never `1E+1` or `0.50`."""
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text


def fill_key(order_id: str, cum_qty: Decimal) -> str:
    """Natural fill key shared by the stream (`order.filled_qty`) and REST (`cum_qty`)."""
    return f"fill:{order_id}:{decimal_text(cum_qty)}"


ACTIVITY_EVENT: Final = "activity"


def activity_key(activity_id: str) -> str:
    """The dedupe key of a non-trade activity: its broker-assigned id."""
    return f"activity:{activity_id}"


def event_key(event: str, order_id: str, cum_qty: Decimal, ts_ns: int,
              execution_id: str | None = None) -> str:
    """The dedupe key of an update (docs/design.md, section 4, layer 1). A bust or a
    correction is one execution of the broker's: keyed by it when given (section 11)."""
    if event in FILL_EVENTS:
        return fill_key(order_id, cum_qty)
    if event in REVISION_EVENTS and execution_id:
        return f"{event}:{order_id}:{execution_id}"
    return f"{event}:{order_id}:{ts_ns}"


def broker_event_key(event_id: str) -> str:
    """The key of an event of the Broker API's events stream (docs/design.md, section
    11): its `event_id`, a ULID the broker sends again unchanged when history is replayed.
    Not the natural fill key: after a bust an order's cumulative quantity comes back down,
    and the next fill reaches a cumulative quantity a busted fill had already reported."""
    return f"event:{event_id}"


_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:?\d{2})\Z"
)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND: Final = timedelta(seconds=1)


_EPOCH_ORDINAL: Final = _EPOCH.toordinal()


def parse_timestamp(text: str) -> tuple[datetime, int]:
    """Parse RFC 3339 with up to nanoseconds and any offset into (UTC datetime, epoch ns).

    `datetime` keeps microseconds; the nanosecond integer keeps the exact instant, which
    event keys use so that `...123456789Z` and `...123456788Z` stay distinct.

    It runs on every frame (it took a third of decoding one, BENCHMARKS.md), so what the
    broker sends (`Z`, or an offset whose hours and minutes are in range) goes to the C
    parser, `datetime.fromisoformat`, once the strict pattern has accepted its shape: that
    parser alone takes more than RFC 3339 (other shapes, offset minutes past 59; hour 24
    is kept from it too, whatever a Python version makes of it). Whatever it refuses, and
    every other spelling, goes to `_parse_fields`, which decides, so both paths give one
    answer (`tests/test_events.py` holds them to it).
    """
    m = _RFC3339.match(text)
    if m is None:
        raise TimestampError(f"not an RFC 3339 timestamp: {text[:64]!r}")
    hour, frac, offset = m.group(4, 7, 8)
    if hour != "24" and (offset == "Z" or (
            len(offset) > 1 and offset[1:3] <= "23" and offset[-2:] <= "59")):
        try:
            utc = datetime.fromisoformat(text)
            if utc.tzinfo is not UTC:
                utc = utc.astimezone(UTC)
        except (ValueError, OverflowError):
            pass  # `_parse_fields` says what is wrong
        else:
            nanos = int(frac.ljust(9, "0")) if frac else 0
            # Whole seconds since the epoch (floor, also before 1970), then the fraction.
            seconds = ((utc.toordinal() - _EPOCH_ORDINAL) * 86_400
                       + utc.hour * 3_600 + utc.minute * 60 + utc.second)
            return utc, seconds * 1_000_000_000 + nanos
    return _parse_fields(m, text)


def _parse_fields(m: re.Match[str], text: str) -> tuple[datetime, int]:
    """`parse_timestamp` field by field: the reference, and the path of every spelling
    the C parser is not given or refuses."""
    year, month, day, hour, minute, second, frac, offset = m.groups()
    nanos = int(frac.ljust(9, "0")) if frac else 0
    try:
        utc = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                       nanos // 1000, UTC)
    except ValueError as exc:
        raise TimestampError(f"invalid timestamp {text[:64]!r}: {exc}") from None
    if len(offset) > 1:
        digits = offset[1:].replace(":", "")
        off_hours, off_minutes = int(digits[:2]), int(digits[2:])
        if off_hours > 23 or off_minutes > 59:
            raise TimestampError(f"invalid offset in {text[:64]!r}")
        shift = timedelta(hours=off_hours, minutes=off_minutes)
        try:
            utc = utc - shift if offset[0] == "+" else utc + shift
        except OverflowError as exc:
            raise TimestampError(f"timestamp out of range {text[:64]!r}: {exc}") from None
    # Whole seconds since the epoch (floor, also before 1970), then the exact fraction.
    ts_ns = (utc - _EPOCH) // _SECOND * 1_000_000_000 + nanos
    return utc, ts_ns


def format_timestamp(ts: datetime) -> str:
    """RFC 3339 in UTC with microseconds, as REST query parameters want it."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
