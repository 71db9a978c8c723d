"""The simulated broker's REST API: the views Alpaca serves (account, FILL activities,
orders, positions) over the market's books, and the dispatch that routes a request to
one, with authentication and the REST chaos knobs. No sockets: `server.py` serves it.
"""

from __future__ import annotations

import bisect
import decimal
import hmac
import itertools
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from ...errors import TimestampError
from ...events import parse_timestamp
from .assets import asset_record
from .chaos import ChaosDecider
from .market import STARTING_CASH, Market
from .ratelimit import RateLimiter
from .records import Order
from .wire import (
    CENT,
    CTX,
    EASTERN,
    MS_NS,
    NS,
    TWELVE,
    ZERO,
    decimal_text,
    dumps,
    money_text,
    utc_us,
)

ACTIVITY_PAGE_MAX: Final = 100
ORDERS_LIMIT_MAX: Final = 500
ORDERS_DEFAULT_LIMIT: Final = 50
"""What `GET /v2/orders` returns without `limit`, as the real endpoint does."""

_OPEN_STATUSES: Final = frozenset(
    {"pending_new", "accepted", "new", "partially_filled", "pending_cancel"}
)


@dataclass(frozen=True)
class RestResponse:
    """One REST answer. `delay` is how long the server should wait before sending it."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


class RestApi:
    """`GET` endpoints of one simulated account, answered from its market."""

    def __init__(
        self,
        market: Market,
        chaos: ChaosDecider,
        stats: dict[str, int],
        limiter: RateLimiter | None = None,
    ) -> None:
        self.market = market
        self.chaos = chaos
        self.stats = stats
        self.limiter = limiter if limiter is not None else RateLimiter(
            market.config.rest_rate_limit)
        # Top-level orders by (submission time, arrival): `orders` finds `after` by
        # bisection instead of scanning and sorting the whole book, which over a long
        # soak's 100,000 orders took a good part of a second on the loop that also
        # answers the stream's pings. Built incrementally: the book only grows, and an
        # order's submission time is set once (at `pending_new`; 0 until then).
        self._order_keys: list[tuple[int, int]] = []
        self._order_index: list[Order] = []
        self._orders_indexed = 0
        self._unsubmitted: list[Order] = []

    def account(self) -> dict[str, Any]:
        market = self.market
        with decimal.localcontext(CTX):
            values = [market.positions[s.name].qty * s.price for s in market.symbols]
            long_value = sum((v for v in values if v > 0), ZERO)
            short_value = sum((v for v in values if v < 0), ZERO)
            cash = market.cash.quantize(CENT)
            equity = (market.cash + long_value + short_value).quantize(CENT)
        number = "PA" + str(int(market.account_id.replace("-", "")[:12], 16) % 10**10).zfill(10)
        return {
            "id": market.account_id,
            "account_number": number,
            "status": "ACTIVE",
            "crypto_status": "ACTIVE",
            "currency": "USD",
            "cash": money_text(cash),
            "buying_power": money_text(max(ZERO, equity) * 2),
            "equity": money_text(equity),
            "last_equity": money_text(STARTING_CASH),
            "portfolio_value": money_text(equity),
            "long_market_value": money_text(long_value.quantize(CENT)),
            "short_market_value": money_text(short_value.quantize(CENT)),
            "multiplier": "2",
            "pattern_day_trader": False,
            "trading_blocked": False,
            "transfers_blocked": False,
            "account_blocked": False,
            "trade_suspended_by_user": False,
            "shorting_enabled": True,
            "created_at": utc_us(market.epoch_ns),
        }

    def fill_activities(
        self,
        *,
        after: str | None,
        until: str | None = None,
        direction: str = "asc",
        page_size: int = ACTIVITY_PAGE_MAX,
        page_token: str | None = None,
    ) -> list[dict[str, Any]]:
        """FILL activities with `after < transaction_time < until`, ordered by id.

        Ids are `<ms>::<uuid>`: fills in one millisecond sort by uuid, so they can come
        back out of cum_qty order, exactly as the real endpoint does.
        """
        if direction not in ("asc", "desc"):
            raise ValueError(f"invalid direction {direction!r}")
        if page_size < 1:
            raise ValueError("page_size must be positive")
        page_size = min(page_size, ACTIVITY_PAGE_MAX)
        after_ns = _parse_time(after, "after")
        until_ns = _parse_time(until, "until")
        ids = self.market.activity_ids
        # Ids begin with their millisecond (at the simulator's fixed New York offset,
        # so they order by time): `after` and `until` are found by bisection rather
        # than by reading every activity before them (a long soak's books hold
        # hundreds of thousands, and a scan took a good part of a second on the loop
        # that also answers the stream's pings).
        floor = _id_prefix(after_ns) if after_ns is not None else None
        ceiling = _id_prefix(until_ns + MS_NS) if until_ns is not None else None
        if direction == "asc":
            start = bisect.bisect_right(ids, page_token) if page_token else 0
            if floor is not None:
                start = max(start, bisect.bisect_left(ids, floor))
            stop = bisect.bisect_left(ids, ceiling) if ceiling is not None else len(ids)
            candidates: Iterable[int] = range(start, stop)
        else:
            stop = bisect.bisect_left(ids, page_token) if page_token else len(ids)
            if ceiling is not None:
                stop = min(stop, bisect.bisect_left(ids, ceiling))
            low = bisect.bisect_left(ids, floor) if floor is not None else 0
            candidates = range(stop - 1, low - 1, -1)
        out: list[dict[str, Any]] = []
        retention = self.market.config.activities_retention
        kept_from = (self.market.now_ns - int(retention * NS)) if retention is not None else None
        for i in candidates:
            ts = self.market.activity_ns[ids[i]]
            if kept_from is not None and ts < kept_from:
                continue  # past the broker's window
            if after_ns is not None and ts <= after_ns:
                continue
            if until_ns is not None and ts >= until_ns:
                continue
            out.append(dict(self.market.activities[i]))
            if len(out) >= page_size:
                break
        return out

    def orders(
        self,
        *,
        status: str = "open",
        limit: int = ORDERS_LIMIT_MAX,
        after: str | None = None,
        direction: str = "desc",
    ) -> list[dict[str, Any]]:
        """`GET /v2/orders`: current order snapshots, by submission time."""
        if status not in ("open", "closed", "all"):
            raise ValueError(f"invalid status {status!r}")
        if direction not in ("asc", "desc"):
            raise ValueError(f"invalid direction {direction!r}")
        if limit < 1:
            raise ValueError("limit must be positive")
        limit = min(limit, ORDERS_LIMIT_MAX)
        after_ns = _parse_time(after, "after")
        self._index_orders()
        low = 0 if after_ns is None else bisect.bisect_right(
            self._order_keys, (after_ns, math.inf))
        index = self._order_index
        # Not yet submitted (`created_ns` 0): before every other, and only without `after`.
        waiting = self._unsubmitted if after_ns is None else []
        chosen: Iterable[Order] = (
            itertools.chain(waiting, (index[i] for i in range(low, len(index))))
            if direction == "asc"
            else itertools.chain((index[i] for i in range(len(index) - 1, low - 1, -1)),
                                 reversed(waiting)))
        out: list[dict[str, Any]] = []
        for o in chosen:
            if status == "all" or (o.status in _OPEN_STATUSES) == (status == "open"):
                out.append(o.snapshot())
                if len(out) >= limit:
                    break
        return out

    def _index_orders(self) -> None:
        """Bring the submission-time index up to the book. A leg is listed inside its
        multi-leg parent (`nested`), not on its own; an order not yet submitted
        (`created_ns` 0) is listed by no `after` and waits to be indexed."""
        book = self.market.orders
        arrived = itertools.islice(book.values(), self._orders_indexed, None)
        waiting = self._unsubmitted + [o for o in arrived if o.parent_id is None]
        self._orders_indexed = len(book)
        self._unsubmitted = []
        for o in waiting:
            if o.created_ns == 0:
                self._unsubmitted.append(o)
                continue
            key = (o.created_ns, len(self._order_keys))
            at = bisect.bisect(self._order_keys, key)
            self._order_keys.insert(at, key)
            self._order_index.insert(at, o)

    def order(self, order_id: str) -> dict[str, Any] | None:
        found = self.market.orders.get(order_id)
        return None if found is None else found.snapshot()

    def positions(self) -> list[dict[str, Any]]:
        """`GET /v2/positions`: open positions only, quantities signed."""
        out: list[dict[str, Any]] = []
        with decimal.localcontext(CTX):
            for sym in self.market.symbols:
                p = self.market.positions[sym.name]
                if p.qty == 0 or p.avg is None:
                    continue
                cost = p.qty * p.avg * sym.multiplier
                value = p.qty * sym.price * sym.multiplier
                unrealized = value - cost
                out.append(
                    {
                        "asset_id": sym.asset_id,
                        "symbol": sym.compact,
                        "exchange": asset_record(sym)["exchange"],
                        "asset_class": sym.asset_class,
                        "asset_marginable": sym.asset_class == "us_equity",
                        "qty": decimal_text(p.qty),
                        "qty_available": decimal_text(p.qty),
                        "avg_entry_price": decimal_text(p.avg.quantize(TWELVE, context=CTX)),
                        "side": "long" if p.qty > 0 else "short",
                        "market_value": money_text(value.quantize(CENT)),
                        "cost_basis": money_text(cost.quantize(CENT)),
                        "unrealized_pl": money_text(unrealized.quantize(CENT)),
                        "unrealized_plpc": decimal_text(
                            (unrealized / abs(cost)).quantize(Decimal("1e-10"))
                        ),
                        "unrealized_intraday_pl": money_text(unrealized.quantize(CENT)),
                        "unrealized_intraday_plpc": decimal_text(
                            (unrealized / abs(cost)).quantize(Decimal("1e-10"))
                        ),
                        "current_price": decimal_text(sym.price),
                        "lastday_price": decimal_text(sym.price),
                        "change_today": "0",
                    }
                )
        return out

    def non_trade_activities(
        self, *, activity_types: str | None, after: str | None, page_size: int,
        page_token: str | None, direction: str = "asc",
    ) -> list[dict[str, Any]]:
        """`GET /v2/account/activities`: the non-trade ones of `activity_types` (all when
        not given), oldest first, after `page_token` (an id) and `after` (a time)."""
        if direction != "asc":
            raise ValueError(f"unsupported direction {direction!r}")
        wanted = {t.strip() for t in activity_types.split(",")} if activity_types else None
        after_ns = _parse_time(after, "after")
        out: list[dict[str, Any]] = []
        if not self.market.non_trade_visible():
            return out
        for activity in self.market.non_trade:
            aid = activity["id"]
            if page_token is not None and aid <= page_token:
                continue
            if after_ns is not None and self.market.non_trade_ns[aid] <= after_ns:
                continue
            if wanted is not None and activity["activity_type"] not in wanted:
                continue
            out.append(dict(activity))
            if len(out) >= page_size:
                break
        return out

    def asset(self, symbol: str) -> dict[str, Any] | None:
        """`GET /v2/assets/{symbol}`, in either spelling of a crypto pair."""
        for sym in self.market.symbols:
            if symbol in (sym.name, sym.compact):
                return asset_record(sym)
        return None
    def clock(self) -> dict[str, Any]:
        """`GET /v2/clock`: the simulated session is regular market hours, open from its
        epoch for six and a half hours."""
        opened = self.market.epoch_ns
        closes = opened + int(6.5 * 3600) * NS
        now = self.market.now_ns
        return {
            "timestamp": utc_us(now),
            "is_open": opened <= now < closes,
            "next_open": utc_us(opened + 86_400 * NS),
            "next_close": utc_us(closes),
        }

    # --- dispatch

    def handle(self, method: str, target: str, headers: Mapping[str, str]) -> RestResponse:
        """Answer one REST request, chaos included. `headers` keys are lower-case.

        The HTTP server and any in-memory client (an httpx MockTransport, say) both call
        this, so faults look the same whichever way the supervisor is wired.
        """
        self.stats["rest_requests"] += 1
        parts = urlsplit(target)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        route = _route(path)
        if route is None:
            return _error(404, 40410000, "endpoint not found")
        if method.upper() != "GET":
            return _error(405, 40510000, "method not allowed")
        if not self._authorized(headers):
            self.stats["rest_401"] += 1
            return _error(401, 40110000, "request is not authorized")
        if route == "activities":
            self.stats["activity_requests"] += 1
        # Alpaca's limit, per account, counted on arrival; every answer says where the
        # window stands (docs/design.md, section 12).
        rate = self.limiter.admit(route, headers.get("user-agent", ""))
        limits = rate.headers(time.time())
        if not rate.allowed:
            self.stats["rest_429"] += 1
            return _error(429, 42910000, "rate limit exceeded", headers=limits)
        delay = self.chaos.rest_delay()
        fault = self.chaos.rest_fault()
        if fault == "error":
            self.stats["rest_faults"] += 1
            return _error(500, 50010000, "internal server error", delay=delay, headers=limits)
        if fault == "rate_limited":
            self.stats["rest_faults"] += 1
            retry = str(math.ceil(self.chaos.config.rest_retry_after))
            return _error(
                429, 42910000, "rate limit exceeded", delay=delay,
                headers=(*limits, ("Retry-After", retry)),
            )
        try:
            body = self._answer(route, path, query)
        except ValueError as exc:
            return _error(422, 42210000, str(exc), delay=delay, headers=limits)
        if body is None:
            return _error(404, 40410000, "order not found", delay=delay, headers=limits)
        return RestResponse(
            200, dumps(body), (("Content-Type", "application/json"), *limits), delay)

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        key = headers.get("apca-api-key-id", "")
        secret = headers.get("apca-api-secret-key", "")
        # Both comparisons always run: no early exit that times which one was wrong.
        ok_key = hmac.compare_digest(key.encode(), self.market.config.key_id.encode())
        ok_secret = hmac.compare_digest(secret.encode(), self.market.config.secret_key.encode())
        return ok_key and ok_secret

    def _answer(self, route: str, path: str, query: dict[str, str]) -> Any:
        if route == "account":
            return self.account()
        if route == "positions":
            return self.positions()
        if route == "clock":
            return self.clock()
        if route == "order":
            return self.order(path.rsplit("/", 1)[1])
        if route == "asset":
            return self.asset(unquote(path.split("/v2/assets/", 1)[1]))
        if route == "non_trade":
            return self.non_trade_activities(
                activity_types=query.get("activity_types") or None,
                after=query.get("after") or None,
                page_size=min(_int_param(query, "page_size", ACTIVITY_PAGE_MAX),
                              ACTIVITY_PAGE_MAX),
                page_token=query.get("page_token") or None,
                direction=query.get("direction") or "asc",
            )
        if route == "orders":
            return self.orders(
                status=query.get("status") or "open",
                limit=_int_param(query, "limit", ORDERS_DEFAULT_LIMIT),
                after=query.get("after") or None,
                direction=query.get("direction") or "desc",
            )
        requested = _int_param(query, "page_size", ACTIVITY_PAGE_MAX)
        if requested < 1:
            raise ValueError("page_size must be positive")
        return self.fill_activities(
            after=query.get("after") or None,
            until=query.get("until") or None,
            direction=query.get("direction") or "asc",
            page_size=self.chaos.page_size(min(requested, ACTIVITY_PAGE_MAX)),
            page_token=query.get("page_token") or None,
        )



# ---------------------------------------------------------------------- helpers


def _route(path: str) -> str | None:
    if path == "/v2/account":
        return "account"
    if path == "/v2/account/activities/FILL":
        return "activities"
    if path == "/v2/account/activities":
        return "non_trade"
    if path.startswith("/v2/assets/") and len(path) > len("/v2/assets/"):
        return "asset"
    if path == "/v2/orders":
        return "orders"
    if path.startswith("/v2/orders/") and path.count("/") == 3:
        return "order"
    if path == "/v2/positions":
        return "positions"
    if path == "/v2/clock":
        return "clock"
    return None


def _error(
    status: int,
    code: int,
    message: str,
    *,
    delay: float = 0.0,
    headers: tuple[tuple[str, str], ...] = (),
) -> RestResponse:
    body = dumps({"code": code, "message": message})
    return RestResponse(status, body, (("Content-Type", "application/json"), *headers), delay)


def _int_param(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"invalid {name}") from None


def _id_prefix(ns: int) -> str:
    """The millisecond prefix of an activity id stamped at `ns` (the market's
    `_record_activity`): every id of that millisecond or later sorts at or after it."""
    local = datetime.fromtimestamp(ns // NS, EASTERN)
    return f"{local:%Y%m%d%H%M%S}{(ns % NS) // MS_NS:03d}"


def _parse_time(text: str | None, name: str) -> int | None:
    """RFC 3339 (any offset, up to ns) or a bare date, as epoch nanoseconds."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return int(day.timestamp()) * NS
        return parse_timestamp(text)[1]
    except (TimestampError, ValueError):
        raise ValueError(f"invalid {name}: {text[:40]!r}") from None

