"""Replicas sharing thirty accounts (docs/design.md, section 11), as real processes:
three `stream-supervisor run` processes on one accounts file, thirty simulated brokers on
loopback, one PostgreSQL. One replica is SIGKILLed mid-market and another joins later;
every account's database ends exactly as its broker says, and PostgreSQL's own lock
table, sampled throughout, never shows an account's writer lock held twice, and shows
every account led again after the kill and after the join.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import psycopg
import pytest
import trio

from stream_supervisor.pgstore import LEADER_LOCK_PREFIX
from stream_supervisor.testing.broker import SimConfig, SimServer, SimulatedBroker, serve
from stream_supervisor.testing.verify import summarize

from .harness import FAST_REST_LIMIT, PROCESS_DRAIN_TIMEOUT, SupervisorProcess, try_verify

pytestmark = pytest.mark.chaos

ACCOUNTS = 30
START_TIMEOUT = 90.0  # cold interpreters on a busy 2-core machine

#: Every account's writer lock as pg_locks shows it (an advisory lock on a bigint key
#: has classid = high 32 bits, objid = low 32 bits), with the session's application name.
_HOLDERS = """
WITH keys AS (
    SELECT k.account_id, hashtextextended(%s || k.account_id, 0) AS key
      FROM unnest(%s::text[]) AS k(account_id)
)
SELECT k.account_id, l.pid, a.application_name
  FROM keys k
  JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.classid = ((k.key >> 32) & x'FFFFFFFF'::bigint)::oid
   AND l.objid = (k.key & x'FFFFFFFF'::bigint)::oid
  JOIN pg_stat_activity a ON a.pid = l.pid
"""


class LockWatch:
    """Samples the account locks from pg_locks; records any account held twice."""

    def __init__(self, database_url: str, account_ids: list[str]) -> None:
        self.database_url = database_url
        self.account_ids = account_ids
        self.samples = 0
        self.doubled: list[str] = []
        self.latest: dict[str, list[str]] = {}

    def sample(self) -> dict[str, list[str]]:
        with psycopg.connect(self.database_url, autocommit=True,
                             application_name="chaos-observer") as conn:
            rows = conn.execute(_HOLDERS, [LEADER_LOCK_PREFIX, self.account_ids]).fetchall()
        holders: dict[str, list[str]] = {}
        for account, _pid, app in rows:
            holders.setdefault(str(account), []).append(str(app))
        return holders

    async def run(self) -> None:
        while True:
            holders = await trio.to_thread.run_sync(self.sample)
            self.samples += 1
            for account, apps in holders.items():
                if len(apps) > 1:
                    self.doubled.append(f"{account}: {apps}")
            self.latest = holders
            await trio.sleep(0.05)

    def per_replica(self) -> Counter[str]:
        return Counter(apps[0] for apps in self.latest.values())

    async def wait(self, ok: object, *, timeout: float, what: str) -> float:
        started = trio.current_time()
        with trio.fail_after(timeout):
            while not callable(ok) or not ok():
                await trio.sleep(0.05)
        return trio.current_time() - started


def _env(database_url: str, accounts_file: Path, creds: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APCA_", "STREAM_SUPERVISOR_")) and k != "DATABASE_URL"}
    env.update(creds)
    env.update({
        "DATABASE_URL": database_url,
        "STREAM_SUPERVISOR_ACCOUNTS_FILE": str(accounts_file),
        "PYTHONUNBUFFERED": "1",
        "STREAM_SUPERVISOR_LOG_FORMAT": "json",
        "STREAM_SUPERVISOR_LOG_LEVEL": "info",
        "STREAM_SUPERVISOR_BACKOFF_INITIAL": "0.05",
        "STREAM_SUPERVISOR_BACKOFF_CAP": "0.5",
        "STREAM_SUPERVISOR_BACKOFF_429_FLOOR": "0.2",
        "STREAM_SUPERVISOR_PING_INTERVAL": "1",
        "STREAM_SUPERVISOR_PING_TIMEOUT": "1",
        "STREAM_SUPERVISOR_DRAIN_TIMEOUT": str(PROCESS_DRAIN_TIMEOUT),
        "STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "3600",
        "STREAM_SUPERVISOR_STATEMENT_TIMEOUT_MS": "5000",
    })
    return env


async def test_three_replicas_share_thirty_accounts_through_a_kill_and_a_join(
    database_url: str, tmp_path: Path
) -> None:
    brokers = [SimulatedBroker(SimConfig(seed=1800 + i, key_id=f"RKEY{i:02d}",
                                         secret_key=f"RSECRET-{i:02d}-x", orders=24, rate=8.0,
                                         scenario="replica-fleet",
                                         rest_rate_limit=FAST_REST_LIMIT))
               for i in range(ACCOUNTS)]
    account_ids = [b.account_id for b in brokers]
    watch = LockWatch(database_url, account_ids)
    with trio.fail_after(400):
        async with trio.open_nursery() as nursery:
            servers: list[SimServer] = [await nursery.start(serve, b) for b in brokers]
            lines, creds = [], {}
            for i, (broker, server) in enumerate(zip(brokers, servers, strict=True)):
                creds[f"R_KEY_{i}"] = broker.config.key_id
                creds[f"R_SECRET_{i}"] = broker.config.secret_key
                lines += [f"[accounts.a{i:02d}]", f'key_id_env = "R_KEY_{i}"',
                          f'secret_key_env = "R_SECRET_{i}"', f'base_url = "{server.rest_url}"',
                          f'stream_url = "{server.ws_url}"', ""]
            accounts_file = tmp_path / "accounts.toml"
            accounts_file.write_text("\n".join(lines))
            env = _env(database_url, accounts_file, creds)
            nursery.start_soon(watch.run)

            def all_led() -> bool:
                return len(watch.latest) == ACCOUNTS

            def shared_by(n: int) -> bool:
                counts = watch.per_replica()
                return all_led() and len(counts) == n and max(counts.values()) <= -(-ACCOUNTS // n)

            async with (SupervisorProcess(env, nursery, name="replica a") as a,
                        SupervisorProcess(env, nursery, name="replica b") as b,
                        SupervisorProcess(env, nursery, name="replica c") as c):
                await watch.wait(lambda: shared_by(3), timeout=START_TIMEOUT, what="3 share")
                start_counts = watch.per_replica()
                for broker in brokers:
                    nursery.start_soon(broker.run_market)
                await trio.sleep(2.0)

                b.kill()
                assert await b.wait(timeout=10) == -signal.SIGKILL
                takeover = await watch.wait(lambda: shared_by(2), timeout=60, what="takeover")
                after_kill = watch.per_replica()

                async with SupervisorProcess(env, nursery, name="replica d") as d:
                    await watch.wait(lambda: shared_by(3), timeout=START_TIMEOUT, what="join")
                    after_join = watch.per_replica()
                    pending = dict(zip(account_ids, brokers, strict=True))
                    with trio.move_on_after(150):
                        while pending:
                            await trio.sleep(0.5)
                            for account, broker in list(pending.items()):
                                if broker.finished and await try_verify(
                                        database_url, broker, strict_prices=True) == []:
                                    del pending[account]
                    for p in (a, c, d):
                        p.terminate()
                    codes = [await p.wait(timeout=PROCESS_DRAIN_TIMEOUT + 20) for p in (a, c, d)]
                    tails = "\n".join(p.tail(15) for p in (a, c, d))
            nursery.cancel_scope.cancel()

    mismatched = {}
    for broker in brokers:
        found = await try_verify(database_url, broker, strict_prices=True)
        if found or not broker.finished:
            mismatched[broker.account_id] = summarize(found or [])
    report = (f"start {dict(start_counts)}, after kill {dict(after_kill)} "
              f"(takeover {takeover:.2f}s), after join {dict(after_join)}, "
              f"{watch.samples} lock samples")
    print(report)
    assert watch.samples > 50
    assert watch.doubled == [], watch.doubled[:5]
    assert not mismatched, report + "\n" + str(mismatched) + "\n" + tails
    assert codes == [0, 0, 0], report + "\n" + tails
    # Each live replica led its share (ceil(30/3) = 10 at most) once the set settled.
    assert sorted(after_join.values()) == [10, 10, 10], report
