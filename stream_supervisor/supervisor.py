"""The supervisor: one nursery of three actors joined by bounded channels, a restart
policy, and a signal-driven drain.

An actor crash restarts the whole pipeline from durable state (cursor and dedupe keys
in the store), within a restart-intensity limit; past it the process exits non-zero so
systemd or ECS restarts it. SIGTERM/SIGINT stop reading, let the writer flush and
commit what it holds, and exit 0 within the drain deadline. Cancellation is never a
crash; configuration errors are fatal at once (exit 78, EX_CONFIG).
"""

from __future__ import annotations

import random
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

import structlog
import trio

from .admission import Admission
from .backoff import Backoff, BackoffPolicy
from .baseline import needs_baseline, take_baseline
from .channels import send_soon
from .connection import ConnectionActor, ConnectionSettings
from .dedupe import FrameMemo, KeyCache, dedupe_actor
from .drain import Drains
from .errors import (
    FATAL,
    BrokerUnavailable,
    LostLeadership,
    StoreError,
    StoreRefusal,
    StoreUnavailable,
    collapse,
)
from .ledger import Cursor
from .logs import get_logger
from .messages import Ack, Item
from .metrics import Metrics
from .nontrade import ActivityRecovery, AssetBook
from .reconciler import ScheduledReconcile
from .recovery import GapRecovery, RecoverySettings
from .replay import replay_with
from .rest import BrokerRest
from .settings import Settings
from .state import SupervisorState
from .store import Store
from .transport import Connector
from .writer import WriterSettings, writer_actor

log = get_logger("stream_supervisor.supervisor")
T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus can name it
ACK_CHANNEL_SIZE = 64
RESTART_POLICY = BackoffPolicy(initial=0.5, factor=2.0, cap=10.0)
STORE_WAIT_POLICY = BackoffPolicy(initial=0.5, factor=2.0, cap=10.0)
STORE_CLOSE_TIMEOUT = 5.0
#: How often a standby asks for the writer lock; takeover happens within this.
LEADER_POLL = 1.0
#: How often the leader looks for dead letters an operator asked to replay.
REPLAY_POLL = 2.0
REPLAYS_PER_POLL = 20
#: How often a leader admitted by a replica set asks whether it should still lead.
ADMISSION_POLL = 0.25


@dataclass
class Dependencies:
    """Everything from the outside world, passed in so tests and the simulation can
    substitute loopback or in-memory versions of each."""

    connector: Connector
    rest: BrokerRest
    store_factory: Callable[[], Store]
    wallclock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    rng: random.Random = field(default_factory=random.Random)
    install_signal_handlers: bool = True
    #: Replicas sharing accounts out (docs/design.md, section 11); None: lead whenever
    #: the writer lock is free.
    admission: Admission | None = None


class Supervisor(Drains):
    _drain_log = log

    def __init__(
        self,
        settings: Settings,
        deps: Dependencies,
        *,
        metrics: Metrics | None = None,
        state: SupervisorState | None = None,
    ) -> None:
        self.settings = settings
        self.deps = deps
        self.metrics = metrics if metrics is not None else Metrics()
        self.state = state if state is not None else SupervisorState()
        self._conn_scope: trio.CancelScope | None = None
        self._pipeline_scope: trio.CancelScope | None = None
        self._drain_requested = trio.Event()
        self._drain_timed_out = False
        self._cache: KeyCache | None = None
        self.exit_code: int | None = None
        #: The configuration error that stopped this supervisor (exit 78), for the
        #: accounts of a fleet to report by name.
        self.fatal_error: str | None = None
        self._stepping_down = False

    # --- public control ------------------------------------------------------------

    # `request_drain`: Drains (drain.py), shared with the events stream's supervisor.

    @property
    def _drain_timeout(self) -> float:
        return self.settings.drain_timeout

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run until drained or failed; returns the process exit code."""
        async with trio.open_nursery() as nursery:
            if self.deps.install_signal_handlers:
                await nursery.start(self._watch_signals)
            try:
                code = await self._supervise(task_status)
            except FATAL as exc:
                code = self._fatal(exc)
            nursery.cancel_scope.cancel()
        self.exit_code = code
        log.info("stopped", exit_code=code, restarts=self.state.restarts)
        return code

    # --- internals -----------------------------------------------------------------

    def step_down(self, why: str) -> None:
        """Drain the pipeline as for a stop, then release the writer lock and wait for
        the account's turn again (replicas moving an account, section 11)."""
        if self.state.draining or self._stepping_down or self._conn_scope is None:
            return
        log.info("stepping_down", why=why)
        self._stepping_down = True
        self._conn_scope.cancel()
        self._set_pipeline_deadline()

    def _fatal(self, exc: BaseException) -> int:
        self.fatal_error = str(exc)
        log.error("fatal_configuration_error", error=str(exc), kind=type(exc).__name__)
        return EXIT_CONFIG

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                self.request_drain(signal.Signals(signum).name)

    async def _unless_drained(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call()`, or None (`state.draining` set) once a drain is asked for: before the
        pipeline runs there is nothing a drain must finish, so a stop does not wait for
        the broker's retries (the unit's stop timeout would kill us first)."""
        result: list[T] = []
        failed: list[Exception] = []
        async with trio.open_nursery() as nursery:
            async def run() -> None:
                try:
                    result.append(await call())
                except Exception as exc:  # noqa: BLE001 - raised again below, outside the group
                    failed.append(exc)
                nursery.cancel_scope.cancel()

            async def drained() -> None:
                await self._drain_requested.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            nursery.start_soon(drained)
        if failed and not self.state.draining:
            raise failed[0]
        return result[0] if result and not self.state.draining else None

    async def _account_id(self) -> str | None:
        """The account, from the settings or `GET /v2/account` (waiting out a broker
        outage); None if a drain came first."""
        if self.settings.account_id:
            return self.settings.account_id
        wait = Backoff(STORE_WAIT_POLICY, self.deps.rng)
        while not self.state.draining:
            try:
                return await self._unless_drained(self.deps.rest.account_id)
            except BrokerUnavailable as exc:
                delay = wait.next_delay()
                log.warning("broker_unavailable", error=str(exc)[:300], delay=round(delay, 3))
                with trio.move_on_after(delay):
                    await self._drain_requested.wait()
        return None

    async def _supervise(self, task_status: trio.TaskStatus[None]) -> int:
        found = await self._account_id()
        if found is None:  # drained before the account was known
            task_status.started()
            return EXIT_OK
        account_id = found
        self.state.account_id = account_id
        structlog_bind(account=account_id)
        crashes: deque[float] = deque()
        restart = Backoff(RESTART_POLICY, self.deps.rng)
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        while not self.state.draining:
            try:
                await self._run_pipeline(account_id, mark_started)
            except (BaseExceptionGroup, Exception) as exc:
                cause = collapse(exc, prefer=FATAL)
                if isinstance(cause, trio.Cancelled | BaseExceptionGroup):
                    raise
                if isinstance(cause, FATAL):
                    raise cause from None
                if isinstance(cause, LostLeadership):
                    # The writer lock went with its connection: stop writing, elect again.
                    log.warning("leadership_lost", error=str(cause)[:500])
                elif isinstance(cause, StoreError) and not isinstance(cause, StoreRefusal):
                    # The writer retries store errors itself; this one hit the pipeline's
                    # start (cursor, warm keys): go round again without counting a crash.
                    # A refusal (StoreRejected, or StoreDataError: a value of the
                    # broker's word refused at a baseline, say; the server answered, and
                    # no) is counted below instead: waiting does not end it, the restart
                    # limit does.
                    log.warning("pipeline_store_error", error=str(cause)[:300])
                else:
                    crashes.append(trio.current_time())
                    self.state.restarts += 1
                    self.metrics.pipeline_restarts.inc()
                    while crashes and crashes[0] < trio.current_time() - self.settings.restart_window:
                        crashes.popleft()
                    log.error(
                        "pipeline_crashed",
                        error=f"{type(cause).__name__}: {cause}"[:500],
                        crashes_in_window=len(crashes),
                        limit=self.settings.restart_limit,
                        exc_info=cause,
                    )
                    if len(crashes) > self.settings.restart_limit:
                        log.error("restart_intensity_exceeded", crashes=len(crashes),
                                  window_s=self.settings.restart_window)
                        return EXIT_FAILURE
            if self.state.draining:
                break
            if self._stepping_down:
                # Released on purpose, not a failure: wait for the turn, not a backoff.
                self._stepping_down = False
                continue
            delay = restart.next_delay()
            log.info("pipeline_restarting", delay=round(delay, 3))
            with trio.move_on_after(delay):
                await self._drain_requested.wait()
        mark_started()
        return EXIT_FAILURE if self._drain_timed_out else EXIT_OK

    async def _open_store(self) -> Store:
        """Open a store, waiting out a database outage (never giving up on our own)."""
        wait = Backoff(STORE_WAIT_POLICY, self.deps.rng)
        while True:
            store = self.deps.store_factory()
            try:
                await store.open()
                return store
            except StoreUnavailable as exc:
                delay = wait.next_delay()
                log.warning("database_unavailable", error=str(exc)[:300], delay=round(delay, 3))
                with trio.move_on_after(delay):
                    await self._drain_requested.wait()
                if self.state.draining:
                    raise _DrainBeforeStart() from None

    async def _run_pipeline(self, account_id: str, mark_started: Callable[[], None]) -> None:
        s = self.settings
        if self.deps.admission is not None and not await self._wait_turn(account_id):
            return
        try:
            store = await self._open_store()
        except _DrainBeforeStart:
            return
        try:
            if not await self._lead(store, account_id):
                return
            cursor = await store.load_cursor(account_id)
            if s.baseline:
                # A baseline reads the broker for as long as it answers with errors; a
                # drain meanwhile ends it (its one write is a single transaction).
                loaded = cursor
                cursor = await self._unless_drained(
                    lambda: self._baseline_if_needed(store, account_id, loaded))
                if self.state.draining:
                    return
            last = self._cache.last_committed if self._cache is not None else None
            if last is not None and not await store.has_key(last):
                # An acknowledged commit is gone: the database failed over to a replica
                # that had not received it. The LRU would drop what backfill brings back.
                log.error("database_lost_commits", last_committed_key=last)
                self._cache = None
            if self._cache is None:
                warm = await store.recent_keys(account_id, s.lru_size) if s.lru_size else []
                self._cache = KeyCache(s.lru_size, warm)
            else:
                # The LRU holds only keys whose batch committed, and the newest of them is
                # still stored: a restart keeps it and drops only what was in flight.
                self._cache.forget_in_flight()
            cache = self._cache
            self.state.committed_cursor = cursor
            log.info("pipeline_starting", cursor=_cursor_text(cursor), cached_keys=len(cache))
            send_events, recv_events = trio.open_memory_channel[Item](s.channel_size)
            send_new, recv_new = trio.open_memory_channel[Item](s.channel_size)
            send_acks, recv_acks = trio.open_memory_channel[Ack](ACK_CHANNEL_SIZE)
            self._export_fill(recv_events, recv_new)
            activities = ActivityRecovery(
                self.deps.rest, partial(send_soon, send_events),
                lambda: store.load_activity_cursor(account_id),
                interval=s.activity_interval, wallclock=self.deps.wallclock,
                future_tolerance=s.future_tolerance,
                ready=lambda: self.state.caught_up and self.state.connection == "streaming",
            )
            recovery = GapRecovery(
                RecoverySettings.from_settings(s),
                self.deps.rest,
                partial(send_soon, send_events),
                self.metrics,
                self.state,
                wallclock=self.deps.wallclock,
                open_order_ids=lambda: store.open_order_ids(account_id),
                activities=activities,
                assets=AssetBook(self.deps.rest),
            )
            connection = ConnectionActor(
                ConnectionSettings.from_settings(s),
                self.deps.connector,
                recovery,
                send_events,
                self.metrics,
                self.state,
                rng=self.deps.rng,
                wallclock=self.deps.wallclock,
                # Layer 0 of dedupe, asking the dedupe actor's cache (dedupe.FrameMemo).
                frames=FrameMemo(cache),
            )
            with trio.CancelScope() as pipeline_scope:
                self._pipeline_scope = pipeline_scope
                if self.state.draining:
                    pipeline_scope.deadline = trio.current_time() + s.drain_timeout
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        self._run_writer, nursery.cancel_scope,
                        WriterSettings.from_settings(s, account_id),
                        store, recv_new, send_acks,
                    )
                    await nursery.start(
                        dedupe_actor, cache, recv_events, send_new,
                        recv_acks, self.metrics, self.state,
                    )
                    nursery.start_soon(self._replay_requested, store, account_id)
                    nursery.start_soon(ScheduledReconcile(
                        s, self.deps.rest, store, account_id, self.metrics, self.state,
                        wallclock=self.deps.wallclock).run)
                    if self.deps.admission is not None:
                        nursery.start_soon(self._watch_admission, self.deps.admission,
                                           account_id)
                    self._conn_scope = trio.CancelScope()
                    if self.state.draining:
                        self._conn_scope.cancel()
                    nursery.start_soon(self._run_connection, connection, self._conn_scope)
                    nursery.start_soon(self._export_fill_loop, recv_events, recv_new)
                    nursery.start_soon(activities.run_periodically)
                    self.state.pipeline_running = True
                    mark_started()
            if pipeline_scope.cancelled_caught and self._stepping_down and not self.state.draining:
                # What the drain could not commit lies within the next leader's backfill.
                log.warning("step_down_timeout", deadline_s=s.drain_timeout)
            elif pipeline_scope.cancelled_caught:
                self._drain_timed_out = True
                log.error("drain_timeout", deadline_s=s.drain_timeout)
            elif self.state.draining:
                log.info("drained", committed_events=self.state.committed_events)
        finally:
            self.state.pipeline_running = False
            if self.state.leader and self.deps.admission is not None:
                self.deps.admission.leading(account_id, False)
            self.state.leader = False
            self.metrics.leader.set(0)
            self._conn_scope = None
            self._pipeline_scope = None
            with trio.move_on_after(STORE_CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await store.aclose()

    async def _baseline_if_needed(
        self, store: Store, account_id: str, cursor: Cursor | None
    ) -> Cursor | None:
        """A first start, or a cursor older than the broker keeps activities: take the
        broker's word as the starting state (docs/design.md, section 9)."""
        now = self.deps.wallclock()
        reason = needs_baseline(cursor, now, self.settings.activities_window)
        if reason is None:
            return cursor
        snapshot, made = await take_baseline(
            store, self.deps.rest, account_id, reason=reason, now=now,
            window=2 * self.settings.backfill_overlap)
        self.state.baseline = reason
        log.info("baseline_taken", reason=reason, positions=len(snapshot.positions),
                 orders=len(snapshot.orders), adjustments=len(made),
                 attempts=snapshot.attempts)
        for note in snapshot.notes:
            log.warning("baseline_inexact", detail=note)
        return await store.load_cursor(account_id)

    async def _lead(self, store: Store, account_id: str) -> bool:
        """Wait (as a standby) until this process holds the account's writer lock.
        False if a drain came first."""
        waiting = False
        admission = self.deps.admission
        while not await store.try_leadership(account_id):
            if admission is not None and not admission.may_lead(account_id):
                # Not ours to lead any more: give the session back, wait for the turn.
                self._stepping_down = True
                return False
            if not waiting:
                waiting = True
                self.state.connection = "standby"
                log.info("standby", reason="another replica holds the writer lock")
            with trio.move_on_after(LEADER_POLL):
                await self._drain_requested.wait()
            if self.state.draining:
                return False
        self.state.leader = True
        self.metrics.leader.set(1)
        if admission is not None:
            admission.leading(account_id, True)
        log.info("leader_elected", waited=waiting)
        return True

    async def _wait_turn(self, account_id: str) -> bool:
        """Wait until the replica set gives this process the account; False if a drain
        came first. Holds no database session and no broker connection meanwhile."""
        assert self.deps.admission is not None
        if not self.deps.admission.may_lead(account_id):
            self.state.connection = "standby"
            log.info("standby", reason="another replica's share")
        async with trio.open_nursery() as nursery:
            async def turn() -> None:
                assert self.deps.admission is not None
                await self.deps.admission.wait_turn(account_id)
                nursery.cancel_scope.cancel()

            nursery.start_soon(turn)
            await self._drain_requested.wait()
            nursery.cancel_scope.cancel()
        return not self.state.draining

    async def _watch_admission(self, admission: Admission, account_id: str) -> None:
        while not self.state.draining:
            await trio.sleep(ADMISSION_POLL)
            if not admission.may_lead(account_id):
                self.step_down("another replica's share")
                if self._stepping_down:
                    return

    async def _run_writer(
        self,
        pipeline: trio.CancelScope,
        settings: WriterSettings,
        store: Store,
        inbox: trio.MemoryReceiveChannel[Item],
        acks: trio.MemorySendChannel[Ack],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await writer_actor(settings, store, inbox, acks, self.metrics, self.state,
                           rng=self.deps.rng, task_status=task_status)
        # The writer returns only after its inbox ended: the connection and dedupe actors
        # are done and everything they sent is committed. Stop the metrics loop too.
        pipeline.cancel()

    async def _replay_requested(self, store: Store, account_id: str) -> None:
        """Replay the dead letters `dead-letters --replay` marked while this process leads:
        through the store connection that holds the writer lock, with the writer's
        `commit_batch` (one call at a time on that connection; a batch claimed ahead may
        be finishing on its own meanwhile, and the dedupe table and the row locks keep
        both exactly once, as between two writers). A replayed update the LRU does not
        know is harmless: layer 1 drops a later copy."""
        assets = AssetBook(self.deps.rest)  # a REST fill's crypto pair, spelled
        while not self.state.draining:
            await trio.sleep(REPLAY_POLL)
            try:
                for letter in await store.pending_replays(account_id, REPLAYS_PER_POLL):
                    if self.state.draining:
                        return
                    outcome = await replay_with(store, letter, self.settings,
                                                self.deps.wallclock(), assets)
                    log.info("dead_letter_replayed", id=letter.id, outcome=outcome[:300],
                             by="service")
            except LostLeadership:
                raise
            except StoreError as exc:
                # The writer sees the same database; this only waits for the next poll.
                log.warning("dead_letter_replay_failed", error=str(exc)[:300])

    async def _run_connection(self, actor: ConnectionActor, scope: trio.CancelScope) -> None:
        with scope:
            await actor.run()
        # Cancelled by a drain: leaving the scope closed the actor's send channel, which
        # tells the dedupe actor, then the writer, to flush and finish.

    def _export_fill(
        self,
        recv_events: trio.MemoryReceiveChannel[Item],
        recv_new: trio.MemoryReceiveChannel[Item],
    ) -> None:
        self.metrics.channel_fill.labels("events").set(
            recv_events.statistics().current_buffer_used)
        self.metrics.channel_fill.labels("new_events").set(
            recv_new.statistics().current_buffer_used)

    async def _export_fill_loop(
        self,
        recv_events: trio.MemoryReceiveChannel[Item],
        recv_new: trio.MemoryReceiveChannel[Item],
    ) -> None:
        while True:
            self._export_fill(recv_events, recv_new)
            await trio.sleep(1.0)


class _DrainBeforeStart(Exception):
    pass


def _cursor_text(cursor: object) -> str | None:
    if cursor is None:
        return None
    fill_time = getattr(cursor, "fill_time", None)
    return fill_time.isoformat() if fill_time is not None else None


def structlog_bind(**values: str) -> None:
    structlog.contextvars.bind_contextvars(**values)


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "Dependencies",
    "Supervisor",
]
