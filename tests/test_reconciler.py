"""The scheduled reconcile (docs/design.md, section 9): while the market is open it
counts drifted symbols (metric and /readyz), and writes adjustments only when told to,
and then only for a difference two runs in a row saw unchanged."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import trio

from stream_supervisor.adjustments import BASELINE, BrokerPosition
from stream_supervisor.events import Event, fill_key
from stream_supervisor.health import readiness
from stream_supervisor.metrics import Metrics
from stream_supervisor.positions import Position
from stream_supervisor.protocol import WireOrder
from stream_supervisor.reconciler import ScheduledReconcile
from stream_supervisor.settings import Settings
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import Batch, BrokerWord
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore

D = Decimal
ACCOUNT = "acct-sched"
T0 = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)


class Rest:
    def __init__(self) -> None:
        self.open = True
        self.held: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.now: str | None = "2026-11-30T15:00:00Z"  # None: a clock without a time
        self.open_list: list[WireOrder] = []
        self.orders: dict[str, WireOrder] = {}

    async def clock(self) -> dict[str, Any]:
        self.calls.append("clock")
        return {"is_open": self.open, **({"timestamp": self.now} if self.now else {})}

    async def positions(self) -> list[dict[str, Any]]:
        self.calls.append("positions")
        return list(self.held)

    async def open_orders(self) -> list[WireOrder]:
        self.calls.append("open_orders")
        return list(self.open_list)

    async def order(self, order_id: str) -> WireOrder | None:
        self.calls.append(f"order {order_id}")
        return self.orders.get(order_id)


async def _store_holding(qty: str) -> MemoryStore:
    store = MemoryStore(MemoryDatabase())
    await store.apply_broker_word(BrokerWord(
        ACCOUNT, BASELINE, T0, [BrokerPosition("AAPL", Decimal(qty), Decimal(100))]))
    return store


def _reconciler(store: MemoryStore, rest: Rest, **kw: Any) -> tuple[ScheduledReconcile,
                                                                     Metrics, SupervisorState]:
    metrics, state = Metrics(), SupervisorState()
    settings = Settings(reconcile_interval=60.0, **kw)
    return (ScheduledReconcile(settings, rest, store, ACCOUNT, metrics, state,  # type: ignore[arg-type]
                               wallclock=lambda: T0), metrics, state)


async def test_closed_market_compares_nothing() -> None:
    rest = Rest()
    rest.open = False
    job, _metrics, state = _reconciler(await _store_holding("10"), rest)
    run = await job.once()
    assert not run.market_open and rest.calls == ["clock"]
    assert state.drifted_symbols is None


async def test_drift_is_counted_in_the_metric_and_readyz_and_not_applied_by_default() -> None:
    rest = Rest()
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "50"},
                 {"symbol": "BTCUSD", "qty": "1", "side": "long", "avg_entry_price": "9",
                  "asset_class": "crypto"}]
    store = await _store_holding("10")
    job, metrics, state = _reconciler(store, rest)
    for _ in range(3):
        run = await job.once()
        assert [d.symbol for d in run.differences] == ["AAPL", "BTC/USD"] and run.applied == 0
    assert metrics.value("stream_supervisor_drifted_symbols") == 2
    assert readiness(state)["drifted_symbols"] == 2
    assert (await store.snapshot(ACCOUNT)).adjustments[1:] == []


async def test_apply_when_configured_only_for_a_difference_seen_twice_unchanged() -> None:
    rest = Rest()
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "50"}]
    store = await _store_holding("10")
    job, metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    assert (await job.once()).applied == 0  # seen once: maybe a fill on its way
    rest.held[0]["qty"] = "21"  # it was: the broker moved on
    assert (await job.once()).applied == 0
    assert (await job.once()).applied == 1  # 10 vs 21 twice: drift
    snap = await store.snapshot(ACCOUNT)
    assert snap.net_position("AAPL") == 21
    assert [(a.reason, a.qty_before, a.qty_after) for a in snap.adjustments] == [
        ("baseline", Decimal(0), Decimal(10)), ("reconcile", Decimal(10), Decimal(21))]
    run = await job.once()
    assert run.differences == () and metrics.value("stream_supervisor_drifted_symbols") == 0


async def test_runs_on_its_interval(autojump_clock: trio.testing.MockClock) -> None:
    rest = Rest()
    job, _, _ = _reconciler(await _store_holding("10"), rest)
    with trio.move_on_after(150):
        await job.run()
    assert rest.calls.count("clock") == 2


async def test_an_applied_difference_records_the_clock_read_before_its_positions() -> None:
    """The moment an adjusted symbol records (docs/design.md, section 10) is the broker's
    clock of the run that applied it, read before that run's positions."""
    rest = Rest()
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "50"}]
    store = await _store_holding("10")
    job, _metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    rest.now = "2026-11-30T15:00:30Z"
    await job.once()
    rest.now = "2026-11-30T15:01:30.5Z"
    assert (await job.once()).applied == 1
    assert rest.calls == ["clock", "positions"] * 2
    moments = (await store.snapshot(ACCOUNT)).baseline_moments
    assert moments == {"": T0, "AAPL": datetime(2026, 11, 30, 15, 1, 30, 500000, tzinfo=UTC)}


class _FillAfterRead(MemoryStore):
    """The writer commits a fill right after the reconcile read our positions."""

    def __init__(self, fill: Event) -> None:
        super().__init__(MemoryDatabase())
        self.fill: Event | None = fill

    async def open_positions(self, account_id: str) -> list[Position]:
        rows = await super().open_positions(account_id)
        if self.fill is not None:
            fill, self.fill = self.fill, None
            await self.commit_batch(Batch(account_id, [fill]))
        return rows


async def test_a_fill_committed_after_the_read_is_not_erased_by_the_adjustment() -> None:
    """10 held, the broker said 15 twice (5 of ours missing): while the second run
    compared, a sale of 5 committed. Setting the broker's 15 then would erase the sale
    (its positions read did not have it yet): the symbol is left as it is, and the next
    runs compare again."""
    at = T0 + timedelta(seconds=5)
    sale = Event(key=fill_key("late", Decimal(5)), event="fill", source="stream",
                 order_id="late", symbol="AAPL", side="sell", status="filled",
                 cum_qty=Decimal(5), timestamp=at, ts_ns=int(at.timestamp()) * 10**9,
                 order_qty=Decimal(5), cum_avg_price=Decimal(101), fill_qty=Decimal(5),
                 fill_price=Decimal(101))
    store = _FillAfterRead(sale)
    await store.apply_broker_word(BrokerWord(
        ACCOUNT, BASELINE, T0, [BrokerPosition("AAPL", Decimal(10), Decimal(100))]))
    held = store.fill
    store.fill = None
    rest = Rest()
    rest.held = [{"symbol": "AAPL", "qty": "15", "side": "long", "avg_entry_price": "100"}]
    job, _metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    assert (await job.once()).applied == 0  # seen once
    store.fill = held
    assert (await job.once()).applied == 0  # seen twice, but ours moved meanwhile
    assert (await store.snapshot(ACCOUNT)).net_position("AAPL") == 5
    # The broker's next reads have the sale too: still 5 apart, now seen twice alike.
    rest.held[0]["qty"] = "10"
    run = await job.once()
    assert [(d.ours, d.broker) for d in run.differences] == [(D(5), D(10))] and run.applied == 0
    assert (await job.once()).applied == 1
    snap = await store.snapshot(ACCOUNT)
    assert snap.net_position("AAPL") == 10
    assert [(a.qty_before, a.qty_after) for a in snap.adjustments[1:]] == [(D(5), D(10))]


async def test_without_the_brokers_time_nothing_is_applied() -> None:
    """The moment decides which fills reaching us later an adjustment already holds, and
    only the broker's clock stamps them: a clock without a time applies nothing."""
    rest = Rest()
    rest.now = None
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "50"}]
    store = await _store_holding("10")
    job, _metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    for _ in range(3):
        run = await job.once()
        assert len(run.differences) == 1 and run.applied == 0
    assert (await store.snapshot(ACCOUNT)).net_position("AAPL") == 10
    rest.now = "2099-01-01T00:00:00Z"  # a clock that wrong would swallow every fill
    run = await job.once()
    assert len(run.differences) == 1 and run.applied == 0
    rest.now = "2026-11-30T15:01:00Z"
    assert (await job.once()).applied == 1


def _resting_fill(cum: str) -> Event:
    """A fill of order `w` (buy 10 AAPL, resting), cumulative `cum`."""
    at = T0 + timedelta(seconds=5)
    return Event(key=fill_key("w", Decimal(cum)), event="partial_fill", source="stream",
                 order_id="w", symbol="AAPL", side="buy", status="partially_filled",
                 cum_qty=Decimal(cum), timestamp=at, ts_ns=int(at.timestamp()) * 10**9,
                 order_qty=Decimal(10), cum_avg_price=Decimal(100), fill_qty=Decimal(cum),
                 fill_price=Decimal(100))


def _w(filled: str, status: str = "partially_filled") -> WireOrder:
    return WireOrder(id="w", symbol="AAPL", side="buy", status=status,
                     filled_qty=Decimal(filled), qty=Decimal(10))


async def test_a_symbol_with_a_resting_order_is_adjusted_when_all_its_fills_are_with_us(
) -> None:
    """10 held at the baseline, 4 of the resting order `w` filled since: ours 14. The
    broker holds 20 (6 came another way). Its open orders, read after its positions,
    give `w` as filled 4, as ours: nothing of `w` is still to reach us, so the steady
    difference is adjusted; `w`'s next fill counts on top."""
    store = await _store_holding("10")
    await store.commit_batch(Batch(ACCOUNT, [_resting_fill("4")]))
    rest = Rest()
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "100"}]
    rest.open_list = [_w("4")]
    job, _metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    assert (await job.once()).applied == 0  # seen once
    assert (await job.once()).applied == 1
    assert rest.calls[-3:] == ["clock", "positions", "open_orders"]
    assert (await store.snapshot(ACCOUNT)).net_position("AAPL") == 20


async def test_a_symbol_whose_resting_order_filled_more_than_reached_us_waits() -> None:
    """The same, but the broker gives `w` as filled 6: 2 of it are still to reach us (in
    the broker's 20 already: 4 came another way), and would count twice. Left; once that
    fill lands and `w` is done, the 4 are adjusted."""
    store = await _store_holding("10")
    await store.commit_batch(Batch(ACCOUNT, [_resting_fill("4")]))
    rest = Rest()
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "100"}]
    rest.open_list = [_w("6")]
    job, _metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    for _ in range(3):
        assert (await job.once()).applied == 0
    await store.commit_batch(Batch(ACCOUNT, [_resting_fill("6")]))
    assert (await store.snapshot(ACCOUNT)).net_position("AAPL") == 16
    # Not listed open any more: read on its own; done with all its fills with us.
    rest.open_list = []
    rest.orders["w"] = _w("6", status="canceled")
    assert (await job.once()).applied == 0
    assert (await job.once()).applied == 1
    assert "order w" in rest.calls
    assert (await store.snapshot(ACCOUNT)).net_position("AAPL") == 20


async def test_a_broker_position_row_outside_the_bounds_holds_every_adjustment_back() -> None:
    """With one row refused (a quantity of NaN), the broker's word is not whole: MSFT,
    missing from it, would read as flat. Nothing is adjusted while it lasts."""
    store = await _store_holding("10")
    rest = Rest()
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "50"},
                 {"symbol": "MSFT", "qty": "NaN", "side": "long", "avg_entry_price": "1"}]
    job, _metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    for _ in range(3):
        run = await job.once()
        assert [d.symbol for d in run.differences] == ["AAPL"] and run.applied == 0
    rest.held = rest.held[:1]
    assert (await job.once()).applied == 1


class _HtmlPositions(Rest):
    """A broker answering its positions with a maintenance page."""

    async def positions(self) -> list[dict[str, Any]]:
        self.calls.append("positions")
        raise msgspec.DecodeError("JSON is malformed: invalid character (byte 0)")


async def test_any_failure_of_a_run_waits_for_the_next_not_the_pipeline(
        autojump_clock: trio.testing.MockClock) -> None:
    """Only a broker outage or a store error stayed in the reconcile; anything else (an
    HTML body, a value no bound foresaw) tore the pipeline down with the stream, every
    interval. Each run's failure is logged and the next run comes."""
    rest = _HtmlPositions()
    job, _, _ = _reconciler(await _store_holding("10"), rest, reconcile_apply=True)
    with trio.move_on_after(150):
        await job.run()
    assert rest.calls.count("positions") == 2


async def test_an_order_answered_with_no_order_leaves_its_symbol_waiting() -> None:
    """`w` is no longer listed open and the broker answers its order read with something
    that is no order: as if not read, the symbol waits (it crashed the run)."""
    from stream_supervisor.errors import DecodeError

    class Garbled(Rest):
        async def order(self, order_id: str) -> WireOrder | None:
            self.calls.append(f"order {order_id}")
            raise DecodeError("invalid order: Expected `object`, got `str`")

    store = await _store_holding("10")
    await store.commit_batch(Batch(ACCOUNT, [_resting_fill("4")]))
    rest = Garbled()
    rest.held = [{"symbol": "AAPL", "qty": "20", "side": "long", "avg_entry_price": "100"}]
    job, _metrics, _state = _reconciler(store, rest, reconcile_apply=True)
    for _ in range(3):
        assert (await job.once()).applied == 0
    assert "order w" in rest.calls
