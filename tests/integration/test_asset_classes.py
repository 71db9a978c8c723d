"""Crypto, options and the day's non-trade activities end to end: the real supervisor over
loopback HTTP and WebSocket against the simulated broker, into PostgreSQL; then `check`
and `reconcile` as an operator runs them (docs/design.md, section 10)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import trio

from stream_supervisor.activities import APPLIED
from stream_supervisor.check import run_checks
from stream_supervisor.demo import run_pipeline_against_sim
from stream_supervisor.pgstore import PgStore
from stream_supervisor.reconcile import reconcile
from stream_supervisor.settings import Settings
from stream_supervisor.testing.broker import SimConfig, SimulatedBroker, serve

SIM = SimConfig(seed=29, orders=60, rate=2000.0, asset_mix=True, activity_delay=0.5)


async def test_a_crypto_and_options_day_reconciles_with_no_tolerance(
        database_url: str, capsys: object) -> None:
    settings = Settings(database_url=database_url, drain_timeout=10.0, activity_interval=0.5)
    with trio.fail_after(150):
        result = await run_pipeline_against_sim(settings, SIM, timeout=120)
    assert result.mismatches == []
    store = PgStore(database_url)
    await store.open()
    try:
        broker = SimulatedBroker(SIM)
        snap = await store.snapshot(broker.account()["id"])
    finally:
        await store.aclose()
    types = {a.activity_type for a in snap.activities}
    assert {"CFEE", "SPLIT"} <= types and types & {"OPEXP", "OPASN"}
    assert all(a.outcome == APPLIED for a in snap.activities)
    crypto = [p for p in snap.positions if p.symbol == "BTC/USD" and p.is_open]
    assert crypto and crypto[0].qty != crypto[0].qty.to_integral_value()
    options = [p for p in snap.positions if p.multiplier == Decimal(100)]
    assert options and all(not p.is_open for p in options)
    assert run_checks(database_url) == []

    # The broker of that run, played to its end, answers reconcile over real HTTP: the
    # pair it calls BTCUSD, the fees taken, the shares an assignment delivered, the split.
    while broker.step() is not None:
        pass
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, broker)
        code = await reconcile(replace(
            settings, key_id=SIM.key_id, secret_key=SIM.secret_key, base_url=server.rest_url,
            account_id=broker.account()["id"]))
        nursery.cancel_scope.cancel()
    assert code == 0
