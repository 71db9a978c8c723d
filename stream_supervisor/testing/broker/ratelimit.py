"""Alpaca's REST rate limit, as the simulated broker enforces it: per account, a fixed
window (60 s) of so many requests (200 by default), counted on arrival. Every answer
carries `X-Ratelimit-Limit`, `X-Ratelimit-Remaining` and `X-Ratelimit-Reset` (Unix
seconds); past the limit the broker answers 429 with `Retry-After`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

DEFAULT_RATE_LIMIT: Final = 200
"""Requests per window per account, as Alpaca documents it."""
RATE_WINDOW: Final = 60.0


def trio_or_monotonic() -> float:
    """Trio's clock inside a run (virtual in the simulated worlds), else the OS's."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_in: float
    """Seconds until the window ends."""

    def headers(self, wall_now: float) -> tuple[tuple[str, str], ...]:
        out: tuple[tuple[str, str], ...] = (
            ("X-Ratelimit-Limit", str(self.limit)),
            ("X-Ratelimit-Remaining", str(self.remaining)),
            ("X-Ratelimit-Reset", str(math.ceil(wall_now + self.reset_in))),
        )
        if not self.allowed:
            out = (*out, ("Retry-After", str(max(1, math.ceil(self.reset_in)))))
        return out


class RateLimiter:
    """A fixed window starting at the first request after the previous one ended.

    `limit` 0 disables the limit (headers are still sent, with a remaining that never
    falls). Counts are kept per endpoint and per caller (the `User-Agent`), so tests and
    benchmarks can say who spent what.
    """

    def __init__(
        self,
        limit: int = DEFAULT_RATE_LIMIT,
        window: float = RATE_WINDOW,
        *,
        clock: Callable[[], float] = trio_or_monotonic,
    ) -> None:
        if limit < 0:
            raise ValueError("rate limit must not be negative")
        if window <= 0:
            raise ValueError("rate window must be positive")
        self.limit = limit
        self.window = window
        self.clock = clock
        self._window_start: float | None = None
        self._used = 0
        self.requests: dict[str, int] = {}
        """Requests per endpoint (route name), admitted or refused."""
        self.by_caller: dict[str, int] = {}
        """Requests admitted per caller (User-Agent)."""
        self.refused: dict[str, int] = {}
        """429s per caller."""
        self.peak_in_window: dict[str, int] = {}
        """The most requests one caller had admitted within a single window."""
        self._caller_window: dict[str, int] = {}

    def admit(self, route: str, caller: str) -> RateDecision:
        now = self.clock()
        if self._window_start is None or now >= self._window_start + self.window:
            self._window_start = now
            self._used = 0
            self._caller_window.clear()
        reset_in = self._window_start + self.window - now
        self.requests[route] = self.requests.get(route, 0) + 1
        if self.limit and self._used >= self.limit:
            self.refused[caller] = self.refused.get(caller, 0) + 1
            return RateDecision(False, self.limit, 0, reset_in)
        self._used += 1
        self.by_caller[caller] = self.by_caller.get(caller, 0) + 1
        spent = self._caller_window[caller] = self._caller_window.get(caller, 0) + 1
        if spent > self.peak_in_window.get(caller, 0):
            self.peak_in_window[caller] = spent
        limit = self.limit or 1_000_000
        return RateDecision(True, limit, max(0, limit - self._used), reset_in)
