"""One simulated world: the real supervisor, the simulated broker and the in-memory store
in one Trio run on a virtual clock, driven by a fault schedule derived from one seed.

A crash cancels the whole supervisor at a scheduled virtual time (nothing uncommitted
survives, committed data does) and a new one starts, as systemd would restart it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio
import trio.testing
from trio._core import _run as trio_run_internals

from ...adjustments import broker_position, compare
from ...backoff import BackoffPolicy
from ...errors import StoreError
from ...metrics import Metrics
from ...settings import DEFAULT_ACTIVITIES_WINDOW, DEFAULT_FUTURE_TOLERANCE, Settings
from ...state import SupervisorState
from ...store import Batch
from ...supervisor import Supervisor
from ...wiring import open_supervisor
from ..broker import ChaosConfig, SimConfig, SimulatedBroker
from ..broker.chaos import poison_refusal
from ..memstore import MemoryDatabase, MemoryStore
from ..verify import Mismatch, verify_against_truth
from .transport import BrokerTransport, memory_connector

#: Simulated wall-clock epoch: a fixed Monday session, so timestamps replay exactly.
EPOCH = datetime(2026, 1, 5, 14, 30, tzinfo=UTC)
#: Virtual seconds the world may run before liveness is declared failed (markets last
#: seconds; crashes, stalls and backoff add tens of seconds at most).
TIME_LIMIT = 900.0


class InjectedCrash(Exception):
    """An actor crash injected by the schedule (not a store error: a bug-like failure)."""


@dataclass(frozen=True)
class Schedule:
    """Every fault of one run. Derived from a seed; shrinkable field by field."""

    seed: int
    orders: int = 30
    rate: float = 100.0
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    #: commit attempts (0-based, counted over the whole run) that fail before committing
    fail_before: frozenset[int] = frozenset()
    #: commit attempts that commit and then fail: the ambiguous commit
    fail_after: frozenset[int] = frozenset()
    #: commit attempts at which the writer crashes (a non-store exception)
    actor_crash: frozenset[int] = frozenset()
    #: commit attempts preceded by a writer stall of `stall_seconds`
    writer_stall: frozenset[int] = frozenset()
    stall_seconds: float = 3.0
    #: virtual times at which the whole supervisor is killed and started again
    crashes: tuple[float, ...] = ()
    max_batch: int = 64
    lru_size: int = 10_000
    #: The market trades crypto and options too and ends its day with non-trade
    #: activities (fees, an expiry, an assignment, a split): docs/design.md, section 10.
    asset_mix: bool = False
    #: An account with history (docs/design.md, section 9): positions held before the
    #: session, and the service's first start this many virtual seconds into it (orders
    #: partly filled by then), taking the broker's word as its baseline.
    preexisting: tuple[tuple[str, str, str], ...] = ()
    start_delay: float = 0.0
    #: Chance that an order filling in pieces is replaced part way (SimConfig).
    replace_prob: float = 0.0
    #: Restarts after the activities window: the broker keeps activities this many
    #: seconds (the service is told the same window), and each crash keeps the service
    #: down for `downtime` seconds. 0: the broker keeps everything, restarts are at once.
    activities_window: float = 0.0
    downtime: float = 0.0

    @property
    def history(self) -> bool:
        return bool(self.preexisting) or self.start_delay > 0 or self.activities_window > 0

    @property
    def strict_prices(self) -> bool:
        """Average entry prices and P&L depend on the order in which fills of different
        orders reach a position. A stream that reorders frames, or silently loses a
        partial fill that a later cumulative update then carries, changes that order
        legitimately: quantities stay exact, prices are then not compared."""
        return self.chaos.reorder_window <= 1 and self.chaos.skip_partial_prob == 0

    def faults(self) -> dict[str, int]:
        c = self.chaos
        return {k: v for k, v in {
            "duplicates": int(c.duplicate_prob > 0),
            "disconnects": int(c.disconnect_prob > 0 or bool(c.disconnect_at)),
            "abrupt": int(c.abrupt_prob > 0),
            "reorder": int(c.reorder_window > 1),
            "delays": int(c.delay_prob > 0),
            "stalls": int(c.stall_prob > 0),
            "malformed": int(c.malformed_prob > 0),
            "unknown_events": int(c.unknown_event_prob > 0),
            "rest_errors": int(c.rest_error_prob > 0 or c.rest_429_prob > 0),
            "short_pages": int(c.rest_short_pages),
            "replay": int(c.replay_on_connect > 0),
            "replay_before_listening": int(c.replay_on_connect > 0
                                           and c.replay_before_listening),
            "skipped_partials": int(c.skip_partial_prob > 0),
            "upgrade_429": int(c.reject_429_connects > 0),
            "poison": int(c.poison_prob > 0),
            "asset_mix": int(self.asset_mix),
            "store_fail_before": len(self.fail_before),
            "store_fail_after": len(self.fail_after),
            "actor_crash": len(self.actor_crash),
            "writer_stall": len(self.writer_stall),
            "supervisor_crash": len(self.crashes),
            "history": int(self.history),
            "replaced": int(self.replace_prob > 0),
        }.items() if v}


    @property
    def delivers_every_frame(self) -> bool:
        """Whether every frame the broker hands over reaches a commit: no crash loses what
        was in flight, no stall or reset loses what was on the wire, no failed backfill
        drops the live frames it buffered. Then every poison sent is a dead letter."""
        c = self.chaos
        return not (self.crashes or self.actor_crash or c.stall_prob > 0
                    or c.disconnect_prob > 0 or c.disconnect_at or c.rest_error_prob > 0
                    or c.rest_429_prob > 0)


@dataclass
class Outcome:
    schedule: Schedule
    mismatches: list[Mismatch]
    finished: bool
    virtual_seconds: float
    lives: int
    commits: int
    digest: str  # the final state, hashed: equal digests = bit-for-bit equal runs
    trace: list[str]
    #: position_adjustments' reasons, in order (a baseline, a rebaseline...).
    adjustments: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.finished and not self.mismatches


class _StoreFaults:
    """Commit-attempt counter shared by every store of the run (it survives crashes)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.attempt = -1
        self.trace: list[str] = []

    def before(self, batch: Batch) -> bool:
        self.attempt += 1
        if self.attempt in self.schedule.actor_crash:
            self.trace.append(f"actor_crash@{self.attempt}")
            raise InjectedCrash(f"injected writer crash at commit attempt {self.attempt}")
        if self.attempt in self.schedule.fail_before:
            self.trace.append(f"fail_before@{self.attempt}")
            return True
        return False

    def after(self, batch: Batch) -> bool:
        if self.attempt in self.schedule.fail_after:
            self.trace.append(f"fail_after@{self.attempt}")
            return True
        return False


class _StallingStore(MemoryStore):
    """A memory store whose commits can stall (a slow database), in virtual time."""

    def __init__(self, db: MemoryDatabase, faults: _StoreFaults) -> None:
        super().__init__(db, fail_before_commit=faults.before, fail_after_commit=faults.after,
                         refuse=poison_refusal)
        self.faults = faults

    async def commit_batch(self, batch: Batch) -> Any:
        if self.faults.attempt + 1 in self.faults.schedule.writer_stall:
            await trio.sleep(self.faults.schedule.stall_seconds)
        return await super().commit_batch(batch)


def sim_settings(schedule: Schedule, sim: SimConfig) -> Settings:
    return Settings(
        key_id=sim.key_id,
        secret_key=sim.secret_key,
        base_url="http://broker.sim",
        stream_url="ws://broker.sim/stream",
        database_url="memory://",
        max_batch=schedule.max_batch,
        channel_size=max(schedule.max_batch, 32),
        lru_size=schedule.lru_size,
        ping_interval=5.0,
        ping_timeout=5.0,
        connect_timeout=5.0,
        backoff=BackoffPolicy(initial=0.2, factor=2.0, cap=5.0, rate_limited_floor=2.0,
                              healthy_after=10.0),
        backfill_overlap=0.25,
        order_refresh_interval=2.0,
        activity_interval=2.0,
        first_start_lookback=86_400.0,
        drain_timeout=10.0,
        restart_limit=10,
        restart_window=30.0,
        rest_timeout=5.0,
        rest_retries=20,
        # A world without history starts with its market, as before: the first-start
        # lookback covers everything. One with history takes the broker's word.
        baseline=schedule.history,
        activities_window=schedule.activities_window or DEFAULT_ACTIVITIES_WINDOW,
    )


@contextmanager
def _seeded_scheduler(seed: int) -> Iterator[None]:
    """Trio shuffles runnable tasks with a module-level Random; seed it so one seed gives
    one interleaving. (Private API, pinned by the determinism test.)"""
    rng = trio_run_internals._r
    saved = rng.getstate()
    rng.seed(seed)
    try:
        yield
    finally:
        rng.setstate(saved)


def run_schedule(
    schedule: Schedule,
    *,
    store_factory: Callable[[MemoryDatabase, _StoreFaults], MemoryStore] | None = None,
) -> Outcome:
    """Run one world to completion (or the time limit) and check every invariant."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    with _seeded_scheduler(schedule.seed):
        return trio.run(_world, schedule, store_factory, clock=clock)


async def _world(
    schedule: Schedule,
    store_factory: Callable[[MemoryDatabase, _StoreFaults], MemoryStore] | None,
) -> Outcome:
    t0 = trio.current_time()
    sim = SimConfig(
        seed=schedule.seed,
        orders=schedule.orders,
        rate=schedule.rate,
        chaos=schedule.chaos,
        start_time=EPOCH,
        scenario="sim",
        asset_mix=schedule.asset_mix,
        # After the longest stall (20 s): the day's updates are delivered before it ends.
        activity_delay=30.0,
        preexisting=schedule.preexisting,
        replace_prob=schedule.replace_prob,
        activities_retention=schedule.activities_window or None,
    )
    broker = SimulatedBroker(sim)
    db = MemoryDatabase()
    faults = _StoreFaults(schedule)
    make_store = store_factory or (lambda d, f: _StallingStore(d, f))
    settings = sim_settings(schedule, sim)
    trace: list[str] = []
    lives = 0
    account_id = broker.account()["id"]

    def wallclock() -> datetime:
        return EPOCH + timedelta(seconds=trio.current_time() - t0)

    async with trio.open_nursery() as world:
        broker.mark_server_started(trio.current_time())
        await world.start(broker.run_market)
        if schedule.start_delay:
            await trio.sleep(schedule.start_delay)  # a first start in the middle of the day
        crash_times = sorted(schedule.crashes)
        while True:
            lives += 1
            rng = random.Random(f"{schedule.seed}/{lives}")
            next_crash = crash_times.pop(0) if crash_times else None
            with trio.CancelScope() as life:
                if next_crash is not None:
                    life.deadline = t0 + next_crash
                async with (
                    open_supervisor(
                        settings, metrics=Metrics(), state=SupervisorState(),
                        connector=memory_connector(broker, world),
                        rest_transport=BrokerTransport(broker),
                        store_factory=lambda: make_store(db, faults),
                        wallclock=wallclock, rng=rng, install_signal_handlers=False,
                    ) as sup,
                    trio.open_nursery() as inner,
                ):
                    inner.start_soon(_run_and_record, sup, trace)
                    if next_crash is None:
                        await _until_converged(broker, db, account_id, t0,
                                              schedule.strict_prices, sup.state,
                                              schedule.history)
                        sup.request_drain("simulation finished")
            if life.cancelled_caught:
                trace.append(f"crash@{trio.current_time() - t0:.3f}")
                if schedule.downtime:
                    await trio.sleep(schedule.downtime)  # the market goes on meanwhile
                continue
            break
        world.cancel_scope.cancel()

    snapshot = await MemoryStore(db).snapshot(account_id)
    truth = broker.ground_truth()
    mismatches = verify_against_truth(snapshot, truth, strict_prices=schedule.strict_prices,
                                      history=schedule.history)
    mismatches += check_poisons(db, account_id, broker.poisons_sent,
                                exact=schedule.delivers_every_frame)
    mismatches += check_broker_positions(snapshot, broker.positions())
    latest = wallclock() + timedelta(seconds=DEFAULT_FUTURE_TOLERANCE)
    if snapshot.cursor is not None and snapshot.cursor.fill_time is not None \
            and snapshot.cursor.fill_time > latest:
        mismatches.append(Mismatch("cursor", "fill_time", f"<= {latest.isoformat()}",
                                   snapshot.cursor.fill_time.isoformat()))
    trace.extend(faults.trace)
    return Outcome(
        schedule=schedule,
        mismatches=mismatches,
        finished=broker.finished,
        virtual_seconds=trio.current_time() - t0,
        lives=lives,
        commits=db.commits,
        digest=_digest(snapshot, truth, list(db.account(account_id).keys)),
        trace=trace,
        adjustments=[a.reason for a in snapshot.adjustments],
    )


async def _run_and_record(sup: Supervisor, trace: list[str]) -> None:
    try:
        code = await sup.run()
    finally:
        if sup.state.baseline is not None:
            trace.append(sup.state.baseline)
    trace.append(f"exit={code}")


async def _until_converged(
    broker: SimulatedBroker, db: MemoryDatabase, account_id: str, t0: float, strict: bool,
    state: SupervisorState, history: bool = False,
) -> None:
    """Wait until the market is finished, the supervisor is caught up (streaming, its
    latest backfill and order refresh done) and the store matches the market, or the
    time limit.

    Caught up matters: an order whose updates are all still on their way matches "not
    stored yet", so a world could stop before a held batch stores the order's first
    update and the REST refresh brings its last (seen with poison batches split by the
    writer while a stall held them).

    Liveness: a supervisor that never catches up fails here (the check after it reports
    what is missing), not by hanging the test.
    """
    store = MemoryStore(db)
    poll = 1.0
    with trio.move_on_at(t0 + TIME_LIMIT):
        while True:
            await trio.sleep(poll)
            # Converged worlds are seen within a second; a stuck one is checked ever less
            # often, so a failing seed costs little real time to report.
            poll = min(poll * 1.5, 30.0) if broker.finished else 1.0
            if broker.finished and state.caught_up and state.connection == "streaming":
                snap = await store.snapshot(account_id)
                if not verify_against_truth(snap, broker.ground_truth(), strict_prices=strict,
                                            history=history):
                    return


def check_broker_positions(snapshot: Any, positions: list[dict[str, Any]]) -> list[Mismatch]:
    """The store's open positions against the broker's `GET /v2/positions`, as
    `reconcile` compares them (canonical symbols, signed quantities)."""
    _, diffs = compare(snapshot.positions, [broker_position(p) for p in positions])
    return [Mismatch("broker_positions", d.symbol, f"net qty {d.broker}", f"net qty {d.ours}")
            for d in diffs]


#: The reason each poison kind must be dead-lettered with.
POISON_REASONS = {"poison_bounds": "out of bounds: ", "poison_store": "refused by the database"}


def check_poisons(db: MemoryDatabase, account_id: str, sent: list[tuple[str, bytes]], *,
                  exact: bool) -> list[Mismatch]:
    """Dead letters match the poison injected: each poison dead-lettered at most once,
    with its kind's reason, nothing but poison there under those reasons; and when the
    schedule loses no delivered frame, every poison sent is there."""
    kinds = {frame: kind for kind, frame in sent}
    found: dict[bytes, list[str]] = {}
    out: list[Mismatch] = []
    for letter in db.stored_dead_letters(account_id):
        poisoned = any(letter.reason.startswith(r) for r in POISON_REASONS.values())
        if letter.payload in kinds:
            found.setdefault(letter.payload, []).append(letter.reason)
        elif poisoned:
            out.append(Mismatch("dead_letters", f"letter {letter.id}", "a poison injected",
                                letter.reason[:80]))
    for frame, reasons in found.items():
        want = POISON_REASONS[kinds[frame]]
        if len(reasons) != 1 or not reasons[0].startswith(want):
            out.append(Mismatch("dead_letters", kinds[frame], f"once, {want}...",
                                str([r[:60] for r in reasons])))
    if exact:
        missing = [kind for kind, frame in sent if frame not in found]
        if missing:
            out.append(Mismatch("dead_letters", "poison", f"{len(sent)} dead letters",
                                f"{len(missing)} missing: {missing[:5]}"))
    return out


def _digest(snapshot: Any, truth: dict[str, Any], commit_order: list[str]) -> str:
    """Hash of the final state *and* of the order events were committed in."""
    h = hashlib.sha256()
    for key in commit_order:
        h.update(key.encode())
    for oid in sorted(snapshot.orders):
        o = snapshot.orders[oid]
        h.update(f"{oid}{o.filled_qty}{o.filled_avg_price}{o.status}".encode())
    for p in sorted(snapshot.positions, key=lambda p: p.position_id or 0):
        h.update(f"{p.position_id}{p.symbol}{p.qty}{p.avg_entry_price}{p.realized_pnl}"
                 f"{p.closed_at}".encode())
    h.update(str(snapshot.cursor).encode())
    h.update(str(truth.get("stats")).encode())
    return h.hexdigest()[:16]


__all__ = ["InjectedCrash", "Outcome", "Schedule", "StoreError", "run_schedule"]
