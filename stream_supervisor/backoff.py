"""Reconnect and retry delays: exponential backoff with full jitter, pure and seedable.

Delays are plain numbers; callers sleep with `trio.sleep`, so tests drive them with a
virtual clock and assert exact values from a seeded random source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    #: HTTP 429 on the upgrade means the broker still holds our previous connection
    #: (reaped after up to ~90 s): wait at least this long, plus jitter.
    rate_limited_floor: float = 15.0
    #: A connection that stayed healthy this long resets the backoff to `initial`.
    healthy_after: float = 60.0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.factor < 1 or self.cap < self.initial:
            raise ValueError(
                f"invalid backoff policy: initial={self.initial} factor={self.factor} cap={self.cap}"
            )

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before retry number `attempt` (0-based)."""
        # Cap the exponent so huge attempt counts cannot overflow a float.
        return min(self.cap, self.initial * self.factor ** min(attempt, 64))


class Backoff:
    """Stateful helper: the next delay, and reset after a healthy period."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def next_delay(self, *, rate_limited: bool = False) -> float:
        """Full jitter: uniform(0, ceiling). A 429 adds the rate-limit floor."""
        delay = self.rng.uniform(0.0, self.policy.ceiling(self.attempt))
        self.attempt += 1
        if rate_limited:
            delay += self.policy.rate_limited_floor
        return delay

    def connection_ended(self, healthy_for: float) -> None:
        """Call when a connection that got through the handshake ends."""
        if healthy_for >= self.policy.healthy_after:
            self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0
