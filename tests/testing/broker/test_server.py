"""The loopback servers (`server.py`): the stream and REST over real sockets, and the
chaos knobs that act on them (429 on upgrade, duplicates, disconnects, stalls, REST
faults)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from stream_supervisor.testing.broker import ChaosConfig, SimServer, SimulatedBroker, serve

from .helpers import AUTH, AUTH_MSG, LISTEN_MSG, all_activities, config, fixture_lines, play_all


@asynccontextmanager
async def running(broker: SimulatedBroker, *, market: bool = False) -> AsyncIterator[SimServer]:
    async with trio.open_nursery() as nursery:
        server: SimServer = await nursery.start(serve, broker)
        if market:
            nursery.start_soon(broker.run_market)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def ws_client(server: SimServer) -> AsyncIterator[WebSocketConnection]:
    """`ws_client(server)`, except that the TCP socket is always closed:
    trio-websocket 0.12's client leaves it open after a rejected upgrade or a
    server-initiated close, which warnings-as-errors turns into a failure."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
    try:
        try:
            async with trio.open_nursery() as nursery:
                host = f"127.0.0.1:{server.ws_port}"
                ws = await wrap_client_stream(nursery, stream, host, "/stream")
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], ConnectionRejected):
                raise group.exceptions[0] from None
            raise
    finally:
        await stream.aclose()


async def login(ws: WebSocketConnection) -> list[Any]:
    await ws.send_message(AUTH_MSG)
    auth = json.loads(await ws.get_message())
    await ws.send_message(LISTEN_MSG)
    listening = await ws.get_message()
    assert isinstance(listening, bytes)
    return [auth, json.loads(listening)]


async def receive_updates(ws: WebSocketConnection, count: int) -> list[str | bytes]:
    return [await ws.get_message() for _ in range(count)]


async def test_loopback_session_streams_binary_frames_like_the_recording() -> None:
    broker = SimulatedBroker(config(seed=4242, orders=15, rate=2000))
    recorded = fixture_lines()
    with trio.fail_after(10):
        # The stock client is fine here: the client closes, so its socket is closed.
        async with running(broker) as server, open_websocket_url(server.ws_url) as ws:
            assert await login(ws) == recorded[:2]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(broker.run_market)
                await broker.wait_finished()
            frames = await receive_updates(ws, broker.updates_total)
    assert all(isinstance(f, bytes) for f in frames)
    assert [json.loads(f) for f in frames] == [
        {"stream": "trade_updates", "data": d} for d in broker_updates(broker)
    ]
    truth = broker.ground_truth()
    assert truth["updates_played"] == truth["updates_total"]
    assert all(f["streamed"] for o in truth["orders"].values() for f in o["fills"])
    assert truth["stats"]["auth_ok"] == truth["stats"]["connections"] == 1


def broker_updates(broker: SimulatedBroker) -> list[dict[str, Any]]:
    return [broker.update(i) for i in range(broker.updates_total)]


async def test_wrong_credentials_are_unauthorized_then_closed() -> None:
    broker = SimulatedBroker(config(orders=5))
    with trio.fail_after(5):
        async with running(broker) as server, ws_client(server) as ws:
            await ws.send_message(
                json.dumps(
                    {"action": "authenticate", "data": {"key_id": "SIMKEY", "secret_key": "nope"}}
                )
            )
            reply = json.loads(await ws.get_message())
            assert reply["stream"] == "authorization"
            assert reply["data"]["status"] == "unauthorized"
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
    assert broker.stats["auth_failed"] == 1 and broker.stats["auth_ok"] == 0


async def test_second_concurrent_connection_gets_429_on_upgrade() -> None:
    broker = SimulatedBroker(config(orders=5))
    with trio.fail_after(5):
        async with running(broker) as server:
            async with ws_client(server) as first:
                await login(first)
                with pytest.raises(ConnectionRejected) as rejected:
                    async with ws_client(server):
                        pass
                assert rejected.value.status_code == 429
            while broker.session_active:  # the slot frees once the first one is gone
                await trio.sleep(0.01)
            async with ws_client(server) as again:
                assert (await login(again))[0]["data"]["status"] == "authorized"
    assert broker.stats["rejected_429"] == 1
    assert broker.stats["upgrade_attempts"] == 3


async def test_429_knob_rejects_the_first_upgrades() -> None:
    broker = SimulatedBroker(config(orders=5, chaos=ChaosConfig(reject_429_connects=2)))
    with trio.fail_after(5):
        async with running(broker) as server:
            for _ in range(2):
                with pytest.raises(ConnectionRejected) as rejected:
                    async with ws_client(server):
                        pass
                assert rejected.value.status_code == 429
            async with ws_client(server) as ws:
                await login(ws)
    assert broker.stats["rejected_429"] == 2


async def test_429_knob_rejects_upgrades_for_a_while() -> None:
    broker = SimulatedBroker(config(orders=5, chaos=ChaosConfig(reject_429_for=0.3)))
    with trio.fail_after(5):
        async with running(broker) as server:
            with pytest.raises(ConnectionRejected) as rejected:
                async with ws_client(server):
                    pass
            assert rejected.value.status_code == 429
            await trio.sleep(0.35)
            async with ws_client(server) as ws:
                await login(ws)
    assert broker.stats["rejected_429"] == 1


async def test_duplicate_knob_sends_bursts() -> None:
    knobs = ChaosConfig(duplicate_prob=1.0, duplicate_burst=3)
    broker = SimulatedBroker(config(seed=3, orders=5, rate=0, chaos=knobs))
    with trio.fail_after(10):
        async with running(broker) as server, ws_client(server) as ws:
            await login(ws)
            await broker.run_market()
            frames = await receive_updates(ws, 3 * broker.updates_total)
    for i in range(broker.updates_total):
        assert frames[3 * i] == frames[3 * i + 1] == frames[3 * i + 2] == broker.frame(i)
    assert (
        broker.stats["dup_frames"] == 2 * broker.stats["update_frames"] == 2 * broker.updates_total
    )


@pytest.mark.parametrize(
    ("knobs", "expected_frames", "close_code"),
    [
        (ChaosConfig(disconnect_every=5), 5, 1000),
        (ChaosConfig(disconnect_at=(2,)), 3, 1000),
        (ChaosConfig(disconnect_at=(3,), abrupt_prob=1.0), 4, 1006),
    ],
)
async def test_disconnect_knobs_close_the_socket(
    knobs: ChaosConfig, expected_frames: int, close_code: int
) -> None:
    broker = SimulatedBroker(config(seed=3, orders=10, rate=0, chaos=knobs))
    with trio.fail_after(10):
        async with running(broker) as server:
            async with ws_client(server) as ws:
                await login(ws)
                await broker.run_market()
                got = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        got.append(await ws.get_message())
            assert closed.value.reason is not None and closed.value.reason.code == close_code
            assert got == [broker.frame(i) for i in range(expected_frames)]
            assert broker.stats["disconnects"] == 1
            while broker.session_active:
                await trio.sleep(0.01)
            # Reconnect: live only, so nothing from before comes again.
            async with ws_client(server) as ws:
                await login(ws)
                with trio.move_on_after(0.1):
                    await ws.get_message()
                    pytest.fail("an old update was replayed")
    truth = broker.ground_truth()
    assert truth["updates_played"] == expected_frames
    assert broker.stats["abrupt_disconnects"] == (1 if close_code == 1006 else 0)


async def test_stall_stops_answering_pings_then_resets() -> None:
    knobs = ChaosConfig(stall_prob=1.0, stall_seconds=0.5)
    broker = SimulatedBroker(config(seed=3, orders=3, rate=0, chaos=knobs))
    with trio.fail_after(10):
        async with running(broker) as server, ws_client(server) as ws:
            await login(ws)
            await ws.ping(b"before")  # answered: no stall yet
            await broker.run_market()
            while not broker.stats["stalls"]:
                await trio.sleep(0.01)
            with trio.move_on_after(0.2) as no_pong:
                await ws.ping(b"during")
            assert no_pong.cancelled_caught
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 1006
    assert broker.stats["update_frames"] == 0


async def test_rest_over_http() -> None:
    broker = SimulatedBroker(config(seed=8, orders=30, rate=0))
    play_all(broker)
    with trio.fail_after(10):
        async with (
            running(broker) as server,
            httpx.AsyncClient(base_url=server.rest_url, headers=AUTH) as client,
        ):
            account = await client.get("/v2/account")
            assert account.status_code == 200
            assert account.headers["content-type"] == "application/json"
            assert account.json()["id"] == broker.account_id

            got: list[dict[str, Any]] = []
            token = None
            requests = 0
            while True:
                requests += 1
                params: dict[str, Any] = {"direction": "asc", "page_size": 10}
                if token:
                    params["page_token"] = token
                page = (await client.get("/v2/account/activities/FILL", params=params)).json()
                if not page:
                    break
                got.extend(page)
                token = page[-1]["id"]
            assert got == all_activities(broker)
            after = got[5]["transaction_time"]
            page = (await client.get("/v2/account/activities/FILL", params={"after": after})).json()
            assert page == broker.fill_activities(after=after)

            orders = (await client.get("/v2/orders", params={"status": "all", "limit": 500})).json()
            assert len(orders) == 30
            one = await client.get(f"/v2/orders/{orders[0]['id']}")
            assert one.json() == orders[0]
            assert (await client.get("/v2/orders/unknown")).status_code == 404
            assert (await client.get("/v2/positions")).json() == broker.positions()
            assert (await client.get("/v2/nope")).status_code == 404
            assert (await client.get("/v2/orders", params={"status": "weird"})).status_code == 422

            anonymous = await client.get("/v2/account", headers={"APCA-API-SECRET-KEY": "wrong"})
            assert anonymous.status_code == 401
            assert anonymous.json() == {"code": 40110000, "message": "request is not authorized"}
            assert "SIMSECRET" not in anonymous.text
    assert broker.stats["rest_401"] == 1
    assert broker.stats["activity_requests"] == requests + 1


async def test_rest_chaos_knobs() -> None:
    knobs = ChaosConfig(
        rest_429_prob=0.4, rest_error_prob=0.2, rest_retry_after=2.0, rest_short_pages=True
    )
    broker = SimulatedBroker(config(seed=8, orders=40, rate=0, chaos=knobs))
    play_all(broker)
    statuses: dict[int, int] = defaultdict(int)
    got: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with (
            running(broker) as server,
            httpx.AsyncClient(base_url=server.rest_url, headers=AUTH) as client,
        ):
            token = None
            while True:
                params: dict[str, Any] = {"page_size": 50}
                if token:
                    params["page_token"] = token
                r = await client.get("/v2/account/activities/FILL", params=params)
                statuses[r.status_code] += 1
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "2"
                    continue
                if r.status_code == 500:
                    continue
                page = r.json()
                if not page:
                    break
                assert len(page) < 50
                got.extend(page)
                token = page[-1]["id"]
    assert got == all_activities(broker)
    assert statuses[429] and statuses[500] and statuses[200]
    assert broker.stats["rest_faults"] == statuses[429] + statuses[500]


async def test_outage_after_a_disconnect_refuses_reconnects_for_a_while() -> None:
    """Alpaca holds a dropped session for a while and answers the reconnect with 429: the
    updates of that outage reach a client only through REST."""
    knobs = ChaosConfig(disconnect_at=(1,), outage_after_disconnect=0.5)
    broker = SimulatedBroker(config(seed=3, orders=10, rate=0, chaos=knobs))
    with trio.fail_after(10):
        async with running(broker) as server:
            async with ws_client(server) as ws:
                await login(ws)
                await broker.run_market()
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            dropped_at = trio.current_time()
            while broker.session_active:
                await trio.sleep(0.01)
            with pytest.raises(ConnectionRejected) as rejected:
                async with ws_client(server):
                    pass
            assert rejected.value.status_code == 429
            await trio.sleep_until(dropped_at + 0.55)
            async with ws_client(server) as ws:
                await login(ws)
    assert broker.stats["rejected_429"] == 1
