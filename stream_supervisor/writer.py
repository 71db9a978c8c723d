"""The writer actor: adaptive batching (group commit) into the store.

It takes everything already queued, up to `max_batch`, and commits it as one
transaction; it never waits to fill a batch, so a quiet stream gets one-event batches
and low latency while a busy one gets large batches. A failed batch is retried (with
backoff) until it commits, never dropped; only then are its keys acknowledged to the
dedupe actor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

from .backoff import Backoff, BackoffPolicy
from .channels import drain
from .errors import LostLeadership, StoreError
from .events import DeadLetter, Event
from .logs import get_logger
from .messages import Ack, Item
from .metrics import Metrics
from .settings import Settings
from .state import SupervisorState
from .store import Batch, BatchResult, Store

log = get_logger("stream_supervisor.writer")


RETRY_POLICY = BackoffPolicy(initial=0.1, factor=2.0, cap=5.0)


@dataclass(frozen=True, slots=True)
class WriterSettings:
    account_id: str
    max_batch: int
    retry: BackoffPolicy = RETRY_POLICY

    @classmethod
    def from_settings(cls, s: Settings, account_id: str) -> WriterSettings:
        return cls(account_id=account_id, max_batch=s.max_batch)


def take_batch(first: Item, inbox: trio.MemoryReceiveChannel[Item], limit: int) -> list[Item]:
    """`first` plus whatever is already queued, up to `limit` items, without waiting."""
    return list(drain(first, inbox, limit))


async def commit_with_retry(
    store: Store,
    batch: Batch,
    metrics: Metrics,
    state: SupervisorState,
    retry: BackoffPolicy,
    rng: random.Random,
) -> BatchResult:
    """Commit until it sticks. A retry after an ambiguous failure is safe: the dedupe
    table makes the second attempt apply nothing the first one already committed."""
    backoff = Backoff(retry, rng)
    while True:
        try:
            result = await store.commit_batch(batch)
        except LostLeadership:
            state.db_writable = False
            raise
        except StoreError as exc:
            state.db_writable = False
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
    state.db_writable = True
    state.beat("writer", trio.current_time())
    task_status.started()
    async with acks, inbox:
        async for first in inbox:
            items = take_batch(first, inbox, settings.max_batch)
            events = [i for i in items if isinstance(i, Event)]
            dead = [i for i in items if isinstance(i, DeadLetter)]
            batch = Batch(settings.account_id, events, dead)
            started = trio.current_time()
            result = await commit_with_retry(store, batch, metrics, state, settings.retry, rng)
            done = trio.current_time()
            state.beat("writer", done)
            _record(result, items, events, started, done, metrics, state)
            # Every key of a committed batch is durable now (stored by it, or found already
            # stored). Sent in batch order, not as a set, so replays are deterministic.
            stored = result.applied_keys
            newest = next((ev.key for ev in reversed(events) if ev.key in stored), None)
            await acks.send(Ack(tuple(ev.key for ev in events), newest))


def _record(
    result: BatchResult,
    items: list[Item],
    events: list[Event],
    started: float,
    done: float,
    metrics: Metrics,
    state: SupervisorState,
) -> None:
    metrics.batches.inc()
    metrics.batch_size.observe(len(items))
    metrics.commit_seconds.observe(done - started)
    for ev in events:
        if ev.received_at:
            metrics.frame_to_commit_seconds.observe(done - ev.received_at)
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
        ms=round((done - started) * 1000, 2),
    )
