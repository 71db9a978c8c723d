"""The official SDK's models (alpaca-py) parse every frame and REST body the simulated
broker produces: trade updates (options, crypto, multi-leg orders with legs), orders,
positions, FILL and non-trade activities, assets and the account. The SDK is the closest
thing to the real broker that runs here (docs/design.md, section 10)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from stream_supervisor.testing.broker import SimConfig, SimulatedBroker

with warnings.catch_warnings():
    # alpaca-py's stream client imports websockets.legacy, deprecated upstream.
    warnings.simplefilter("ignore", DeprecationWarning)
    from alpaca.trading.models import (
        Asset,
        NonTradeActivity,
        Order,
        Position,
        TradeAccount,
        TradeActivity,
        TradeUpdate,
    )

HEADERS = {"apca-api-key-id": "SIMKEY", "apca-api-secret-key": "SIMSECRET"}


def _played(seed: int, *, asset_mix: bool) -> SimulatedBroker:
    broker = SimulatedBroker(SimConfig(seed=seed, orders=80, rate=0, asset_mix=asset_mix,
                                       activity_delay=0))
    while broker.step() is not None:
        pass
    return broker


def _get(broker: SimulatedBroker, target: str) -> Any:
    response = broker.rest("GET", target, HEADERS)
    assert response.status == 200, (target, response.status, response.body)
    return response.json()


@pytest.mark.parametrize("asset_mix", [False, True])
@pytest.mark.parametrize("seed", [5, 8])
def test_the_sdk_parses_everything_the_simulated_broker_says(seed: int, asset_mix: bool) -> None:
    broker = _played(seed, asset_mix=asset_mix)
    classes = set()
    for i in range(broker.updates_total):
        update = TradeUpdate(**json.loads(broker.frame(i))["data"])
        classes.add(update.order.asset_class)
    orders = [Order(**o) for o in _get(broker, "/v2/orders?status=all&limit=500&nested=true")]
    positions = [Position(**p) for p in _get(broker, "/v2/positions")]
    account = TradeAccount(**_get(broker, "/v2/account"))
    # The trading API's activities carry no account_id, which the SDK's models (shared
    # with the Broker API, where they do) require: it is the one field supplied here.
    fills = [TradeActivity(**{"account_id": str(account.id), **a})
             for a in _get(broker, "/v2/account/activities/FILL?page_size=100")]
    others = [NonTradeActivity(**{"account_id": str(account.id), **a})
              for a in _get(broker, "/v2/account/activities?activity_types="
                            "CFEE,OPEXP,OPASN,OPEXC,SPLIT&page_size=100")]
    symbols = {str(o.symbol) for o in orders if o.symbol}
    assets = [Asset(**_get(broker, f"/v2/assets/{s.replace('/', '%2F')}")) for s in symbols]
    assert orders and positions and fills and len(assets) == len(symbols)
    if asset_mix:
        assert {c.value for c in classes if c is not None} == {"us_equity", "us_option",
                                                                "crypto"}
        assert "CFEE" in {a.activity_type.value for a in others}
        assert any(o.legs for o in orders)
        assert {str(p.symbol) for p in positions} >= {"BTCUSD"}
    else:
        assert others == []
