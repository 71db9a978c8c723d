"""An update racing the `listening` reply (docs/design.md, section 2): the real supervisor
on a loopback WebSocket and real PostgreSQL.

It waits in the live buffer for recovery, as every update read while recovery runs does.
Forwarded at once, ahead of the backfill, a fill of *now* could be committed first and
move the cursor past fills REST had not brought back yet: after a recovery that failed,
the next one started from that fill's time less the overlap, and a fill of the outage
older than that was never read again.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import trio

from stream_supervisor.backoff import BackoffPolicy
from stream_supervisor.errors import BrokerUnavailable
from stream_supervisor.protocol import WireActivity
from stream_supervisor.recovery import EASTERN
from stream_supervisor.settings import Settings

from .replay import KEY_ID, SECRET_KEY, FixtureRest, ReplayServer, Script, stored, supervising

ACCOUNT = "acct-listen-race"


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fill_frame(order_id: str, symbol: str, qty: str, price: str, at: datetime) -> bytes:
    order = {"id": order_id, "client_order_id": f"c-{order_id}", "symbol": symbol,
             "side": "buy", "qty": qty, "filled_qty": qty, "filled_avg_price": price,
             "status": "filled", "order_type": "market", "type": "market",
             "asset_class": "us_equity", "created_at": _stamp(at), "updated_at": _stamp(at)}
    return json.dumps({"stream": "trade_updates", "data": {
        "event": "fill", "order": order, "timestamp": _stamp(at), "qty": qty,
        "price": price, "position_qty": qty}}).encode()


def _activity(order_id: str, symbol: str, qty: str, price: str, at: datetime) -> WireActivity:
    eastern = at.astimezone(EASTERN)
    return WireActivity(
        id=f"{eastern:%Y%m%d%H%M%S}{eastern.microsecond // 1000:03d}::{order_id}",
        order_id=order_id, symbol=symbol, side="buy", price=Decimal(price),
        qty=Decimal(qty), cum_qty=Decimal(qty), transaction_time=_stamp(at),
        order_status="filled")


class RefusedOnce(FixtureRest):
    """The broker's books, whose first FILL activities read is refused (a 429 storm that
    outlasts the retries): the first recovery fails."""

    def __init__(self, activities: list[WireActivity]) -> None:
        super().__init__(ACCOUNT, activities)
        self.refusals = 1

    async def fill_activities(self, *, after: str | None, page_token: str | None,
                              page_size: int = 100) -> list[Any]:
        if self.refusals:
            self.refusals -= 1
            raise BrokerUnavailable("broker REST failed after 9 attempts: HTTP 429")
        return await super().fill_activities(after=after, page_token=page_token,
                                             page_size=page_size)


async def _net(database_url: str) -> dict[str, Decimal]:
    snap = await stored(database_url, ACCOUNT)
    return {p.symbol: p.qty for p in snap.positions if p.is_open}


async def test_a_fill_racing_listening_waits_for_the_backfill(database_url: str) -> None:
    now = datetime.now(UTC)
    outage = now - timedelta(minutes=9)  # never streamed: only REST has it
    racing = now - timedelta(seconds=1)  # sent before `listening` on the first connection
    server = ReplayServer(Script([], before_listening={
        0: [_fill_frame("order-racing", "MSFT", "3", "200", racing)]}))
    rest = RefusedOnce([_activity("order-outage", "AAPL", "5", "100", outage),
                        _activity("order-racing", "MSFT", "3", "200", racing)])
    held: dict[str, Decimal] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        settings = Settings(
            key_id=KEY_ID, secret_key=SECRET_KEY, base_url="http://127.0.0.1:9",
            stream_url=server.url, database_url=database_url, account_id=ACCOUNT,
            first_start_lookback=3600.0, drain_timeout=5.0, baseline=False,
            backoff=BackoffPolicy(initial=0.2, cap=0.5))
        with trio.fail_after(60):
            async with supervising(settings, rest) as sup:
                # Two connections (the first one's recovery refused), then caught up.
                with trio.move_on_after(20):
                    while not (server.connections >= 2 and sup.state.caught_up
                               and len(held := await _net(database_url)) == 2):
                        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert server.connections >= 2 and rest.refusals == 0
    assert held == {"AAPL": Decimal(5), "MSFT": Decimal(3)}
