"""How the simulated broker writes values, the way the recorded Alpaca session does:
decimals without exponents, timestamps in the stream's and REST's styles, seeded uuids
and compact JSON. Pure functions, shared by the market, REST and the ground truth.
"""

from __future__ import annotations

import decimal
import json
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Final

# Ground-truth arithmetic: the recorded broker reports realized P&L unrounded at 50
# significant digits, and averages rounded half-even to 12 decimals.
CTX: Final = decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN)
TWELVE: Final = Decimal("1e-12")
CENT: Final = Decimal("0.01")
ZERO: Final = Decimal(0)

# The recording is from November, so US/Eastern is -05:00. A fixed offset keeps activity
# ids monotonic across a DST change and needs no tz database.
EASTERN: Final = timezone(timedelta(hours=-5))
NS: Final = 1_000_000_000
MS_NS: Final = 1_000_000


def uuid4(rng: random.Random) -> uuid.UUID:
    """A version-4 uuid drawn from `rng`, so a seed gives the same ids."""
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def decimal_text(value: Decimal) -> str:
    """Decimal as the broker writes it: `353`, `0.974`, `-16.253`; never exponents."""
    if value == 0:
        return "0"
    return format(value.normalize(CTX), "f")


def decimal_text_opt(value: Decimal | None) -> str | None:
    return None if value is None else decimal_text(value)


def round12(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(TWELVE, context=CTX)


def money_text(value: Decimal) -> str:
    return format(value, "f")


def utc_us(ns: int) -> str:
    """An order's or activity's time: UTC, microseconds (`...T20:47:37.758317Z`)."""
    stamp = datetime.fromtimestamp(ns // NS, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{(ns % NS) // 1000:06d}Z"


def utc_us_opt(ns: int | None) -> str | None:
    return None if ns is None else utc_us(ns)


def rfc3339_ns(ns: int, *, eastern: bool) -> str:
    """The stream's `timestamp`: nanoseconds, in UTC (`Z`) or US/Eastern (`-05:00`)."""
    if eastern:
        stamp = datetime.fromtimestamp(ns // NS, EASTERN)
        return f"{stamp:%Y-%m-%dT%H:%M:%S}.{ns % NS:09d}-05:00"
    stamp = datetime.fromtimestamp(ns // NS, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{ns % NS:09d}Z"


def dumps(value: object) -> bytes:
    """Compact UTF-8 JSON, as every frame and REST body of the real broker."""
    return json.dumps(value, separators=(",", ":")).encode()
