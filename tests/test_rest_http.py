"""The HTTP REST client against answers that are not what an endpoint should give, over
real loopback HTTP (`tests/integration/rest_stub.py`): each is `BrokerUnavailable`, never
an empty list, a traceback or a value taken on trust (docs/design.md, section 2)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest
import trio

from stream_supervisor.adjustments import BASELINE, BrokerPosition
from stream_supervisor.errors import BrokerUnavailable
from stream_supervisor.metrics import Metrics
from stream_supervisor.pgstore import PgStore
from stream_supervisor.reconciler import ScheduledReconcile
from stream_supervisor.rest_http import HttpBrokerRest, RestSettings
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import BrokerWord

from .integration.rest_stub import RestStub

ACCOUNT = "acct-rest-http"
T0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

Call = Callable[[HttpBrokerRest], Awaitable[object]]

#: Every endpoint that answers a list, and the path it asks.
LIST_CALLS: dict[str, tuple[str, Call]] = {
    "positions": ("/v2/positions", lambda r: r.positions()),
    "open_orders": ("/v2/orders", lambda r: r.open_orders()),
    "orders_since": ("/v2/orders", lambda r: r.orders_since(after="2026-11-30T00:00:00Z")),
    "fill_activities": ("/v2/account/activities/FILL",
                        lambda r: r.fill_activities(after=None, page_token=None)),
    "non_trade_activities": ("/v2/account/activities", lambda r: r.non_trade_activities(
        activity_types=["CFEE"], after=None, page_token=None)),
}


@asynccontextmanager
async def stub_rest(**kw: Any) -> AsyncIterator[tuple[RestStub, HttpBrokerRest]]:
    stub = RestStub(ACCOUNT)
    async with trio.open_nursery() as nursery:
        await nursery.start(stub.serve)
        rest = HttpBrokerRest(RestSettings(base_url=stub.url, key_id="k", secret_key="s",
                                           timeout=5.0, retries=0, budget_share=1.0), **kw)
        async with rest:
            yield stub, rest
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("answer", [(200, b""), (204, b""), (404, b"{}")],
                         ids=["empty-200", "204", "404"])
@pytest.mark.parametrize("name", sorted(LIST_CALLS))
async def test_a_list_endpoint_answering_nothing_is_unavailable_not_empty(
        name: str, answer: tuple[int, bytes]) -> None:
    path, call = LIST_CALLS[name]
    async with stub_rest() as (stub, rest):
        stub.answers[path] = answer
        with trio.fail_after(10), pytest.raises(BrokerUnavailable, match=path):
            await call(rest)


async def test_only_a_404_means_no_such_order_or_asset() -> None:
    async with stub_rest() as (stub, rest):
        with trio.fail_after(10):
            stub.answers["/v2/orders/o-1"] = (404, b'{"message": "order not found"}')
            stub.answers["/v2/assets/BTCUSD"] = (404, b'{"message": "not found"}')
            assert await rest.order("o-1") is None
            assert await rest.asset("BTCUSD") is None
            for status in (200, 204):
                stub.answers["/v2/orders/o-1"] = (status, b"")
                stub.answers["/v2/assets/BTCUSD"] = (status, b"")
                with pytest.raises(BrokerUnavailable, match="/v2/orders/o-1"):
                    await rest.order("o-1")
                with pytest.raises(BrokerUnavailable, match="/v2/assets/BTCUSD"):
                    await rest.asset("BTCUSD")


#: Every endpoint, the path it asks, and what it expects: "list" or "object".
ALL_CALLS: dict[str, tuple[str, Call, str]] = {
    **{name: (path, call, "list") for name, (path, call) in LIST_CALLS.items()},
    "account_id": ("/v2/account", lambda r: r.account_id(), "object"),
    "clock": ("/v2/clock", lambda r: r.clock(), "object"),
    "asset": ("/v2/assets/BTCUSD", lambda r: r.asset("BTCUSD"), "object"),
    "order": ("/v2/orders/o-1", lambda r: r.order("o-1"), "object"),
}

#: 200 bodies that are no answer, and what the error says came.
NOT_ANSWERS: dict[str, tuple[bytes, str]] = {
    "html": (b"<html>down for maintenance</html>", "not JSON: '<html>down for maint"),
    "not-utf8": (b'{"id": "\xff\xfe"}', "not JSON"),
    "null": (b"null", "a JSON null"),
    "number": (b"42", "a number"),
}


@pytest.mark.parametrize("kind", sorted(NOT_ANSWERS))
@pytest.mark.parametrize("name", sorted(ALL_CALLS))
async def test_a_body_that_is_not_json_is_unavailable_naming_what_came(
        name: str, kind: str) -> None:
    path, call, _ = ALL_CALLS[name]
    body, said = NOT_ANSWERS[kind]
    async with stub_rest() as (stub, rest):
        stub.answers[path] = (200, body)
        with trio.fail_after(10), pytest.raises(BrokerUnavailable) as info:
            await call(rest)
    assert path in str(info.value) and said in str(info.value)


@pytest.mark.parametrize("name", sorted(ALL_CALLS))
async def test_json_of_the_wrong_shape_is_unavailable(name: str) -> None:
    """A list where an object is expected, an object where a list is: `/v2/positions`
    answering an object used to give its keys as positions."""
    path, call, expects = ALL_CALLS[name]
    body, came = (b'{"AAPL": "10"}', "an object") if expects == "list" else (
        b'[{"id": "x"}]', "a list")
    async with stub_rest() as (stub, rest):
        stub.answers[path] = (200, body)
        with trio.fail_after(10), pytest.raises(BrokerUnavailable) as info:
            await call(rest)
    assert path in str(info.value) and came in str(info.value)


async def test_positions_that_are_not_objects_are_unavailable() -> None:
    async with stub_rest() as (stub, rest):
        stub.answers["/v2/positions"] = (200, b'[{"symbol": "AAPL"}, "AAPL"]')
        with trio.fail_after(10), pytest.raises(BrokerUnavailable, match="a string"):
            await rest.positions()


@pytest.mark.parametrize("ident", [None, "", 42, "a\x00b", "x" * 129],
                         ids=["null", "empty", "number", "nul", "129-chars"])
async def test_an_account_id_that_is_not_one_is_unavailable(ident: object) -> None:
    """`{"id": null}` ran the service as account "None"."""
    async with stub_rest() as (stub, rest):
        stub.answers["/v2/account"] = (200, msgspec.json.encode({"id": ident}))
        with trio.fail_after(10), pytest.raises(BrokerUnavailable, match="account id"):
            await rest.account_id()
        stub.answers["/v2/account"] = (200, msgspec.json.encode({"id": "x" * 128}))
        assert await rest.account_id() == "x" * 128


async def test_an_empty_positions_answer_closes_nothing_in_a_reconcile_that_applies(
        database_url: str) -> None:
    """A 200 with no body used to be read as "flat": the scheduled reconcile with apply
    then closed a 10-share position."""
    store = PgStore(database_url)
    await store.open()
    try:
        assert await store.try_leadership(ACCOUNT)
        await store.apply_broker_word(BrokerWord(
            ACCOUNT, BASELINE, T0, [BrokerPosition("AAPL", Decimal(10), Decimal(100))]))
        async with stub_rest() as (stub, rest):
            stub.answers["/v2/positions"] = (200, b"")
            job = ScheduledReconcile(Settings(reconcile_interval=60.0, reconcile_apply=True),
                                     rest, store, ACCOUNT, Metrics(), SupervisorState(),
                                     wallclock=lambda: T0)
            with trio.fail_after(20):
                for _ in range(3):  # a difference seen twice unchanged would be applied
                    with pytest.raises(BrokerUnavailable, match="empty body"):
                        await job.once()
        snap = await store.snapshot(ACCOUNT)
        assert snap.net_position("AAPL") == 10
        assert [a.reason for a in snap.adjustments] == ["baseline"]
    finally:
        await store.aclose()


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_read_no_further(sized: bool) -> None:
    """A 200 MB body was read whole into memory. Now a body over the limit
    (`MAX_BODY_BYTES`, 64 MiB; here 1 MiB) fails the call, whether it says its length or
    streams on."""
    limit = 1 << 20
    row = b'{"symbol": "AAPL", "qty": "1", "side": "long", "x": "'
    big = row + b"A" * limit + b'"}'
    async with stub_rest(max_body_bytes=limit) as (stub, rest):
        if not sized:
            stub.unsized.add("/v2/positions")
        stub.answers["/v2/positions"] = (200, b"[" + big + b"]")
        with trio.fail_after(10), pytest.raises(BrokerUnavailable, match="limit"):
            await rest.positions()
        fits = row + b"A" * (limit - len(row) - 4) + b'"}'
        stub.answers["/v2/positions"] = (200, b"[" + fits + b"]")
        assert len(b"[" + fits + b"]") == limit
        assert [p["symbol"] for p in await rest.positions()] == ["AAPL"]
