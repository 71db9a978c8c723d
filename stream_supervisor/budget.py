"""How the service paces its REST requests within its share of the account's limit:
pure arithmetic on times and the broker's rate headers, no I/O (docs/design.md,
section 12).

The broker counts requests on arrival in a fixed window of its own, which we can neither
see nor align with, and the account's own trading bot spends from the same window. So
the budget never bursts: requests go out evenly spaced, at most `n` per window where `n`
is the share of the limit less a margin, which keeps any window the broker may draw at
or under the share whatever its alignment. The latest answer's `X-Ratelimit-Remaining`
and `X-Ratelimit-Reset` are trusted over our own count: when the account as a whole runs
low we wait for the window to end, and a 429 waits out its `Retry-After`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

DEFAULT_SHARE: Final = 0.5
"""Of the account's REST limit; the rest is the user's own trading."""
DEFAULT_LIMIT: Final = 200
"""Alpaca's requests per minute per account, until an answer says otherwise."""
WINDOW: Final = 60.0
PACE_MARGIN: Final = 0.9
"""Plan for this much of the share: arrivals bunch up a little in the network."""
RESERVE_FRACTION: Final = 0.05
"""When the account's remaining requests in the window fall to this fraction of the
limit, we wait for the window to end: the user's bot is spending hard."""
RESET_SLACK: Final = 0.5
"""Seconds past the announced reset before we count on a new window."""
MIN_RETRY_AFTER: Final = 1.0
"""A 429 never leads to a retry sooner than this, whatever it says."""
MAX_RETRY_AFTER: Final = 120.0
"""Nor to a wait longer than this: one answer (a proxy's, a misconfigured gateway's)
must not park every REST read, and with them recovery, for a day."""


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """What one answer said about the account's window."""

    limit: int | None
    remaining: int | None
    reset_in: float | None
    """Seconds until the window ends, by the answer's `X-Ratelimit-Reset`."""
    retry_after: float | None

    @classmethod
    def parse(cls, headers: Mapping[str, str], wall_now: float) -> RateHeaders:
        """From response headers (any case); `wall_now` is Unix time, for the reset."""
        low = {k.lower(): v for k, v in headers.items()}
        reset = _number(low.get("x-ratelimit-reset"))
        retry = _number(low.get("retry-after"))
        return cls(
            limit=_count(low.get("x-ratelimit-limit")),
            remaining=_count(low.get("x-ratelimit-remaining")),
            # A clock far off ours must not park us: at most one window.
            reset_in=None if reset is None else min(max(reset - wall_now, 0.0), WINDOW),
            retry_after=None if retry is None else min(retry, MAX_RETRY_AFTER),
        )


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _count(text: str | None) -> int | None:
    value = _number(text)
    return None if value is None else int(value)


def check_share(share: float) -> float:
    """The share must leave the service something and the user something."""
    if not (math.isfinite(share) and 0.0 < share <= 1.0):
        raise ValueError(f"must be a fraction above 0 and at most 1, got {share!r}")
    return share


class RestBudget:
    """Decides when the next request may go. Callers ask `next_send_at(now)`, wait until
    then, call `sent(now)`, and report each answer with `answered(now, headers, status)`.
    Times are one monotonic clock's seconds."""

    def __init__(self, share: float = DEFAULT_SHARE, limit: int = DEFAULT_LIMIT,
                 window: float = WINDOW) -> None:
        self.share = check_share(share)
        self.limit = max(1, limit)
        self.window = window
        self.sent_total = 0
        self.refused_total = 0
        self.remaining: int | None = None
        """The account's remaining requests in the window, by the latest answer."""
        self._last_sent: float | None = None
        self._blocked_until = -math.inf

    @property
    def per_window(self) -> int:
        """Requests we send per window at most: our share, less the margin."""
        return max(1, math.floor(self.limit * self.share * PACE_MARGIN))

    @property
    def interval(self) -> float:
        # A millisecond over: n intervals must span a whole window, float sums included.
        return self.window / self.per_window + 0.001

    def next_send_at(self, now: float) -> float:
        at = now if self._last_sent is None else max(now, self._last_sent + self.interval)
        return max(at, self._blocked_until)

    def sent(self, now: float) -> None:
        self._last_sent = now
        self.sent_total += 1

    def answered(self, now: float, headers: RateHeaders, status: int) -> float:
        """Learn from an answer; returns how long until the next request may go (0 if
        nothing holds it beyond the pace)."""
        if headers.limit is not None and headers.limit > 0:
            self.limit = headers.limit
        if headers.remaining is not None:
            self.remaining = headers.remaining
        reset_in = headers.reset_in
        if status == 429:
            self.refused_total += 1
            wait = headers.retry_after if headers.retry_after is not None else reset_in
            wait = max(MIN_RETRY_AFTER, wait if wait is not None else self.window)
            self._block(now + wait)
        elif headers.remaining is not None and headers.remaining <= self.reserve:
            self._block(now + (reset_in if reset_in is not None else self.window)
                        + RESET_SLACK)
        return max(0.0, self._blocked_until - now)

    @property
    def reserve(self) -> int:
        return math.ceil(self.limit * RESERVE_FRACTION)

    @property
    def blocked_until(self) -> float:
        return self._blocked_until

    def _block(self, until: float) -> None:
        self._blocked_until = max(self._blocked_until, until)

    def sustainable_fills_per_second(self, page_size: int) -> float:
        """Fills a second REST recovery can read within the share (pages of `page_size`)."""
        return self.per_window * page_size / self.window
