"""The broker's REST API as the service needs it: an interface, no I/O.

Gap recovery, the supervisor and `reconcile` are written against `BrokerRest`. The real
one is `rest_http.HttpBrokerRest` (httpx on Trio); the deterministic simulation answers
the same calls in memory. Implementations raise `errors.BrokerAuthError` when the broker
refuses the credentials and `errors.BrokerUnavailable` when it keeps failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

from .activities import WireNonTrade
from .protocol import WireActivity, WireOrder

#: The most FILL activities the broker returns per page.
MAX_PAGE_SIZE: Final = 100
#: The most orders `GET /v2/orders` returns per request.
MAX_ORDERS_PAGE: Final = 500


class BrokerRest(Protocol):
    """What the supervisor needs from the broker's REST API (the simulation fakes this)."""

    async def account_id(self) -> str: ...

    async def fill_activities(
        self, *, after: str | None, page_token: str | None, page_size: int = MAX_PAGE_SIZE
    ) -> list[WireActivity]: ...

    async def open_orders(self) -> list[WireOrder]: ...

    async def order(self, order_id: str) -> WireOrder | None: ...

    async def orders_since(self, *, after: str, limit: int = MAX_ORDERS_PAGE) -> list[WireOrder]:
        """Orders of any status submitted after `after`, oldest first, legs nested."""
        ...

    async def positions(self) -> list[dict[str, Any]]: ...

    async def non_trade_activities(
        self, *, activity_types: Sequence[str], after: str | None, page_token: str | None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> list[WireNonTrade]:
        """`GET /v2/account/activities?activity_types=...`, oldest first (section 10)."""
        ...

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        """`GET /v2/assets/{symbol}`: the broker's record of an asset (None if unknown)."""
    async def clock(self) -> dict[str, Any]:
        """`GET /v2/clock`: `timestamp`, `is_open`, `next_open`, `next_close` (the
        scheduled reconcile runs while the market is open, docs/design.md, section 9)."""
        ...
