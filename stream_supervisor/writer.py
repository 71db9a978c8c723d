"""The writer actor: adaptive batching (group commit) into the store.

It takes everything already queued, up to `max_batch`, and commits it as one
transaction; it never waits to fill a batch, so a quiet stream gets one-event batches
and low latency while a busy one gets large batches. While a full batch waits, it takes
the next batch as one starts committing and has the store claim its keys meanwhile
(claim ahead, docs/design.md section 4), so that two batches' database work overlaps;
batches still commit one at a time, in order. A failed batch is retried (with
backoff) until it commits, never dropped; only then are its keys acknowledged to the
dedupe actor. Two failures are not retried as they are (docs/design.md, sections 4 and
8): a value the database refuses (`StoreDataError`) makes the writer split the batch in
halves, in order, until the update at fault is alone, dead-letter it with the database's
message and commit the rest; and the same refusal of one batch `REPEATS_BEFORE_CRASH`
times in a row (`StoreRejected`) is a crash, which the supervisor counts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import trio

from .backoff import Backoff, BackoffPolicy
from .channels import drain
from .errors import (
    BatchKeepsFailing,
    LostLeadership,
    StoreDataError,
    StoreError,
    StoreRejected,
)
from .events import DeadLetter, Event
from .logs import get_logger
from .messages import Ack, Item
from .metrics import Metrics
from .settings import Settings
from .state import SupervisorState
from .store import Batch, BatchResult, ReplayMark, Store

log = get_logger("stream_supervisor.writer")


RETRY_POLICY = BackoffPolicy(initial=0.1, factor=2.0, cap=5.0)
#: The same `StoreRejected` (SQLSTATE and message) for one batch this many times in a row
#: is a crash: about 1.5 s of retries with the default policy, then the pipeline restarts
#: from durable state, and a loop the database never ends reaches the restart limit.
REPEATS_BEFORE_CRASH = 5
#: A dead letter's reason keeps this much of the database's message.
REASON_CHARS = 500


@dataclass(frozen=True, slots=True)
class WriterSettings:
    account_id: str
    max_batch: int
    retry: BackoffPolicy = RETRY_POLICY
    repeats_before_crash: int = REPEATS_BEFORE_CRASH
    claim_ahead: bool = True

    @classmethod
    def from_settings(cls, s: Settings, account_id: str) -> WriterSettings:
        return cls(account_id=account_id, max_batch=s.max_batch, claim_ahead=s.claims_ahead)


def take_batch(first: Item, inbox: trio.MemoryReceiveChannel[Item], limit: int) -> list[Item]:
    """`first` plus whatever is already queued, up to `limit` items, without waiting."""
    return list(drain(first, inbox, limit))


def take_ahead(inbox: trio.MemoryReceiveChannel[Item], limit: int) -> list[Item]:
    """Whatever is queued now, up to `limit` items, without waiting: the next batch,
    taken while the one before it commits."""
    try:
        first = inbox.receive_nowait()
    except (trio.WouldBlock, trio.EndOfChannel):
        return []
    return list(drain(first, inbox, limit))


def batch_of(account_id: str, items: Sequence[Item]) -> Batch:
    return Batch(account_id, [i for i in items if isinstance(i, Event)],
                 [i for i in items if isinstance(i, DeadLetter)])


async def commit_with_retry(
    store: Store,
    batch: Batch,
    metrics: Metrics,
    state: SupervisorState,
    retry: BackoffPolicy,
    rng: random.Random,
    *,
    repeats_before_crash: int = REPEATS_BEFORE_CRASH,
) -> BatchResult:
    """Commit until it sticks. A retry after an ambiguous failure is safe: the dedupe
    table makes the second attempt apply nothing the first one already committed.

    `StoreDataError` is not retried (the same values would be refused again): it goes
    to the caller, which isolates the update at fault. `LostLeadership` stops at once."""
    backoff = Backoff(retry, rng)
    last: tuple[str, str | None, str] | None = None
    repeats = 0
    while True:
        try:
            result = await store.commit_batch(batch)
        except (LostLeadership, StoreDataError) as exc:
            state.db_writable = isinstance(exc, StoreDataError)
            raise
        except StoreError as exc:
            state.db_writable = False
            if isinstance(exc, StoreRejected):
                repeats = repeats + 1 if exc.signature == last else 1
                last = exc.signature
                if repeats >= repeats_before_crash:
                    log.error("batch_keeps_failing", error=str(exc)[:300], sqlstate=exc.sqlstate,
                              attempts=repeats, events=len(batch.events))
                    raise BatchKeepsFailing(
                        f"the database refused the same batch {repeats} times in a row: "
                        f"{str(exc)[:500]}") from None
            else:
                last, repeats = None, 0
            delay = backoff.next_delay()
            metrics.batch_retries.inc()
            log.warning(
                "batch_retry",
                error=str(exc)[:300],
                events=len(batch.events),
                attempt=backoff.attempt,
                delay=round(delay, 3),
            )
            await trio.sleep(delay)
            continue
        state.db_writable = True
        return result


@dataclass
class Outcome:
    """What committing one taken batch came to: the transactions that committed (one,
    unless the database refused a value), and the updates dead-lettered instead."""

    commits: list[tuple[Batch, BatchResult]] = field(default_factory=list)
    refused: list[Event] = field(default_factory=list)
    round_trips: int = 0  # commit attempts the isolation cost (the first one excluded)


def refused_letter(event: Event, error: StoreDataError) -> DeadLetter:
    """The dead letter of an update the database refused: verbatim, with its message."""
    payload = event.raw or msgspec.json.encode(event)
    sqlstate = f" [{error.sqlstate}]" if error.sqlstate else ""
    return DeadLetter(
        reason=f"refused by the database{sqlstate}: {error.detail}"[:REASON_CHARS],
        payload=payload, source=event.source, received_at=event.received_at)


class _Committer:
    """Commits one taken batch, isolating refused updates by binary splitting."""

    def __init__(self, settings: WriterSettings, store: Store, metrics: Metrics,
                 state: SupervisorState, rng: random.Random) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.state = state
        self.rng = rng

    async def _commit(self, batch: Batch) -> BatchResult:
        return await commit_with_retry(self.store, batch, self.metrics, self.state,
                                       self.settings.retry, self.rng,
                                       repeats_before_crash=self.settings.repeats_before_crash)

    async def commit(self, batch: Batch) -> Outcome:
        outcome = Outcome()
        try:
            outcome.commits.append((batch, await self._commit(batch)))
        except StoreDataError as exc:
            log.warning("batch_refused", error=exc.detail[:300], sqlstate=exc.sqlstate,
                        events=len(batch.events))
            await self._split(batch, exc, outcome)
        return outcome

    async def _try(self, batch: Batch, outcome: Outcome) -> None:
        outcome.round_trips += 1
        try:
            outcome.commits.append((batch, await self._commit(batch)))
        except StoreDataError as exc:
            await self._split(batch, exc, outcome)

    async def _split(self, batch: Batch, exc: StoreDataError, outcome: Outcome) -> None:
        """`batch` was refused: halves in order (the batch's own dead letters and replay
        marks with the half that holds their update), until one update is left alone."""
        events = batch.events
        if len(events) <= 1:
            await self._dead_letter(batch, exc, outcome)
            return
        mid = len(events) // 2
        first, second = events[:mid], events[mid:]
        second_keys = {ev.key for ev in second} - {ev.key for ev in first}
        marks_first = [m for m in batch.replays if m.event_key not in second_keys]
        marks_second = [m for m in batch.replays if m.event_key in second_keys]
        await self._try(Batch(batch.account_id, first, batch.dead_letters, marks_first), outcome)
        await self._try(Batch(batch.account_id, second, (), marks_second), outcome)

    async def _dead_letter(self, batch: Batch, exc: StoreDataError, outcome: Outcome) -> None:
        """One update (or none) and still refused: it is at fault. Its dead letter commits
        with whatever else rode with it; a replayed update records the refusal on the row
        it was replayed from instead of adding another."""
        if not batch.events:
            # Only dead letters and replay marks, and those hold nothing the database can
            # refuse: not an update's fault, so not something to dead-letter.
            raise BatchKeepsFailing(f"the database refused a batch of no updates: {exc}")
        event = batch.events[0]
        replayed = [m for m in batch.replays if m.event_key == event.key]
        letters = list(batch.dead_letters)
        if replayed:
            reason = refused_letter(event, exc).reason
            marks: Sequence[ReplayMark] = [
                *(m for m in batch.replays if m.event_key != event.key),
                *(ReplayMark(m.dead_letter_id, m.event_key, reason) for m in replayed)]
        else:
            letters.append(refused_letter(event, exc))
            marks = batch.replays
        log.warning("update_refused", key=event.key[:200], update=event.event[:64],
                    source=event.source, error=exc.detail[:300], sqlstate=exc.sqlstate,
                    replayed=bool(replayed))
        outcome.round_trips += 1
        try:
            result = await self._commit(Batch(batch.account_id, [], letters, marks))
        except StoreDataError as again:
            raise BatchKeepsFailing(
                f"the database refused the dead letter of a refused update: {again}") from None
        outcome.commits.append((Batch(batch.account_id, [], letters, marks), result))
        outcome.refused.append(event)


async def writer_actor(
    settings: WriterSettings,
    store: Store,
    inbox: trio.MemoryReceiveChannel[Item],
    acks: trio.MemorySendChannel[Ack],
    metrics: Metrics,
    state: SupervisorState,
    *,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume `inbox` until it ends, committing batches; the store is already open."""
    rng = rng if rng is not None else random.Random()
    committer = _Committer(settings, store, metrics, state, rng)
    state.db_writable = True
    state.beat("writer", trio.current_time())
    task_status.started()
    async with acks, inbox:
        try:
            await _write(committer, inbox, acks)
        finally:
            # A batch claimed ahead that will not be committed by this writer: its claims
            # must not linger in an open transaction (a later writer would wait on them).
            # Shielded: the wait is for a claim in flight, which the statement timeout ends.
            with trio.CancelScope(shield=True):
                await store.release_ahead()


async def _write(committer: _Committer, inbox: trio.MemoryReceiveChannel[Item],
                 acks: trio.MemorySendChannel[Ack]) -> None:
    """The writer's loop: take, (claim ahead,) commit, acknowledge, until `inbox` ends."""
    settings, store = committer.settings, committer.store
    metrics, state = committer.metrics, committer.state
    account = settings.account_id
    upcoming: Batch | None = None  # taken while the batch before it committed
    upcoming_claimed = False
    # Claim ahead only while a full batch waits (the writer is what holds the stream
    # up): below that, what is queued is better left to grow into the batch taken after
    # the commit, and a few updates' claim saves less than its thread hop costs.
    full = max(1, min(settings.max_batch, inbox.statistics().max_buffer_size))

    def backlog() -> bool:
        return inbox.statistics().current_buffer_used >= full

    async def take_next() -> None:
        nonlocal upcoming, upcoming_claimed
        if backlog():
            upcoming = batch_of(account, take_ahead(inbox, settings.max_batch))
            upcoming_claimed = await store.claim_ahead(upcoming)

    while True:
        if upcoming is not None:
            batch, claimed, upcoming = upcoming, upcoming_claimed, None
        else:
            try:
                first = await inbox.receive()
            except trio.EndOfChannel:
                return
            batch = batch_of(account, take_batch(first, inbox, settings.max_batch))
            claimed = False
        events = batch.events
        # A backlog: claim this batch's keys first, so that the next batch's claim can run
        # while this one commits. Claims are made in batch order, each after the one before
        # it returned. Asked again for a batch claimed while the one before it committed:
        # the store answers at once if it still holds the claim, and claims it now if it
        # gave the claim up (the batch before it failed).
        if events and settings.claim_ahead and (claimed or backlog()):
            claimed = await store.claim_ahead(batch)
        started = trio.current_time()
        if claimed:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_next)
                outcome = await committer.commit(batch)
                # Acknowledged as soon as it committed, not when the next claim returns.
                await _finish(batch, outcome, started, acks, metrics, state)
        else:
            outcome = await committer.commit(batch)
            await _finish(batch, outcome, started, acks, metrics, state)


async def _finish(batch: Batch, outcome: Outcome, started: float,
                  acks: trio.MemorySendChannel[Ack], metrics: Metrics,
                  state: SupervisorState) -> None:
    """A taken batch is committed: the writer's records, then the ack."""
    events = batch.events
    done = trio.current_time()
    state.beat("writer", done)
    metrics.commit_seconds.observe(done - started)
    # One histogram update per batch, not per update (metrics.BatchHistogram).
    metrics.frame_to_commit_seconds.observe_many(
        [done - ev.received_at for ev in events if ev.received_at])
    for part, result in outcome.commits:
        _record(result, part, done - started, metrics, state)
    if outcome.refused:
        metrics.updates_refused.inc(len(outcome.refused))
    await acks.send(_ack(events, outcome))


def _ack(events: Sequence[Event], outcome: Outcome) -> Ack:
    """Every key of a committed batch is durable now (stored by it, or found already
    stored); sent in batch order, not as a set, so replays are deterministic. Keys the
    database refused are released instead."""
    stored: set[str] = set()
    committed: set[str] = set()
    for batch, result in outcome.commits:
        stored |= result.applied_keys
        committed.update(ev.key for ev in batch.events)
    newest = next((ev.key for ev in reversed(events) if ev.key in stored), None)
    rejected = tuple(dict.fromkeys(ev.key for ev in outcome.refused if ev.key not in committed))
    keys = tuple(ev.key for ev in events if ev.key in committed)
    return Ack(keys, newest, rejected)


def _record(
    result: BatchResult,
    batch: Batch,
    seconds: float,
    metrics: Metrics,
    state: SupervisorState,
) -> None:
    """One committed transaction (several when the database refused a value)."""
    events = batch.events
    metrics.batches.inc()
    metrics.batch_size.observe(len(events) + len(batch.dead_letters))
    if result.duplicate_keys:
        metrics.duplicates_dropped.labels("database").inc(len(result.duplicate_keys))
    if result.stale_fills:
        metrics.duplicates_dropped.labels("order").inc(result.stale_fills)
    metrics.fills_applied.inc(result.fills_applied)
    if result.dead_letters:
        metrics.dead_letters.inc(result.dead_letters)
    for drift in result.drift:
        metrics.position_drift.inc()
        log.warning(
            "position_drift",
            symbol=drift.symbol,
            order_id=drift.order_id,
            ours=str(drift.ours),
            broker=str(drift.broker),
        )
    if result.inexact_fills:
        log.warning("fill_gap", fills=result.inexact_fills)
    state.committed_cursor = result.cursor
    state.committed_events += len(result.applied_keys)
    state.committed_batches += 1
    log.debug(
        "batch_committed",
        events=len(events),
        applied=len(result.applied_keys),
        duplicates=len(result.duplicate_keys),
        fills=result.fills_applied,
        dead_letters=result.dead_letters,
        ms=round(seconds * 1000, 2),
    )
