"""The suite catches a broken pipeline: with exactly-once deliberately broken in one
place (put there by the test), the same chaos run fails the invariant checker, while
the intact pipeline under the very same fault passes.

The fault is a writer crash on the batch carrying an order's final fill, before that
batch commits. The pipeline restarts and REST backfill brings the lost fills back...
unless the LRU already learnt their keys (learning before commit), or the cursor was
already moved past them (the cursor written outside the batch transaction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from stream_supervisor import dedupe, pgstore
from stream_supervisor.ledger import cursor_of
from stream_supervisor.store import Batch
from stream_supervisor.testing.broker import ChaosConfig, SimConfig

from .harness import FAST_REST_LIMIT, Outcome, chaos_settings, run_scenario

pytestmark = pytest.mark.chaos


class InjectedCrash(RuntimeError):
    """A bug in the writer's process, raised before the batch transaction commits."""


class CrashOnFinalFill:
    """Wraps `pgstore._commit`: once, on the first batch (after a few committed ones)
    that carries an order's final fill, run `before_crash` and then crash."""

    def __init__(self, before_crash: Callable[[psycopg.Connection[Any], Batch], None]
                 = lambda conn, batch: None, *, after_batches: int = 2) -> None:
        self.real = pgstore._commit
        self.before_crash = before_crash
        self.after_batches = after_batches
        self.seen = 0
        self.lost_orders: set[str] = set()

    def __call__(self, conn: psycopg.Connection[Any], batch: Batch, *args: Any) -> Any:
        finals = {ev.order_id for ev in batch.events if ev.event == "fill"}
        self.seen += 1
        if finals and not self.lost_orders and self.seen > self.after_batches:
            self.lost_orders = finals
            self.before_crash(conn, batch)
            raise InjectedCrash(f"injected writer crash on orders {sorted(finals)}")
        return self.real(conn, batch, *args)


class EagerCache:
    """The broken LRU: a key counts as committed the moment it is first seen. It is one
    cache for the whole process, as the supervisor's own is across pipeline restarts, so
    what it learnt early outlives the crash that lost the batch."""

    def __init__(self) -> None:
        self.learnt: dict[str, None] = {}

    def check(self, cache: dedupe.KeyCache, key: str) -> str | None:
        if key in self.learnt:
            return "lru"
        self.learnt[key] = None
        return None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        eager = self

        def check(cache: dedupe.KeyCache, key: str) -> str | None:
            return eager.check(cache, key)

        monkeypatch.setattr(dedupe.KeyCache, "check", check)


def advance_cursor_outside_the_batch(conn: psycopg.Connection[Any], batch: Batch) -> None:
    """The broken store: the cursor is moved in a statement of its own, in another
    session (the batch's may already be in its transaction, claimed ahead), so it
    survives the batch that never commits."""
    cursor = cursor_of(batch.events)
    with psycopg.connect(conn.info.dsn, password=conn.info.password,
                         autocommit=True) as other:
        other.execute(pgstore._ADVANCE_CURSOR, {"acct": batch.account_id,
                                                "fill_time": cursor.fill_time,
                                                "activity_id": cursor.activity_id})


# No reorder or skipped partials: a single lost final fill must show as a wrong order.
CHAOS = ChaosConfig(duplicate_prob=0.2, duplicate_burst=3, text_frame_prob=0.3)


def _sim(seed: int) -> SimConfig:
    return SimConfig(seed=seed, orders=30, rate=300.0, chaos=CHAOS, scenario="broken-pipeline",
                     rest_rate_limit=FAST_REST_LIMIT)


@pytest.fixture
def crash(monkeypatch: pytest.MonkeyPatch) -> Iterator[CrashOnFinalFill]:
    injector = CrashOnFinalFill()
    monkeypatch.setattr(pgstore, "_commit", injector)
    yield injector


def _lost_fills_reported(outcome: Outcome, orders: set[str]) -> list[str]:
    return [str(m) for m in outcome.mismatches
            if m.invariant == "order_fill" and m.subject in orders]


async def _run(database_url: str, seed: int, *, broken: bool, **settings: Any) -> Outcome:
    # Small batches: many of them, so the crash lands mid-run, not on the first one. A
    # broken pipeline never matches: judge it once it has caught up and gone quiet.
    return await run_scenario(database_url, _sim(seed),
                              settings=chaos_settings(database_url, max_batch=5, **settings),
                              timeout=15.0, give_up_when_quiet=1.5 if broken else None)


@pytest.mark.parametrize("seed", [301, 302])
async def test_intact_pipeline_survives_the_injected_crash(
    seed: int, database_url: str, node_id: str, crash: CrashOnFinalFill
) -> None:
    outcome = await _run(database_url, seed, broken=False, backfill_overlap=0.0)
    assert crash.lost_orders, "the crash was never injected"
    assert outcome.supervisor.state.restarts == 1
    outcome.assert_exactly_once(node_id)


@pytest.mark.parametrize("seed", [301, 302])
async def test_lru_learning_before_commit_is_caught(
    seed: int, database_url: str, crash: CrashOnFinalFill, monkeypatch: pytest.MonkeyPatch
) -> None:
    EagerCache().install(monkeypatch)
    outcome = await _run(database_url, seed, broken=True)
    assert crash.lost_orders and outcome.supervisor.state.restarts == 1
    assert outcome.mismatches, "the checker missed a pipeline that forgets fills"
    caught = _lost_fills_reported(outcome, crash.lost_orders)
    assert caught, f"no order_fill mismatch for {crash.lost_orders}: {outcome.mismatches}"


@pytest.mark.parametrize("seed", [301, 302])
async def test_cursor_outside_the_batch_transaction_is_caught(
    seed: int, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    injector = CrashOnFinalFill(advance_cursor_outside_the_batch)
    monkeypatch.setattr(pgstore, "_commit", injector)
    # No overlap window: the cursor alone says where backfill starts (the overlap is a
    # second safety net that would otherwise hide this bug in a run this short).
    outcome = await _run(database_url, seed, broken=True, backfill_overlap=0.0)
    assert injector.lost_orders and outcome.supervisor.state.restarts == 1
    assert outcome.mismatches, "the checker missed a cursor that ran ahead of the data"
    caught = _lost_fills_reported(outcome, injector.lost_orders)
    assert caught, f"no order_fill mismatch for {injector.lost_orders}: {outcome.mismatches}"
