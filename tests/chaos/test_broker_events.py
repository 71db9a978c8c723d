"""The Broker API events stream end to end (docs/design.md, section 11): a simulated
partner with a dozen accounts on one Server-Sent Events stream that disconnects, drops
messages for a slow reader, sends history twice, goes silent and busts and corrects
fills; the service, through the accounts file's `source = "broker-events"`, the real SSE
client on a loopback socket and PostgreSQL, ends with every account's orders and
positions equal to the partner's books.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio

from stream_supervisor.accounts import parse_accounts
from stream_supervisor.fleet import Fleet
from stream_supervisor.supervisor import EXIT_OK
from stream_supervisor.testing.broker import SimConfig, SimulatedBroker
from stream_supervisor.testing.broker.partner import PartnerChaos, PartnerFeed
from stream_supervisor.testing.verify import Mismatch, summarize, verify_against_truth
from stream_supervisor.wiring import account_opener

from .harness import FAST_REST_LIMIT, chaos_settings, snapshot

pytestmark = pytest.mark.chaos

ACCOUNTS = 12


async def _mismatches(database_url: str, partner: PartnerFeed,
                      account: str) -> list[Mismatch]:
    snap = await snapshot(database_url, account)
    # Per-symbol prices depend on the order fills of different orders were applied in,
    # and a bust changes them in ways a partner's books do not restate: quantities and
    # each order's figures are exact.
    return verify_against_truth(snap, partner.ground_truth(account), strict_prices=False)


async def run_partner(database_url: str, chaos: PartnerChaos, *, seed: int,
                      orders: int = 10) -> tuple[PartnerFeed, dict[str, str], list[int], Any]:
    brokers = [SimulatedBroker(SimConfig(seed=seed + i, orders=orders, rate=20.0,
                                         scenario="broker-events",
                                         rest_rate_limit=FAST_REST_LIMIT))
               for i in range(ACCOUNTS)]
    partner = PartnerFeed(brokers, chaos=chaos, seed=seed)
    codes: list[int] = []
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partner.serve)
            env = {"PARTNER_KEY": partner.key_id, "PARTNER_SECRET": partner.secret_key}
            specs = parse_accounts({"accounts": {"partner": {
                "key_id_env": "PARTNER_KEY", "secret_key_env": "PARTNER_SECRET",
                "base_url": url, "source": "broker-events"}}}, env)
            fleet = Fleet(chaos_settings(database_url), specs, account_opener(),
                          install_signal_handlers=False)

            async def run_fleet() -> None:
                codes.append(await fleet.run())

            nursery.start_soon(run_fleet)
            state = fleet.accounts["partner"].state
            with trio.fail_after(30):
                while state.connection != "streaming":
                    await trio.sleep(0.05)
            for broker in brokers:
                nursery.start_soon(broker.run_market)
            pending = set(partner.brokers)
            left: dict[str, str] = {}
            with trio.move_on_after(150):
                while pending:
                    await trio.sleep(0.5)
                    for account in list(pending):
                        if partner.brokers[account].finished and not await _mismatches(
                                database_url, partner, account):
                            pending.discard(account)
            for account in pending:
                left[account] = summarize(await _mismatches(database_url, partner, account))
            readiness = fleet.readiness()
            fleet.request_drain("test finished")
            with trio.fail_after(30):
                while not codes:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    return partner, left, codes, readiness


async def test_the_events_stream_survives_drops_disconnects_replays_and_busts(
        database_url: str) -> None:
    chaos = PartnerChaos(disconnect_every=150, drop_prob=0.01, drop_max=4, replay_prob=0.05,
                         bust_prob=0.3, correct_prob=0.2, heartbeat_every=0.3)
    partner, left, codes, readiness = await run_partner(database_url, chaos, seed=1900)
    stats = partner.stats
    print(stats)
    assert left == {}, f"{stats}\n{left}"
    assert codes == [EXIT_OK]
    assert readiness["failed"] == {}
    # Every fault happened.
    assert stats["busts"] > 0 and stats["corrections"] > 0, stats
    assert stats["dropped"] > 0 and stats["disconnects"] > 0 and stats["replayed"] > 0, stats
    with psycopg.connect(database_url) as conn:
        position = conn.execute("SELECT event_id FROM event_stream_positions "
                                "WHERE stream = 'partner'").fetchone()
    assert position is not None and position[0] in partner.ids


async def test_a_silent_connection_is_dead_after_the_heartbeat_deadline(
        database_url: str) -> None:
    # Every 60 new events the partner goes quiet on that connection, heartbeats too:
    # only the client's deadline ends it, and the reconnect resumes from the position.
    chaos = PartnerChaos(silent_every=60, heartbeat_every=0.3)
    partner, left, codes, _ = await run_partner(database_url, chaos, seed=1950, orders=6)
    assert left == {}, f"{partner.stats}\n{left}"
    assert partner.stats["silenced"] > 0 and partner.stats["connections"] > 1
    assert codes == [EXIT_OK]
