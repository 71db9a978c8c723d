"""Ledger: batches of new events applied to orders and positions, against broker truth.

The property test is the design's central claim: any delivery the system allows (stream
updates in order per order, REST activities, duplicates anywhere, arbitrary reordering
across orders, any batching) ends at the broker's per-order fills and per-symbol
positions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stream_supervisor.events import Event, event_key
from stream_supervisor.ledger import (
    Cursor,
    LedgerResult,
    apply_events,
    cursor_of,
    order_fills_by_cum_qty,
)
from stream_supervisor.orders import OrderState
from stream_supervisor.positions import Position
from stream_supervisor.protocol import (
    WireActivity,
    WireOrder,
    WireUpdate,
    activity_to_event,
    decode_activities,
    decode_frame,
    update_to_event,
)
from stream_supervisor.store import Batch, StoreSnapshot
from stream_supervisor.testing.memstore import MemoryDatabase, MemoryStore

from .fixtures import RECORDING

D = Decimal
TRUTH: dict[str, Any] = json.loads((RECORDING / "ground_truth.json").read_text())
ACCOUNT = TRUTH["account_id"]
AVG_TOL = D("1e-9")
PNL_TOL = D("1e-6")


def _stream_events() -> list[Event]:
    out = []
    for line in (RECORDING / "trade_updates.jsonl").read_bytes().splitlines()[2:]:
        ev = decode_frame(line)
        assert isinstance(ev, Event)
        out.append(ev)
    return out


STREAM = _stream_events()
REST = [
    activity_to_event(a)
    for a in decode_activities((RECORDING / "fill_activities.json").read_bytes())
]


@dataclass
class Book:
    """What a store holds, threaded between batches: a faithful pure model of one."""

    keys: set[str] = field(default_factory=set)
    orders: dict[str, OrderState] = field(default_factory=dict)
    open: dict[str, Position] = field(default_factory=dict)
    rows: list[Position] = field(default_factory=list)  # closed rows, in closing order
    results: list[LedgerResult] = field(default_factory=list)

    def apply(self, batch: Sequence[Event]) -> None:
        new: list[Event] = []
        for ev in batch:
            if ev.key not in self.keys:
                self.keys.add(ev.key)
                new.append(ev)
        touched = {ev.symbol for ev in new}
        result = apply_events(
            ACCOUNT,
            {e.order_id: self.orders[e.order_id] for e in new if e.order_id in self.orders},
            {s: p for s, p in self.open.items() if s in touched},
            new,
        )
        self.results.append(result)
        self.orders.update(result.orders)
        # `positions` is the final version of every row touched: per symbol, an open row
        # there is the open row now; only closed rows there means the symbol went flat.
        for row in result.positions:
            if not row.is_open:
                self.rows.append(row)
        for symbol in {row.symbol for row in result.positions}:
            still_open = [r for r in result.positions if r.symbol == symbol and r.is_open]
            assert len(still_open) <= 1
            if still_open:
                self.open[symbol] = still_open[0]
            else:
                self.open.pop(symbol, None)

    def realized(self, symbol: str) -> Decimal:
        rows = [r for r in self.rows if r.symbol == symbol]
        if symbol in self.open:
            rows.append(self.open[symbol])
        return sum((r.realized_pnl for r in rows), D(0))


def _batches(events: Sequence[Event], size: int) -> list[list[Event]]:
    return [list(events[i : i + size]) for i in range(0, len(events), size)]


def _assert_fixture_orders(orders: dict[str, OrderState]) -> None:
    assert set(orders) == set(TRUTH["orders"])
    for oid, truth in TRUTH["orders"].items():
        got = orders[oid]
        assert got.filled_qty == D(truth["filled_qty"]), oid
        assert got.status == truth["status"], oid
        if truth["filled_avg_price"] is None:
            assert got.filled_avg_price is None
        else:
            assert got.filled_avg_price is not None
            assert abs(got.filled_avg_price - D(truth["filled_avg_price"])) < AVG_TOL, oid


def _assert_fixture_positions(open_rows: dict[str, Position], realized: dict[str, Decimal]) -> None:
    for symbol, truth in TRUTH["positions"].items():
        pos = open_rows.get(symbol)
        assert (pos.qty if pos is not None else D(0)) == D(truth["qty"]), symbol
        if truth["avg_entry_price"] is None:
            assert pos is None
        else:
            assert pos is not None
            assert abs(pos.avg_entry_price - D(truth["avg_entry_price"])) < AVG_TOL, symbol
        assert abs(realized[symbol] - D(truth["realized_pnl"])) < PNL_TOL, symbol


# --- the recorded session against ground truth ----------------------------------------


def test_fixture_in_one_batch_equals_ground_truth() -> None:
    result = apply_events(ACCOUNT, {}, {}, STREAM)
    _assert_fixture_orders(result.orders)
    open_rows = {p.symbol: p for p in result.positions if p.is_open}
    assert len(open_rows) == sum(1 for p in result.positions if p.is_open)  # one per symbol
    realized: dict[str, Decimal] = defaultdict(Decimal)
    for p in result.positions:
        realized[p.symbol] += p.realized_pnl
    _assert_fixture_positions(open_rows, realized)
    assert result.fills_applied == TRUTH["fills_total"] == 101
    assert result.stale_fills == 0 and result.inexact_fills == 0
    assert result.drift == []  # every fill agreed with the broker's position_qty
    assert all(
        type(p.qty) is Decimal and type(p.avg_entry_price) is Decimal for p in result.positions
    )
    # Every closed row is in `closed`, for position_history.
    assert result.closed == [p for p in result.positions if not p.is_open]


@settings(max_examples=25, deadline=None)
@given(size=st.integers(min_value=1, max_value=40))
def test_fixture_in_small_batches_equals_ground_truth(size: int) -> None:
    book = Book()
    for batch in _batches(STREAM, size):
        book.apply(batch)
    _assert_fixture_orders(book.orders)
    _assert_fixture_positions(book.open, {s: book.realized(s) for s in TRUTH["positions"]})
    assert sum(r.fills_applied for r in book.results) == 101
    assert not any(r.drift for r in book.results)


async def test_fixture_through_the_memory_store_in_small_batches() -> None:
    store = MemoryStore(MemoryDatabase())
    await store.open()
    for batch in _batches(STREAM, 7):
        await store.commit_batch(Batch(ACCOUNT, batch))
    snap = await store.snapshot(ACCOUNT)
    _assert_fixture_orders(snap.orders)
    open_rows = {p.symbol: p for p in snap.positions if p.is_open}
    _assert_fixture_positions(open_rows, {s: snap.realized_pnl(s) for s in TRUTH["positions"]})
    assert snap.event_keys == {ev.key for ev in STREAM}
    assert sorted(p.position_id for p in snap.history) == sorted(  # type: ignore[type-var]
        p.position_id for p in snap.positions if not p.is_open
    )


def test_rest_activities_alone_reach_the_fills() -> None:
    # Backfill only: every fill, no cumulative averages. Fills are in order per order, so
    # every price is exact and each order's average is recovered.
    result = apply_events(ACCOUNT, {}, {}, REST)
    assert result.inexact_fills == 0
    for oid, truth in TRUTH["orders"].items():
        if D(truth["filled_qty"]) == 0:
            assert oid not in result.orders
            continue
        got = result.orders[oid]
        assert got.filled_qty == D(truth["filled_qty"])
        assert abs(got.filled_avg_price - D(truth["filled_avg_price"])) < AVG_TOL  # type: ignore[operator]
    open_rows = {p.symbol: p for p in result.positions if p.is_open}
    for symbol, truth in TRUTH["positions"].items():
        pos = open_rows.get(symbol)
        assert (pos.qty if pos is not None else 0) == D(truth["qty"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fixture_any_mix_of_stream_and_rest_duplicated_and_reordered(data: st.DataObject) -> None:
    """The recording's README use: frames and activities, any mix, duplicated, shuffled
    across orders, in any batches: orders and net positions end at the ground truth."""
    by_order: dict[str, list[Event]] = defaultdict(list)
    for ev in STREAM:
        by_order[ev.order_id].append(ev)
    rest_by_key = {ev.key: ev for ev in REST}
    lanes: dict[str, list[Event]] = {}
    for oid, evs in by_order.items():
        lane: list[Event] = []
        for ev in evs:
            via = data.draw(st.sampled_from(["stream", "rest", "both"])) if ev.is_fill else "stream"
            if via in ("stream", "both"):
                lane.append(ev)
            if via in ("rest", "both"):
                lane.append(rest_by_key[ev.key])
        lanes[oid] = lane
    delivery = _merge(data, list(lanes.values()))
    delivery = _with_duplicates(data, delivery, max_dups=30)
    book = Book()
    for batch in _cut(data, delivery):
        book.apply(batch)
    for oid, truth in TRUTH["orders"].items():
        assert book.orders[oid].filled_qty == D(truth["filled_qty"])
        assert book.orders[oid].status == truth["status"]
    for symbol, truth in TRUTH["positions"].items():
        pos = book.open.get(symbol)
        assert (pos.qty if pos is not None else 0) == D(truth["qty"])
    assert book.keys == {ev.key for ev in STREAM}  # one dedupe key per distinct update


# --- delivery helpers shared by the property tests ------------------------------------


def _merge(data: st.DataObject, lanes: list[list[Event]]) -> list[Event]:
    """An arbitrary interleaving of lanes that keeps each lane's own order."""
    tokens = [i for i, lane in enumerate(lanes) for _ in lane]
    order = data.draw(st.permutations(tokens))
    pos = [0] * len(lanes)
    out = []
    for i in order:
        out.append(lanes[i][pos[i]])
        pos[i] += 1
    return out


def _with_duplicates(data: st.DataObject, events: list[Event], max_dups: int) -> list[Event]:
    """Replays: copies of earlier items inserted anywhere after the original."""
    out = list(events)
    if not out:
        return out
    for _ in range(data.draw(st.integers(min_value=0, max_value=max_dups))):
        src = data.draw(st.integers(min_value=0, max_value=len(out) - 1))
        dst = data.draw(st.integers(min_value=src + 1, max_value=len(out)))
        out.insert(dst, out[src])
    return out


def _cut(data: st.DataObject, events: list[Event]) -> list[list[Event]]:
    if len(events) < 2:
        return [events]
    cuts = data.draw(st.sets(st.integers(min_value=1, max_value=len(events) - 1)))
    bounds = [0, *sorted(cuts), len(events)]
    return [events[a:b] for a, b in pairwise(bounds)]


# --- the property: a generated broker, its truth, and any allowed delivery -------------

T0 = datetime(2026, 11, 23, 14, 30, tzinfo=UTC)
SYMBOLS = ("AAA", "BBB", "CCC")

_qty = st.one_of(
    st.integers(min_value=1, max_value=300).map(D),
    st.integers(min_value=1, max_value=99_999).map(lambda n: D(n).scaleb(-3)),
)
_price = st.integers(min_value=100, max_value=90_000).map(lambda n: D(n).scaleb(-2))


@dataclass
class PlannedOrder:
    oid: str
    symbol: str
    side: str
    fills: list[tuple[Decimal, Decimal]]
    complete: bool  # fully filled; otherwise canceled after its fills

    @property
    def sign(self) -> int:
        return 1 if self.side == "buy" else -1

    @property
    def cum(self) -> Decimal:
        return sum((q for q, _ in self.fills), D(0))

    @property
    def avg(self) -> Decimal | None:
        return sum((q * p for q, p in self.fills), D(0)) / self.cum if self.fills else None

    @property
    def status(self) -> str:
        return "filled" if self.complete and self.fills else "canceled"

    @property
    def order_qty(self) -> Decimal:
        return self.cum if self.complete and self.fills else self.cum + 1


def _stamp(i: int) -> str:
    ts = T0 + timedelta(milliseconds=i)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%f") + f"{i % 1000:03d}Z"


def _wire_order(o: PlannedOrder, status: str, cum: Decimal, avg: Decimal | None) -> WireOrder:
    return WireOrder(
        id=o.oid,
        symbol=o.symbol,
        side=o.side,
        status=status,
        filled_qty=cum,
        client_order_id=f"c-{o.oid}",
        qty=o.order_qty,
        filled_avg_price=avg.quantize(D("1e-12")) if avg is not None else None,
        order_type="market",
        asset_class="us_equity",
        created_at=_stamp(0),
    )


@dataclass
class World:
    orders: list[PlannedOrder]
    lanes: dict[str, list[Event]]  # per order: its stream updates, in the broker's order
    stream_all: dict[str, list[tuple[Event, bool]]]  # every stream update, and if losable
    rest: dict[str, list[Event]]  # per order: its FILL activities, in cumulative order
    via: dict[str, str]  # event key of each fill -> stream | rest | both | none

    def truth_net(self, symbol: str) -> Decimal:
        return sum((o.sign * o.cum for o in self.orders if o.symbol == symbol), D(0))


@st.composite
def worlds(draw: st.DrawFn) -> World:
    orders = []
    for n in range(draw(st.integers(min_value=1, max_value=6))):
        fills = draw(st.lists(st.tuples(_qty, _price), max_size=5))
        orders.append(
            PlannedOrder(
                oid=f"order-{n}",
                symbol=draw(st.sampled_from(SYMBOLS[: draw(st.integers(1, 3))])),
                side=draw(st.sampled_from(["buy", "sell"])),
                fills=fills,
                complete=draw(st.booleans()),
            )
        )
    # The broker's chronology: each order's updates in order, orders interleaved.
    script: dict[str, list[tuple[str, int]]] = {}
    for o in orders:
        steps = [("pending_new", 0), ("new", 0)] + [("fill", k) for k in range(len(o.fills))]
        if o.status == "canceled":
            steps.append(("canceled", 0))
        script[o.oid] = steps
    tokens = [oid for oid, steps in script.items() for _ in steps]
    chronology = draw(st.permutations(tokens))
    by_id = {o.oid: o for o in orders}
    nxt: dict[str, int] = defaultdict(int)
    net: dict[str, Decimal] = defaultdict(Decimal)
    lanes: dict[str, list[Event]] = defaultdict(list)
    stream_all: dict[str, list[tuple[Event, bool]]] = defaultdict(list)
    rest: dict[str, list[Event]] = defaultdict(list)
    via: dict[str, str] = {}
    for i, oid in enumerate(chronology, start=1):
        o = by_id[oid]
        kind, k = script[oid][nxt[oid]]
        nxt[oid] += 1
        if kind != "fill":
            cum = o.cum if kind == "canceled" else D(0)
            avg = o.avg if kind == "canceled" else None
            update = update_to_event(
                WireUpdate(event=kind, order=_wire_order(o, kind, cum, avg), timestamp=_stamp(i))
            )
            lanes[oid].append(update)
            stream_all[oid].append((update, False))
            continue
        qty, price = o.fills[k]
        done = o.fills[: k + 1]
        cum = sum((q for q, _ in done), D(0))
        avg = sum((q * p for q, p in done), D(0)) / cum
        last = k == len(o.fills) - 1
        kind = "fill" if last and o.complete else "partial_fill"
        status = "filled" if kind == "fill" else "partially_filled"
        net[o.symbol] += o.sign * qty
        stream_ev = update_to_event(
            WireUpdate(
                event=kind,
                order=_wire_order(o, status, cum, avg),
                timestamp=_stamp(i),
                execution_id=f"x{i}",
                price=price,
                qty=qty,
                position_qty=net[o.symbol],
            )
        )
        rest_ev = activity_to_event(
            WireActivity(
                id=f"{20261123143000000 + i:017d}::{oid}-{k}",
                order_id=oid,
                symbol=o.symbol,
                side=o.side,
                price=price,
                qty=qty,
                cum_qty=cum,
                transaction_time=_stamp(i + 1)[:23] + "Z",  # REST has milliseconds, later
                type=kind,
                leaves_qty=o.order_qty - cum,
                order_status=status,
            )
        )
        assert stream_ev.key == rest_ev.key
        stream_all[oid].append((stream_ev, not last))
        # Every fill reaches us somehow, except that the stream may lose one that a later
        # update of the same order covers.
        choices = ["stream", "rest", "both"] + ([] if last else ["none"])
        via[stream_ev.key] = draw(st.sampled_from(choices))
        if via[stream_ev.key] in ("stream", "both"):
            lanes[oid].append(stream_ev)
        if via[stream_ev.key] in ("rest", "both"):
            rest[oid].append(rest_ev)
    return World(orders, dict(lanes), dict(stream_all), dict(rest), via)


def _deliver(data: st.DataObject, world: World) -> list[list[Event]]:
    # REST pages are ascending, but same-millisecond partial fills of one order can come
    # back out of order.
    rest_lanes = []
    for evs in world.rest.values():
        rest_lanes.append(data.draw(st.permutations(evs)) if data.draw(st.booleans()) else evs)
    stream = _merge(data, list(world.lanes.values()))  # arbitrary across orders
    rest = _merge(data, rest_lanes)
    delivery = _merge(data, [stream, rest])  # backfill races the live stream
    delivery = _with_duplicates(data, delivery, max_dups=12)
    return _cut(data, delivery)


def _check_against_truth(world: World, snap: StoreSnapshot, inexact: int) -> None:
    delivered = {ev.key for lane in world.lanes.values() for ev in lane} | {
        ev.key for lane in world.rest.values() for ev in lane
    }
    assert snap.event_keys == delivered  # one dedupe row per distinct update
    for o in world.orders:
        got = snap.orders[o.oid]
        assert got.filled_qty == o.cum, o.oid  # nothing missed, nothing counted twice
        assert got.status == o.status, o.oid
    for symbol in SYMBOLS:
        open_rows = [p for p in snap.positions if p.symbol == symbol and p.is_open]
        assert len(open_rows) <= 1  # never two open positions for one symbol
        assert snap.net_position(symbol) == world.truth_net(symbol), symbol
        for p in open_rows:
            assert p.qty != 0 and (p.side == "long") == (p.qty > 0)
    event("priced exactly" if not inexact else "REST fill past a gap")
    if inexact:
        return  # a REST fill past a gap has no exact price: quantities are all we claim
    for o in world.orders:
        got = snap.orders[o.oid]
        if o.avg is None:
            assert got.filled_avg_price is None
        else:
            assert got.filled_avg_price is not None
            assert abs(got.filled_avg_price - o.avg) < AVG_TOL, o.oid
    for symbol in SYMBOLS:
        # Realized P&L plus the open cost basis is the cash paid, in any fill order.
        paid = sum(
            (
                o.sign * o.cum * o.avg
                for o in world.orders
                if o.symbol == symbol and o.avg is not None
            ),
            D(0),
        )
        basis = sum(
            (p.qty * p.avg_entry_price for p in snap.positions if p.symbol == symbol and p.is_open),
            D(0),
        )
        assert abs(snap.realized_pnl(symbol) - (basis - paid)) < PNL_TOL, symbol


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
async def test_any_allowed_delivery_ends_at_the_broker_truth(
    world: World, data: st.DataObject
) -> None:
    store = MemoryStore(MemoryDatabase())
    await store.open()
    inexact = 0
    for batch in _deliver(data, world):
        result = await store.commit_batch(Batch(ACCOUNT, batch))
        inexact += result.inexact_fills
    _check_against_truth(world, await store.snapshot(ACCOUNT), inexact)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
def test_stream_only_delivery_is_exact_to_the_cent(world: World, data: st.DataObject) -> None:
    """Without REST, every fill is priced exactly, even across lost updates."""
    lanes = [
        [ev for ev, losable in evs if not (losable and data.draw(st.booleans()))]
        for evs in world.stream_all.values()
    ]
    delivery = _with_duplicates(data, _merge(data, lanes), max_dups=8)
    book = Book()
    for batch in _cut(data, delivery):
        book.apply(batch)
    assert sum(r.inexact_fills for r in book.results) == 0
    for o in world.orders:
        got = book.orders[o.oid]
        assert got.filled_qty == o.cum
        if o.avg is not None:
            assert abs(got.filled_avg_price - o.avg) < AVG_TOL  # type: ignore[operator]
    for symbol in SYMBOLS:
        pos = book.open.get(symbol)
        assert (pos.qty if pos is not None else 0) == world.truth_net(symbol)


# --- cursor ---------------------------------------------------------------------------

_times = st.none() | st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
)
_ids = st.none() | st.integers(min_value=0, max_value=10**17 - 1).map(
    lambda n: f"{n:017d}::00000000-0000-0000-0000-000000000000"
)
_cursors = st.builds(Cursor, _times, _ids)


def _not_behind(new: Cursor, old: Cursor) -> bool:
    ok_time = old.fill_time is None or (
        new.fill_time is not None and new.fill_time >= old.fill_time
    )
    ok_id = old.activity_id is None or (
        new.activity_id is not None and new.activity_id >= old.activity_id
    )
    return ok_time and ok_id


@settings(max_examples=100, deadline=None)
@given(st.lists(_cursors, min_size=1, max_size=10))
def test_cursor_never_moves_backwards(steps: list[Cursor]) -> None:
    cursor = Cursor()
    for step in steps:
        moved = cursor.advanced(step)
        assert _not_behind(moved, cursor)
        assert _not_behind(moved, step)
        cursor = moved
    # Order of arrival does not matter: the result is the componentwise maximum.
    other = Cursor()
    for step in reversed(steps):
        other = other.advanced(step)
    assert other == cursor
    assert cursor.advanced(cursor) == cursor


def _fill_event(ts: datetime, activity_id: str | None, event: str = "fill") -> Event:
    ts_ns = int(ts.timestamp()) * 10**9
    return Event(
        key=event_key(event, "o", D(1), ts_ns),
        event=event,
        source="rest" if activity_id else "stream",
        order_id="o",
        symbol="S",
        side="buy",
        status="filled",
        cum_qty=D(1),
        timestamp=ts,
        ts_ns=ts_ns,
        activity_id=activity_id,
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.datetimes(
                min_value=datetime(2020, 1, 1),
                max_value=datetime(2030, 1, 1),
                timezones=st.just(UTC),
            ),
            _ids,
            st.sampled_from(["fill", "partial_fill", "new", "canceled"]),
        ),
        max_size=10,
    ),
    _cursors,
)
def test_cursor_of_covers_fills_only_and_never_regresses(
    raw: list[tuple[datetime, str | None, str]], start: Cursor
) -> None:
    events = [_fill_event(ts, aid, kind) for ts, aid, kind in raw]
    moved = cursor_of(events)
    fills = [e for e in events if e.is_fill]
    assert moved.fill_time == max((e.timestamp for e in fills), default=None)
    assert moved.activity_id == max(
        (e.activity_id for e in fills if e.activity_id is not None), default=None
    )
    assert _not_behind(start.advanced(moved), start)


def test_cursor_ignores_non_fill_updates() -> None:
    late = datetime(2030, 1, 1, tzinfo=UTC)
    assert cursor_of([_fill_event(late, "99::x", "canceled")]) == Cursor()


# --- order_fills_by_cum_qty -----------------------------------------------------------


def _ev(order: str, cum: int, event: str = "partial_fill") -> Event:
    return Event(
        key=event_key(event, order, D(cum), cum),
        event=event,
        source="rest",
        order_id=order,
        symbol="S",
        side="buy",
        status="partially_filled",
        cum_qty=D(cum),
        timestamp=T0,
        ts_ns=cum,
    )


def test_order_fills_by_cum_qty_keeps_slots() -> None:
    a3, a1, b5, new, a2, b2 = (
        _ev("a", 3),
        _ev("a", 1),
        _ev("b", 5),
        _ev("a", 0, "new"),
        _ev("a", 2),
        _ev("b", 2),
    )
    out = order_fills_by_cum_qty([a3, a1, b5, new, a2, b2])
    # a's fills go into a's slots (0, 1, 4) smallest first; b's into (2, 5); `new` stays.
    assert out == [a1, a2, b2, new, a3, b5]


def test_order_fills_by_cum_qty_out_of_order_activities_apply_exactly() -> None:
    fills = [(D(2), D(10)), (D(3), D(14)), (D(1), D(20))]
    acts = []
    cum = D(0)
    for i, (q, p) in enumerate(fills):
        cum += q
        acts.append(
            activity_to_event(
                WireActivity(
                    id=f"{i:017d}::x",
                    order_id="o",
                    symbol="S",
                    side="buy",
                    price=p,
                    qty=q,
                    cum_qty=cum,
                    transaction_time="2026-11-23T14:30:00.000Z",
                    type="partial_fill",
                )
            )
        )
    result = apply_events(ACCOUNT, {}, {}, [acts[2], acts[0], acts[1]])  # same millisecond
    assert result.inexact_fills == 0 and result.stale_fills == 0
    assert result.orders["o"].filled_qty == D(6)
    assert result.orders["o"].filled_avg_price == D(82) / D(6)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 20), st.booleans()), max_size=15))
def test_order_fills_by_cum_qty_is_a_slot_preserving_sort(raw: list[tuple[str, int, bool]]) -> None:
    events = [_ev(o, c, "partial_fill" if is_fill else "new") for o, c, is_fill in raw]
    out = order_fills_by_cum_qty(events)
    assert sorted(map(id, out)) == sorted(map(id, events))  # same items
    for i, (before, after) in enumerate(zip(events, out, strict=True)):
        if not before.is_fill:
            assert after is before  # non-fills keep their place
        else:
            assert after.is_fill and after.order_id == before.order_id  # an order keeps its slots
    for order in "abc":
        cums = [e.cum_qty for e in out if e.is_fill and e.order_id == order]
        assert cums == sorted(cums)
