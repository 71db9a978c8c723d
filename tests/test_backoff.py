"""Reconnect and retry delays: exponential backoff with full jitter, seeded and exact."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_supervisor.backoff import Backoff, BackoffPolicy

POLICY = BackoffPolicy(
    initial=0.5, factor=2.0, cap=30.0, rate_limited_floor=15.0, healthy_after=60.0
)


def _delays(backoff: Backoff, n: int, **kw: bool) -> list[float]:
    return [backoff.next_delay(**kw) for _ in range(n)]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    initial=st.floats(min_value=0.01, max_value=5),
    factor=st.floats(min_value=1, max_value=4),
    cap_over=st.floats(min_value=0, max_value=100),
)
def test_delays_stay_within_the_exponential_ceiling(
    seed: int, initial: float, factor: float, cap_over: float
) -> None:
    policy = BackoffPolicy(initial=initial, factor=factor, cap=initial + cap_over)
    backoff = Backoff(policy, random.Random(seed))
    for n in range(40):
        delay = backoff.next_delay()
        assert 0.0 <= delay <= min(policy.cap, initial * factor**n)


def test_the_sequence_for_a_seed_is_exact_full_jitter() -> None:
    reference = random.Random(1234)
    expected = [reference.uniform(0.0, c) for c in (0.5, 1, 2, 4, 8, 16, 30, 30, 30)]
    assert _delays(Backoff(POLICY, random.Random(1234)), 9) == expected
    # The same seed gives the same delays: chaos runs replay.
    assert _delays(Backoff(POLICY, random.Random(1234)), 9) == expected


def test_ceiling_grows_then_caps() -> None:
    assert [POLICY.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert POLICY.ceiling(10_000) == 30  # no float overflow on a long outage


class _MaxRandom(random.Random):
    """Always the top of the range: makes the ceiling visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_delays_are_capped() -> None:
    assert _delays(Backoff(POLICY, _MaxRandom()), 10) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]


def test_healthy_connection_resets_the_backoff() -> None:
    backoff = Backoff(POLICY, _MaxRandom())
    _delays(backoff, 6)
    backoff.connection_ended(healthy_for=60.0)
    assert backoff.next_delay() == 0.5


def test_short_lived_connection_keeps_backing_off() -> None:
    backoff = Backoff(POLICY, _MaxRandom())
    _delays(backoff, 4)  # 0.5, 1, 2, 4
    backoff.connection_ended(healthy_for=59.9)  # flapping: authorized, then dropped
    assert backoff.next_delay() == 8


def test_reset() -> None:
    backoff = Backoff(POLICY, _MaxRandom())
    _delays(backoff, 5)
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_429_adds_the_floor() -> None:
    rng_seed = 99
    plain = _delays(Backoff(POLICY, random.Random(rng_seed)), 5)
    limited = _delays(Backoff(POLICY, random.Random(rng_seed)), 5, rate_limited=True)
    assert limited == [d + 15.0 for d in plain]
    # Even the first retry after a 429 waits out the broker's stale connection.
    assert all(d >= 15.0 for d in limited)
    assert Backoff(POLICY, _MaxRandom()).next_delay(rate_limited=True) == 15.5


@pytest.mark.parametrize(
    "kwargs", [{"initial": 0}, {"initial": -1}, {"factor": 0.5}, {"initial": 10, "cap": 5}]
)
def test_invalid_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid backoff policy"):
        BackoffPolicy(**kwargs)
