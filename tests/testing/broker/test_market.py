"""The simulated broker: deterministic order flow, truthful ground truth, Alpaca-shaped
REST and stream, and chaos knobs that do what they say (over real loopback sockets)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from itertools import pairwise
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from stream_supervisor.events import parse_timestamp
from stream_supervisor.testing.broker import (
    ChaosConfig,
    SessionClosed,
    SimConfig,
    SimServer,
    SimulatedBroker,
    serve,
)
from stream_supervisor.testing.broker.chaos import ChaosDecider

from ...fixtures import RECORDING

START = datetime(2026, 11, 23, 20, 47, 37, 758317, tzinfo=UTC)
AUTH = {"APCA-API-KEY-ID": "SIMKEY", "APCA-API-SECRET-KEY": "SIMSECRET"}
AUTH_MSG = json.dumps(
    {"action": "authenticate", "data": {"key_id": "SIMKEY", "secret_key": "SIMSECRET"}}
)
LISTEN_MSG = json.dumps({"action": "listen", "data": {"streams": ["trade_updates"]}})
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(Z|-05:00)$")
ORDER_TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def config(**kw: Any) -> SimConfig:
    kw.setdefault("start_time", START)
    return SimConfig(**kw)


def play_all(broker: SimulatedBroker) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while (batch := broker.step()) is not None:
        out.extend(batch)
    return out


def all_activities(
    broker: SimulatedBroker, page_size: int = 100, **kw: Any
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = None
    while page := broker.fill_activities(after=None, page_size=page_size, page_token=token, **kw):
        out.extend(page)
        token = page[-1]["id"]
    return out


def fixture_lines() -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in (RECORDING / "trade_updates.jsonl").read_text().splitlines()
    ]


# ---------------------------------------------------------------------- pure state


def test_same_seed_same_frames_and_truth() -> None:
    a, b = SimulatedBroker(config(seed=7, orders=60)), SimulatedBroker(config(seed=7, orders=60))
    assert play_all(a) == play_all(b)
    assert a.ground_truth() == b.ground_truth()
    assert all_activities(a) == all_activities(b)
    other = SimulatedBroker(config(seed=8, orders=60))
    assert play_all(other) != play_all(SimulatedBroker(config(seed=7, orders=60)))


def test_chaos_knobs_do_not_change_the_market() -> None:
    calm = SimulatedBroker(config(seed=3, orders=30))
    noisy = SimulatedBroker(config(seed=3, orders=30, chaos=ChaosConfig(duplicate_prob=0.5)))
    assert play_all(calm) == play_all(noisy)


def test_chaos_decisions_are_seeded() -> None:
    knobs = ChaosConfig(
        duplicate_prob=0.3, disconnect_prob=0.1, malformed_prob=0.2, rest_error_prob=0.3
    )
    runs = []
    for _ in range(2):
        d = ChaosDecider(knobs, seed=11)
        runs.append(
            [(d.copies(), d.disconnect_after(i), d.injection(), d.rest_fault()) for i in range(200)]
        )
    assert runs[0] == runs[1]
    slow = ChaosDecider(ChaosConfig(delay_prob=1.0, delay_max=0.25, rest_delay_max=0.5), seed=1)
    assert all(0 <= slow.delay() <= 0.25 and 0 <= slow.rest_delay() <= 0.5 for _ in range(50))
    assert any(c > 1 for c, *_ in runs[0]) and any(f for *_, f in runs[0])


def test_ground_truth_is_consistent_with_the_updates() -> None:
    broker = SimulatedBroker(config(seed=5, orders=150))
    updates = play_all(broker)
    truth = broker.ground_truth()
    assert broker.finished and truth["finished"]
    assert truth["updates_total"] == len(updates)

    net: dict[str, Decimal] = defaultdict(Decimal)
    seen_flip = seen_fraction = False
    with localcontext() as ctx:
        ctx.prec = 50
        for u in updates:
            if u["event"] not in ("fill", "partial_fill"):
                continue
            o = u["order"]
            signed = Decimal(u["qty"]) * (1 if o["side"] == "buy" else -1)
            before = net[o["symbol"]]
            net[o["symbol"]] += signed
            assert Decimal(u["position_qty"]) == net[o["symbol"]]
            seen_flip |= before * net[o["symbol"]] < 0
            seen_fraction |= Decimal(u["qty"]) != Decimal(u["qty"]).to_integral_value()
    assert seen_flip and seen_fraction

    fills_total = 0
    for order_id, o in truth["orders"].items():
        fills = o["fills"]
        fills_total += len(fills)
        assert sum(Decimal(f["qty"]) for f in fills) == Decimal(o["filled_qty"])
        cum = Decimal(0)
        for f in fills:
            cum += Decimal(f["qty"])
            assert Decimal(f["cum_qty"]) == cum
        assert o["status"] in ("filled", "canceled", "expired")
        if o["status"] == "filled":
            assert o["filled_qty"] == o["qty"]
        if fills:
            with localcontext() as ctx:
                ctx.prec = 50
                avg = sum(Decimal(f["qty"]) * Decimal(f["price"]) for f in fills) / cum
                expected = avg.quantize(Decimal("1e-12"), rounding=ROUND_HALF_EVEN).normalize()
            assert Decimal(o["filled_avg_price"]) == expected
        else:
            assert o["filled_avg_price"] is None
        assert order_id in {u["order"]["id"] for u in updates}
    assert fills_total == truth["fills_total"]
    for symbol, p in truth["positions"].items():
        assert Decimal(p["qty"]) == net[symbol]
        assert (p["avg_entry_price"] is None) == (net[symbol] == 0)

    statuses = {o["status"] for o in truth["orders"].values()}
    assert {"filled", "canceled"} <= statuses
    partially_canceled = [
        o for o in truth["orders"].values() if o["status"] == "canceled" and o["fills"]
    ]
    assert partially_canceled


def test_position_math_matches_design_section_4() -> None:
    """Replaying the fills with the DESIGN math reproduces avg price and realized P&L."""
    broker = SimulatedBroker(config(seed=9, orders=120))
    updates = play_all(broker)
    book: dict[str, tuple[Decimal, Decimal | None, Decimal]] = {}
    with localcontext() as ctx:
        ctx.prec = 50
        for u in updates:
            if u["event"] not in ("fill", "partial_fill"):
                continue
            sym, price = u["order"]["symbol"], Decimal(u["price"])
            dq = Decimal(u["qty"]) * (1 if u["order"]["side"] == "buy" else -1)
            q, a, r = book.get(sym, (Decimal(0), None, Decimal(0)))
            if q == 0:
                q, a = dq, price
            elif (q > 0) == (dq > 0):
                assert a is not None
                a, q = (q * a + dq * price) / (q + dq), q + dq
            else:
                assert a is not None
                r += min(abs(q), abs(dq)) * (price - a) * (1 if q > 0 else -1)
                after = q + dq
                a = None if after == 0 else (price if (after > 0) != (q > 0) else a)
                q = after
            book[sym] = (q, a, r)
        truth = broker.ground_truth()["positions"]
        for sym, (q, a, r) in book.items():
            assert Decimal(truth[sym]["qty"]) == q
            assert Decimal(truth[sym]["realized_pnl"]) == r
            if a is None:
                assert truth[sym]["avg_entry_price"] is None
            else:
                assert Decimal(truth[sym]["avg_entry_price"]) == a.quantize(Decimal("1e-12"))


def test_shapes_match_the_recording() -> None:
    recorded = fixture_lines()
    broker = SimulatedBroker(config(seed=4242, orders=150))
    updates = play_all(broker)

    recorded_shapes = {(d["data"]["event"], tuple(d["data"])) for d in recorded[2:]}
    assert {(u["event"], tuple(u)) for u in updates} <= recorded_shapes
    assert {u["event"] for u in updates} >= {
        "pending_new",
        "new",
        "partial_fill",
        "fill",
        "pending_cancel",
        "canceled",
        "expired",
    }
    order_keys = tuple(recorded[2]["data"]["order"])
    for u in updates:
        assert tuple(u["order"]) == order_keys
        assert TS_RE.match(u["timestamp"]), u["timestamp"]
        for key in ("created_at", "updated_at", "submitted_at", "filled_at", "canceled_at"):
            assert u["order"][key] is None or ORDER_TS_RE.match(u["order"][key])
        for key in ("qty", "filled_qty", "price", "position_qty"):
            value = u.get(key, u["order"].get(key))
            assert value is None or (isinstance(value, str) and "E" not in value)
    styles = {u["timestamp"][-1] for u in updates}
    assert styles == {"Z", "0"}  # both `Z` and `-05:00`
    assert any(u["timestamp"].endswith("000000Z") for u in updates)  # whole-ms stamps
    # timestamps never go backwards, whatever their offset
    stamps = [parse_timestamp(u["timestamp"])[1] for u in updates]
    assert stamps == sorted(stamps)

    recorded_acts = json.loads((RECORDING / "fill_activities.json").read_text())
    acts = all_activities(broker)
    assert all(tuple(a) == tuple(recorded_acts[0]) for a in acts)
    assert all(re.match(r"^\d{17}::[0-9a-f-]{36}$", a["id"]) for a in acts)

    recorded_truth = json.loads((RECORDING / "ground_truth.json").read_text())
    truth = broker.ground_truth()
    assert set(truth) == set(recorded_truth)
    assert set(truth["stats"]) >= set(recorded_truth["stats"])
    assert set(truth["injected"]) == set(recorded_truth["injected"])
    sample_order = next(iter(recorded_truth["orders"].values()))
    for o in truth["orders"].values():
        assert set(o) == set(sample_order)
        assert all(set(f) == set(sample_order["fills"][0]) for f in o["fills"])
    assert all(
        set(p) == {"qty", "avg_entry_price", "realized_pnl"} for p in truth["positions"].values()
    )


def test_activities_paging_and_the_same_millisecond_quirk() -> None:
    broker = SimulatedBroker(config(seed=21, orders=150))
    play_all(broker)
    truth = broker.ground_truth()
    everything = all_activities(broker)
    assert len(everything) == truth["fills_total"]
    ids = [a["id"] for a in everything]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all_activities(broker, page_size=7) == everything
    assert len(broker.fill_activities(after=None, page_size=500)) == 100  # max page size

    desc = all_activities(broker, direction="desc")
    assert desc == everything[::-1]

    pivot = everything[40]["transaction_time"]
    later = broker.fill_activities(after=pivot, page_size=100)
    assert later and all(a["transaction_time"] > pivot for a in later)
    assert later[0] == next(a for a in everything if a["transaction_time"] > pivot)
    until = everything[10]["transaction_time"]
    assert all(a["transaction_time"] < until for a in all_activities(broker, until=until))

    # Same-ms fills sort by uuid: some come back out of cum_qty order, but sorting one
    # order's activities by cum_qty gives exactly the ground truth.
    per_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for a in everything:
        per_order[a["order_id"]].append(a)
    inversions = 0
    for order_id, acts in per_order.items():
        cums = [Decimal(a["cum_qty"]) for a in acts]
        for earlier, later_act in pairwise(acts):
            if Decimal(later_act["cum_qty"]) < Decimal(earlier["cum_qty"]):
                inversions += 1
                assert later_act["id"][:17] == earlier["id"][:17]
        truth_fills = truth["orders"][order_id]["fills"]
        assert sorted(cums) == [Decimal(f["cum_qty"]) for f in truth_fills]
        assert {a["id"] for a in acts} == {f["activity_id"] for f in truth_fills}
    assert inversions > 0

    with pytest.raises(ValueError):
        broker.fill_activities(after="yesterday")


def test_rest_views_follow_the_market() -> None:
    broker = SimulatedBroker(config(seed=2, orders=40))
    for _ in range(25):
        broker.step()
    open_orders = broker.orders(status="open")
    assert open_orders and all(
        o["status"] not in ("filled", "canceled", "expired") for o in open_orders
    )
    created = [o["created_at"] for o in open_orders]
    assert created == sorted(created, reverse=True)
    one = open_orders[0]
    assert broker.order(one["id"]) == one
    assert broker.order("00000000-0000-4000-8000-000000000000") is None
    play_all(broker)
    assert broker.orders(status="open") == []
    assert len(broker.orders(status="all", limit=500)) == 40
    truth = broker.ground_truth()["positions"]
    positions = broker.positions()
    assert {p["symbol"]: p["qty"] for p in positions} == {
        s: p["qty"] for s, p in truth.items() if p["qty"] != "0"
    }
    for p in positions:
        assert p["side"] == ("long" if Decimal(p["qty"]) > 0 else "short")
        assert p["avg_entry_price"] == truth[p["symbol"]]["avg_entry_price"]
    account = broker.account()
    assert account["id"] == broker.account_id and account["status"] == "ACTIVE"
    assert account["currency"] == "USD" and account["account_number"]


def test_account_id_defaults_to_a_seeded_uuid() -> None:
    assert SimulatedBroker(config(seed=1)).account_id == SimulatedBroker(config(seed=1)).account_id
    assert SimulatedBroker(config(seed=1)).account_id != SimulatedBroker(config(seed=2)).account_id
    assert SimulatedBroker(config(account_id="acct-x")).account_id == "acct-x"


# ---------------------------------------------------------------------- sessions in memory


class MemoryTransport:
    """Both ends of an in-memory connection: the server side is the SessionTransport."""

    def __init__(self) -> None:
        self.up_send, self.up_recv = trio.open_memory_channel[str | bytes](100)
        self.down_send, self.down_recv = trio.open_memory_channel[str | bytes](100_000)
        self.closed: str | None = None

    async def get_message(self) -> str | bytes:
        try:
            return await self.up_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SessionClosed from None

    async def send_message(self, data: str | bytes) -> None:
        try:
            await self.down_send.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise SessionClosed from None

    async def aclose(self, *, abrupt: bool = False) -> None:
        self.closed = self.closed or ("abrupt" if abrupt else "clean")
        self.down_send.close()
        self.up_recv.close()

    async def drain(self) -> list[str | bytes]:
        """Everything the client was sent (the session is over: nothing more comes)."""
        out: list[str | bytes] = []
        while True:
            try:
                out.append(self.down_recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out


async def memory_session(broker: SimulatedBroker) -> MemoryTransport:
    """Run a listening session to the end of the market; return the client's view."""
    conn = MemoryTransport()
    before = broker.updates_total
    await conn.up_send.send(AUTH_MSG)
    await conn.up_send.send(LISTEN_MSG)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(broker.handle_session, conn)
            while broker.stats["listen"] == 0:
                await trio.sleep(0.001)
            await broker.run_market()
            done = ("update_frames", "skipped_partials")
            while sum(broker.stats[k] for k in done) < broker.updates_total - before:
                await trio.sleep(0.001)
            conn.up_send.close()  # the client leaves
    return conn


async def test_injected_frames_and_text_frames_in_memory() -> None:
    knobs = ChaosConfig(
        malformed_prob=0.3,
        unknown_event_prob=0.2,
        text_frame_prob=0.5,
        oversized_prob=0.05,
        oversized_bytes=5000,
    )
    broker = SimulatedBroker(config(seed=4, orders=20, rate=0, chaos=knobs))
    conn = await memory_session(broker)
    frames = await conn.drain()
    assert json.loads(frames[0]) == {
        "stream": "authorization",
        "data": {"status": "authorized", "action": "authenticate"},
    }
    stats, injected = broker.stats, broker.injected
    assert sum(injected.values()) == stats["injected_frames"] > 0
    assert injected["invalid_json"] and injected["unknown_event"] and injected["oversized"]
    assert stats["text_frames"] == sum(isinstance(f, str) for f in frames) > 0
    assert stats["frames_sent"] == len(frames) - 2
    real = unknown = 0
    for f in frames[2:]:
        try:
            msg = json.loads(f)
        except ValueError:
            continue
        data = msg.get("data") if isinstance(msg, dict) else None
        if (
            msg.get("stream") == "trade_updates"
            and isinstance(data, dict)
            and isinstance(data.get("event"), str)
        ):
            if data["event"] == "future_event":
                unknown += 1
                assert data["order"]["id"] in broker.ground_truth()["orders"]
            elif isinstance(data.get("order"), dict):
                real += 1
    assert real == broker.updates_total == stats["update_frames"]
    assert unknown == injected["unknown_event"] + injected["oversized"]
    assert any(len(f) >= 5000 for f in frames)


async def test_reorder_window_shuffles_but_delivers_everything() -> None:
    broker = SimulatedBroker(config(seed=6, orders=30, rate=0, chaos=ChaosConfig(reorder_window=8)))
    conn = await memory_session(broker)
    frames = [json.loads(f) for f in (await conn.drain())[2:]]
    expected = [json.loads(broker.frame(i)) for i in range(broker.updates_total)]
    assert sorted(map(json.dumps, frames)) == sorted(map(json.dumps, expected))
    assert frames != expected


async def test_skipped_partials_are_still_in_rest() -> None:
    broker = SimulatedBroker(
        config(seed=6, orders=30, rate=0, chaos=ChaosConfig(skip_partial_prob=0.5))
    )
    await memory_session(broker)
    truth = broker.ground_truth()
    unstreamed = [f for o in truth["orders"].values() for f in o["fills"] if not f["streamed"]]
    assert len(unstreamed) == broker.stats["skipped_partials"] == broker.stats["fills_unsent"] > 0
    rest_ids = {a["id"] for a in all_activities(broker)}
    assert {f["activity_id"] for f in unstreamed} <= rest_ids


async def test_updates_while_nobody_listens_are_never_streamed() -> None:
    broker = SimulatedBroker(config(seed=12, orders=10, rate=0))
    for _ in range(15):
        broker.step()
    early = broker.updates_total
    conn = await memory_session(broker)
    got = [json.loads(f) for f in (await conn.drain())[2:]]
    assert got == [json.loads(broker.frame(i)) for i in range(early, broker.updates_total)]
    truth = broker.ground_truth()
    assert truth["updates_played"] == broker.updates_total - early
    assert broker.stats["updates_unsent"] == early


# ---------------------------------------------------------------------- real sockets


@asynccontextmanager
async def running(broker: SimulatedBroker, *, market: bool = False) -> AsyncIterator[SimServer]:
    async with trio.open_nursery() as nursery:
        server: SimServer = await nursery.start(serve, broker)
        if market:
            nursery.start_soon(broker.run_market)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def ws_client(server: SimServer) -> AsyncIterator[WebSocketConnection]:
    """`ws_client(server)`, except that the TCP socket is always closed:
    trio-websocket 0.12's client leaves it open after a rejected upgrade or a
    server-initiated close, which warnings-as-errors turns into a failure."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
    try:
        try:
            async with trio.open_nursery() as nursery:
                host = f"127.0.0.1:{server.ws_port}"
                ws = await wrap_client_stream(nursery, stream, host, "/stream")
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], ConnectionRejected):
                raise group.exceptions[0] from None
            raise
    finally:
        await stream.aclose()


async def login(ws: WebSocketConnection) -> list[Any]:
    await ws.send_message(AUTH_MSG)
    auth = json.loads(await ws.get_message())
    await ws.send_message(LISTEN_MSG)
    listening = await ws.get_message()
    assert isinstance(listening, bytes)
    return [auth, json.loads(listening)]


async def receive_updates(ws: WebSocketConnection, count: int) -> list[str | bytes]:
    return [await ws.get_message() for _ in range(count)]


async def test_loopback_session_streams_binary_frames_like_the_recording() -> None:
    broker = SimulatedBroker(config(seed=4242, orders=15, rate=2000))
    recorded = fixture_lines()
    with trio.fail_after(10):
        # The stock client is fine here: the client closes, so its socket is closed.
        async with running(broker) as server, open_websocket_url(server.ws_url) as ws:
            assert await login(ws) == recorded[:2]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(broker.run_market)
                await broker.wait_finished()
            frames = await receive_updates(ws, broker.updates_total)
    assert all(isinstance(f, bytes) for f in frames)
    assert [json.loads(f) for f in frames] == [
        {"stream": "trade_updates", "data": d} for d in broker_updates(broker)
    ]
    truth = broker.ground_truth()
    assert truth["updates_played"] == truth["updates_total"]
    assert all(f["streamed"] for o in truth["orders"].values() for f in o["fills"])
    assert truth["stats"]["auth_ok"] == truth["stats"]["connections"] == 1


def broker_updates(broker: SimulatedBroker) -> list[dict[str, Any]]:
    return [broker.update(i) for i in range(broker.updates_total)]


async def test_wrong_credentials_are_unauthorized_then_closed() -> None:
    broker = SimulatedBroker(config(orders=5))
    with trio.fail_after(5):
        async with running(broker) as server, ws_client(server) as ws:
            await ws.send_message(
                json.dumps(
                    {"action": "authenticate", "data": {"key_id": "SIMKEY", "secret_key": "nope"}}
                )
            )
            reply = json.loads(await ws.get_message())
            assert reply["stream"] == "authorization"
            assert reply["data"]["status"] == "unauthorized"
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
    assert broker.stats["auth_failed"] == 1 and broker.stats["auth_ok"] == 0


async def test_second_concurrent_connection_gets_429_on_upgrade() -> None:
    broker = SimulatedBroker(config(orders=5))
    with trio.fail_after(5):
        async with running(broker) as server:
            async with ws_client(server) as first:
                await login(first)
                with pytest.raises(ConnectionRejected) as rejected:
                    async with ws_client(server):
                        pass
                assert rejected.value.status_code == 429
            while broker.session_active:  # the slot frees once the first one is gone
                await trio.sleep(0.01)
            async with ws_client(server) as again:
                assert (await login(again))[0]["data"]["status"] == "authorized"
    assert broker.stats["rejected_429"] == 1
    assert broker.stats["upgrade_attempts"] == 3


async def test_429_knob_rejects_the_first_upgrades() -> None:
    broker = SimulatedBroker(config(orders=5, chaos=ChaosConfig(reject_429_connects=2)))
    with trio.fail_after(5):
        async with running(broker) as server:
            for _ in range(2):
                with pytest.raises(ConnectionRejected) as rejected:
                    async with ws_client(server):
                        pass
                assert rejected.value.status_code == 429
            async with ws_client(server) as ws:
                await login(ws)
    assert broker.stats["rejected_429"] == 2


async def test_429_knob_rejects_upgrades_for_a_while() -> None:
    broker = SimulatedBroker(config(orders=5, chaos=ChaosConfig(reject_429_for=0.3)))
    with trio.fail_after(5):
        async with running(broker) as server:
            with pytest.raises(ConnectionRejected) as rejected:
                async with ws_client(server):
                    pass
            assert rejected.value.status_code == 429
            await trio.sleep(0.35)
            async with ws_client(server) as ws:
                await login(ws)
    assert broker.stats["rejected_429"] == 1


async def test_duplicate_knob_sends_bursts() -> None:
    knobs = ChaosConfig(duplicate_prob=1.0, duplicate_burst=3)
    broker = SimulatedBroker(config(seed=3, orders=5, rate=0, chaos=knobs))
    with trio.fail_after(10):
        async with running(broker) as server, ws_client(server) as ws:
            await login(ws)
            await broker.run_market()
            frames = await receive_updates(ws, 3 * broker.updates_total)
    for i in range(broker.updates_total):
        assert frames[3 * i] == frames[3 * i + 1] == frames[3 * i + 2] == broker.frame(i)
    assert (
        broker.stats["dup_frames"] == 2 * broker.stats["update_frames"] == 2 * broker.updates_total
    )


@pytest.mark.parametrize(
    ("knobs", "expected_frames", "close_code"),
    [
        (ChaosConfig(disconnect_every=5), 5, 1000),
        (ChaosConfig(disconnect_at=(2,)), 3, 1000),
        (ChaosConfig(disconnect_at=(3,), abrupt_prob=1.0), 4, 1006),
    ],
)
async def test_disconnect_knobs_close_the_socket(
    knobs: ChaosConfig, expected_frames: int, close_code: int
) -> None:
    broker = SimulatedBroker(config(seed=3, orders=10, rate=0, chaos=knobs))
    with trio.fail_after(10):
        async with running(broker) as server:
            async with ws_client(server) as ws:
                await login(ws)
                await broker.run_market()
                got = []
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        got.append(await ws.get_message())
            assert closed.value.reason is not None and closed.value.reason.code == close_code
            assert got == [broker.frame(i) for i in range(expected_frames)]
            assert broker.stats["disconnects"] == 1
            while broker.session_active:
                await trio.sleep(0.01)
            # Reconnect: live only, so nothing from before comes again.
            async with ws_client(server) as ws:
                await login(ws)
                with trio.move_on_after(0.1):
                    await ws.get_message()
                    pytest.fail("an old update was replayed")
    truth = broker.ground_truth()
    assert truth["updates_played"] == expected_frames
    assert broker.stats["abrupt_disconnects"] == (1 if close_code == 1006 else 0)


async def test_stall_stops_answering_pings_then_resets() -> None:
    knobs = ChaosConfig(stall_prob=1.0, stall_seconds=0.5)
    broker = SimulatedBroker(config(seed=3, orders=3, rate=0, chaos=knobs))
    with trio.fail_after(10):
        async with running(broker) as server, ws_client(server) as ws:
            await login(ws)
            await ws.ping(b"before")  # answered: no stall yet
            await broker.run_market()
            while not broker.stats["stalls"]:
                await trio.sleep(0.01)
            with trio.move_on_after(0.2) as no_pong:
                await ws.ping(b"during")
            assert no_pong.cancelled_caught
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 1006
    assert broker.stats["update_frames"] == 0


async def test_rest_over_http() -> None:
    broker = SimulatedBroker(config(seed=8, orders=30, rate=0))
    play_all(broker)
    with trio.fail_after(10):
        async with (
            running(broker) as server,
            httpx.AsyncClient(base_url=server.rest_url, headers=AUTH) as client,
        ):
            account = await client.get("/v2/account")
            assert account.status_code == 200
            assert account.headers["content-type"] == "application/json"
            assert account.json()["id"] == broker.account_id

            got: list[dict[str, Any]] = []
            token = None
            requests = 0
            while True:
                requests += 1
                params: dict[str, Any] = {"direction": "asc", "page_size": 10}
                if token:
                    params["page_token"] = token
                page = (await client.get("/v2/account/activities/FILL", params=params)).json()
                if not page:
                    break
                got.extend(page)
                token = page[-1]["id"]
            assert got == all_activities(broker)
            after = got[5]["transaction_time"]
            page = (await client.get("/v2/account/activities/FILL", params={"after": after})).json()
            assert page == broker.fill_activities(after=after)

            orders = (await client.get("/v2/orders", params={"status": "all", "limit": 500})).json()
            assert len(orders) == 30
            one = await client.get(f"/v2/orders/{orders[0]['id']}")
            assert one.json() == orders[0]
            assert (await client.get("/v2/orders/unknown")).status_code == 404
            assert (await client.get("/v2/positions")).json() == broker.positions()
            assert (await client.get("/v2/nope")).status_code == 404
            assert (await client.get("/v2/orders", params={"status": "weird"})).status_code == 422

            anonymous = await client.get("/v2/account", headers={"APCA-API-SECRET-KEY": "wrong"})
            assert anonymous.status_code == 401
            assert anonymous.json() == {"code": 40110000, "message": "request is not authorized"}
            assert "SIMSECRET" not in anonymous.text
    assert broker.stats["rest_401"] == 1
    assert broker.stats["activity_requests"] == requests + 1


async def test_rest_chaos_knobs() -> None:
    knobs = ChaosConfig(
        rest_429_prob=0.4, rest_error_prob=0.2, rest_retry_after=2.0, rest_short_pages=True
    )
    broker = SimulatedBroker(config(seed=8, orders=40, rate=0, chaos=knobs))
    play_all(broker)
    statuses: dict[int, int] = defaultdict(int)
    got: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with (
            running(broker) as server,
            httpx.AsyncClient(base_url=server.rest_url, headers=AUTH) as client,
        ):
            token = None
            while True:
                params: dict[str, Any] = {"page_size": 50}
                if token:
                    params["page_token"] = token
                r = await client.get("/v2/account/activities/FILL", params=params)
                statuses[r.status_code] += 1
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "2"
                    continue
                if r.status_code == 500:
                    continue
                page = r.json()
                if not page:
                    break
                assert len(page) < 50
                got.extend(page)
                token = page[-1]["id"]
    assert got == all_activities(broker)
    assert statuses[429] and statuses[500] and statuses[200]
    assert broker.stats["rest_faults"] == statuses[429] + statuses[500]
