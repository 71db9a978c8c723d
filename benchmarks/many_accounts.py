#!/usr/bin/env python3
"""Benchmark: many accounts (docs/design.md, section 11), three figures in one run.

1. `--sse-accounts` (1,000) simulated accounts on one Broker API events stream, served by
   one `stream-supervisor run` process (accounts file, `source = "broker-events"`): the
   partner's whole history (every account's market played first) is read from the start,
   and the figure is aggregate updates per second from the first connection to the last
   update committed, with the process's peak RSS and RSS per account (peak minus the
   process's RSS once started, over the accounts).
2. `--ws-accounts` (50) accounts over as many WebSockets in one process: every account
   streaming, then every market played as fast as it can; updates per second until all
   are committed, peak RSS, RSS per account.
3. Takeover: 3 replica processes share `--replica-accounts` (30) accounts; one is
   SIGKILLed; the time until PostgreSQL's lock table shows every account's writer lock
   held again (by the survivors).

The supervisors run as child processes, so RSS is theirs alone (the simulators live in
this process). Every account is verified against its broker at the end of 1 and 2.

    python benchmarks/many_accounts.py                       # the figures in BENCHMARKS.md
    python benchmarks/many_accounts.py --sse-accounts 20 --ws-accounts 4 --replica-accounts 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg
import trio

from stream_supervisor.embedded import create_database, drop_database, start_embedded_postgres
from stream_supervisor.logs import configure_logging
from stream_supervisor.migrate import apply_migrations
from stream_supervisor.pgstore import LEADER_LOCK_PREFIX, PgStore
from stream_supervisor.testing.broker import SimConfig, SimServer, SimulatedBroker, serve
from stream_supervisor.testing.broker.partner import PartnerChaos, PartnerFeed
from stream_supervisor.testing.verify import verify_against_truth

OBSERVER = "bench-observer"
_LOCKS = """
WITH keys AS (SELECT hashtextextended(%s || a, 0) AS key FROM unnest(%s::text[]) AS t(a))
SELECT count(*) FROM keys k JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted
   AND l.objsubid = 1 AND l.classid = ((k.key >> 32) & x'FFFFFFFF'::bigint)::oid
   AND l.objid = (k.key & x'FFFFFFFF'::bigint)::oid
"""


class Child:
    """`python -m stream_supervisor run` with an accounts file; stdout kept, RSS read."""

    def __init__(self, env: dict[str, str], nursery: trio.Nursery) -> None:
        self.env = env
        self.nursery = nursery
        self.lines: list[str] = []
        self.process: trio.Process | None = None

    async def start(self) -> None:
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "stream_supervisor", "run"], env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process.stdout is not None
        self.nursery.start_soon(self._read, self.process.stdout)

    async def _read(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        try:
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                self.lines.extend(line.decode("utf-8", "replace") for line in lines)
        except BaseException:
            # A phase that fails (a wait timing out) cancels its nursery: its children
            # must not outlive it, still writing while the next phase runs.
            if self.process is not None and self.process.returncode is None:
                self.process.kill()
                with trio.CancelScope(shield=True):
                    await self.process.wait()
            raise

    def logged(self, event: str) -> bool:
        return any(f'"event": "{event}"' in line for line in self.lines)

    def last(self, event: str) -> dict[str, Any] | None:
        """The fields of the latest line logging `event`."""
        tag = f'"event": "{event}"'
        return next((json.loads(line) for line in reversed(self.lines) if tag in line), None)

    def rss(self, field: str = "VmRSS") -> int:
        """Bytes of the child's resident set (`VmHWM` for its peak)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.fail_after(60):
            return await self.process.wait()


def _env(database_url: str, accounts_file: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APCA_", "STREAM_SUPERVISOR_")) and k != "DATABASE_URL"}
    env.update(extra)
    env.update({"DATABASE_URL": database_url, "STREAM_SUPERVISOR_ACCOUNTS_FILE": str(accounts_file),
                "STREAM_SUPERVISOR_LOG_FORMAT": "json", "STREAM_SUPERVISOR_LOG_LEVEL": "info",
                "PYTHONUNBUFFERED": "1", "STREAM_SUPERVISOR_PING_INTERVAL": "5",
                "STREAM_SUPERVISOR_PING_TIMEOUT": "5", "STREAM_SUPERVISOR_DRAIN_TIMEOUT": "20",
                "STREAM_SUPERVISOR_FIRST_START_LOOKBACK": "3600",
                "STREAM_SUPERVISOR_BACKOFF_INITIAL": "0.05",
                "STREAM_SUPERVISOR_BACKOFF_CAP": "0.5"})
    return env


def _count(database_url: str, sql: str, params: list[Any]) -> int:
    with psycopg.connect(database_url, autocommit=True, application_name=OBSERVER) as conn:
        row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _holders(database_url: str, ids: list[str]) -> dict[str, int]:
    """Accounts whose writer lock each session's application name holds."""
    sql = _LOCKS.replace("SELECT count(*) FROM keys k", "SELECT a.application_name, count(*) "
                         "FROM keys k") + (" JOIN pg_stat_activity a ON a.pid = l.pid "
                                           "GROUP BY a.application_name")
    with psycopg.connect(database_url, autocommit=True, application_name=OBSERVER) as conn:
        return {str(r[0]): int(r[1]) for r in conn.execute(sql, [LEADER_LOCK_PREFIX, ids])}


async def _wait(predicate: Callable[[], bool], timeout: float, poll: float = 0.2) -> float:
    started = time.perf_counter()
    with trio.fail_after(timeout):  # a hang fails the benchmark instead of stalling it
        while not await trio.to_thread.run_sync(predicate):
            await trio.sleep(poll)
    return time.perf_counter() - started


async def _verify(database_url: str, accounts: list[str],
                  truth: Callable[[str], dict[str, Any]], strict: bool) -> list[str]:
    store = PgStore(database_url, application_name=OBSERVER)
    await store.open()
    problems: list[str] = []
    try:
        for account in accounts:
            found = verify_against_truth(await store.snapshot(account), truth(account),
                                         strict_prices=strict)
            problems += [f"{account}: {m}" for m in found[:3]]
    finally:
        await store.aclose()
    return problems


# ----------------------------------------------------------------- 1. the events stream


async def bench_sse(database_url: str, accounts: int, orders: int, tmp: Path) -> dict[str, Any]:
    brokers = [SimulatedBroker(SimConfig(seed=50_000 + i, orders=orders, rate=0.0,
                                         scenario="bench-sse")) for i in range(accounts)]
    partner = PartnerFeed(brokers, chaos=PartnerChaos(heartbeat_every=1.0), seed=5)
    async with trio.open_nursery() as nursery:
        for broker in brokers:  # the whole history first: the figure is the reader's
            nursery.start_soon(broker.run_market)
    url: str
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partner.serve)
        await trio.sleep(0.2)  # the feed takes in every market's updates
        total = len(partner.ids)
        file = tmp / "sse.toml"
        file.write_text(f'[accounts.partner]\nsource = "broker-events"\nbase_url = "{url}"\n'
                        'key_id_env = "P_KEY"\nsecret_key_env = "P_SECRET"\n')
        child = Child(_env(database_url, file, {"P_KEY": partner.key_id,
                                                "P_SECRET": partner.secret_key}), nursery)
        # Baseline: the process up and its (empty) stream open, before any event: a
        # partner with no history yet answers with heartbeats only.
        partner.ids, saved_ids = [], partner.ids
        partner.frames, saved_frames = [], partner.frames
        await child.start()
        await _wait(lambda: child.logged("events_connecting"), 120, 0.05)
        await trio.sleep(1.0)
        base_rss = child.rss()
        # The history appears at once: the open connection (waiting past an empty log)
        # sends it from the start, as a first connection with no position would.
        started = time.perf_counter()
        partner.ids, partner.frames = saved_ids, saved_frames
        await _wait(lambda: _count(database_url, "SELECT count(*) FROM alpaca_event_dedupe "
                                   "WHERE event_key LIKE 'event:%%'", []) >= total, 900)
        elapsed = time.perf_counter() - started
        peak = child.rss("VmHWM")
        code = await child.stop()
        nursery.cancel_scope.cancel()
    problems = await _verify(database_url, list(partner.brokers), partner.ground_truth, False)
    return {"accounts": accounts, "updates": total, "seconds": round(elapsed, 2),
            "updates_per_s": round(total / elapsed), "peak_rss_mib": round(peak / 2**20, 1),
            "base_rss_mib": round(base_rss / 2**20, 1),
            "rss_per_account_kib": round((peak - base_rss) / accounts / 1024, 1),
            "exit_code": code, "verified": not problems, "problems": problems[:10]}


# ----------------------------------------------------------------- 2. WebSockets


async def bench_ws(database_url: str, accounts: int, orders: int, tmp: Path) -> dict[str, Any]:
    brokers = [SimulatedBroker(SimConfig(seed=60_000 + i, orders=orders, rate=0.0,
                                         key_id=f"WSKEY{i}", secret_key=f"WSSECRET-{i}",
                                         scenario="bench-ws")) for i in range(accounts)]
    async with trio.open_nursery() as nursery:
        servers: list[SimServer] = [await nursery.start(serve, b) for b in brokers]
        lines, creds = [], {}
        for i, (broker, server) in enumerate(zip(brokers, servers, strict=True)):
            creds[f"K{i}"], creds[f"S{i}"] = broker.config.key_id, broker.config.secret_key
            lines += [f"[accounts.ws{i:03d}]", f'key_id_env = "K{i}"', f'secret_key_env = "S{i}"',
                      f'base_url = "{server.rest_url}"', f'stream_url = "{server.ws_url}"', ""]
        # One account alone first: what a process serving one account holds.
        single = tmp / "ws-one.toml"
        single.write_text("\n".join(lines[:6]))
        one = Child(_env(database_url, single, creds), nursery)
        await one.start()
        await _wait(lambda: one.logged("listening"), 180, 0.1)
        await trio.sleep(1.0)
        one_rss = one.rss()
        await one.stop()
        file = tmp / "ws.toml"
        file.write_text("\n".join(lines))
        child = Child(_env(database_url, file, creds), nursery)
        await child.start()
        await _wait(lambda: sum(1 for line in child.lines if '"event": "listening"' in line)
                    >= accounts, 180, 0.1)
        await trio.sleep(1.0)
        base_rss = child.rss()
        started = time.perf_counter()
        for broker in brokers:
            nursery.start_soon(broker.run_market)
        ids = [b.account_id for b in brokers]

        def done() -> bool:
            if not all(b.finished for b in brokers):
                return False
            return _count(database_url, "SELECT count(*) FROM alpaca_event_dedupe WHERE "
                          "account_id = ANY(%s) AND event_key NOT LIKE 'refresh:%%'",
                          [ids]) >= sum(b.updates_total for b in brokers)

        await _wait(done, 600)
        elapsed = time.perf_counter() - started
        total = sum(b.updates_total for b in brokers)
        peak = child.rss("VmHWM")
        code = await child.stop()
        nursery.cancel_scope.cancel()
    by_id = {b.account_id: b for b in brokers}
    problems = await _verify(database_url, ids, lambda a: by_id[a].ground_truth(), True)
    return {"accounts": accounts, "updates": total, "seconds": round(elapsed, 2),
            "updates_per_s": round(total / elapsed), "peak_rss_mib": round(peak / 2**20, 1),
            "one_account_rss_mib": round(one_rss / 2**20, 1),
            "streaming_rss_mib": round(base_rss / 2**20, 1),
            # Each account beyond the first: its pipeline, sockets, REST client, session.
            "rss_per_account_kib": round((peak - one_rss) / max(1, accounts - 1) / 1024, 1),
            "exit_code": code, "verified": not problems, "problems": problems[:10]}


# ----------------------------------------------------------------- 3. takeover


async def bench_takeover(database_url: str, accounts: int, tmp: Path) -> dict[str, Any]:
    brokers = [SimulatedBroker(SimConfig(seed=70_000 + i, orders=4, rate=2.0,
                                         key_id=f"TKEY{i}", secret_key=f"TSECRET-{i}",
                                         scenario="bench-takeover")) for i in range(accounts)]
    ids = [b.account_id for b in brokers]
    async with trio.open_nursery() as nursery:
        servers: list[SimServer] = [await nursery.start(serve, b) for b in brokers]
        lines, creds = [], {}
        for i, (broker, server) in enumerate(zip(brokers, servers, strict=True)):
            creds[f"K{i}"], creds[f"S{i}"] = broker.config.key_id, broker.config.secret_key
            lines += [f"[accounts.t{i:03d}]", f'key_id_env = "K{i}"', f'secret_key_env = "S{i}"',
                      f'base_url = "{server.rest_url}"', f'stream_url = "{server.ws_url}"', ""]
        file = tmp / "takeover.toml"
        file.write_text("\n".join(lines))
        env = _env(database_url, file, creds)
        replicas = [Child(env, nursery) for _ in range(3)]
        for child in replicas:
            await child.start()

        def held() -> int:
            return _count(database_url, _LOCKS, [LEADER_LOCK_PREFIX, ids])

        def session(replica: Child) -> str:
            return f"stream-supervisor@{(replica.last('replicas_changed') or {})['replica_id']}"[:63]

        def settled() -> bool:
            """Every replica sees all three and holds the writer locks of its share.

            Until then an account may still sit with the replica that started first,
            waiting to be drained and handed over: a victim killed then may lead
            nothing, and the takeover it was meant to time never happens.
            """
            seen = [c.last("replicas_changed") for c in replicas]
            if any(s is None or s["replicas"] != len(replicas) for s in seen):
                return False
            holders = _holders(database_url, ids)
            return sum(holders.values()) == accounts and all(
                holders.get(session(c), 0) == s["share"]
                for c, s in zip(replicas, seen, strict=True) if s is not None)

        await _wait(settled, 180)
        holders = await trio.to_thread.run_sync(_holders, database_url, ids)
        victim = max(replicas, key=lambda c: holders.get(session(c), 0))
        victim_share = holders.get(session(victim), 0)
        assert victim.process is not None and victim_share > 0, holders
        victim.process.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        await _wait(lambda: held() < accounts, 30, 0.01)
        await _wait(lambda: held() == accounts, 120, 0.02)
        takeover = time.perf_counter() - killed
        await victim.stop(signal.SIGKILL)
        codes = [await c.stop() for c in replicas if c is not victim]
        nursery.cancel_scope.cancel()
    return {"accounts": accounts, "replicas": 3, "killed_replica_led": victim_share,
            "leaders_before_kill": sorted(holders.values()),
            "takeover_s": round(takeover, 2), "survivor_exit_codes": codes}


# ----------------------------------------------------------------- main


async def _run(args: argparse.Namespace, admin: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        phases: list[tuple[str, Callable[[str], Awaitable[dict[str, Any]]]]] = [
            ("sse", lambda url: bench_sse(url, args.sse_accounts, args.orders, Path(tmp))),
            ("websockets", lambda url: bench_ws(url, args.ws_accounts, args.orders, Path(tmp))),
            ("takeover", lambda url: bench_takeover(url, args.replica_accounts, Path(tmp))),
        ]
        for name, fn in phases:
            db = f"bench_many_{uuid.uuid4().hex[:8]}"
            url = await trio.to_thread.run_sync(create_database, admin, db)
            try:
                await trio.to_thread.run_sync(apply_migrations, url)
                results[name] = await fn(url)
                print(name, json.dumps(results[name]), flush=True)
            finally:
                await trio.to_thread.run_sync(drop_database, admin, db)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sse-accounts", type=int, default=1000)
    parser.add_argument("--ws-accounts", type=int, default=50)
    parser.add_argument("--replica-accounts", type=int, default=30)
    parser.add_argument("--orders", type=int, default=6, help="orders per account")
    parser.add_argument("--database-url", help="admin URI of a server (default: embedded)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    configure_logging(fmt="console", level="warning")  # the simulators' own lines
    server = None
    admin = args.database_url
    if admin is None:
        server = start_embedded_postgres(Path(tempfile.mkdtemp()) / "pg", delete_on_stop=True)
        admin = server.uri
    try:
        results = trio.run(_run, args, admin)
    finally:
        if server is not None:
            server.stop()
    results["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()}
    results["command"] = "python benchmarks/many_accounts.py " + " ".join(argv or sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    verified = results["sse"]["verified"] and results["websockets"]["verified"]
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
