"""Real accounts (docs/design.md, section 9), on real PostgreSQL: the reproductions of
issue 14 each end with stored positions equal to the broker's `GET /v2/positions`
(quantity, side, average entry where the broker's is known), and `check` passes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from stream_supervisor.activities import WireNonTrade
from stream_supervisor.adjustments import (
    BASELINE,
    REBASELINE,
    broker_position,
    broker_positions,
    compare,
)
from stream_supervisor.baseline import needs_baseline, take_baseline, take_snapshot
from stream_supervisor.check import run_checks
from stream_supervisor.errors import BrokerUnavailable
from stream_supervisor.events import Event, Source, event_key, format_timestamp
from stream_supervisor.ledger import Cursor
from stream_supervisor.metrics import Metrics
from stream_supervisor.pgstore import PgStore
from stream_supervisor.protocol import OrderList, WireActivity, WireOrder
from stream_supervisor.reconcile import apply_differences, known_assets, reconcile_account
from stream_supervisor.recovery import GapRecovery, RecoverySettings
from stream_supervisor.state import SupervisorState
from stream_supervisor.store import Batch, StoreSnapshot

ACCOUNT = "acct-real"
D = Decimal
NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)


def at(minutes: float) -> datetime:
    return NOW + timedelta(minutes=minutes)


class Broker:
    """The REST side of an account with history: positions, open orders and FILL
    activities as the broker would answer them (in memory; the store is PostgreSQL)."""

    def __init__(self) -> None:
        self.held: list[dict[str, Any]] = []
        self.open: list[WireOrder] = []
        self.orders: dict[str, WireOrder] = {}
        self.activities: list[WireActivity] = []
        self.market_open = True

    async def account_id(self) -> str:
        return ACCOUNT

    async def fill_activities(self, *, after: str | None, page_token: str | None,
                              page_size: int = 100) -> list[WireActivity]:
        items = [a for a in self.activities if after is None or a.transaction_time > after]
        if page_token is not None:
            items = [a for a in items if a.id > page_token]
        return items[:page_size]

    async def open_orders(self) -> list[WireOrder]:
        return list(self.open)

    async def order(self, order_id: str) -> WireOrder | None:
        return self.orders.get(order_id)

    async def orders_since(self, *, after: str, limit: int = 500) -> list[WireOrder]:
        return []

    async def positions(self) -> list[dict[str, Any]]:
        return list(self.held)

    async def clock(self) -> dict[str, Any]:
        return {"is_open": self.market_open}

    async def non_trade_activities(self, **_: Any) -> list[WireNonTrade]:
        return []

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        return None


def fill(order_id: str, side: str, cum: str, qty: str, price: str, avg: str, t: datetime,
         *, symbol: str = "AAPL", order_qty: str | None = None, source: Source = "stream",
         status: str | None = None) -> Event:
    ts_ns = int(t.timestamp()) * 10**9
    done = order_qty is None or D(cum) >= D(order_qty)
    return Event(
        key=event_key("fill", order_id, D(cum), ts_ns), event="fill" if done else "partial_fill",
        source=source, order_id=order_id, symbol=symbol, side=side,
        status=status or ("filled" if done else "partially_filled"), cum_qty=D(cum),
        timestamp=t, ts_ns=ts_ns, order_qty=D(order_qty or cum),
        cum_avg_price=D(avg) if source == "stream" else None, fill_qty=D(qty),
        fill_price=D(price), activity_id=None if source == "stream" else f"a-{order_id}-{cum}",
    )


def update(event: str, order_id: str, status: str, t: datetime, *, cum: str = "0",
           side: str = "buy", symbol: str = "AAPL", source: Source = "stream") -> Event:
    ts_ns = int(t.timestamp()) * 10**9
    name = "refresh" if event == "refresh" else event
    key = (f"refresh:{order_id}:{status}:{ts_ns}" if event == "refresh"
           else event_key(event, order_id, D(cum), ts_ns))
    return Event(key=key, event=name, source=source, order_id=order_id, symbol=symbol,
                 side=side, status=status, cum_qty=D(cum), timestamp=t, ts_ns=ts_ns)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PgStore]:
    pg = PgStore(database_url)
    await pg.open()
    assert await pg.try_leadership(ACCOUNT)
    try:
        yield pg
    finally:
        await pg.aclose()


async def commit(store: PgStore, *events: Event) -> None:
    await store.commit_batch(Batch(ACCOUNT, list(events)))


def open_rows(snap: StoreSnapshot) -> dict[str, tuple[str, Decimal, Decimal]]:
    return {p.symbol: (p.side, abs(p.qty), p.avg_entry_price) for p in snap.positions
            if p.is_open}


def broker_rows(broker: Broker) -> dict[str, tuple[str, Decimal, Decimal]]:
    out = {}
    for row in broker.held:
        b = broker_position(row)
        out[b.symbol] = ("long" if b.qty > 0 else "short", abs(b.qty), b.avg_entry_price)
    return out


async def assert_as_the_broker(store: PgStore, broker: Broker, database_url: str) -> None:
    snap = await store.snapshot(ACCOUNT)
    assert open_rows(snap) == broker_rows(broker)
    _, diffs = compare(snap.positions, [broker_position(p) for p in broker.held],
                       known_assets(snap))
    assert diffs == []
    assert run_checks(database_url, ACCOUNT) == []


def position(symbol: str, qty: str, avg: str, **extra: str) -> dict[str, Any]:
    side = "short" if qty.startswith("-") else "long"
    return {"symbol": symbol, "qty": qty, "side": side, "avg_entry_price": avg,
            "asset_class": "us_equity", **extra}


async def test_positions_held_before_the_first_start_are_the_starting_state(
        store: PgStore, database_url: str) -> None:
    # Reproduction 1: long 100 AAPL bought yesterday; today sell 100 @190, buy 50 @185.
    broker = Broker()
    broker.held = [position("AAPL", "100", "150")]
    assert needs_baseline(await store.load_cursor(ACCOUNT), at(0), 86400) == BASELINE
    _, made = await take_baseline(store, broker, ACCOUNT, reason=BASELINE, now=at(0),
                                  window=600)
    assert [(a.symbol, a.qty_before, a.qty_after) for a in made] == [("AAPL", D(0), D(100))]
    await commit(store, fill("s1", "sell", "100", "100", "190", "190", at(1)))
    await commit(store, fill("b1", "buy", "50", "50", "185", "185", at(2)))
    broker.held = [position("AAPL", "50", "185")]
    await assert_as_the_broker(store, broker, database_url)
    snap = await store.snapshot(ACCOUNT)
    closed = [p for p in snap.history if p.symbol == "AAPL"]
    # The long 100 closed at 190 against the broker's average entry of 150.
    assert [(p.realized_pnl, p.opened_by_order_id) for p in closed] == [(D(4000), BASELINE)]
    assert needs_baseline(await store.load_cursor(ACCOUNT), at(3), 86400) is None


async def test_a_gtc_order_partly_filled_before_the_first_start_counts_only_later_fills(
        store: PgStore, database_url: str) -> None:
    # Reproduction 2: a GTC buy of 20 filled 10 yesterday (in the broker's position),
    # 5 more today after the first start.
    broker = Broker()
    gtc = WireOrder(id="g1", symbol="AAPL", side="buy", status="partially_filled",
                    filled_qty=D(10), qty=D(20), filled_avg_price=D(100),
                    created_at=format_timestamp(at(-1440)), updated_at=format_timestamp(at(-1430)))
    broker.open = [gtc]
    broker.held = [position("AAPL", "10", "100")]
    await take_baseline(store, broker, ACCOUNT, reason=BASELINE, now=at(0), window=600)
    # The stream (or a replay) repeating the fill of yesterday changes nothing...
    await commit(store, fill("g1", "buy", "10", "10", "100", "100", at(0.5), order_qty="20"))
    # ...and only today's 5 count.
    await commit(store, fill("g1", "buy", "15", "5", "106", "102", at(1), order_qty="20"))
    broker.held = [position("AAPL", "15", "102")]
    await assert_as_the_broker(store, broker, database_url)
    # A REST refresh of the order changes nothing more.
    await commit(store, update("refresh", "g1", "partially_filled", at(2), cum="15",
                               source="rest"))
    await assert_as_the_broker(store, broker, database_url)
    snap = await store.snapshot(ACCOUNT)
    assert snap.orders["g1"].filled_qty == 15
    assert snap.baseline_qty == {"g1": D(10)}


async def test_fills_inside_the_window_before_the_snapshot_are_not_counted_twice(
        store: PgStore, database_url: str) -> None:
    # An order filled two minutes before the first start, no longer open: the first
    # backfill re-reads its fill (cursor minus the overlap), which must be stale.
    broker = Broker()
    act = WireActivity(id="a-m1-3", order_id="m1", symbol="MSFT", side="buy",
                       price=D(400), qty=D(3), cum_qty=D(3),
                       transaction_time=format_timestamp(at(-2)), order_status="filled")
    broker.activities = [act]
    broker.orders["m1"] = WireOrder(id="m1", symbol="MSFT", side="buy", status="filled",
                                    filled_qty=D(3), qty=D(3), filled_avg_price=D(400),
                                    updated_at=format_timestamp(at(-2)))
    broker.held = [position("MSFT", "3", "400")]
    snapshot, _ = await take_baseline(store, broker, ACCOUNT, reason=BASELINE, now=at(0),
                                      window=600)
    assert {o.order_id for o in snapshot.orders} == {"m1"}
    await commit(store, fill("m1", "buy", "3", "3", "400", "400", at(-2), source="rest"))
    await assert_as_the_broker(store, broker, database_url)
    assert (await store.load_cursor(ACCOUNT)) == Cursor(at(0), act.id)


async def test_the_snapshot_is_read_again_until_no_fill_lands_in_between() -> None:
    broker = Broker()
    reads = 0
    real_positions = broker.positions

    async def positions() -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        if reads == 1:  # a fill lands while the first read is under way
            broker.activities.append(WireActivity(
                id="1::a", order_id="o9", symbol="AAPL", side="buy", price=D(1), qty=D(1),
                cum_qty=D(1), transaction_time=format_timestamp(at(-1))))
            broker.held = [position("AAPL", "1", "1")]
        return await real_positions()

    broker.positions = positions  # type: ignore[method-assign]
    snapshot = await take_snapshot(broker, now=at(0), window=600)
    assert snapshot.attempts == 2
    assert [o.filled_qty for o in snapshot.orders] == [D(1)]


async def test_each_symbol_settles_in_a_round_of_its_own_while_others_fill() -> None:
    # MSFT and TSLA take turns filling during every read, so no round is quiet for the
    # whole account; each symbol is quiet in every other round, which is enough: its
    # position moved by exactly its fills stamped after the previous round's positions
    # read (the clock read right after that read is `at((reads + 1) / 10)`).
    broker = TickingBroker()
    cum = {"MSFT": 0, "TSLA": 0}
    reads = 0
    real_positions = broker.positions

    async def positions() -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        answer = await real_positions()
        symbol = "TSLA" if reads % 2 else "MSFT"
        cum[symbol] += 1
        broker.activities.append(WireActivity(
            id=f"{reads:03d}::{symbol}", order_id=symbol.lower(), symbol=symbol, side="buy",
            price=D(100), qty=D(1), cum_qty=D(cum[symbol]),
            transaction_time=format_timestamp(at((reads + 1) / 10 + 0.05))))
        broker.held = [position(sym, str(q), "100") for sym, q in cum.items() if q]
        return answer

    broker.positions = positions  # type: ignore[method-assign]
    snapshot = await take_snapshot(broker, now=at(0), window=600)
    # Round 1: TSLA fills. Round 2: MSFT fills, TSLA settles at 1. Round 3: TSLA fills
    # again, MSFT settles at 1. Each with its order's mark as of its own round.
    assert snapshot.attempts == 3
    assert snapshot.moments == {"TSLA": at(0.25), "MSFT": at(0.35)}
    assert sorted((p.symbol, p.qty) for p in snapshot.positions) == [
        ("MSFT", D(1)), ("TSLA", D(1))]
    assert sorted((o.order_id, o.filled_qty) for o in snapshot.orders) == [
        ("msft", D(1)), ("tsla", D(1))]


async def test_a_refused_cancel_or_replace_and_a_new_day_leave_no_stuck_status(
        store: PgStore, database_url: str) -> None:
    # Reproduction 3.
    await commit(store, update("new", "c1", "new", at(0)),
                 update("pending_cancel", "c1", "pending_cancel", at(1)),
                 update("order_cancel_rejected", "c1", "new", at(2)))
    await commit(store, update("new", "r1", "new", at(0)),
                 update("pending_replace", "r1", "pending_replace", at(1)),
                 update("order_replace_rejected", "r1", "new", at(2)))
    await commit(store, update("new", "d1", "new", at(0)),
                 update("done_for_day", "d1", "done_for_day", at(1)),
                 update("new", "d1", "new", at(1440)))
    # One stuck before this change (the refusal never seen): the refresh repairs it.
    await commit(store, update("new", "x1", "new", at(0)),
                 update("pending_cancel", "x1", "pending_cancel", at(1)))
    await commit(store, update("refresh", "x1", "new", at(3), source="rest"))
    snap = await store.snapshot(ACCOUNT)
    assert {o: s.status for o, s in snap.orders.items()} == {
        "c1": "new", "r1": "new", "d1": "new", "x1": "new"}
    assert await store.open_order_ids(ACCOUNT) != []
    await assert_as_the_broker(store, Broker(), database_url)


async def test_crypto_positions_are_compared_once_under_one_symbol(
        store: PgStore, database_url: str) -> None:
    # Reproduction 4: orders and the stream say BTC/USD, GET /v2/positions says BTCUSD.
    await take_baseline(store, Broker(), ACCOUNT, reason=BASELINE, now=at(0), window=600)
    await commit(store, fill("k1", "buy", "0.5", "0.5", "60000", "60000", at(1),
                             symbol="BTC/USD"))
    broker = Broker()
    broker.held = [{"symbol": "BTCUSD", "qty": "0.5", "side": "long",
                    "avg_entry_price": "60000", "asset_class": "crypto",
                    "asset_id": "276e2673-764b-4ab6-a611-caf665ca6340"}]
    await assert_as_the_broker(store, broker, database_url)


async def test_replaced_orders_keep_their_fills_and_nothing_counts_twice(
        store: PgStore, database_url: str) -> None:
    # Reproduction 5: 4 of 10 filled, replaced by an order of 6 that fills 3 then 3.
    await take_baseline(store, Broker(), ACCOUNT, reason=BASELINE, now=at(0), window=600)
    await commit(store, update("new", "old", "new", at(1)),
                 fill("old", "buy", "4", "4", "10", "10", at(2), order_qty="10"))
    await commit(store, update("replaced", "old", "replaced", at(3), cum="4"),
                 update("new", "new", "new", at(3)),
                 fill("new", "buy", "3", "3", "11", "11", at(4), order_qty="6"))
    # The old order's fill again from REST (backfill) and the replacement's second fill.
    await commit(store, fill("old", "buy", "4", "4", "10", "10", at(2), source="rest"),
                 fill("new", "buy", "6", "3", "12", "11.5", at(5), order_qty="6"))
    broker = Broker()
    broker.held = [position("AAPL", "10", "10.9")]
    await assert_as_the_broker(store, broker, database_url)
    snap = await store.snapshot(ACCOUNT)
    assert {o: (s.status, s.filled_qty) for o, s in snap.orders.items()} == {
        "old": ("replaced", D(4)), "new": ("filled", D(6))}


async def test_reconcile_apply_brings_a_drifted_database_to_the_broker_and_check_passes(
        store: PgStore, database_url: str) -> None:
    # Drift the service cannot see: a split doubled TSLA, a transfer brought in 2 ETH.
    await take_baseline(store, Broker(), ACCOUNT, reason=BASELINE, now=at(0), window=600)
    await commit(store, fill("t1", "buy", "10", "10", "200", "200", at(1), symbol="TSLA"),
                 fill("t2", "sell", "5", "5", "50", "50", at(1), symbol="XYZ"))
    broker = Broker()
    broker.held = [position("TSLA", "20", "100"),
                   {"symbol": "ETHUSD", "qty": "2", "side": "long", "avg_entry_price": "3000",
                    "asset_class": "crypto"}]
    snap = await store.snapshot(ACCOUNT)
    _, diffs = compare(snap.positions, [broker_position(p) for p in broker.held])
    assert [(d.symbol, d.ours, d.broker) for d in diffs] == [
        ("ETH/USD", D(0), D(2)), ("TSLA", D(10), D(20)), ("XYZ", D(-5), D(0))]
    made = await apply_differences(store, ACCOUNT, diffs, taken_at=at(2))
    assert [(a.symbol, a.reason, a.qty_before, a.qty_after) for a in made] == [
        ("ETH/USD", "reconcile", D(0), D(2)), ("TSLA", "reconcile", D(10), D(20)),
        ("XYZ", "reconcile", D(-5), D(0))]
    await assert_as_the_broker(store, broker, database_url)
    snap = await store.snapshot(ACCOUNT)
    assert [a.reason for a in snap.adjustments] == ["reconcile"] * 3
    # The rows it replaced are closed and in history, not overwritten.
    assert sorted(p.symbol for p in snap.history) == ["TSLA", "XYZ"]
    # Later fills go on from the broker's quantity.
    await commit(store, fill("t3", "sell", "20", "20", "110", "110", at(3), symbol="TSLA"))
    broker.held = broker.held[1:]
    await assert_as_the_broker(store, broker, database_url)


class ClockedBroker(Broker):
    """A broker whose `GET /v2/clock` gives its time (`self.now`)."""

    def __init__(self, now: datetime) -> None:
        super().__init__()
        self.now = now

    async def clock(self) -> dict[str, Any]:
        return {"is_open": True, "timestamp": format_timestamp(self.now)}


def fee(n: int, qty: str, t: datetime, symbol: str = "BTCUSD") -> Event:
    from stream_supervisor.activities import non_trade_to_event

    return non_trade_to_event(WireNonTrade(
        id=f"20261130{n:09d}::fee", activity_type="CFEE", date=t.date().isoformat(),
        transaction_time=format_timestamp(t), symbol=symbol, qty=D(qty)))


async def test_reconcile_apply_holds_a_fee_posted_later_for_a_fill_before_it(
        store: PgStore, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`reconcile --apply` after a crypto buy whose fee has not posted: the adjustment
    brings the pair to the broker's (fee included); the CFEE posting later, charged at
    the fill before the reconcile's clock, is stored and not applied again, and `check`
    passes. A fee charged after the reconcile's clock is applied (docs/design.md,
    section 10)."""
    from stream_supervisor.activities import APPLIED, IN_BASELINE

    await take_baseline(store, Broker(), ACCOUNT, reason=BASELINE, now=at(0), window=600)
    await commit(store, fill("c1", "buy", "1", "1", "50000", "50000", at(1), symbol="BTC/USD"))
    broker = ClockedBroker(at(2))
    broker.held = [{"symbol": "BTCUSD", "qty": "0.9975", "side": "long",
                    "avg_entry_price": "50000", "asset_class": "crypto"}]
    assert await reconcile_account(store, broker, ACCOUNT, apply=True,
                                   now=lambda: at(2.5)) == 0
    assert "BTC/USD: stored 1, broker 0.9975" in capsys.readouterr().out
    snap = await store.snapshot(ACCOUNT)
    assert snap.baseline_moments["BTC/USD"] == at(2)
    await assert_as_the_broker(store, broker, database_url)
    # The fill's fee posts (at the end of the day): already in the broker's quantity.
    await commit(store, fee(1, "-0.0025", at(1)))
    await assert_as_the_broker(store, broker, database_url)
    # A buy after the reconcile, and its fee: both applied.
    await commit(store, fill("c2", "buy", "1", "1", "50000", "50000", at(3),
                             symbol="BTC/USD"),
                 fee(2, "-0.0025", at(3)))
    broker.held[0]["qty"] = "1.995"
    await assert_as_the_broker(store, broker, database_url)
    snap = await store.snapshot(ACCOUNT)
    assert [a.outcome for a in snap.activities] == [IN_BASELINE, APPLIED]
    # The reconcile read again finds nothing to do.
    broker.now = at(4)
    assert await reconcile_account(store, broker, ACCOUNT, apply=True) == 0
    assert (await store.snapshot(ACCOUNT)).baseline_moments["BTC/USD"] == at(2)


async def test_reconcile_apply_without_the_brokers_time_applies_nothing(
        store: PgStore, capsys: pytest.CaptureFixture[str]) -> None:
    """The moment an adjustment records decides which later fills it holds, and only the
    broker's clock stamps them: without it, `--apply` writes nothing and exits 1."""
    await commit(store, fill("a1", "buy", "10", "10", "100", "100", at(1)))
    broker = Broker()  # its clock gives no time
    broker.held = [{"symbol": "AAPL", "qty": "12", "side": "long", "avg_entry_price": "100"}]
    assert await reconcile_account(store, broker, ACCOUNT, apply=True) == 1
    assert "nothing applied: the broker's clock" in capsys.readouterr().out
    snap = await store.snapshot(ACCOUNT)
    assert snap.net_position("AAPL") == 10 and snap.adjustments == []
    # A clock far ahead of ours is no reading either: as the moment it would take every
    # later fill as already held, as a baseline's cursor skip every fill until then.
    ahead = ClockedBroker(datetime(2099, 1, 1, tzinfo=UTC))
    ahead.held = broker.held
    assert await reconcile_account(store, ahead, ACCOUNT, apply=True) == 1
    assert "nothing applied: the broker's clock" in capsys.readouterr().out
    assert (await store.snapshot(ACCOUNT)).adjustments == []


async def test_a_baseline_does_not_take_a_broker_clock_far_ahead_of_ours(
        store: PgStore) -> None:
    """A first start whose broker clock reads 2099: that moment as the cursor would have
    every backfill start there and read nothing. Our clock stands in, as when the broker
    gives no time."""
    broker = ClockedBroker(datetime(2099, 1, 1, tzinfo=UTC))
    broker.held = [position("AAPL", "10", "100")]
    await take_baseline(store, broker, ACCOUNT, reason=BASELINE, now=at(0), window=600)
    cursor = await store.load_cursor(ACCOUNT)
    assert cursor is not None and cursor.fill_time == at(0)
    assert (await store.snapshot(ACCOUNT)).net_position("AAPL") == 10


class FillingBroker(ClockedBroker):
    """A broker whose AAPL buys 5 between the two positions reads of `--apply` (the
    user's bot trades while the service is stopped)."""

    def __init__(self, now: datetime) -> None:
        super().__init__(now)
        self.reads = 0

    async def positions(self) -> list[dict[str, Any]]:
        self.reads += 1
        if self.reads == 2:
            for row in self.held:
                if row["symbol"] == "AAPL":
                    row["qty"] = str(D(row["qty"]) + 5)
        return await super().positions()


async def test_reconcile_apply_leaves_a_symbol_that_filled_while_it_read(
        store: PgStore, capsys: pytest.CaptureFixture[str]) -> None:
    """A fill between the clock and the positions read would be in the quantity taken
    but stamped after its moment: counted again when it reaches us. `--apply` reads the
    clock and positions twice and adjusts only what the broker held alike in both."""
    await commit(store, fill("a1", "buy", "10", "10", "100", "100", at(1)),
                 fill("m1", "buy", "4", "4", "50", "50", at(1), symbol="MSFT"))
    broker = FillingBroker(at(2))
    broker.held = [{"symbol": "AAPL", "qty": "12", "side": "long", "avg_entry_price": "100"},
                   {"symbol": "MSFT", "qty": "6", "side": "long", "avg_entry_price": "50"}]
    assert await reconcile_account(store, broker, ACCOUNT, apply=True) == 1
    out = capsys.readouterr().out
    assert "AAPL left as it is: the broker's quantity moved between two reads" in out
    snap = await store.snapshot(ACCOUNT)
    assert [(a.symbol, a.qty_before, a.qty_after) for a in snap.adjustments] == [
        ("MSFT", D(4), D(6))]
    assert snap.net_position("AAPL") == 10


async def test_reconcile_apply_adjusts_a_symbol_with_a_resting_order_whose_fills_are_ours(
        store: PgStore, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A resting order of AAPL (4 of 10 filled, all with us) and one of MSFT the broker
    filled more of than reached us. A transfer the service cannot see brought 6 AAPL and
    2 MSFT. `--apply` reads the broker's open orders after its positions: AAPL is
    adjusted (nothing of its order is still to come); MSFT is left, exit 1."""
    await commit(store, fill("r1", "buy", "4", "4", "100", "100", at(1), order_qty="10"),
                 fill("r2", "buy", "3", "3", "50", "50", at(1), order_qty="10",
                      symbol="MSFT"))
    broker = ClockedBroker(at(2))
    broker.held = [position("AAPL", "10", "100"), position("MSFT", "7", "50")]
    broker.open = [
        WireOrder(id="r1", symbol="AAPL", side="buy", status="partially_filled",
                  filled_qty=D(4), qty=D(10)),
        WireOrder(id="r2", symbol="MSFT", side="buy", status="partially_filled",
                  filled_qty=D(5), qty=D(10))]
    assert await reconcile_account(store, broker, ACCOUNT, apply=True) == 1
    out = capsys.readouterr().out
    assert "MSFT left as it is: an order of it is still working and the broker filled more" \
        in out
    snap = await store.snapshot(ACCOUNT)
    assert [(a.symbol, a.qty_before, a.qty_after) for a in snap.adjustments] == [
        ("AAPL", D(4), D(10))]
    # The rest of each order reaches us: AAPL counts its 6 on top of the 10; MSFT's 2
    # bring it to the broker's 7 (5 of r2 and 2 transferred: still 2 apart, now settled).
    await commit(store, fill("r1", "buy", "10", "6", "101", "100.6", at(3), order_qty="10"),
                 fill("r2", "buy", "5", "2", "51", "50.4", at(3), order_qty="10",
                      symbol="MSFT", status="partially_filled"))
    broker.held = [position("AAPL", "16", "100.375"), position("MSFT", "7", "50")]
    broker.open = broker.open[1:]  # r1 is done
    broker.now = at(4)
    assert await reconcile_account(store, broker, ACCOUNT, apply=True) == 0
    await assert_as_the_broker(store, broker, database_url)


async def test_rebaseline_keeps_history_and_counts_nothing_twice(
        store: PgStore, database_url: str) -> None:
    broker = Broker()
    broker.held = [position("AAPL", "100", "150")]
    await take_baseline(store, broker, ACCOUNT, reason=BASELINE, now=at(0), window=600)
    await commit(store, fill("g2", "buy", "5", "5", "160", "160", at(1), order_qty="50"))
    await commit(store, fill("x9", "sell", "2", "2", "170", "170", at(1), order_qty="10",
                             symbol="NVDA"))
    # Away past the activities window: g2 filled 20 more, AAPL is 125 now; x9 sold its
    # other 8 and finished.
    broker.orders["x9"] = WireOrder(id="x9", symbol="NVDA", side="sell", status="filled",
                                    filled_qty=D(10), qty=D(10), filled_avg_price=D(171),
                                    updated_at=format_timestamp(at(15)))
    broker.open = [WireOrder(id="g2", symbol="AAPL", side="buy", status="partially_filled",
                             filled_qty=D(25), qty=D(50), filled_avg_price=D(158),
                             updated_at=format_timestamp(at(20)))]
    broker.held = [position("AAPL", "125", "151"), position("NVDA", "-10", "171")]
    assert needs_baseline(await store.load_cursor(ACCOUNT), at(60 * 24 * 40),
                          86400 * 30) == REBASELINE
    _, made = await take_baseline(store, broker, ACCOUNT, reason=REBASELINE, now=at(21),
                                  window=600)
    assert [(a.symbol, a.qty_before, a.qty_after) for a in made] == [
        ("AAPL", D(105), D(125)), ("NVDA", D(-2), D(-10))]
    snap = await store.snapshot(ACCOUNT)
    assert (snap.orders["x9"].filled_qty, snap.orders["x9"].status) == (D(10), "filled")
    assert snap.baseline_qty == {"g2": D(20), "x9": D(8)}
    with psycopg.connect(database_url) as conn:
        origins = conn.execute("SELECT symbol, origin, alpaca_order_id FROM active_positions "
                               "WHERE status = 'open' ORDER BY symbol").fetchall()
    assert origins == [("AAPL", "baseline", "rebaseline"), ("NVDA", "baseline", "rebaseline")]
    await assert_as_the_broker(store, broker, database_url)
    # The order's fill at 25 (already in 125) arrives late: nothing; at 30, 5 more.
    await commit(store, fill("g2", "buy", "25", "20", "157.5", "158", at(20), order_qty="50"),
                 fill("g2", "buy", "30", "5", "160", "158.333333333333", at(22), order_qty="50"))
    snap = await store.snapshot(ACCOUNT)
    assert snap.net_position("AAPL") == 130
    # The rows we held (100 from the baseline + 5; short 2) are closed by the rebaseline.
    assert [(p.symbol, p.peak_qty) for p in snap.history] == [("AAPL", D(105)),
                                                               ("NVDA", D(-2))]
    assert run_checks(database_url, ACCOUNT) == []


async def test_check_holds_positions_to_baselines_and_adjustments(
        store: PgStore, database_url: str) -> None:
    broker = Broker()
    broker.open = [WireOrder(id="h1", symbol="AAPL", side="buy", status="partially_filled",
                             filled_qty=D(4), qty=D(10), filled_avg_price=D(100),
                             updated_at=format_timestamp(at(-60)))]
    broker.held = [position("AAPL", "4", "100")]
    await take_baseline(store, broker, ACCOUNT, reason=BASELINE, now=at(0), window=600)
    await commit(store, fill("h1", "buy", "6", "2", "101", "100.333333333333", at(1),
                             order_qty="10"))
    assert run_checks(database_url, ACCOUNT) == []
    # A fill counted twice (the mark forgotten) is named by check.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE broker_orders SET baseline_qty = 0 WHERE alpaca_order_id = 'h1'")
    found = run_checks(database_url, ACCOUNT)
    assert [(v.layer, v.what) for v in found] == [
        ("position", "net position differs from the orders")]
    assert "open positions net 6" in found[0].detail and " 10" in found[0].detail


# --- what a baseline holds of the activities that post after it (section 10) -----------


class TickingBroker(Broker):
    """A broker whose clock (`GET /v2/clock`) says a later moment at each read."""

    def __init__(self) -> None:
        super().__init__()
        self.clock_reads = 0

    async def clock(self) -> dict[str, Any]:
        self.clock_reads += 1
        return {"is_open": True, "timestamp": format_timestamp(at(self.clock_reads / 10))}

    async def asset(self, symbol: str) -> dict[str, Any] | None:
        return {"class": "crypto"} if symbol == "BTCUSD" else None


async def test_a_split_between_the_clock_and_the_positions_read_is_held_not_applied() -> None:
    """The books change without a fill after the round's clock read and before its
    positions read: the positions hold the split, stamped after the round's moment. A
    symbol settles only when a read finds it as the previous one did, at that round's
    moment, so the SPLIT posted later is stored, not applied again."""
    from stream_supervisor.activities import IN_BASELINE

    broker = TickingBroker()
    broker.held = [position("NVDA", "100", "100")]
    reads = 0
    real_positions = broker.positions

    async def positions() -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        if reads == 1:  # the split lands just after the first clock read
            broker.held = [position("NVDA", "400", "25")]
        return await real_positions()

    broker.positions = positions  # type: ignore[method-assign]
    snapshot = await take_snapshot(broker, now=at(0), window=600)
    assert snapshot.attempts == 2
    assert snapshot.taken_at == at(0.1) and snapshot.moments == {"NVDA": at(0.2)}
    result = _split_posted_later(snapshot, at(0.15), "300")
    assert [r.outcome for r in result.activities] == [IN_BASELINE]
    assert result.positions == []


def _split_posted_later(snapshot: Any, stamp: datetime, added: str) -> Any:
    """The SPLIT of the snapshot's one NVDA position, stamped `stamp`, applied to the row
    the baseline made of it under the baseline's moments."""
    from stream_supervisor.activities import non_trade_to_event
    from stream_supervisor.ledger import apply_events, baseline_moments
    from stream_supervisor.positions import Position

    split = non_trade_to_event(WireNonTrade(
        id="1::split", activity_type="SPLIT", transaction_time=format_timestamp(stamp),
        symbol="NVDA", qty=D(added)))
    [held] = snapshot.positions
    row = Position(ACCOUNT, "NVDA", held.qty, held.avg_entry_price, "baseline", None, at(0),
                   position_id=1)
    return apply_events(ACCOUNT, {}, {"NVDA": row}, [split],
                        baseline_moments(snapshot.taken_at, snapshot.moments))


async def test_a_split_beside_a_fill_waits_for_a_read_that_finds_the_position_unchanged(
) -> None:
    """A symbol fills after the first round's positions read, and splits between the
    second round's clock read and its positions read. The second round is quiet (no new
    fill), but the position moved by the fill and the split together: settled there, its
    moment would precede the split, and the SPLIT posting later would add its shares a
    second time (the outage worlds' seed 140: a short put assigned while its stock
    traded, the stock doubled). It settles in the third round, which finds it as the
    second did, and the split is held."""
    from stream_supervisor.activities import IN_BASELINE

    broker = TickingBroker()
    broker.held = [position("NVDA", "100", "100")]
    reads = 0
    real_positions = broker.positions

    async def positions() -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        if reads == 2:  # the split lands after the second round's clock read
            broker.held = [position("NVDA", "440", "25")]
        answer = await real_positions()
        if reads == 1:  # a buy of 10 fills after the first positions read
            broker.activities.append(WireActivity(
                id="1::nvda", order_id="n1", symbol="NVDA", side="buy", price=D(100),
                qty=D(10), cum_qty=D(10), transaction_time=format_timestamp(at(0.25)),
                order_status="filled"))
            broker.held = [position("NVDA", "110", "100")]
            broker.orders["n1"] = WireOrder(id="n1", symbol="NVDA", side="buy",
                                            status="filled", filled_qty=D(10),
                                            filled_avg_price=D(100))
        return answer

    broker.positions = positions  # type: ignore[method-assign]
    snapshot = await take_snapshot(broker, now=at(0), window=600)
    assert snapshot.attempts == 3
    assert snapshot.moments == {"NVDA": at(0.3)}
    assert [(p.symbol, p.qty) for p in snapshot.positions] == [("NVDA", D(440))]
    result = _split_posted_later(snapshot, at(0.27), "330")
    assert [r.outcome for r in result.activities] == [IN_BASELINE]
    assert result.positions == []


async def test_a_crypto_fill_named_without_its_slash_unsettles_its_pair() -> None:
    """A FILL activity says `BTCUSD`, positions `BTC/USD` once canonical: a fill landing
    in the first round is the pair's, which is read again; its moment and its order's
    symbol are in the stored spelling."""
    broker = TickingBroker()
    reads = 0
    real_positions = broker.positions

    async def positions() -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        answer = await real_positions()
        if reads == 1:  # a buy fills after this read
            broker.activities.append(WireActivity(
                id="1::btc", order_id="c1", symbol="BTCUSD", side="buy", price=D(50_000),
                qty=D("0.5"), cum_qty=D("0.5"), transaction_time=format_timestamp(at(0.15)),
                order_status="filled"))
            broker.held = [{"symbol": "BTCUSD", "qty": "0.49875", "side": "long",
                            "avg_entry_price": "50000", "asset_class": "crypto"}]
            broker.orders["c1"] = WireOrder(id="c1", symbol="BTC/USD", side="buy",
                                            status="filled", filled_qty=D("0.5"),
                                            filled_avg_price=D(50_000), asset_class="crypto")
        return answer

    broker.positions = positions  # type: ignore[method-assign]
    snapshot = await take_snapshot(broker, now=at(0), window=600)
    assert [(p.symbol, p.qty) for p in snapshot.positions] == [("BTC/USD", D("0.49875"))]
    # Unsettled by its fill in round 1, moved by it in round 2: settled in round 3, which
    # finds it as round 2 did.
    assert snapshot.attempts == 3
    assert snapshot.moments == {"BTC/USD": at(0.3)}
    assert [(o.order_id, o.symbol, o.filled_qty) for o in snapshot.orders] == [
        ("c1", "BTC/USD", D("0.5"))]


async def test_a_multi_leg_orders_legs_are_marked_in_their_own_symbols_round() -> None:
    """An open mleg order: a leg that fills after the first round's open-orders read is
    unsettled by its fill; its mark is its filled_qty in the round its symbol settles
    in (with the position that holds the fill), not the first round's."""
    call, put = "AAPL261218C00190000", "AAPL261218P00190000"

    def mleg(call_filled: str) -> WireOrder:
        legs = [WireOrder(id="leg-c", symbol=call, side="buy", status="partially_filled",
                          filled_qty=D(call_filled), qty=D(2), asset_class="us_option"),
                WireOrder(id="leg-p", symbol=put, side="sell", status="new",
                          filled_qty=D(0), qty=D(2), asset_class="us_option")]
        return WireOrder(id="m1", symbol="", side="", status="partially_filled",
                         filled_qty=D(0), qty=D(2), order_class="mleg", legs=legs)

    broker = TickingBroker()
    broker.open = [mleg("0")]
    real_open = broker.open_orders
    calls = 0

    async def open_orders() -> list[WireOrder]:
        nonlocal calls
        calls += 1
        answer = await real_open()
        if calls == 1:  # the call leg fills after this read
            broker.activities.append(WireActivity(
                id="1::leg", order_id="leg-c", symbol=call, side="buy", price=D(3),
                qty=D(1), cum_qty=D(1), transaction_time=format_timestamp(at(0.15))))
            broker.held = [position(call, "1", "3")]
            broker.open = [mleg("1")]
        return answer

    broker.open_orders = open_orders  # type: ignore[method-assign]
    snapshot = await take_snapshot(broker, now=at(0), window=600)
    marks = {o.order_id: (o.symbol, o.filled_qty, o.parent_order_id) for o in snapshot.orders}
    assert marks["leg-c"] == (call, D(1), "m1")
    assert marks["leg-p"] == (put, D(0), "m1")
    assert marks["m1"][2] is None
    assert [(p.symbol, p.qty) for p in snapshot.positions] == [(call, D(1))]


@pytest.mark.parametrize(("row", "why"), [
    ({"symbol": "AAPL", "qty": "Infinity", "side": "long"}, "not a finite number"),
    ({"symbol": "AAPL", "qty": "NaN", "side": "short"}, "not a finite number"),
    ({"symbol": "AAPL", "qty": "1e400", "side": "long"}, "out of range"),
    ({"symbol": "AAPL", "qty": "1" * 40, "side": "long"}, "out of range"),
    ({"symbol": "AAPL", "qty": "", "side": "long"}, "qty missing"),
    ({"symbol": "AAPL", "qty": None, "side": "long"}, "qty missing"),
    ({"symbol": "AAPL", "qty": True, "side": "long"}, "not a number"),
    ({"symbol": "AAPL", "qty": "abc", "side": "long"}, "not a number"),
    ({"symbol": "AAPL", "qty": "10", "side": "flat"}, "neither long nor short"),
    ({"symbol": "AAPL", "qty": "10", "avg_entry_price": "NaN"}, "not a finite number"),
    ({"qty": "10", "side": "long"}, "without a usable symbol"),
    ({"symbol": None, "qty": "10"}, "without a usable symbol"),
    ({"symbol": "A\u0000", "qty": "10"}, "without a usable symbol"),
])
def test_a_broker_position_row_outside_the_bounds_is_named_not_taken(
        row: dict[str, Any], why: str) -> None:
    """Set as a position, such a row was stored as it came (Infinity stays Infinity after
    every sale; a NaN average makes every later P&L NaN), or raised a bare exception that
    crash-looped a first start. Now each is refused, saying why."""
    taken, refused = broker_positions([row, position("MSFT", "5", "50")])
    assert [p.symbol for p in taken] == ["MSFT"]
    assert len(refused) == 1 and why in refused[0], refused
    # An asset class the service does not know yet is no reason to refuse a row.
    [future] = broker_positions([{"symbol": "ES", "qty": "1", "asset_class": "us_future"}])[0]
    assert (future.symbol, future.qty) == ("ES", D(1))


async def test_reconcile_applies_nothing_while_a_broker_position_row_is_refused(
        store: PgStore, capsys: pytest.CaptureFixture[str]) -> None:
    """A row outside the bounds leaves its symbol out of the broker's word, where it would
    read as flat: `--apply` sets nothing that run, names the row and exits 1."""
    await commit(store, fill("a1", "buy", "10", "10", "100", "100", at(1)),
                 fill("m1", "buy", "4", "4", "50", "50", at(1), symbol="MSFT"))
    broker = ClockedBroker(at(2))
    broker.held = [{"symbol": "AAPL", "qty": "NaN", "side": "long", "avg_entry_price": "100"},
                   position("MSFT", "6", "50")]
    assert await reconcile_account(store, broker, ACCOUNT, apply=True) == 1
    out = capsys.readouterr().out
    assert "a position row of the broker's is refused: AAPL: position qty is not a finite" in out
    assert "nothing applied" in out
    snap = await store.snapshot(ACCOUNT)
    assert snap.adjustments == [] and snap.net_position("AAPL") == 10


async def test_a_baseline_refuses_broker_values_outside_the_bounds_naming_them(
        store: PgStore) -> None:
    """A first start meeting a position row, an open order's mark or a FILL activity
    outside the bounds stops with an error naming it (it crashed with a bare exception,
    or stored the value: a mark of Infinity takes every later fill as stale)."""
    row = Broker()
    row.held = [{"symbol": "AAPL", "qty": "", "side": "long"}]
    with pytest.raises(BrokerUnavailable, match="AAPL: position qty missing"):
        await take_baseline(store, row, ACCOUNT, reason=BASELINE, now=at(0), window=600)
    mark = Broker()
    mark.open = [WireOrder(id="inf", symbol="AAPL", side="buy", status="partially_filled",
                           filled_qty=D("Infinity"), qty=D(10))]
    with pytest.raises(BrokerUnavailable, match="order inf is outside the bounds"):
        await take_baseline(store, mark, ACCOUNT, reason=BASELINE, now=at(0), window=600)
    act = Broker()
    act.activities = [WireActivity(
        id="20261201000000000::x", order_id="o", symbol="AAPL", side="buy", price=D(1),
        qty=D(1), cum_qty=D(1), transaction_time="yesterday")]
    with pytest.raises(BrokerUnavailable, match="FILL activity 20261201000000000::x"):
        await take_baseline(store, act, ACCOUNT, reason=BASELINE, now=at(0), window=600)

    class Garbled(Broker):  # one open order the list decoder had to leave out
        async def open_orders(self) -> list[WireOrder]:
            listed = OrderList()
            listed.skipped = ("order g1: filled_qty is no number",)
            return listed

    with pytest.raises(BrokerUnavailable, match="open orders hold one that does not decode"):
        await take_baseline(store, Garbled(), ACCOUNT, reason=BASELINE, now=at(0),
                            window=600)
    snap = await store.snapshot(ACCOUNT)
    assert snap.positions == [] and snap.adjustments == [] and snap.orders == {}


@pytest.mark.parametrize("avg", ["NaN", "sNaN", "Infinity", "1e400", "0." + "1" * 40])
async def test_a_gap_is_not_priced_from_an_average_outside_the_bounds(
        store: PgStore, avg: str) -> None:
    """Gap pricing took REST's `filled_avg_price` unbounded: an order listed with an
    average of NaN, Infinity or 1e400 gave the fill that price. Now such an average is as
    if absent: the fill lands at its own price."""
    broker = Broker()
    t = at(1)
    # The second fill of an order whose first fill fell before the window: a gap.
    broker.activities = [WireActivity(
        id="20990101000000000::a", order_id="o1", symbol="AAPL", side="buy", price=D(101),
        qty=D(5), cum_qty=D(10), transaction_time=format_timestamp(t), order_status="filled")]
    broker.orders["o1"] = WireOrder(id="o1", symbol="AAPL", side="buy", status="filled",
                                    filled_qty=D(10), qty=D(10), filled_avg_price=D(avg),
                                    updated_at=format_timestamp(t))
    forwarded: list[object] = []

    async def forward(item: object) -> None:
        forwarded.append(item)

    recovery = GapRecovery(
        RecoverySettings(backfill_overlap=300.0, first_start_lookback=3600.0,
                         order_refresh_interval=0.0),
        broker, forward, Metrics(), SupervisorState(), wallclock=lambda: at(5))
    await recovery.backfill()
    fills = [f for f in forwarded if isinstance(f, Event) and f.is_fill]
    assert [f.cum_avg_price for f in fills] == [None]
    await commit(store, *fills)
    snap = await store.snapshot(ACCOUNT)
    assert open_rows(snap) == {"AAPL": ("long", D(10), D(101))}
