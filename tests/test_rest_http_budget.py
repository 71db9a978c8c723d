"""Every request of the HTTP REST client goes through the budget: against the simulated
broker's limit (in virtual time), the service keeps to its share, never meets a 429
while the user's bot keeps to its own, and obeys `Retry-After` when the bot does not."""

from __future__ import annotations

from datetime import UTC, datetime

import trio
import trio.testing

from stream_supervisor.metrics import Metrics
from stream_supervisor.rest_http import HttpBrokerRest, RestSettings, endpoint_label
from stream_supervisor.testing.broker import (
    USER_BOT_AGENT,
    SimConfig,
    SimulatedBroker,
    run_user_bot,
)
from stream_supervisor.testing.worlds.transport import BrokerTransport

SVC = "stream-supervisor"


def broker(limit: int = 200) -> SimulatedBroker:
    b = SimulatedBroker(SimConfig(seed=5, orders=30, rest_rate_limit=limit,
                                  start_time=datetime(2026, 11, 23, 15, tzinfo=UTC)))
    while b.step() is not None:
        pass
    return b


def client(b: SimulatedBroker, metrics: Metrics, share: float = 0.5) -> HttpBrokerRest:
    return HttpBrokerRest(
        RestSettings(base_url="http://sim", key_id="SIMKEY", secret_key="SIMSECRET",
                     budget_share=share),
        transport=BrokerTransport(b), metrics=metrics)


async def test_every_endpoint_is_paced_within_the_share(
        autojump_clock: trio.testing.MockClock) -> None:
    b = broker()
    metrics = Metrics()
    async with client(b, metrics) as rest, trio.open_nursery() as nursery:
        await nursery.start(run_user_bot, b, 100.0)  # the user's half, all of it
        start = trio.current_time()
        for i in range(150):
            if i % 3 == 0:
                await rest.fill_activities(after=None, page_token=None)
            elif i % 3 == 1:
                await rest.open_orders()
            else:
                await rest.positions()
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    limiter = b.rate_limiter
    assert limiter.refused == {}
    assert limiter.peak_in_window[SVC] <= 100
    assert limiter.by_caller[SVC] == 150
    # 150 requests at 90 a minute: paced over more than a minute and a half, not burst.
    assert elapsed >= 149 * 60 / 90 - 1e-6
    assert metrics.value("stream_supervisor_rest_requests_total") == 150
    assert metrics.value("stream_supervisor_rest_requests_total",
                         endpoint="account/activities/FILL") == 50
    assert metrics.value("stream_supervisor_rest_budget_per_window") == 90
    assert 0 <= metrics.value("stream_supervisor_rest_budget_remaining") < 200
    assert metrics.value("stream_supervisor_rest_rate_limited_total") == 0
    assert limiter.by_caller[USER_BOT_AGENT] > 0


async def test_a_greedy_bot_gets_a_429_obeyed_not_hammered(
        autojump_clock: trio.testing.MockClock) -> None:
    b = broker(limit=50)
    metrics = Metrics()
    async with client(b, metrics) as rest, trio.open_nursery() as nursery:
        await nursery.start(run_user_bot, b, 600.0)  # 10 a second: the account is spent
        start = trio.current_time()
        for _ in range(20):
            await rest.positions()
        windows = (trio.current_time() - start) / 60
        nursery.cancel_scope.cancel()
    limiter = b.rate_limiter
    ours_refused = limiter.refused.get(SVC, 0)
    # At most one refusal per window we tried in: each was waited out.
    assert 0 < ours_refused <= windows + 1
    assert metrics.value("stream_supervisor_rest_rate_limited_total") == ours_refused
    assert limiter.peak_in_window[SVC] <= 25


def test_endpoint_labels_stay_few() -> None:
    assert endpoint_label("/v2/orders/6c1e-42") == "orders/:id"
    assert endpoint_label("/v2/orders") == "orders"
    assert endpoint_label("/v2/account/activities/FILL") == "account/activities/FILL"
    assert endpoint_label("/v2/assets/AAPL") == "assets/:id"
    assert endpoint_label("/v2/clock") == "clock"
