"""`BrokerRest` over HTTP: httpx on Trio (through anyio). Timeouts on every call,
retries with backoff on 5xx, 429 honouring `Retry-After`, and no retry on 401/403,
which is a configuration error. Every request, whatever its endpoint, goes through the
REST budget (`budget.py`): paced within the service's share of the account's limit
(docs/design.md, section 12).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Self
from urllib.parse import quote

import httpx
import msgspec
import trio

from .activities import WireNonTrade, decode_non_trade
from .backoff import Backoff, BackoffPolicy
from .bounds import MAX_ID_CHARS
from .budget import DEFAULT_SHARE, MAX_RETRY_AFTER, RateHeaders, RestBudget
from .errors import BrokerAuthError, BrokerUnavailable, DecodeError
from .logs import get_logger
from .metrics import Metrics
from .protocol import (
    OrderList,
    WireActivity,
    WireOrder,
    decode_activities,
    decode_order,
    decode_orders,
)
from .rest import MAX_ORDERS_PAGE, MAX_PAGE_SIZE
from .settings import DEFAULT_REST_RETRIES, DEFAULT_REST_TIMEOUT, Settings

log = get_logger("stream_supervisor.rest_http")

_RETRY_POLICY = BackoffPolicy(initial=0.25, factor=2.0, cap=10.0)
#: The most bytes a REST answer may hold. Far beyond any real one (a page of 100
#: activities or 500 orders is well under a megabyte), it keeps a broken proxy or a
#: hostile endpoint from filling the process's memory: a body over it is read no
#: further and fails the call (docs/design.md, section 2).
MAX_BODY_BYTES: Final = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RestSettings:
    base_url: str
    key_id: str
    secret_key: str
    timeout: float = DEFAULT_REST_TIMEOUT
    retries: int = DEFAULT_REST_RETRIES
    budget_share: float = DEFAULT_SHARE

    @classmethod
    def from_settings(cls, s: Settings) -> RestSettings:
        return cls(base_url=s.base_url, key_id=s.key_id, secret_key=s.secret_key,
                   timeout=s.rest_timeout, retries=s.rest_retries,
                   budget_share=s.rest_budget_share)


class HttpBrokerRest:
    """`BrokerRest` over HTTP. Use as an async context manager (it owns a connection pool)."""

    def __init__(
        self,
        settings: RestSettings,
        *,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: Metrics | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._settings = settings
        self._max_body_bytes = max_body_bytes
        self._rng = rng if rng is not None else random.Random()
        self.budget = RestBudget(settings.budget_share)
        self._metrics = metrics
        self._pace = trio.Lock()
        if metrics is not None:
            metrics.rest_budget_per_window.set(self.budget.per_window)
        # `transport` lets the deterministic simulation answer in memory while every
        # retry, timeout and status rule here still runs for real.
        self._client = httpx.AsyncClient(
            transport=transport,
            base_url=settings.base_url,
            headers={
                "APCA-API-KEY-ID": settings.key_id,
                "APCA-API-SECRET-KEY": settings.secret_key,
                "Accept": "application/json",
                "User-Agent": "stream-supervisor",
            },
            timeout=httpx.Timeout(settings.timeout),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await self._client.aclose()

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> bytes | None:
        """GET with retries. Returns the body, or None for 404."""
        backoff = Backoff(_RETRY_POLICY, self._rng)
        attempts = max(1, self._settings.retries + 1)
        last = ""
        for attempt in range(attempts):
            try:
                await self._wait_for_budget(path)
                # The client has its own timeouts; this bounds the whole exchange too.
                with trio.fail_after(self._settings.timeout * 2):
                    async with self._client.stream("GET", path, params=params) as resp:
                        self._learn(path, resp)
                        if resp.status_code < 300:
                            body = await self._read_body(path, resp)
            except (httpx.TransportError, trio.TooSlowError) as exc:
                last = f"{type(exc).__name__}"
                delay = backoff.next_delay()
            else:
                status = resp.status_code
                if status < 300:
                    return body
                if status == 404:
                    return None
                if status in (401, 403):
                    raise BrokerAuthError(
                        f"broker REST refused the credentials (HTTP {status} on {path}): "
                        "check APCA_API_KEY_ID, APCA_API_SECRET_KEY and APCA_API_BASE_URL"
                    )
                if status == 429:
                    # The budget now holds every request until Retry-After has passed.
                    last = "HTTP 429"
                    delay = 0.0
                elif status >= 500:
                    last = f"HTTP {status}"
                    delay = backoff.next_delay()
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                    if retry_after is not None:
                        delay = max(delay, retry_after)
                else:
                    raise BrokerUnavailable(f"broker REST answered HTTP {status} on {path}")
            if attempt + 1 < attempts:
                log.warning("rest_retry", path=path, reason=last, attempt=attempt + 1,
                            delay=round(delay, 3))
                if delay > 0:
                    await trio.sleep(delay)
        raise BrokerUnavailable(f"broker REST {path} failed after {attempts} attempts: {last}")

    async def _read_body(self, path: str, resp: httpx.Response) -> bytes:
        """The body, read as it comes, up to `max_body_bytes`; more fails the call (the
        same answer would come again: it is not retried)."""
        limit = self._max_body_bytes
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BrokerUnavailable(f"GET {path} answered {declared} bytes, over the limit "
                                    f"of {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise BrokerUnavailable(f"GET {path} answered more than {limit} bytes, "
                                        "the limit: read no further")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _wait_for_budget(self, path: str) -> None:
        """Hold this request until the budget lets it go (one at a time, evenly spaced)."""
        async with self._pace:
            now = trio.current_time()
            at = self.budget.next_send_at(now)
            if at > now:
                if self._metrics is not None:
                    self._metrics.rest_budget_wait_seconds.inc(at - now)
                await trio.sleep_until(at)
            self.budget.sent(trio.current_time())
        if self._metrics is not None:
            self._metrics.rest_requests.labels(endpoint_label(path)).inc()

    def _learn(self, path: str, resp: httpx.Response) -> None:
        headers = RateHeaders.parse(resp.headers, time.time())
        held = self.budget.answered(trio.current_time(), headers, resp.status_code)
        m = self._metrics
        if m is not None:
            m.rest_budget_per_window.set(self.budget.per_window)
            if headers.remaining is not None:
                m.rest_budget_remaining.set(headers.remaining)
        if resp.status_code == 429:
            if m is not None:
                m.rest_rate_limited.inc()
            log.warning("rest_rate_limited", path=path, retry_after=headers.retry_after,
                        limit=self.budget.limit, held_s=round(held, 3))
        elif held > 0:
            log.info("rest_budget_low", remaining=headers.remaining, limit=self.budget.limit,
                     held_s=round(held, 3))

    async def _get_list(self, path: str, params: dict[str, Any] | None = None) -> bytes:
        """The body of an endpoint that answers a list. A list endpoint has no "none":
        a 404, or a 2xx with no body (a 204, a proxy's empty answer), is the broker not
        answering, never an empty list (an empty positions list would close every
        position in a reconcile that applies it; an empty open-orders list would leave a
        baseline's working orders unmarked)."""
        body = await self._get(path, params)
        if body is None:
            raise BrokerUnavailable(f"GET {path} answered HTTP 404 where a list was expected")
        if not body:
            raise BrokerUnavailable(f"GET {path} answered an empty body where a list was "
                                    "expected")
        return body

    async def account_id(self) -> str:
        body = await self._get("/v2/account")
        if body is None:
            raise BrokerUnavailable("GET /v2/account returned 404")
        account = _decode_json("/v2/account", body, dict)
        ident = account.get("id")
        # The id names every row the service writes: `null` would run it as "None".
        if (not isinstance(ident, str) or not ident or not ident.isprintable()
                or len(ident) > MAX_ID_CHARS):
            shown = repr(ident[:40]) if isinstance(ident, str) else _kind(ident)
            raise BrokerUnavailable(
                f"GET /v2/account answered an account id that is not one: {shown} (an id is "
                f"1 to {MAX_ID_CHARS} printable characters)")
        return ident

    async def fill_activities(
        self, *, after: str | None, page_token: str | None, page_size: int = MAX_PAGE_SIZE
    ) -> list[WireActivity]:
        params: dict[str, Any] = {"direction": "asc", "page_size": min(page_size, MAX_PAGE_SIZE)}
        if after is not None:
            params["after"] = after
        if page_token is not None:
            params["page_token"] = page_token
        path = "/v2/account/activities/FILL"
        body = await self._get_list(path, params)
        try:
            return decode_activities(body)
        except DecodeError as exc:
            raise _unexpected(path, body, list, exc) from None

    async def open_orders(self) -> list[WireOrder]:
        # nested: a multi-leg order comes with its legs (docs/design.md, section 10).
        body = await self._get_list("/v2/orders",
                                    {"status": "open", "limit": 500, "nested": "true"})
        return _orders("/v2/orders", body)

    async def orders_since(self, *, after: str, limit: int = MAX_ORDERS_PAGE) -> list[WireOrder]:
        body = await self._get_list("/v2/orders", {
            "status": "all", "after": after, "direction": "asc",
            "limit": min(limit, MAX_ORDERS_PAGE), "nested": "true"})
        return _orders("/v2/orders", body)

    async def order(self, order_id: str) -> WireOrder | None:
        path = f"/v2/orders/{order_id}"
        body = await self._get(path)
        if body is None:
            return None  # 404: no such order
        if not body:
            raise BrokerUnavailable(f"GET {path} answered an empty body")
        try:
            return decode_order(body)
        except DecodeError as exc:
            _decode_json(path, body, dict)  # not an object at all: the broker is not answering
            # As an order of a list that does not decode: skipped, said so; the next
            # update of the order carries its status (docs/design.md, section 4).
            log.warning("order_undecodable", path=path, problem=str(exc)[:300])
            return None

    async def positions(self) -> list[dict[str, Any]]:
        path = "/v2/positions"
        rows: list[dict[str, Any]] = _decode_json(path, await self._get_list(path), list)
        for row in rows:
            if not isinstance(row, dict):
                raise BrokerUnavailable(f"GET {path} answered a list holding {_kind(row)} "
                                        "where positions (objects) were expected")
        return rows

    async def non_trade_activities(
        self, *, activity_types: Sequence[str], after: str | None, page_token: str | None,
        page_size: int = MAX_PAGE_SIZE,
    ) -> list[WireNonTrade]:
        params: dict[str, Any] = {"activity_types": ",".join(activity_types),
                                  "direction": "asc", "page_size": min(page_size, MAX_PAGE_SIZE)}
        if after is not None:
            params["after"] = after
        if page_token is not None:
            params["page_token"] = page_token
        path = "/v2/account/activities"
        body = await self._get_list(path, params)
        try:
            return decode_non_trade(body)
        except DecodeError as exc:
            raise _unexpected(path, body, list, exc) from None

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        path = f"/v2/assets/{quote(symbol, safe='')}"
        body = await self._get(path)
        if body is None:
            return None  # 404: the broker has no such asset
        if not body:
            raise BrokerUnavailable(f"GET {path} answered an empty body")
        found: dict[str, Any] = _decode_json(path, body, dict)
        return found

    async def clock(self) -> dict[str, Any]:
        body = await self._get("/v2/clock")
        if body is None:
            raise BrokerUnavailable("GET /v2/clock returned 404")
        clock: dict[str, Any] = _decode_json("/v2/clock", body, dict)
        return clock


def _decode_json(path: str, body: bytes, expect: type[Any]) -> Any:
    """The body as JSON of the type `expect` (`list` or `dict`), or BrokerUnavailable
    naming the endpoint and what came (a proxy's HTML page, a JSON null)."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise BrokerUnavailable(f"GET {path} answered a body that is not JSON: "
                                f"{_head(body)}") from None
    if not isinstance(value, expect):
        raise BrokerUnavailable(f"GET {path} answered {_kind(value)} where "
                                f"{_kind(expect())} was expected")
    return value


def _unexpected(path: str, body: bytes, expect: type[Any],
                exc: DecodeError) -> BrokerUnavailable:
    """Why a body a typed decoder refused whole is no answer."""
    try:
        _decode_json(path, body, expect)
    except BrokerUnavailable as unavailable:
        return unavailable
    return BrokerUnavailable(f"GET {path} answered what is not one: {exc}"[:300])


def _kind(value: object) -> str:
    if value is None:
        return "a JSON null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _head(body: bytes) -> str:
    return repr(body[:60].decode("utf-8", errors="replace")) + (
        f" ({len(body)} bytes)" if len(body) > 60 else "")


def _orders(path: str, body: bytes) -> OrderList:
    try:
        orders = decode_orders(body)
    except DecodeError as exc:
        raise _unexpected(path, body, list, exc) from None
    for problem in orders.skipped:
        log.warning("order_undecodable", path=path, problem=problem)
    return orders


def endpoint_label(path: str) -> str:
    """A low-cardinality name for a REST path: ids become `:id`."""
    parts = [p for p in path.split("/") if p and p != "v2"]
    if len(parts) >= 2 and parts[0] in ("orders", "assets", "positions"):
        return f"{parts[0]}/:id"
    return "/".join(parts[:3]) or "/"


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
