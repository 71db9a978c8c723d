"""The running service's scheduled reconcile (docs/design.md, section 9).

Every `STREAM_SUPERVISOR_RECONCILE_INTERVAL` seconds, while `GET /v2/clock` says the
market is open, the leader compares its open positions with `GET /v2/positions`. The
count of drifted symbols is a gauge (`stream_supervisor_drifted_symbols`) and a field of
`/readyz`; each difference is logged. It writes nothing unless
`STREAM_SUPERVISOR_RECONCILE_APPLY` is on, and then only a difference seen unchanged by
two runs in a row: a fill still on its way between the broker and our commit changes our
side between the runs, so it is never mistaken for drift and adjusted twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import trio

from .adjustments import Difference, broker_clock_reading, broker_positions, compare
from .baseline import broker_filled
from .errors import LostLeadership
from .logs import get_logger
from .metrics import Metrics
from .rest import BrokerRest
from .settings import Settings
from .state import SupervisorState
from .store import Store, reconcile_word

log = get_logger("stream_supervisor.reconciler")


@dataclass(frozen=True, slots=True)
class ReconcileRun:
    market_open: bool
    differences: tuple[Difference, ...] = ()
    applied: int = 0


class ScheduledReconcile:
    def __init__(
        self,
        settings: Settings,
        rest: BrokerRest,
        store: Store,
        account_id: str,
        metrics: Metrics,
        state: SupervisorState,
        *,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.rest = rest
        self.store = store
        self.account_id = account_id
        self.metrics = metrics
        self.state = state
        self.wallclock = wallclock
        self._previous: dict[str, tuple[Decimal, Decimal]] = {}

    async def run(self) -> None:
        """Forever, one reconcile per interval; the pipeline's nursery cancels it."""
        if self.settings.reconcile_interval <= 0:
            return
        while True:
            await trio.sleep(self.settings.reconcile_interval)
            try:
                await self.once()
            except LostLeadership:
                raise
            except Exception as exc:  # noqa: BLE001 - a check beside the stream, not of it
                # The next run tries again; the writer has its own view of the store. Any
                # failure (a broker answering HTML, a value no bound foresaw) stays here:
                # it tore the pipeline down, the stream with it, every interval.
                log.warning("reconcile_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    async def once(self) -> ReconcileRun:
        clock = await self.rest.clock()
        if not clock.get("is_open"):
            return ReconcileRun(market_open=False)
        # The broker's clock, read before its positions: an adjusted symbol records it as
        # its moment (docs/design.md, sections 9 and 10).
        moment = broker_clock_reading(clock, now=self.wallclock(),
                                      tolerance=self.settings.future_tolerance)
        broker, refused = broker_positions(await self.rest.positions())
        for line in refused:
            log.warning("reconcile_position_refused", detail=line, scheduled=True)
        ours = await self.store.open_positions(self.account_id)
        _, diffs = compare(ours, broker)
        self.state.drifted_symbols = len(diffs)
        self.metrics.drifted_symbols.set(len(diffs))
        for d in diffs:
            log.warning("reconcile_difference", symbol=d.symbol, ours=str(d.ours),
                        broker=str(d.broker), scheduled=True)
        seen = {d.symbol: (d.ours, d.broker) for d in diffs}
        steady = [d for d in diffs if self._previous.get(d.symbol) == seen[d.symbol]]
        self._previous = seen
        applied = 0
        if self.settings.reconcile_apply and steady and refused:
            # The broker's word is not whole: a symbol missing from it reads as flat.
            log.warning("reconcile_not_applied",
                        reason="a position row of the broker's is outside the bounds",
                        symbols=len(steady))
        elif self.settings.reconcile_apply and steady and moment is None:
            # Without the broker's time no moment says which later fills it holds.
            log.warning("reconcile_not_applied",
                        reason="the broker's clock gave no time within the bounds",
                        symbols=len(steady))
        elif self.settings.reconcile_apply and steady:
            # Only where ours is still what was compared: a fill the writer committed
            # meanwhile is not in the broker's positions read, and would be erased. And
            # only where every order still working has all its fills with us (the
            # broker's filled_qty, read after its positions, is ours).
            working = await broker_filled(self.rest, await self.store.open_order_ids(
                self.account_id, [d.symbol for d in steady]))
            made = await self.store.apply_broker_word(reconcile_word(
                self.account_id, steady, taken_at=self.wallclock(), moment=moment,
                working_filled=working))
            for adj in made:
                log.info("position_adjusted", symbol=adj.symbol, reason=adj.reason,
                         before=str(adj.qty_before), after=str(adj.qty_after))
            adjusted = {adj.symbol for adj in made}
            for d in steady:
                if d.symbol not in adjusted:
                    log.info("reconcile_deferred", symbol=d.symbol, scheduled=True)
            applied = len(made)
            for d in steady:
                self._previous.pop(d.symbol, None)
        return ReconcileRun(market_open=True, differences=tuple(diffs), applied=applied)
