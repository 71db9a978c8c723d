"""The Broker API's events stream (docs/design.md, section 11): one Server-Sent Events
connection carrying the trade events of every account of a broker partner, into one
pipeline: source -> dedupe -> writer, each account's events applied to its own books.

The broker resumes the stream itself (`since_id`, a ULID), so there is no REST backfill:
the stream's position is committed with the batch that applied it, and every connection,
first or again after a disconnect, a missed heartbeat or a `dropped N messages` comment,
asks for the events after the position minus an overlap (ULIDs of one millisecond do not
sort in the order the broker sent them). Events read twice are dropped by their key (the
`event_id`) or by the order level, as any duplicate.
"""

from __future__ import annotations

import random
import re
import signal
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import trio

from .backoff import Backoff, BackoffPolicy
from .bounds import not_after_ns
from .channels import send_soon
from .dedupe import KeyCache, dedupe_actor
from .drain import Drains
from .errors import FATAL, LostLeadership, StoreError, StoreRejected, TransportClosed, collapse
from .events import DeadLetter, Event
from .eventstream import EventStreamConnector, SseComment
from .logs import get_logger
from .messages import Ack, Item
from .metrics import Metrics
from .protocol import decode_broker_event, ulid_ms
from .settings import Settings
from .state import SupervisorState
from .store import Batch, Store, StreamPosition
from .writer import Outcome, WriterSettings, _ack, _Committer, _record, take_batch

log = get_logger("stream_supervisor.broker_events")

#: How far before the committed position a connection resumes (ms of ULID time).
DEFAULT_OVERLAP_MS: Final = 2_000
#: No event and no heartbeat for this long: the connection is dead.
DEFAULT_HEARTBEAT_TIMEOUT: Final = 15.0
_DROPPED: Final = re.compile(r"dropped (\d+) messages")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
RESTART_POLICY: Final = BackoffPolicy(initial=0.5, factor=2.0, cap=10.0)


def resume_id(event_id: str | None, overlap_ms: int) -> str | None:
    """The `since_id` to ask for: the smallest ULID of the millisecond `overlap_ms`
    before `event_id`'s (None: the whole history)."""
    if event_id is None:
        return None
    ms = max(0, ulid_ms(event_id) - overlap_ms)
    start = ms << 80
    return "".join(_CROCKFORD[(start >> (5 * i)) & 31] for i in range(25, -1, -1))


@dataclass(frozen=True, slots=True)
class EventsSettings:
    stream: str
    overlap_ms: int = DEFAULT_OVERLAP_MS
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    max_frame_bytes: int = 1 << 20
    future_tolerance: float = 120.0
    max_batch: int = 1000
    channel_size: int = 2000
    lru_size: int = 100_000
    drain_timeout: float = 20.0
    restart_limit: int = 5
    restart_window: float = 60.0

    @classmethod
    def from_settings(cls, s: Settings, stream: str) -> EventsSettings:
        return cls(stream=stream, backoff=s.backoff, max_frame_bytes=s.max_frame_bytes,
                   future_tolerance=s.future_tolerance, max_batch=s.max_batch,
                   channel_size=s.channel_size, lru_size=s.lru_size,
                   drain_timeout=s.drain_timeout, restart_limit=s.restart_limit,
                   restart_window=s.restart_window,
                   # Silence as long as an unanswered WebSocket ping would be tolerated.
                   heartbeat_timeout=s.ping_interval + s.ping_timeout)


class EventsSource:
    """The source actor: connect from the position minus the overlap, forward events,
    reconnect on any end, heartbeat deadline or announced gap."""

    def __init__(self, settings: EventsSettings, connector: EventStreamConnector,
                 outbox: trio.MemorySendChannel[Item], metrics: Metrics,
                 state: SupervisorState, position: str | None, *,
                 rng: random.Random | None = None,
                 wallclock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.connector = connector
        self.outbox = outbox
        self.metrics = metrics
        self.state = state
        #: The newest event_id read (at start: the committed position).
        self.position = position
        self.backoff = Backoff(settings.backoff, rng)
        self.wallclock = wallclock
        self.accounts: set[str] = set()

    async def run(self) -> None:
        async with self.outbox:
            while True:
                self.state.connection_id += 1
                self.state.connection = "connecting"
                since = resume_id(self.position, self.settings.overlap_ms)
                log.info("events_connecting", since_id=since,
                         connection_id=self.state.connection_id)
                connected_at: float | None = None
                try:
                    try:
                        async with self.connector(since) as items:
                            connected_at = trio.current_time()
                            self.state.connection = "streaming"
                            self.state.caught_up = True
                            reason = await self._read(items)
                    except BaseExceptionGroup as group:
                        raise collapse(group, prefer=FATAL) from None
                except TransportClosed as exc:
                    reason = exc.reason
                self.state.connection = "backoff"
                self.state.caught_up = False
                self.state.last_disconnect_reason = reason
                self.metrics.reconnects.labels(_label(reason)).inc()
                if connected_at is not None:
                    self.backoff.connection_ended(trio.current_time() - connected_at)
                delay = self.backoff.next_delay()
                log.warning("events_disconnected", reason=reason[:300], delay=round(delay, 3),
                            position=self.position)
                await trio.sleep(delay)

    async def _read(self, items: AsyncIterator[object]) -> str:
        s = self.settings
        received = self.metrics.events_received
        while True:
            with trio.move_on_after(s.heartbeat_timeout) as waiting:
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    return "closed by server"
            if waiting.cancelled_caught:
                return f"no event or heartbeat within {s.heartbeat_timeout}s"
            now = trio.current_time()
            self.state.beat("connection", now)
            if isinstance(item, SseComment):
                dropped = _DROPPED.search(item.text)
                if dropped:
                    # A gap the broker announces: read again from before it.
                    return f"broker dropped {dropped.group(1)} messages"
                continue
            data = getattr(item, "data", b"")
            latest = not_after_ns(self.wallclock(), s.future_tolerance)
            account, decoded = decode_broker_event(data, received_at=now,
                                                   max_bytes=s.max_frame_bytes,
                                                   not_after_ns=latest)
            if isinstance(decoded, Event):
                assert decoded.event_id is not None
                if self.position is None or decoded.event_id > self.position:
                    self.position = decoded.event_id
                received.labels(decoded.event, "events").inc()
                if account is not None:
                    self.accounts.add(account)
                await send_soon(self.outbox, decoded)
            else:
                log.warning("frame_dead_lettered", reason=decoded.reason,
                            bytes=len(decoded.payload), account=account)
                await send_soon(self.outbox, _tag(decoded, account))


def _tag(letter: DeadLetter, account: str | None) -> DeadLetter:
    # A dead letter has no account field; on this pipeline's channels its key carries
    # the account it came for (when readable), and the writer files it under that
    # account (else under the stream's name) with its own key again.
    return DeadLetter(letter.reason, letter.payload, letter.source, letter.received_at,
                      key=f"{account or ''}|{letter.key}")


def _label(reason: str) -> str:
    if reason.startswith("broker dropped"):
        return "dropped"
    if reason.startswith("no event or heartbeat"):
        return "heartbeat"
    if "closed" in reason:
        return "closed"
    return "error"


async def events_writer(settings: EventsSettings, store: Store,
                        inbox: trio.MemoryReceiveChannel[Item],
                        acks: trio.MemorySendChannel[Ack], metrics: Metrics,
                        state: SupervisorState, *, rng: random.Random | None = None,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """The writer for a stream of many accounts: each taken batch is split by account,
    each account's part committed through the single-account writer's path (its ledger,
    its isolation of refused updates), in the order their events came; the stream's
    position moves with the last part, once everything before it is committed."""
    committer = _Committer(WriterSettings(settings.stream, settings.max_batch), store,
                           metrics, state, rng or random.Random())
    state.db_writable = True
    state.beat("writer", trio.current_time())
    task_status.started()
    async with acks, inbox:
        async for first in inbox:
            items = take_batch(first, inbox, settings.max_batch)
            events = [i for i in items if isinstance(i, Event)]
            parts: dict[str, tuple[list[Event], list[DeadLetter]]] = {}
            for item in items:
                if isinstance(item, Event):
                    parts.setdefault(item.account_id or settings.stream, ([], []))[0].append(item)
                else:
                    account, _, key = item.key.partition("|")
                    letter = DeadLetter(item.reason, item.payload, item.source,
                                        item.received_at, key=key or item.key)
                    parts.setdefault(account or settings.stream, ([], []))[1].append(letter)
            newest = max((e.event_id for e in events if e.event_id), default=None)
            started = trio.current_time()
            merged = Outcome()
            names = list(parts)
            for n, account in enumerate(names):
                evs, letters = parts[account]
                last = n == len(names) - 1
                position = (StreamPosition(settings.stream, newest)
                            if newest is not None and last else None)
                # One WAL flush per taken batch: the last part's durable commit flushes
                # the parts before it (the WAL is one sequence), and nothing of the
                # batch is acknowledged, nor the position moved, before it.
                outcome = await committer.commit(Batch(account, evs, letters,
                                                       stream_position=position,
                                                       durable=last))
                merged.commits.extend(outcome.commits)
                merged.refused.extend(outcome.refused)
            done = trio.current_time()
            state.beat("writer", done)
            metrics.commit_seconds.observe(done - started)
            for batch, result in merged.commits:
                _record(result, batch, done - started, metrics, state)
            if merged.refused:
                metrics.updates_refused.inc(len(merged.refused))
            await acks.send(_ack(events, merged))


class EventsSupervisor(Drains):
    """One events stream: store, writer lock, pipeline, restart budget, drain. `run`
    returns the exit code, like `Supervisor.run`."""

    _drain_log = log

    def __init__(self, settings: EventsSettings, connector: EventStreamConnector,
                 store_factory: Callable[[], Store], *, metrics: Metrics | None = None,
                 state: SupervisorState | None = None, rng: random.Random | None = None,
                 install_signal_handlers: bool = True,
                 wallclock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.connector = connector
        self.store_factory = store_factory
        self.metrics = metrics or Metrics()
        self.state = state or SupervisorState()
        self.rng = rng or random.Random()
        self.install_signal_handlers = install_signal_handlers
        self.wallclock = wallclock
        self.source: EventsSource | None = None
        self._drain_requested = trio.Event()
        self._conn_scope: trio.CancelScope | None = None
        self._pipeline_scope: trio.CancelScope | None = None
        self._cache: KeyCache | None = None
        self.fatal_error: str | None = None

    # `request_drain`: Drains (drain.py), shared with the account's supervisor.

    @property
    def _drain_timeout(self) -> float:
        return self.settings.drain_timeout

    async def run(self) -> int:
        from .supervisor import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK

        self.state.account_id = f"events:{self.settings.stream}"
        crashes: deque[float] = deque()
        restart = Backoff(RESTART_POLICY, self.rng)
        timed_out = False
        async with trio.open_nursery() as outer:
            if self.install_signal_handlers:
                outer.start_soon(self._watch_signals)
            try:
                while not self.state.draining:
                    try:
                        timed_out = await self._pipeline() or timed_out
                    except (BaseExceptionGroup, Exception) as exc:
                        cause = collapse(exc, prefer=FATAL)
                        if isinstance(cause, trio.Cancelled | BaseExceptionGroup):
                            raise
                        if isinstance(cause, FATAL):
                            raise cause from None
                        if isinstance(cause, LostLeadership) or (
                                isinstance(cause, StoreError)
                                and not isinstance(cause, StoreRejected)):
                            log.warning("pipeline_store_error", error=str(cause)[:300])
                        else:
                            now = trio.current_time()
                            crashes.append(now)
                            self.state.restarts += 1
                            self.metrics.pipeline_restarts.inc()
                            while crashes and crashes[0] < now - self.settings.restart_window:
                                crashes.popleft()
                            log.error("pipeline_crashed", error=f"{type(cause).__name__}: "
                                      f"{cause}"[:500], crashes_in_window=len(crashes),
                                      exc_info=cause)
                            if len(crashes) > self.settings.restart_limit:
                                log.error("restart_intensity_exceeded", crashes=len(crashes))
                                outer.cancel_scope.cancel()
                                return EXIT_FAILURE
                    if self.state.draining:
                        break
                    with trio.move_on_after(restart.next_delay()):
                        await self._drain_requested.wait()
            except FATAL as exc:
                self.fatal_error = str(exc)
                log.error("fatal_configuration_error", error=str(exc), kind=type(exc).__name__)
                outer.cancel_scope.cancel()
                return EXIT_CONFIG
            outer.cancel_scope.cancel()
        return EXIT_FAILURE if timed_out else EXIT_OK

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.request_drain(signal.Signals(signum).name)

    async def _pipeline(self) -> bool:
        """One pipeline run; True if its drain missed the deadline."""
        s = self.settings
        store = self.store_factory()
        try:
            await store.open()
            lock = f"events:{s.stream}"
            waiting = False
            while not await store.try_leadership(lock):
                if not waiting:
                    waiting = True
                    self.state.connection = "standby"
                    log.info("standby", reason="another replica holds the stream's lock")
                with trio.move_on_after(1.0):
                    await self._drain_requested.wait()
                if self.state.draining:
                    return False
            self.state.leader = True
            self.metrics.leader.set(1)
            log.info("leader_elected", stream=s.stream)
            position = await store.load_stream_position(s.stream)
            # A cache of its own each life of the pipeline, empty: what a lost primary had
            # committed (a failover that lost acknowledged commits) is read again from the
            # stream position the new one holds, and a cache remembering it would drop it
            # for a duplicate. The dedupe table drops what is stored.
            self._cache = KeyCache(s.lru_size)
            log.info("pipeline_starting", stream=s.stream, position=position)
            send_events, recv_events = trio.open_memory_channel[Item](s.channel_size)
            send_new, recv_new = trio.open_memory_channel[Item](s.channel_size)
            send_acks, recv_acks = trio.open_memory_channel[Ack](64)
            source = self.source = EventsSource(s, self.connector, send_events, self.metrics,
                                                self.state, position, rng=self.rng,
                                                wallclock=self.wallclock)
            with trio.CancelScope() as pipeline_scope:
                self._pipeline_scope = pipeline_scope
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._writer, nursery.cancel_scope, store, recv_new,
                                        send_acks)
                    await nursery.start(dedupe_actor, self._cache, recv_events, send_new,
                                        recv_acks, self.metrics, self.state)
                    self._conn_scope = trio.CancelScope()
                    if self.state.draining:
                        self._conn_scope.cancel()
                    nursery.start_soon(self._source, source, self._conn_scope)
                    self.state.pipeline_running = True
            if pipeline_scope.cancelled_caught:
                log.error("drain_timeout", deadline_s=s.drain_timeout)
                return True
            if self.state.draining:
                log.info("drained", committed_events=self.state.committed_events)
            return False
        finally:
            self.state.pipeline_running = False
            self.state.leader = False
            self.metrics.leader.set(0)
            self._conn_scope = None
            self._pipeline_scope = None
            with trio.move_on_after(5, shield=True):
                await store.aclose()

    async def _writer(self, pipeline: trio.CancelScope, store: Store,
                      inbox: trio.MemoryReceiveChannel[Item], acks: trio.MemorySendChannel[Ack],
                      *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await events_writer(self.settings, store, inbox, acks, self.metrics, self.state,
                            rng=self.rng, task_status=task_status)
        pipeline.cancel()

    async def _source(self, source: EventsSource, scope: trio.CancelScope) -> None:
        with scope:
            await source.run()


__all__ = [
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_OVERLAP_MS",
    "EventsSettings",
    "EventsSource",
    "EventsSupervisor",
    "events_writer",
    "resume_id",
]
