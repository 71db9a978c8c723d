"""The REST budget (`budget.py`): paced evenly within its share of the account's limit,
whatever the broker's window alignment and whatever the user's bot spends; a 429 is
waited out, never retried in a tight loop. Checked against the simulated broker's own
limiter (fixed window, counted on arrival), with hypothesis."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stream_supervisor.budget import (
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    PACE_MARGIN,
    RateHeaders,
    RestBudget,
    check_share,
)
from stream_supervisor.errors import ConfigError
from stream_supervisor.settings import load_settings
from stream_supervisor.testing.broker.ratelimit import RateLimiter

SVC = "stream-supervisor"
BOT = "user-bot"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(budget: RestBudget, limiter: RateLimiter, clock: Clock, wishes: list[float],
        bot_times: list[float], *, delay: float = 0.0) -> list[tuple[float, int]]:
    """Drive the budget and the bot against the limiter; `delay` is how long our
    requests take to arrive. Returns (send time, status) of each of ours."""
    bot = sorted(bot_times)
    out: list[tuple[float, int]] = []
    last = 0.0
    for wish in sorted(wishes):
        t = budget.next_send_at(max(wish, last))
        while bot and bot[0] < t + delay:
            clock.now = bot.pop(0)
            limiter.admit("orders", BOT)
        budget.sent(t)
        clock.now = t + delay
        decision = limiter.admit("activities", SVC)
        status = 200 if decision.allowed else 429
        headers = RateHeaders.parse(dict(decision.headers(1_000.0)), 1_000.0)
        budget.answered(t + delay, headers, status)
        out.append((t, status))
        last = t
    for b in bot:
        clock.now = b
        limiter.admit("orders", BOT)
    return out


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(10, 400),
    share=st.floats(0.1, 1.0),
    bot_fraction=st.floats(0.0, 1.0),
    wishes=st.lists(st.floats(0.0, 400.0), min_size=1, max_size=300),
    delay=st.floats(0.0, 0.05),
)
def test_never_past_the_share_and_the_users_share_untouched(
        limit: int, share: float, bot_fraction: float, wishes: list[float],
        delay: float) -> None:
    clock = Clock()
    limiter = RateLimiter(limit, clock=clock)
    budget = RestBudget(share, limit=limit)
    # The bot spends up to its share (what the service leaves), evenly.
    bot_n = math.floor(limit * (1 - share) * bot_fraction)
    bot_times = [i * 60.0 / bot_n for i in range(int(bot_n * 500 / 60))] if bot_n else []
    sent = run(budget, limiter, clock, wishes, bot_times, delay=delay)
    assert all(status == 200 for _, status in sent)
    assert limiter.peak_in_window.get(SVC, 0) <= max(1, math.floor(limit * share))
    assert limiter.refused == {}


@settings(max_examples=100, deadline=None)
# Eight requests wanted at once, seven allowed: 7 x (60 / 7) fell short of 60 s in floats.
@example(limit=10, share=0.78125, bot_per_minute=0, wishes=[0.0] * 8)
@given(
    limit=st.integers(10, 300),
    share=st.floats(0.1, 1.0),
    bot_per_minute=st.integers(0, 2000),
    wishes=st.lists(st.floats(0.0, 300.0), min_size=1, max_size=200),
)
def test_a_greedy_bot_never_makes_us_loop_or_overspend(
        limit: int, share: float, bot_per_minute: int, wishes: list[float]) -> None:
    """The user's bot may spend more than its share; we still keep to ours, and after a
    429 (or with the account nearly spent) wait for the window instead of hammering."""
    clock = Clock()
    limiter = RateLimiter(limit, clock=clock)
    budget = RestBudget(share, limit=limit)
    bot_times = [i * 60.0 / bot_per_minute for i in range(bot_per_minute * 5)]
    sent = run(budget, limiter, clock, wishes, bot_times)
    assert limiter.peak_in_window.get(SVC, 0) <= max(1, math.floor(limit * share))
    for (t, status), (t_next, _) in pairwise(sent):
        if status == 429:
            assert t_next - t >= MIN_RETRY_AFTER


def test_even_pacing_from_the_share() -> None:
    budget = RestBudget(0.5, limit=200)
    assert budget.per_window == math.floor(200 * 0.5 * PACE_MARGIN) == 90
    assert budget.next_send_at(10.0) == 10.0
    budget.sent(10.0)
    assert budget.next_send_at(10.0) == pytest.approx(10.0 + 60.0 / 90, abs=0.002)
    # The latest answer's limit wins over the default.
    budget.answered(10.1, RateHeaders(1000, 990, 30.0, None), 200)
    assert budget.per_window == 450


def test_a_429_waits_out_retry_after_and_low_remaining_waits_for_the_reset() -> None:
    budget = RestBudget(0.5, limit=200)
    budget.sent(0.0)
    assert budget.answered(0.0, RateHeaders(200, 0, 40.0, 7.0), 429) == 7.0
    assert budget.next_send_at(1.0) == 7.0
    assert budget.refused_total == 1
    # A 429 claiming 0 s still waits a second: never a tight loop.
    budget.answered(8.0, RateHeaders(200, 0, None, 0.0), 429)
    assert budget.next_send_at(8.0) == 8.0 + MIN_RETRY_AFTER
    # 10 left of 200 (the reserve): the user's bot is busy, wait for the new window.
    held = budget.answered(20.0, RateHeaders(200, 10, 12.0, None), 200)
    assert held == pytest.approx(12.5)


def test_headers_parse_and_a_far_clock_is_capped() -> None:
    h = RateHeaders.parse({"X-Ratelimit-Limit": "200", "X-Ratelimit-Remaining": "17",
                           "X-Ratelimit-Reset": "1030", "Retry-After": "3"}, 1000.0)
    assert h == RateHeaders(200, 17, 30.0, 3.0)
    far = RateHeaders.parse({"x-ratelimit-reset": "99999999999"}, 1000.0)
    assert far.reset_in == 60.0
    assert RateHeaders.parse({"X-Ratelimit-Remaining": "soon"}, 0.0).remaining is None
    # A Retry-After of a day parks nothing for a day: two minutes at most, as for 5xx.
    day = RateHeaders.parse({"Retry-After": "86400"}, 0.0)
    assert day.retry_after == MAX_RETRY_AFTER == 120.0
    assert RestBudget().answered(10.0, day, 429) == MAX_RETRY_AFTER


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2", "nan", "half"])
def test_share_setting_is_validated_with_its_name(bad: str) -> None:
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_REST_BUDGET_SHARE"):
        load_settings({"STREAM_SUPERVISOR_REST_BUDGET_SHARE": bad})


def test_share_setting_is_read() -> None:
    assert load_settings({"STREAM_SUPERVISOR_REST_BUDGET_SHARE": "0.25"}).rest_budget_share == 0.25
    assert load_settings({}).rest_budget_share == 0.5
    with pytest.raises(ValueError):
        check_share(0.0)
