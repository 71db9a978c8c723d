"""Replicas sharing an accounts file out, coordinated in PostgreSQL (docs/design.md,
section 11): no coordination service beyond the database every replica already uses.

Each replica registers in `stream_supervisor_replicas` over a session of its own and
refreshes its row every poll. A replica is live while its row is fresh and the session
that registered it exists, so a SIGKILLed replica drops out within one poll. Every live
replica computes the same assignment of accounts from the same live set (rendezvous
hashing with a load cap of ceil(M/N): about M/N each, and few accounts move when one
joins or leaves) and leads only its own. The assignment only says who should *try*: the
account's writer lock (section 7) still decides, so replicas that disagree for a poll
cannot both write; an account changes hands only after its old leader has drained it
and closed the session that held the lock.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Final

import psycopg
import trio

from . import pgconn
from .backoff import Backoff, BackoffPolicy
from .errors import StoreError
from .logs import get_logger

log = get_logger("stream_supervisor.pgfleet")

#: How often a replica refreshes its row and reads the live set.
POLL: Final = 0.5
#: A row not refreshed for this long is a dead replica's, whatever its session says
#: (a partitioned host whose session the server has not noticed yet).
STALE_AFTER: Final = 10.0
#: Rows of replicas dead for this long are deleted.
FORGET_AFTER: Final = 60.0
APPLICATION_NAME: Final = "stream-supervisor-replicas"
_RETRY: Final = BackoffPolicy(initial=0.5, factor=2.0, cap=5.0)

_REGISTER = """
INSERT INTO stream_supervisor_replicas
    (replica_id, host, pid, backend_pid, backend_start, accounts, account_names)
SELECT %s, %s, %s, pg_backend_pid(), a.backend_start, %s, %s
  FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
ON CONFLICT (replica_id) DO UPDATE
   SET backend_pid = EXCLUDED.backend_pid, backend_start = EXCLUDED.backend_start,
       account_names = EXCLUDED.account_names, heartbeat_at = now()
"""
_HEARTBEAT = "UPDATE stream_supervisor_replicas SET heartbeat_at = now() WHERE replica_id = %s"
_LIVE = """
SELECT r.replica_id, r.account_names FROM stream_supervisor_replicas r
 WHERE r.heartbeat_at > now() - make_interval(secs => %s)
   AND EXISTS (SELECT 1 FROM pg_stat_activity a
                WHERE a.pid = r.backend_pid AND a.backend_start = r.backend_start)
 ORDER BY r.replica_id
"""
_FORGET = """
DELETE FROM stream_supervisor_replicas r
 WHERE r.heartbeat_at < now() - make_interval(secs => %s)
    OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                    WHERE a.pid = r.backend_pid AND a.backend_start = r.backend_start)
   AND r.heartbeat_at < now() - make_interval(secs => %s)
"""
_LEAVE = "DELETE FROM stream_supervisor_replicas WHERE replica_id = %s"


def _weight(replica: str, account: str) -> int:
    digest = hashlib.blake2b(f"{replica}\0{account}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(accounts: Iterable[str], replicas: Sequence[str],
           serving: Mapping[str, Collection[str] | None] | None = None) -> dict[str, str]:
    """Account name -> the replica that should lead it. Pure and deterministic: every
    replica that sees the same live set computes the same answer. Rendezvous hashing
    (each account prefers the replicas in the order of a hash of both names) with a cap
    of ceil(M/N) accounts per replica, accounts taken in a fixed order.

    `serving`: the accounts each replica serves (None, or a replica missing: all of them).
    An account goes only to a replica that serves it, past the cap if every one that does
    is full: one unit per account (`stream-supervisor@NAME`), or replicas whose accounts
    files differ for a rolling deploy, leave no account without a leader."""
    names = sorted(set(accounts), key=lambda a: (hashlib.blake2b(a.encode(),
                                                                 digest_size=8).digest(), a))
    live = sorted(set(replicas))
    if not live:
        return {}
    cap = math.ceil(len(names) / len(live))
    load = dict.fromkeys(live, 0)
    lists = {r: None if serving is None or serving.get(r) is None
             else frozenset(serving[r] or ()) for r in live}
    out: dict[str, str] = {}
    for account in names:
        able = [r for r in live if (listed := lists[r]) is None or account in listed]
        ranked = sorted(able, key=lambda r: (-_weight(r, account), r))
        chosen = next((r for r in ranked if load[r] < cap), ranked[0] if ranked else None)
        if chosen is not None:
            load[chosen] += 1
            out[account] = chosen
    return out


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ReplicaSet:
    """This replica's view of the replica set; `run` keeps it current. `view(name)` is
    the `Admission` one account's supervisor consults."""

    def __init__(self, database_url: str, accounts: Sequence[str], *,
                 replica_id: str | None = None, poll: float = POLL,
                 stale_after: float = STALE_AFTER) -> None:
        self.database_url = database_url
        self.accounts = list(accounts)
        self.replica_id = replica_id or default_replica_id()
        self.poll = poll
        self.stale_after = stale_after
        self.live: tuple[str, ...] = ()
        self._serving: dict[str, tuple[str, ...] | None] = {}
        self.assignment: dict[str, str] = {}
        self.leading: set[str] = set()
        self._changed = trio.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._limiter = trio.CapacityLimiter(1)

    def owns(self, account: str) -> bool:
        return self.assignment.get(account) == self.replica_id

    def view(self, account: str) -> AccountAdmission:
        return AccountAdmission(self, account)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, then refresh and recompute every poll until cancelled; on the way
        out, leave (the row goes, so the others need not wait for the session to end)."""
        wait = Backoff(_RETRY)
        started = False
        try:
            while True:
                try:
                    live = await self._call(self._refresh)
                except StoreError as exc:
                    delay = wait.next_delay()
                    log.warning("replica_registry_unavailable", error=str(exc)[:300],
                                delay=round(delay, 3))
                    await self._close()
                    await trio.sleep(delay)
                    continue
                wait.reset()
                self._update(live)
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(self.poll)
        finally:
            with trio.move_on_after(5, shield=True):
                try:
                    await self._call(self._leave)
                except StoreError:
                    pass
                await self._close()

    # --- internals

    def _update(self, live: Sequence[tuple[str, tuple[str, ...] | None]]) -> None:
        serving = dict(live)
        live_t = tuple(serving)
        if live_t == self.live and serving == self._serving and self.assignment:
            return
        before = {a for a, r in self.assignment.items() if r == self.replica_id}
        self.live = live_t
        self._serving = serving
        # Every live replica's accounts, so that all of them compute the same assignment.
        names = {a for listed in serving.values() if listed is not None for a in listed}
        self.assignment = assign(names | set(self.accounts), live_t, serving)
        mine = {a for a, r in self.assignment.items() if r == self.replica_id}
        log.info("replicas_changed", replicas=len(live_t), replica_id=self.replica_id,
                 share=len(mine), gained=len(mine - before), given_up=len(before - mine))
        self._changed.set()
        self._changed = trio.Event()

    async def _call(self, fn: Any) -> Any:
        def run() -> Any:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = pgconn.connect(self.database_url, autocommit=True,
                                                application_name=APPLICATION_NAME)
                    self._conn.execute(_REGISTER, [self.replica_id, socket.gethostname(),
                                                   os.getpid(), len(self.accounts),
                                                   sorted(self.accounts)])
                return fn(self._conn)
            except psycopg.Error as exc:
                self._drop()
                raise StoreError(pgconn.error_text(exc, self.database_url)) from None

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    def _refresh(self, conn: psycopg.Connection[Any]
                 ) -> list[tuple[str, tuple[str, ...] | None]]:
        """The live replicas, each with the accounts it serves (None: a replica from
        before the registry said, taken to serve them all)."""
        conn.execute(_HEARTBEAT, [self.replica_id])
        conn.execute(_FORGET, [FORGET_AFTER, self.stale_after])
        rows = conn.execute(_LIVE, [self.stale_after]).fetchall()
        live = [(str(r[0]), None if r[1] is None else tuple(r[1])) for r in rows]
        if self.replica_id not in {r for r, _ in live}:
            # Our row was forgotten (a long pause); register again.
            conn.execute(_REGISTER, [self.replica_id, socket.gethostname(), os.getpid(),
                                     len(self.accounts), sorted(self.accounts)])
            live = sorted([*live, (self.replica_id, tuple(sorted(self.accounts)))])
        return live

    def _leave(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(_LEAVE, [self.replica_id])

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    async def _close(self) -> None:
        await trio.to_thread.run_sync(self._drop, limiter=self._limiter)


class AccountAdmission:
    """One account's `Admission` (stream_supervisor/admission.py) in a `ReplicaSet`."""

    def __init__(self, replicas: ReplicaSet, account: str) -> None:
        self.replicas = replicas
        self.account = account

    async def wait_turn(self, account_id: str) -> None:
        while not self.replicas.owns(self.account):
            await self.replicas._changed.wait()

    def may_lead(self, account_id: str) -> bool:
        return self.replicas.owns(self.account)

    def leading(self, account_id: str, held: bool) -> None:
        if held:
            self.replicas.leading.add(self.account)
        else:
            self.replicas.leading.discard(self.account)


__all__ = ["APPLICATION_NAME", "AccountAdmission", "ReplicaSet", "assign",
           "default_replica_id"]
