"""`SimulatedBroker`: one account's broker, composed of its parts, none of which imports
another back: the market makes updates, the feeds hand them to sessions, REST and the
ground truth read the market. Tests, the demo and the servers hold this one object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import structlog
import trio

from .chaos import INJECTED_KINDS, ChaosDecider
from .feeds import Feeds
from .market import Market, SimConfig
from .ratelimit import RateLimiter
from .rest import ACTIVITY_PAGE_MAX, ORDERS_LIMIT_MAX, RestApi, RestResponse
from .sessions import SessionTransport, handle_session
from .truth import ground_truth

log = structlog.get_logger("stream_supervisor.testing.broker")

STAT_KEYS: Final = (
    "connections",
    "rejected_429",
    "auth_ok",
    "auth_failed",
    "listen",
    "frames_sent",
    "update_frames",
    "dup_frames",
    "replay_frames",
    "frames_before_listening",
    "text_frames",
    "injected_frames",
    "skipped_partials",
    "updates_unsent",
    "fills_unsent",
    "disconnects",
    "abrupt_disconnects",
    "stalls",
    "slow_consumer_drops",
    "client_disconnects",
    "rest_requests",
    "rest_401",
    "rest_faults",
    "activity_requests",
    "upgrade_attempts",
    "rest_429",
)
"""The broker's counters, in the order `ground_truth()["stats"]` lists them."""


class SimulatedBroker:
    """An Alpaca-compatible broker for one account: market, ground truth, REST, stream.

    No sockets here: `server.py` puts it on loopback, and a deterministic harness can
    drive `step()`, `rest()` and `handle_session()` directly.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.chaos = ChaosDecider(config.chaos, config.seed)
        self.market = Market(config)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.injected: dict[str, int] = dict.fromkeys(INJECTED_KINDS, 0)
        self._feeds = Feeds(self.market, self.chaos, self.stats, self.injected)
        self._rest = RestApi(self.market, self.chaos, self.stats)

    @property
    def account_id(self) -> str:
        return self.market.account_id

    @property
    def poisons_sent(self) -> list[tuple[str, bytes]]:
        """Poison updates handed to a client, with their kind, in the order sent."""
        return self._feeds.poisons_sent

    @property
    def finished(self) -> bool:
        """The market made all its orders, and each of them is done."""
        return self.market.finished

    @property
    def fills_total(self) -> int:
        return self.market.fills_total

    @property
    def updates_total(self) -> int:
        return self.market.updates_total

    def update(self, index: int) -> dict[str, Any]:
        return self.market.update(index)

    def frame(self, index: int) -> bytes:
        """The update's wire frame: compact UTF-8 JSON, rendered once."""
        return self.market.frame(index)

    # --- the market

    async def run_market(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Play the market in Trio time at `config.rate`, then set `finished` and return."""
        task_status.started()
        rate = self.config.rate
        burst_from, burst_count = self.config.burst
        burst_to = burst_from + burst_count if burst_count > 0 else -1
        # Paced by the market's own clock: each batch goes out when its time is due, so
        # the market's timestamps keep to the wall clock, as a broker's do. Paced by
        # count (`len(batch) / rate`), the ticks' rounding up to whole milliseconds ran
        # them 1.3% ahead at 500 updates/s (16 s in 20 minutes): a long soak's
        # reconnects then read ever more of the future over REST (BENCHMARKS.md, the
        # soak).
        started, market_from = trio.current_time(), self.market.now_ns
        while self.step() is not None:
            if burst_from <= self.updates_total < burst_to:
                # The burst: no pacing (a yield per update lets the consumers read).
                await trio.lowlevel.checkpoint()
                started = trio.current_time() - (self.market.now_ns - market_from) / 1e9
            elif rate > 0:
                # An absolute schedule, so sleep overhead does not drift the rate.
                await trio.sleep_until(started + (self.market.now_ns - market_from) / 1e9)
            else:
                await trio.lowlevel.checkpoint()
        log.debug("sim_market_finished", updates=self.updates_total, fills=self.fills_total)

    async def wait_finished(self) -> None:
        await self.market.wait_finished()

    def step(self) -> list[dict[str, Any]] | None:
        """Produce, record and publish the next batch of updates; None once finished."""
        indices = self.market.step()
        if indices is None:
            return None
        self._feeds.publish(indices)
        return [self.market.update(i) for i in indices]

    def ground_truth(self) -> dict[str, Any]:
        """The broker's final (or current) state, in the recorded fixture's schema."""
        return ground_truth(self.market, self._feeds, self.stats, self.injected)

    # --- the stream

    def mark_server_started(self, now: float) -> None:
        self._feeds.mark_server_started(now)

    def admit(self) -> int | None:
        """Decide a WebSocket upgrade: None to accept (the slot is then reserved), else 429."""
        return self._feeds.admit()

    def cancel_admission(self) -> None:
        """The upgrade that `admit()` accepted never completed: free the slot."""
        self._feeds.cancel_admission()

    @property
    def session_active(self) -> bool:
        return self._feeds.session_active

    async def handle_session(self, conn: SessionTransport) -> None:
        """Serve one client connection (after `admit()`, or directly on an in-memory
        transport). A second concurrent session is refused: closed at once."""
        await handle_session(
            conn, self._feeds, key_id=self.config.key_id, secret_key=self.config.secret_key
        )

    # --- REST

    @property
    def rate_limiter(self) -> RateLimiter:
        """The account's REST limit: requests per endpoint and per caller, 429s."""
        return self._rest.limiter

    def rest(self, method: str, target: str, headers: Mapping[str, str]) -> RestResponse:
        """Answer one REST request, chaos included. `headers` keys are lower-case.

        The HTTP server and any in-memory client (an httpx MockTransport, say) both call
        this, so faults look the same whichever way the supervisor is wired.
        """
        return self._rest.handle(method, target, headers)

    def account(self) -> dict[str, Any]:
        return self._rest.account()

    def fill_activities(
        self,
        *,
        after: str | None,
        until: str | None = None,
        direction: str = "asc",
        page_size: int = ACTIVITY_PAGE_MAX,
        page_token: str | None = None,
    ) -> list[dict[str, Any]]:
        """FILL activities with `after < transaction_time < until`, ordered by id."""
        return self._rest.fill_activities(
            after=after, until=until, direction=direction, page_size=page_size,
            page_token=page_token,
        )

    def orders(
        self,
        *,
        status: str = "open",
        limit: int = ORDERS_LIMIT_MAX,
        after: str | None = None,
        direction: str = "desc",
    ) -> list[dict[str, Any]]:
        """`GET /v2/orders`: current order snapshots, by submission time."""
        return self._rest.orders(status=status, limit=limit, after=after, direction=direction)

    def order(self, order_id: str) -> dict[str, Any] | None:
        return self._rest.order(order_id)

    def positions(self) -> list[dict[str, Any]]:
        """`GET /v2/positions`: open positions only, quantities signed."""
        return self._rest.positions()
