"""Fifty accounts in one process (docs/design.md, section 11): fifty simulated brokers on
loopback, one fleet of supervisors, one PostgreSQL. One account has bad credentials, one
is fed poison frames; the other 48 end exactly as their brokers say, and the two are
reported by name in the fleet's readiness, its metrics and its logs.
"""

from __future__ import annotations

import random
from dataclasses import replace

import psycopg
import pytest
import trio

from stream_supervisor.accounts import parse_accounts
from stream_supervisor.fleet import Fleet
from stream_supervisor.supervisor import EXIT_CONFIG, EXIT_OK
from stream_supervisor.testing.broker import (
    ChaosConfig,
    SimConfig,
    SimServer,
    SimulatedBroker,
    serve,
)
from stream_supervisor.testing.verify import summarize
from stream_supervisor.wiring import account_opener
from stream_supervisor.wsclient import websocket_connector

from .harness import DISCONNECT_TIMEOUT, FAST_REST_LIMIT, chaos_settings, try_verify

pytestmark = pytest.mark.chaos

ACCOUNTS = 50
BAD = "acct-07-badcreds"
POISONED = "acct-23-poisoned"


def _name(i: int) -> str:
    return {7: BAD, 23: POISONED}.get(i, f"acct-{i:02d}")


async def test_fifty_accounts_in_one_process_one_bad_one_poisoned(database_url: str) -> None:
    configs = [
        SimConfig(seed=1700 + i, key_id=f"KEY{i:02d}x",
                  secret_key=f"SECRET-{i:02d}-{random.Random(i).getrandbits(32):08x}",
                  orders=10, rate=25.0, scenario="many-accounts",
                  rest_rate_limit=FAST_REST_LIMIT,
                  chaos=ChaosConfig(duplicate_prob=0.1, disconnect_prob=0.02,
                                    poison_prob=0.3 if _name(i) == POISONED else 0.0))
        for i in range(ACCOUNTS)
    ]
    brokers = [SimulatedBroker(c) for c in configs]
    # The database refuses the poison symbol, as an operator's CHECK might.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE broker_orders ADD CONSTRAINT test_refuses_poison "
                     "CHECK (symbol <> 'POISON')")
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            servers: list[SimServer] = [await nursery.start(serve, b) for b in brokers]
            env: dict[str, str] = {}
            doc: dict[str, dict[str, object]] = {"accounts": {}}
            for i, (config, server) in enumerate(zip(configs, servers, strict=True)):
                name = _name(i)
                env[f"KEY_{i}"] = config.key_id
                env[f"SECRET_{i}"] = "wrong-secret-0000" if name == BAD else config.secret_key
                doc["accounts"][name] = {
                    "key_id_env": f"KEY_{i}", "secret_key_env": f"SECRET_{i}",
                    "base_url": server.rest_url, "stream_url": server.ws_url}
            specs = parse_accounts(doc, env)
            settings = replace(chaos_settings(database_url), restart_limit=5)
            opener = account_opener(connector=websocket_connector(
                connect_timeout=settings.connect_timeout, disconnect_timeout=DISCONNECT_TIMEOUT))
            fleet = Fleet(settings, specs, opener, install_signal_handlers=False)
            codes: list[int] = []

            async def run_fleet() -> None:
                codes.append(await fleet.run())

            nursery.start_soon(run_fleet)
            # Every account streaming before its market opens: updates go over the sockets.
            with trio.fail_after(60):
                while not all(r.state.connection == "streaming"
                              for n, r in fleet.accounts.items() if n != BAD):
                    await trio.sleep(0.1)
            for broker in brokers:
                nursery.start_soon(broker.run_market)
            good = [(n, b) for n, b in zip(map(_name, range(ACCOUNTS)), brokers, strict=True)
                    if n != BAD]
            pending = dict(good)
            with trio.move_on_after(180):
                while pending:
                    await trio.sleep(0.5)
                    for name, broker in list(pending.items()):
                        if broker.finished and await try_verify(
                                database_url, broker, strict_prices=True) == []:
                            del pending[name]
            readiness = fleet.readiness()
            exposition = fleet.registry.collect()
            fleet.request_drain("test finished")
            with trio.fail_after(30):
                while not codes:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    # The 48 (and the poisoned one, whose poison was dead-lettered) match their broker.
    mismatched = {}
    for name, broker in good:
        found = await try_verify(database_url, broker, strict_prices=True)
        if found:
            mismatched[name] = summarize(found)
    assert not mismatched, mismatched
    assert sorted(pending) == [], pending

    # The bad one is reported by name, with the variable to fix; it wrote nothing.
    failed = readiness["failed"]
    assert list(failed) == [BAD], failed
    assert "SECRET_7" in failed[BAD] and "wrong-secret" not in str(readiness)
    assert readiness["accounts"][BAD]["status"] == "failed"
    assert fleet.accounts[BAD].exit_code == EXIT_CONFIG
    # The poisoned one kept streaming, and says so under its name.
    poisoned = readiness["accounts"][POISONED]
    assert poisoned["status"] == "running" and poisoned["dead_letters"] > 0, (
        poisoned, brokers[23].ground_truth()["injected"], brokers[23].poisons_sent)
    assert all(a["dead_letters"] == 0 for n, a in readiness["accounts"].items()
               if n != POISONED)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT account_id, count(*) FROM dead_letters "
                            "GROUP BY account_id").fetchall()
        bad_rows = conn.execute("SELECT count(*) FROM alpaca_event_dedupe WHERE account_id = %s",
                                [brokers[7].account_id]).fetchone()
    assert {r[0] for r in rows} == {brokers[23].account_id}
    assert bad_rows == (0,)
    # Metrics are labelled by account name.
    labels = {s.labels.get("account") for m in exposition for s in m.samples
              if s.name == "stream_supervisor_dead_letters_total" and s.value > 0}
    assert labels == {POISONED}
    assert codes == [EXIT_OK]
