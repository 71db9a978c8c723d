"""An update older than the connection (a replay) forwarded after the reconnect's order
refresh: the real supervisor on a loopback WebSocket and real PostgreSQL.

The broker replays an order's `pending_cancel` on connect, and never sends the
`canceled` that followed it (it came while we were away, or with a recovery's live buffer
that was let go). The reconnect refresh ran before the replay left the live buffer and
knew nothing of the order; only REST can tell it ended (docs/design.md, section 12).
Chaos seed 60 of tests/chaos/test_broker_faults.py met this at random.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from stream_supervisor.protocol import WireOrder, decode_order
from stream_supervisor.settings import Settings
from stream_supervisor.supervisor import Supervisor

from .replay import KEY_ID, SECRET_KEY, FixtureRest, ReplayServer, Script, stored, supervising

ACCOUNT = "acct-stale-replay"
ORDER_ID = "7d1c2b3a-0000-4000-8000-00000000c001"


def _order(status: str, updated_at: str, **extra: Any) -> dict[str, Any]:
    return {"id": ORDER_ID, "client_order_id": "c-stale-1", "symbol": "AAPL", "side": "buy",
            "status": status, "qty": "5", "filled_qty": "0", "filled_avg_price": None,
            "order_type": "limit", "type": "limit", "asset_class": "us_equity",
            "created_at": "2026-11-23T15:00:00.000000Z", "updated_at": updated_at,
            **extra}


def _update(event: str, at: str, order_id: str = ORDER_ID) -> bytes:
    data = {"event": event, "execution_id": f"5a1f0c3e-0000-4000-8000-{order_id[-12:]}",
            "order": {**_order(event, at), "id": order_id},
            "timestamp": at.replace("Z", "000Z")}
    return json.dumps({"stream": "trade_updates", "data": data}).encode()


def _replayed_pending_cancel() -> bytes:
    return _update("pending_cancel", "2026-11-23T15:00:02.000000Z")


class CanceledAtBroker(FixtureRest):
    """The broker's books: the order ended `canceled` a moment after the replayed update."""

    def __init__(self) -> None:
        super().__init__(ACCOUNT)
        self.snapshot = decode_order(json.dumps(_order(
            "canceled", "2026-11-23T15:00:03.000000Z",
            canceled_at="2026-11-23T15:00:03.000000Z")).encode())
        self.order_reads = 0

    async def fill_activities(self, *, after: str | None, page_token: str | None,
                              page_size: int = 100) -> list[Any]:
        # A REST round trip: the replay, sent on connect, reaches the live buffer while
        # recovery reads, as it does against the broker.
        await trio.sleep(0.5)
        return await super().fill_activities(after=after, page_token=page_token,
                                             page_size=page_size)

    async def order(self, order_id: str) -> WireOrder | None:
        self.order_reads += 1
        return self.snapshot if order_id == ORDER_ID else None

    async def orders_since(self, *, after: str, limit: int = 500) -> list[WireOrder]:
        return [self.snapshot] if after < (self.snapshot.created_at or "") else []


async def _stored_status(database_url: str) -> str | None:
    found = (await stored(database_url, ACCOUNT)).orders.get(ORDER_ID)
    return None if found is None else found.status


def _settings(server: ReplayServer, database_url: str) -> Settings:
    return Settings(
        key_id=KEY_ID, secret_key=SECRET_KEY, base_url="http://127.0.0.1:9",
        stream_url=server.url, database_url=database_url, account_id=ACCOUNT,
        first_start_lookback=3600.0, drain_timeout=5.0, baseline=False,
        # Far beyond the test: the periodic refresh must not be what repairs it.
        order_refresh_interval=3600.0,
    )


@asynccontextmanager
async def _running(server: ReplayServer, rest: FixtureRest,
                   database_url: str) -> AsyncIterator[Supervisor]:
    """The server and the supervisor running; drained and stopped on leaving."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        async with supervising(_settings(server, database_url), rest) as sup:
            yield sup
        nursery.cancel_scope.cancel()


async def test_a_replayed_update_after_the_refresh_is_read_again(database_url: str) -> None:
    server = ReplayServer(Script([_replayed_pending_cancel()]))
    rest = CanceledAtBroker()
    statuses: list[str | None] = []
    with trio.fail_after(30):
        async with _running(server, rest, database_url) as sup:
            # The replay is stored; nothing more comes on the stream.
            while not (server.done.is_set() and sup.state.caught_up
                       and sup.state.committed_events >= 1):
                await trio.sleep(0.05)
            with trio.move_on_after(10):
                while (status := await _stored_status(database_url)) != "canceled":
                    statuses.append(status)
                    await trio.sleep(0.1)
    assert await _stored_status(database_url) == "canceled", statuses
    assert rest.order_reads >= 1


async def test_live_updates_from_a_broker_clock_behind_ours_are_not_read_again(
        database_url: str) -> None:
    """Only what reached the buffer while recovery read can be a replay: live updates
    stamped half a minute before we see them (a broker clock behind ours) cost no REST
    read each, whatever their stamps."""
    gate = trio.Event()
    behind = datetime.now(UTC) - timedelta(seconds=30)
    orders = [f"7d1c2b3a-0000-4000-8000-0000000{n:05d}" for n in range(3)]
    frames = [_update("new", (behind + timedelta(milliseconds=n)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"), order_id) for n, order_id in enumerate(orders)]
    server = ReplayServer(Script(frames, start=gate))
    rest = CanceledAtBroker()
    with trio.fail_after(30):
        async with _running(server, rest, database_url) as sup:
            while not sup.state.caught_up:
                await trio.sleep(0.05)
            gate.set()  # recovery is done: the broker starts trading
            while sup.state.committed_events < len(frames):
                await trio.sleep(0.05)
            await trio.sleep(0.5)
    assert rest.order_reads == 0


class SlowOrderReads(CanceledAtBroker):
    """The same books, with each order read waiting for `release`: the recovery's paced
    share of the REST budget, which a fleet's start or a busy bot can make seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = trio.Event()
        self.release = trio.Event()

    async def order(self, order_id: str) -> WireOrder | None:
        self.reading.set()
        await self.release.wait()
        return await super().order(order_id)

    async def orders_since(self, *, after: str, limit: int = 500) -> list[WireOrder]:
        self.reading.set()
        await self.release.wait()
        return await super().orders_since(after=after, limit=limit)


async def test_live_updates_are_not_held_behind_the_read_of_a_replayed_order(
        database_url: str) -> None:
    """The replayed order's read waits (the REST budget); a live update that comes
    meanwhile is committed before the read returns, and the read still repairs the
    replayed order once it does."""
    gate = trio.Event()
    live = _update("new", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                   "7d1c2b3a-0000-4000-8000-00000000c002")
    server = ReplayServer(Script([_replayed_pending_cancel(), live],
                                 pause_after={0: gate.wait}))
    rest = SlowOrderReads()
    with trio.fail_after(30):
        async with _running(server, rest, database_url) as sup:
            await rest.reading.wait()  # the replayed order is being read again
            gate.set()  # the broker sends a live update
            with trio.move_on_after(10) as held:
                while sup.state.committed_events < 2:
                    await trio.sleep(0.05)
            assert not held.cancelled_caught, "the live update waited for the read"
            assert not rest.release.is_set() and rest.order_reads == 0
            rest.release.set()
            while await _stored_status(database_url) != "canceled":
                await trio.sleep(0.1)
    assert rest.order_reads >= 1
