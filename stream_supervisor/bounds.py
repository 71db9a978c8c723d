"""Every bound on a value that comes from the broker, stated once: pure, no I/O.

The decoder (`protocol.py`) refuses an update holding a value outside these bounds (it
becomes a dead letter with the reason), so nothing PostgreSQL would refuse, nothing the
domain core cannot compute exactly and no timestamp that would move the cursor into the
future reaches a batch (docs/design.md, section 4, "Bounds at the edge"). Each bound is
far beyond any real value and well inside what the schema holds; `tests/test_bounds.py`
stores the extreme accepted values through both stores and reads them back exactly, and
shows the first refused value on each side dead-lettered.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from typing import Final

from .errors import OutOfBounds

# --- text --------------------------------------------------------------------------------

#: Order, activity and execution ids. Alpaca's are UUIDs (36 characters) and
#: `<17 digits>::<uuid>` (55). An event key holds one id, an event name and a number:
#: at 4 UTF-8 bytes a character it stays far below `POSTGRES_INDEX_ROW_MAX`.
MAX_ID_CHARS: Final = 128
#: Alpaca caps client_order_id at 128 characters; twice that leaves room for a change.
MAX_CLIENT_ORDER_ID_CHARS: Final = 256
#: Symbols: equities (`BRK.B`), crypto pairs (`BTC/USD`), OCC option symbols (21).
MAX_SYMBOL_CHARS: Final = 64
#: Event names, statuses, order types, asset classes, activity types.
MAX_LABEL_CHARS: Final = 64

# --- amounts -----------------------------------------------------------------------------

#: Quantities (fill, order, cumulative, leaves, position): |q| < 10**15 with at most 12
#: decimal places (crypto needs 9). That is 27 significant digits at most, so the
#: domain core's sums and differences of quantities stay exact in Decimal's default
#: 28-digit context: quantities are never rounded (section 4, layer 2).
QTY_LIMIT: Final = Decimal(10) ** 15
QTY_MAX_SCALE: Final = 12
#: Prices and averages: |p| < 10**12 with at most 28 decimal places. The domain core
#: computes averages to 28 significant digits itself; a broker's average may be as long.
PRICE_LIMIT: Final = Decimal(10) ** 12
PRICE_MAX_SCALE: Final = 28

# --- time --------------------------------------------------------------------------------

#: Nothing the broker stamps is older than this (Alpaca started in 2015): an earlier
#: time is a default value (`0001-01-01`, the Unix epoch) leaking through.
TIMESTAMP_FLOOR: Final = datetime(2000, 1, 1, tzinfo=UTC)
TIMESTAMP_FLOOR_NS: Final = int(TIMESTAMP_FLOOR.timestamp()) * 1_000_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
#: How far ahead of our wall clock a broker timestamp may be (clock skew) before the
#: update is dead-lettered, unless `STREAM_SUPERVISOR_FUTURE_TOLERANCE` says otherwise: a
#: fill's time becomes the cursor, and backfill starts at the cursor minus the overlap
#: (300 s), so a tolerance below the overlap keeps one skewed fill from hiding the fills
#: before it (docs/design.md, section 4, step 5).
DEFAULT_FUTURE_TOLERANCE: Final = 120.0

# --- what the schema and the transport hold (for the tests and the docs) -----------------

#: A btree index entry (event keys, order ids, symbols) holds at most this many bytes.
POSTGRES_INDEX_ROW_MAX: Final = 2704
#: `numeric` holds up to 131,072 digits before the point and 16,383 after it.
POSTGRES_NUMERIC_MAX_SCALE: Final = 16_383
POSTGRES_NUMERIC_MAX_INTEGER_DIGITS: Final = 131_072
#: Frames larger than this are dead-lettered unparsed (the broker's are about 2 KB).
DEFAULT_MAX_FRAME_BYTES: Final = 1_000_000
#: What is kept of an oversized frame in the dead-letter table.
DEAD_LETTER_KEEP_BYTES: Final = 64_000
#: The largest `STREAM_SUPERVISOR_MAX_FRAME_BYTES` accepted: the transport reads at most
#: this much of one message into memory, and cuts anything longer (section 8).
TRANSPORT_MAX_MESSAGE: Final = 16 * 1024 * 1024


def check_text(name: str, value: str, limit: int) -> None:
    """`value` is at most `limit` characters. (A NUL, which PostgreSQL text cannot hold, is
    stored as U+FFFD by `pgstore`, as it always was: not a reason to refuse an update.)"""
    if len(value) > limit:
        raise OutOfBounds(f"{name} is {len(value)} characters, over the limit of {limit}")


def check_opt_text(name: str, value: str | None, limit: int) -> None:
    if value is not None:
        check_text(name, value, limit)


# Quantize in a context of its own: wide enough for any accepted value (15 + 28 digits),
# whatever the thread's default context says.
_EXACT: Final = Context(prec=64, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation])
_QTY_QUANTUM: Final = Decimal(1).scaleb(-QTY_MAX_SCALE)
_PRICE_QUANTUM: Final = Decimal(1).scaleb(-PRICE_MAX_SCALE)
QTY_LIMIT_ADJUSTED: Final = QTY_LIMIT.adjusted()
PRICE_LIMIT_ADJUSTED: Final = PRICE_LIMIT.adjusted()


def qty_ok(value: Decimal) -> bool:
    """The decoder's fast path (it runs several times per frame, so no as_tuple()):
    finite, |value| < QTY_LIMIT, and equal to itself rounded to QTY_MAX_SCALE places.
    `adjusted()` bounds a zero's written exponent too (`0E-20000`): a nonzero value
    below 10**-scale fails the rounding anyway."""
    return (value.is_finite() and -QTY_MAX_SCALE <= value.adjusted() < QTY_LIMIT_ADJUSTED
            and value.quantize(_QTY_QUANTUM, None, _EXACT) == value)


def price_ok(value: Decimal) -> bool:
    """Like `qty_ok`, with `PRICE_LIMIT` and `PRICE_MAX_SCALE`."""
    return (value.is_finite() and -PRICE_MAX_SCALE <= value.adjusted() < PRICE_LIMIT_ADJUSTED
            and value.quantize(_PRICE_QUANTUM, None, _EXACT) == value)


def _check_decimal(name: str, value: Decimal, limit_adjusted: int, quantum: Decimal) -> None:
    if not value.is_finite():
        raise OutOfBounds(f"{name} is not a finite number: {str(value)[:40]}")
    scale = -quantum.adjusted()
    if value.adjusted() >= limit_adjusted:
        raise OutOfBounds(f"{name} is out of range (10^{limit_adjusted} or more): "
                          f"{str(value)[:40]}")
    if value.adjusted() < -scale or value.quantize(quantum, None, _EXACT) != value:
        raise OutOfBounds(f"{name} has more than {scale} decimal places: {str(value)[:40]}")


def check_qty(name: str, value: Decimal | None) -> None:
    """|value| < `QTY_LIMIT`, with at most `QTY_MAX_SCALE` decimal places that matter
    (trailing zeros do not: `0.5000` is 0.5)."""
    if value is not None:
        _check_decimal(name, value, QTY_LIMIT_ADJUSTED, _QTY_QUANTUM)


def check_price(name: str, value: Decimal | None) -> None:
    """|value| < `PRICE_LIMIT`, with at most `PRICE_MAX_SCALE` decimal places."""
    if value is not None:
        _check_decimal(name, value, PRICE_LIMIT_ADJUSTED, _PRICE_QUANTUM)


def check_time(name: str, ts_ns: int, not_after_ns: int | None) -> None:
    """`ts_ns` (epoch nanoseconds) is after the floor and, when a limit is given (the
    wall clock plus the tolerance), not after it."""
    if ts_ns < TIMESTAMP_FLOOR_NS:
        raise OutOfBounds(f"{name} is before {TIMESTAMP_FLOOR.date().isoformat()}")
    if not_after_ns is not None and ts_ns > not_after_ns:
        ahead = (ts_ns - not_after_ns) / 1e9
        raise OutOfBounds(f"{name} is in the future: {ahead:.3f} s beyond the wall clock "
                          "plus the tolerance")


def not_after_ns(now: datetime, tolerance: float) -> int:
    """The latest broker timestamp accepted at wall-clock time `now`, in epoch ns."""
    micros = (now - _EPOCH) // _MICROSECOND
    return micros * 1_000 + round(tolerance * 1_000_000_000)


__all__ = [
    "DEAD_LETTER_KEEP_BYTES",
    "DEFAULT_FUTURE_TOLERANCE",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_CLIENT_ORDER_ID_CHARS",
    "MAX_ID_CHARS",
    "MAX_LABEL_CHARS",
    "MAX_SYMBOL_CHARS",
    "PRICE_LIMIT",
    "PRICE_MAX_SCALE",
    "QTY_LIMIT",
    "QTY_MAX_SCALE",
    "TIMESTAMP_FLOOR",
    "TRANSPORT_MAX_MESSAGE",
    "check_opt_text",
    "check_price",
    "check_qty",
    "check_text",
    "check_time",
    "not_after_ns",
    "price_ok",
    "qty_ok",
]
