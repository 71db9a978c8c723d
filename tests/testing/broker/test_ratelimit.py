"""The simulated broker enforces Alpaca's REST limit (`ratelimit.py`): per account, a
fixed 60 s window, the three rate headers on every answer, 429 with `Retry-After` past
the limit, and counts per endpoint and per caller."""

from __future__ import annotations

import trio
import trio.testing

from stream_supervisor.testing.broker import USER_BOT_AGENT, SimulatedBroker, run_user_bot

from .helpers import config

AUTH = {"apca-api-key-id": "SIMKEY", "apca-api-secret-key": "SIMSECRET",
        "user-agent": "stream-supervisor"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def broker_with_clock(limit: int) -> tuple[SimulatedBroker, FakeClock]:
    broker = SimulatedBroker(config(seed=3, orders=20, rest_rate_limit=limit))
    clock = FakeClock()
    broker.rate_limiter.clock = clock
    return broker, clock


def test_fixed_window_headers_and_429_with_retry_after() -> None:
    broker, clock = broker_with_clock(5)
    remaining = []
    for _ in range(5):
        answer = broker.rest("GET", "/v2/account/activities/FILL?direction=asc", AUTH)
        assert answer.status == 200
        headers = dict(answer.headers)
        assert headers["X-Ratelimit-Limit"] == "5"
        remaining.append(int(headers["X-Ratelimit-Remaining"]))
        assert int(headers["X-Ratelimit-Reset"]) > 0
        clock.now += 1.0
    assert remaining == [4, 3, 2, 1, 0]
    refused = broker.rest("GET", "/v2/orders?status=open", AUTH)
    assert refused.status == 429
    headers = dict(refused.headers)
    # The window opened at 1000 and it is now 1005: 55 s to go.
    assert headers["Retry-After"] == "55"
    assert headers["X-Ratelimit-Remaining"] == "0"
    assert broker.ground_truth()["stats"]["rest_429"] == 1
    # A fixed window, not a sliding one: at its end the whole limit is back at once.
    clock.now = 1060.0
    again = broker.rest("GET", "/v2/orders?status=open", AUTH)
    assert again.status == 200
    assert dict(again.headers)["X-Ratelimit-Remaining"] == "4"
    limiter = broker.rate_limiter
    assert limiter.requests == {"activities": 5, "orders": 2}
    assert limiter.by_caller == {"stream-supervisor": 6}
    assert limiter.refused == {"stream-supervisor": 1}
    assert limiter.peak_in_window == {"stream-supervisor": 5}


def test_every_answer_carries_the_headers_even_errors() -> None:
    broker, _ = broker_with_clock(200)
    missing = broker.rest("GET", "/v2/orders/not-an-order", AUTH)
    assert missing.status == 404
    assert dict(missing.headers)["X-Ratelimit-Remaining"] == "199"
    bad = broker.rest("GET", "/v2/account/activities/FILL?after=yesterday", AUTH)
    assert bad.status == 422
    assert dict(bad.headers)["X-Ratelimit-Remaining"] == "198"


def test_the_default_is_alpacas_200_a_minute() -> None:
    broker = SimulatedBroker(config(seed=3, orders=5))
    answers = [broker.rest("GET", "/v2/account", AUTH).status for _ in range(201)]
    assert answers.count(200) == 200 and answers[-1] == 429


async def test_the_users_bot_spends_the_same_budget(
        autojump_clock: trio.testing.MockClock) -> None:
    broker = SimulatedBroker(config(seed=3, orders=5, rest_rate_limit=200))
    async with trio.open_nursery() as nursery:
        await nursery.start(run_user_bot, broker, 100.0)
        await trio.sleep(29.9)
        ours = [broker.rest("GET", "/v2/account", AUTH).status for _ in range(160)]
        nursery.cancel_scope.cancel()
    limiter = broker.rate_limiter
    # The bot's 100 a minute (50 of them by 29.9 s) and ours share one window.
    assert limiter.by_caller[USER_BOT_AGENT] == 50
    assert ours.count(200) == 200 - 50
    assert limiter.refused == {"stream-supervisor": 160 - (200 - 50)}
