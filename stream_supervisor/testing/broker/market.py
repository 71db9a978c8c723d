"""The simulated broker's state: a seeded order-flow market, its ground truth, REST views.

No sockets here. `session.py` speaks the stream protocol to one client and `server.py`
puts both on loopback; a deterministic harness can drive `step()` and `rest()` directly.
"""

from __future__ import annotations

import bisect
import decimal
import hmac
import json
import math
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

import structlog
import trio

from ...events import TimestampError, parse_timestamp
from .chaos import INJECTED_KINDS, ChaosConfig, ChaosDecider

if TYPE_CHECKING:
    from .sessions import SessionTransport

log = structlog.get_logger("stream_supervisor.testing.broker")

# Ground-truth arithmetic: the recorded broker reports realized P&L unrounded at 50
# significant digits, and averages rounded half-even to 12 decimals.
_CTX: Final = decimal.Context(prec=50, rounding=decimal.ROUND_HALF_EVEN)
_TWELVE: Final = Decimal("1e-12")
_CENT: Final = Decimal("0.01")
_ZERO: Final = Decimal(0)

# The recording is from November, so US/Eastern is -05:00. A fixed offset keeps activity
# ids monotonic across a DST change and needs no tz database.
_EASTERN: Final = timezone(timedelta(hours=-5))
_NS: Final = 1_000_000_000
_MS_NS: Final = 1_000_000

MAX_LIVE_ORDERS: Final = 4
"""Orders in flight at once; their updates interleave on the stream."""
DEFAULT_STEP_NS: Final = 5_800_000
"""Simulated time between updates when `rate` is 0 (about the recording's spacing)."""
SAME_MS_PAIR_PROB: Final = 0.12
"""Chance that two consecutive fills of an order land in the same millisecond."""
EASTERN_TIMESTAMP_PROB: Final = 0.3
FEED_BUFFER: Final = 100_000
"""Updates queued for one session before it is dropped as a slow consumer."""
ACTIVITY_PAGE_MAX: Final = 100
ORDERS_LIMIT_MAX: Final = 500
ORDERS_DEFAULT_LIMIT: Final = 50
"""What `GET /v2/orders` returns without `limit`, as the real endpoint does."""
STARTING_CASH: Final = Decimal(100000)

STAT_KEYS: Final = (
    "connections",
    "rejected_429",
    "auth_ok",
    "auth_failed",
    "listen",
    "frames_sent",
    "update_frames",
    "dup_frames",
    "replay_frames",
    "text_frames",
    "injected_frames",
    "skipped_partials",
    "updates_unsent",
    "fills_unsent",
    "disconnects",
    "abrupt_disconnects",
    "stalls",
    "slow_consumer_drops",
    "client_disconnects",
    "rest_requests",
    "rest_401",
    "rest_faults",
    "activity_requests",
    "upgrade_attempts",
)

_OPEN_STATUSES: Final = frozenset(
    {"pending_new", "accepted", "new", "partially_filled", "pending_cancel"}
)

_Step = Literal["pending_new", "new", "fill", "pending_cancel", "canceled", "expired"]


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes one simulated session. Same config, same frames."""

    seed: int = 1
    account_id: str | None = None
    """Default: a uuid derived from the seed."""
    key_id: str = "SIMKEY"
    secret_key: str = "SIMSECRET"
    symbols: tuple[str, ...] = ("AAPL", "QQQ", "TSLA", "NVDA", "SPY", "MSFT")
    orders: int = 200
    """Orders the market generates before it is finished."""
    rate: float = 200.0
    """Updates per second of Trio time; 0 = as fast as possible."""
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    start_time: datetime | None = None
    """Wall-clock epoch of simulated time; default `datetime.now(UTC)` at construction.
    Set it to make timestamps (and so activity ids) fully deterministic."""
    scenario: str = "default"
    """A label copied into the ground truth."""


@dataclass(frozen=True)
class RestResponse:
    """One REST answer. `delay` is how long the server should wait before sending it."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class _Symbol:
    name: str
    asset_id: str
    price: Decimal
    fractional: bool


@dataclass(slots=True)
class _Position:
    qty: Decimal = _ZERO
    avg: Decimal | None = None
    realized: Decimal = _ZERO

    def apply(self, signed_qty: Decimal, price: Decimal) -> None:
        """DESIGN section 4 position math; caller holds the 50-digit context."""
        q = self.qty
        if q == 0:
            self.qty, self.avg = signed_qty, price
            return
        assert self.avg is not None
        if (q > 0) == (signed_qty > 0):
            self.avg = (q * self.avg + signed_qty * price) / (q + signed_qty)
            self.qty = q + signed_qty
            return
        closed = min(abs(q), abs(signed_qty))
        self.realized += closed * (price - self.avg) * (1 if q > 0 else -1)
        after = q + signed_qty
        if after == 0:
            self.avg = None
        elif (after > 0) != (q > 0):
            self.avg = price  # flipped: the remainder opens at the fill price
        self.qty = after


@dataclass(slots=True)
class _Fill:
    qty: Decimal
    price: Decimal
    cum_qty: Decimal
    activity_id: str
    update_index: int


@dataclass(slots=True)
class _Order:
    id: str
    client_order_id: str
    symbol: _Symbol
    side: str
    qty: Decimal
    order_type: str
    time_in_force: str
    limit_price: Decimal | None
    position_intent: str
    plan: list[tuple[_Step, Decimal]]
    status: str = "pending_new"
    created_ns: int = 0
    updated_ns: int = 0
    filled_ns: int | None = None
    canceled_ns: int | None = None
    expired_ns: int | None = None
    filled_qty: Decimal = _ZERO
    notional: Decimal = _ZERO
    fills: list[_Fill] = field(default_factory=list)

    def avg_price(self) -> Decimal | None:
        if self.filled_qty == 0:
            return None
        with decimal.localcontext(_CTX):
            return (self.notional / self.filled_qty).quantize(_TWELVE)

    def snapshot(self) -> dict[str, Any]:
        """The order object, keys in the order the real broker sends them."""
        avg = self.avg_price()
        return {
            "id": self.id,
            "client_order_id": self.client_order_id,
            "created_at": _utc_us(self.created_ns),
            "updated_at": _utc_us(self.updated_ns),
            "submitted_at": _utc_us(self.created_ns),
            "filled_at": _utc_us_opt(self.filled_ns),
            "expired_at": _utc_us_opt(self.expired_ns),
            "expires_at": None,
            "canceled_at": _utc_us_opt(self.canceled_ns),
            "failed_at": None,
            "replaced_at": None,
            "replaced_by": None,
            "replaces": None,
            "asset_id": self.symbol.asset_id,
            "symbol": self.symbol.name,
            "asset_class": "us_equity",
            "notional": None,
            "qty": _text(self.qty),
            "filled_qty": _text(self.filled_qty),
            "filled_avg_price": None if avg is None else _text(avg),
            "order_class": "",
            "order_type": self.order_type,
            "type": self.order_type,
            "side": self.side,
            "position_intent": self.position_intent,
            "time_in_force": self.time_in_force,
            "limit_price": None if self.limit_price is None else _text(self.limit_price),
            "stop_price": None,
            "status": self.status,
            "extended_hours": False,
            "legs": None,
            "trail_percent": None,
            "trail_price": None,
            "hwm": None,
            "subtag": None,
            "source": None,
        }


class SimulatedBroker:
    """An Alpaca-compatible broker for one account: market, ground truth, REST, stream."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.chaos = ChaosDecider(config.chaos, config.seed)
        # Market randomness only: chaos and the account id draw from their own streams,
        # so a chaos knob never changes which orders the market makes.
        self._rng = random.Random(config.seed)
        self.account_id = config.account_id or str(_uuid4(random.Random(f"{config.seed}/account")))
        start = config.start_time or datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("SimConfig.start_time must be timezone-aware")
        epoch = start.astimezone(UTC)
        self._epoch_ns = int(epoch.replace(microsecond=0).timestamp()) * _NS + (
            epoch.microsecond * 1000
        )
        self._now_ns = self._epoch_ns
        self._step_ns = int(_NS / config.rate) if config.rate > 0 else DEFAULT_STEP_NS

        self._symbols = [
            _Symbol(
                name=name,
                asset_id=str(_uuid4(self._rng)),
                price=Decimal(self._rng.randint(2_000, 60_000)) / 100,
                # Alternate so both fractional and whole-share symbols are always exercised.
                fractional=(i % 2 == 0),
            )
            for i, name in enumerate(config.symbols)
        ]
        if not self._symbols:
            raise ValueError("SimConfig.symbols must not be empty")
        self._positions = {s.name: _Position() for s in self._symbols}
        self._cash = STARTING_CASH

        self._orders: dict[str, _Order] = {}
        self._live: list[_Order] = []
        self._created = 0
        self._updates: list[dict[str, Any]] = []
        self._frames: list[bytes] = []
        self._sent: list[bool] = []
        self._fill_updates: set[int] = set()
        self._activity_ids: list[str] = []
        self._activities: list[dict[str, Any]] = []
        self._activity_ns: dict[str, int] = {}
        self.fills_total = 0

        self.finished = config.orders <= 0
        self._finished_event = trio.Event()
        if self.finished:
            self._finished_event.set()

        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.injected: dict[str, int] = dict.fromkeys(INJECTED_KINDS, 0)

        # One trade_updates session per account (DESIGN section 2).
        self._slot: object | None = None
        self._reservation: object | None = None
        self._started_at: float | None = None
        self._feeds: list[trio.MemorySendChannel[int]] = []

    # ------------------------------------------------------------------ the market

    async def run_market(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Play the market in Trio time at `config.rate`, then set `finished` and return."""
        task_status.started()
        rate = self.config.rate
        next_at = trio.current_time()
        while (batch := self.step()) is not None:
            if rate > 0:
                # Schedule against an absolute clock so sleep overhead does not drift the rate.
                next_at += len(batch) / rate
                await trio.sleep_until(next_at)
            else:
                await trio.lowlevel.checkpoint()
        log.debug("sim_market_finished", updates=len(self._updates), fills=self.fills_total)

    async def wait_finished(self) -> None:
        await self._finished_event.wait()

    def step(self) -> list[dict[str, Any]] | None:
        """Produce, record and publish the next batch of updates; None once finished."""
        if self.finished:
            return None
        with decimal.localcontext(_CTX):
            indices = self._advance()
        if self._created >= self.config.orders and not self._live:
            self.finished = True
            self._finished_event.set()
        self._publish(indices)
        return [self._updates[i] for i in indices]

    def _advance(self) -> list[int]:
        rng = self._rng
        can_open = self._created < self.config.orders
        if can_open and (
            not self._live or (len(self._live) < MAX_LIVE_ORDERS and rng.random() < 0.35)
        ):
            order = self._open_order()
            self._live.append(order)
        else:
            order = rng.choice(self._live)
        # Two fills of one order in the same millisecond: their activity ids share the
        # time prefix and sort by uuid, which is how REST returns them out of cum order.
        pair = (
            len(order.plan) >= 2
            and order.plan[0][0] == "fill"
            and order.plan[1][0] == "fill"
            and rng.random() < SAME_MS_PAIR_PROB
        )
        out = [self._play(order, self._tick(snap=pair))]
        if pair:
            out.append(self._play(order, self._tick(same_ms=True)))
        if not order.plan:
            self._live.remove(order)
        return out

    def _tick(self, *, snap: bool = False, same_ms: bool = False) -> int:
        rng = self._rng
        now = self._now_ns
        if same_ms:
            room = (now // _MS_NS + 1) * _MS_NS - now - 1
            if room > 0:
                now += rng.randint(1, room)
        else:
            now += max(1, int(self._step_ns * rng.uniform(0.5, 1.5)))
            # The real broker often stamps on a whole millisecond ("...770000000Z").
            if snap or rng.random() < 0.15:
                now = -(-now // _MS_NS) * _MS_NS
        self._now_ns = now
        return now

    def _random_qty(self, sym: _Symbol) -> Decimal:
        rng = self._rng
        if sym.fractional and rng.random() < 0.5:
            return Decimal(rng.randint(1, 60_000)) / 1000  # e.g. 0.974, 17.026
        return Decimal(rng.randint(1, 100))

    def _open_order(self) -> _Order:
        rng = self._rng
        sym = rng.choice(self._symbols)
        held = self._positions[sym.name].qty
        r = rng.random()
        if held != 0 and r < 0.30:
            side, qty = ("sell" if held > 0 else "buy"), abs(held)  # close exactly
        elif held != 0 and r < 0.45:
            side, qty = ("sell" if held > 0 else "buy"), abs(held) + self._random_qty(sym)  # flip
        else:
            side, qty = rng.choice(("buy", "sell")), self._random_qty(sym)
        fractional_qty = qty != qty.to_integral_value()
        if fractional_qty:
            # The real broker accepts fractional quantities only as market day orders.
            order_type, tif = "market", "day"
        else:
            order_type, tif = rng.choice(("market", "limit")), rng.choice(("day", "gtc"))
        limit: Decimal | None = None
        if order_type == "limit":
            offset = Decimal(rng.randint(50, 400)) / 100
            # Marketable limits, so most fill, some at the limit when the price walks away.
            limit = sym.price + offset if side == "buy" else max(_CENT, sym.price - offset)
        if side == "buy":
            intent = "buy_to_close" if held < 0 else "buy_to_open"
        else:
            intent = "sell_to_close" if held > 0 else "sell_to_open"

        pieces = self._split(qty, Decimal("0.001") if fractional_qty else Decimal(1))
        plan: list[tuple[_Step, Decimal]] = [("pending_new", _ZERO), ("new", _ZERO)]
        fate = rng.random()
        if fate < 0.12:
            k = rng.randint(1, len(pieces) - 1) if len(pieces) > 1 else 0
            plan += [("fill", p) for p in pieces[:k]]
            plan += [("pending_cancel", _ZERO), ("canceled", _ZERO)]
        elif fate < 0.18 and order_type == "limit" and tif == "day":
            k = rng.randint(1, len(pieces) - 1) if len(pieces) > 1 else 0
            plan += [("fill", p) for p in pieces[:k]]
            plan.append(("expired", _ZERO))
        else:
            plan += [("fill", p) for p in pieces]

        self._created += 1
        order = _Order(
            id=str(_uuid4(rng)),
            client_order_id=str(_uuid4(rng)),
            symbol=sym,
            side=side,
            qty=qty,
            order_type=order_type,
            time_in_force=tif,
            limit_price=limit,
            position_intent=intent,
            plan=plan,
        )
        self._orders[order.id] = order
        return order

    def _split(self, qty: Decimal, unit: Decimal) -> list[Decimal]:
        """Cut `qty` into 1..5 fills of whole `unit`s."""
        units = int(qty / unit)
        k = min(self._rng.randint(1, 5), units)
        cuts = sorted(self._rng.sample(range(1, units), k - 1)) if k > 1 else []
        bounds = [0, *cuts, units]
        return [(bounds[i + 1] - bounds[i]) * unit for i in range(len(bounds) - 1)]

    def _fill_price(self, order: _Order) -> Decimal:
        sym = order.symbol
        sym.price = max(Decimal(1), sym.price + Decimal(self._rng.randint(-40, 40)) / 100)
        price = sym.price
        if order.limit_price is not None:
            price = (
                min(price, order.limit_price)
                if order.side == "buy"
                else max(price, order.limit_price)
            )
        return price

    def _play(self, order: _Order, ts: int) -> int:
        rng = self._rng
        step, fill_qty = order.plan.pop(0)
        order.updated_ns = ts
        execution_id = None if step == "pending_new" else str(_uuid4(rng))
        extra: dict[str, str] = {}
        event: str = step
        if step == "pending_new":
            order.created_ns = ts
            order.status = "pending_new"
        elif step == "new":
            order.status = "new"
        elif step == "fill":
            price = self._fill_price(order)
            order.filled_qty += fill_qty
            order.notional += fill_qty * price
            done = order.filled_qty == order.qty
            event = "fill" if done else "partial_fill"
            order.status = "filled" if done else "partially_filled"
            if done:
                order.filled_ns = ts
            signed = fill_qty if order.side == "buy" else -fill_qty
            position = self._positions[order.symbol.name]
            position.apply(signed, price)
            self._cash -= signed * price
            activity_id = self._record_activity(order, event, fill_qty, price, ts, rng)
            order.fills.append(
                _Fill(fill_qty, price, order.filled_qty, activity_id, len(self._updates))
            )
            self.fills_total += 1
            extra = {
                "price": _text(price),
                "qty": _text(fill_qty),
                "position_qty": _text(position.qty),
            }
        elif step == "pending_cancel":
            order.status = "pending_cancel"
        elif step == "canceled":
            order.status = "canceled"
            order.canceled_ns = ts
        else:
            order.status = "expired"
            order.expired_ns = ts
        data: dict[str, Any] = {
            "event": event,
            "execution_id": execution_id,
            "order": order.snapshot(),
            "timestamp": _rfc3339_ns(ts, eastern=rng.random() < EASTERN_TIMESTAMP_PROB),
        }
        data.update(extra)
        return self._record_update(data)

    def _record_activity(
        self, order: _Order, event: str, qty: Decimal, price: Decimal, ts: int, rng: random.Random
    ) -> str:
        local = datetime.fromtimestamp(ts // _NS, _EASTERN)
        activity_id = f"{local:%Y%m%d%H%M%S}{(ts % _NS) // _MS_NS:03d}::{_uuid4(rng)}"
        activity = {
            "id": activity_id,
            "activity_type": "FILL",
            "transaction_time": _utc_us(ts),
            "type": event,
            "price": _text(price),
            "qty": _text(qty),
            "side": order.side,
            "symbol": order.symbol.name,
            "leaves_qty": _text(order.qty - order.filled_qty),
            "order_id": order.id,
            "cum_qty": _text(order.filled_qty),
            "order_status": order.status,
        }
        at = bisect.bisect(self._activity_ids, activity_id)
        self._activity_ids.insert(at, activity_id)
        self._activities.insert(at, activity)
        # Compare `after`/`until` at the precision clients see: microseconds.
        self._activity_ns[activity_id] = ts - ts % 1000
        return activity_id

    def _record_update(self, data: dict[str, Any]) -> int:
        index = len(self._updates)
        self._updates.append(data)
        self._frames.append(_dumps({"stream": "trade_updates", "data": data}))
        self._sent.append(False)
        self.stats["updates_unsent"] += 1
        if data["event"] in ("fill", "partial_fill"):
            self._fill_updates.add(index)
            self.stats["fills_unsent"] += 1
        return index

    # ------------------------------------------------------------------ feeds (session.py)

    def _publish(self, indices: list[int]) -> None:
        for feed in list(self._feeds):
            for index in indices:
                try:
                    feed.send_nowait(index)
                except trio.WouldBlock:
                    # A real server drops a consumer that cannot keep up; the session
                    # sees the end of its feed and resets the connection.
                    self.stats["slow_consumer_drops"] += 1
                    self.close_feed(feed)
                    break
                except trio.BrokenResourceError:
                    self.close_feed(feed)
                    break

    def open_feed(self) -> tuple[trio.MemorySendChannel[int], trio.MemoryReceiveChannel[int]]:
        """Subscribe to live update indices from now on (live only: no history)."""
        send, receive = trio.open_memory_channel[int](FEED_BUFFER)
        self._feeds.append(send)
        return send, receive

    def close_feed(self, feed: trio.MemorySendChannel[int]) -> None:
        if feed in self._feeds:
            self._feeds.remove(feed)
        feed.close()

    def update(self, index: int) -> dict[str, Any]:
        return self._updates[index]

    def frame(self, index: int) -> bytes:
        """The update's wire frame: compact UTF-8 JSON, rendered once."""
        return self._frames[index]

    @property
    def updates_total(self) -> int:
        return len(self._updates)

    def sent_indices(self, last: int) -> list[int]:
        """Up to `last` most recent updates that were already streamed once."""
        out: list[int] = []
        for index in range(len(self._sent) - 1, -1, -1):
            if len(out) >= last:
                break
            if self._sent[index]:
                out.append(index)
        out.reverse()
        return out

    def mark_sent(self, index: int) -> None:
        if not self._sent[index]:
            self._sent[index] = True
            self.stats["updates_unsent"] -= 1
            if index in self._fill_updates:
                self.stats["fills_unsent"] -= 1

    def current_time_text(self) -> str:
        """Now in simulated time, in the stream's timestamp style."""
        return _rfc3339_ns(self._now_ns, eastern=False)

    def sample_order(self, rng: random.Random) -> dict[str, Any] | None:
        """A current snapshot of some existing order (for injected unknown events)."""
        if not self._orders:
            return None
        return rng.choice(list(self._orders.values())).snapshot()

    # ------------------------------------------------------------------ sessions

    def mark_server_started(self, now: float) -> None:
        self._started_at = now

    def admit(self) -> int | None:
        """Decide a WebSocket upgrade: None to accept (the slot is then reserved), else 429."""
        self.stats["upgrade_attempts"] += 1
        now = trio.current_time()
        if self._started_at is None:
            self._started_at = now
        chaos = self.chaos.reject_upgrade(
            attempt=self.stats["upgrade_attempts"], since_start=now - self._started_at
        )
        if chaos or self._slot is not None:
            self.stats["rejected_429"] += 1
            return 429
        self._reservation = self._slot = object()
        return None

    def cancel_admission(self) -> None:
        """The upgrade that `admit()` accepted never completed: free the slot."""
        if self._reservation is not None and self._slot is self._reservation:
            self._slot = None
        self._reservation = None

    @property
    def session_active(self) -> bool:
        return self._slot is not None

    async def handle_session(self, conn: SessionTransport) -> None:
        """Serve one client connection (after `admit()`, or directly on an in-memory
        transport). A second concurrent session is refused: closed at once."""
        from .sessions import run_session  # session.py imports this module

        if self._reservation is not None and self._slot is self._reservation:
            token, self._reservation = self._reservation, None
        elif self._slot is None:
            token = self._slot = object()
        else:
            self.stats["rejected_429"] += 1
            await conn.aclose()
            return
        try:
            await run_session(self, conn)
        finally:
            if self._slot is token:
                self._slot = None

    # ------------------------------------------------------------------ ground truth

    def ground_truth(self) -> dict[str, Any]:
        """The broker's final (or current) state, in the recorded fixture's schema.

        A fill is `streamed` once its update was handed to a listening client's socket
        (an abrupt reset right after may still lose it in flight); `updates_played`
        counts such updates, `stats["updates_unsent"]` the others.
        """
        with decimal.localcontext(_CTX):
            orders = {
                o.id: {
                    "symbol": o.symbol.name,
                    "side": o.side,
                    "qty": _text(o.qty),
                    "filled_qty": _text(o.filled_qty),
                    "filled_avg_price": _text_opt(o.avg_price()),
                    "status": o.status,
                    "fills": [
                        {
                            "qty": _text(f.qty),
                            "price": _text(f.price),
                            "cum_qty": _text(f.cum_qty),
                            "activity_id": f.activity_id,
                            "streamed": self._sent[f.update_index],
                        }
                        for f in o.fills
                    ],
                }
                for o in self._orders.values()
            }
            positions = {
                name: {
                    "qty": _text(p.qty),
                    "avg_entry_price": _text_opt(_round12(p.avg)),
                    "realized_pnl": _text(p.realized),
                }
                for name, p in self._positions.items()
            }
        return {
            "orders": orders,
            "positions": positions,
            "fills_total": self.fills_total,
            "version": 1,
            "seed": self.config.seed,
            "scenario": self.config.scenario,
            "account_id": self.account_id,
            "symbols": list(self.config.symbols),
            "finished": self.finished,
            "updates_total": len(self._updates),
            "updates_played": sum(self._sent),
            "injected": dict(self.injected),
            "stats": dict(self.stats),
        }

    # ------------------------------------------------------------------ REST views

    def account(self) -> dict[str, Any]:
        with decimal.localcontext(_CTX):
            values = [self._positions[s.name].qty * s.price for s in self._symbols]
            long_value = sum((v for v in values if v > 0), _ZERO)
            short_value = sum((v for v in values if v < 0), _ZERO)
            cash = self._cash.quantize(_CENT)
            equity = (self._cash + long_value + short_value).quantize(_CENT)
        number = "PA" + str(int(self.account_id.replace("-", "")[:12], 16) % 10**10).zfill(10)
        return {
            "id": self.account_id,
            "account_number": number,
            "status": "ACTIVE",
            "crypto_status": "ACTIVE",
            "currency": "USD",
            "cash": _money(cash),
            "buying_power": _money(max(_ZERO, equity) * 2),
            "equity": _money(equity),
            "last_equity": _money(STARTING_CASH),
            "portfolio_value": _money(equity),
            "long_market_value": _money(long_value.quantize(_CENT)),
            "short_market_value": _money(short_value.quantize(_CENT)),
            "multiplier": "2",
            "pattern_day_trader": False,
            "trading_blocked": False,
            "transfers_blocked": False,
            "account_blocked": False,
            "trade_suspended_by_user": False,
            "shorting_enabled": True,
            "created_at": _utc_us(self._epoch_ns),
        }

    def fill_activities(
        self,
        *,
        after: str | None,
        until: str | None = None,
        direction: str = "asc",
        page_size: int = ACTIVITY_PAGE_MAX,
        page_token: str | None = None,
    ) -> list[dict[str, Any]]:
        """FILL activities with `after < transaction_time < until`, ordered by id.

        Ids are `<ms>::<uuid>`: fills in one millisecond sort by uuid, so they can come
        back out of cum_qty order, exactly as the real endpoint does.
        """
        if direction not in ("asc", "desc"):
            raise ValueError(f"invalid direction {direction!r}")
        if page_size < 1:
            raise ValueError("page_size must be positive")
        page_size = min(page_size, ACTIVITY_PAGE_MAX)
        after_ns = _parse_time(after, "after")
        until_ns = _parse_time(until, "until")
        ids = self._activity_ids
        if direction == "asc":
            start = bisect.bisect_right(ids, page_token) if page_token else 0
            candidates: Iterable[int] = range(start, len(ids))
        else:
            stop = bisect.bisect_left(ids, page_token) if page_token else len(ids)
            candidates = range(stop - 1, -1, -1)
        out: list[dict[str, Any]] = []
        for i in candidates:
            ts = self._activity_ns[ids[i]]
            if after_ns is not None and ts <= after_ns:
                continue
            if until_ns is not None and ts >= until_ns:
                continue
            out.append(dict(self._activities[i]))
            if len(out) >= page_size:
                break
        return out

    def orders(
        self,
        *,
        status: str = "open",
        limit: int = ORDERS_LIMIT_MAX,
        after: str | None = None,
        direction: str = "desc",
    ) -> list[dict[str, Any]]:
        """`GET /v2/orders`: current order snapshots, by submission time."""
        if status not in ("open", "closed", "all"):
            raise ValueError(f"invalid status {status!r}")
        if direction not in ("asc", "desc"):
            raise ValueError(f"invalid direction {direction!r}")
        if limit < 1:
            raise ValueError("limit must be positive")
        limit = min(limit, ORDERS_LIMIT_MAX)
        after_ns = _parse_time(after, "after")
        chosen = [
            o
            for o in self._orders.values()
            if (status == "all" or (o.status in _OPEN_STATUSES) == (status == "open"))
            and (after_ns is None or o.created_ns > after_ns)
        ]
        chosen.sort(key=lambda o: o.created_ns, reverse=(direction == "desc"))
        return [o.snapshot() for o in chosen[:limit]]

    def order(self, order_id: str) -> dict[str, Any] | None:
        found = self._orders.get(order_id)
        return None if found is None else found.snapshot()

    def positions(self) -> list[dict[str, Any]]:
        """`GET /v2/positions`: open positions only, quantities signed."""
        out: list[dict[str, Any]] = []
        with decimal.localcontext(_CTX):
            for sym in self._symbols:
                p = self._positions[sym.name]
                if p.qty == 0 or p.avg is None:
                    continue
                cost = p.qty * p.avg
                value = p.qty * sym.price
                unrealized = value - cost
                out.append(
                    {
                        "asset_id": sym.asset_id,
                        "symbol": sym.name,
                        "exchange": "NASDAQ",
                        "asset_class": "us_equity",
                        "asset_marginable": True,
                        "qty": _text(p.qty),
                        "qty_available": _text(p.qty),
                        "avg_entry_price": _text(p.avg.quantize(_TWELVE, context=_CTX)),
                        "side": "long" if p.qty > 0 else "short",
                        "market_value": _money(value.quantize(_CENT)),
                        "cost_basis": _money(cost.quantize(_CENT)),
                        "unrealized_pl": _money(unrealized.quantize(_CENT)),
                        "unrealized_plpc": _text(
                            (unrealized / abs(cost)).quantize(Decimal("1e-10"))
                        ),
                        "unrealized_intraday_pl": _money(unrealized.quantize(_CENT)),
                        "unrealized_intraday_plpc": _text(
                            (unrealized / abs(cost)).quantize(Decimal("1e-10"))
                        ),
                        "current_price": _text(sym.price),
                        "lastday_price": _text(sym.price),
                        "change_today": "0",
                    }
                )
        return out

    # ------------------------------------------------------------------ REST dispatch

    def rest(self, method: str, target: str, headers: Mapping[str, str]) -> RestResponse:
        """Answer one REST request, chaos included. `headers` keys are lower-case.

        The HTTP server and any in-memory client (an httpx MockTransport, say) both call
        this, so faults look the same whichever way the supervisor is wired.
        """
        self.stats["rest_requests"] += 1
        parts = urlsplit(target)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        route = _route(path)
        if route is None:
            return _error(404, 40410000, "endpoint not found")
        if method.upper() != "GET":
            return _error(405, 40510000, "method not allowed")
        if not self._authorized(headers):
            self.stats["rest_401"] += 1
            return _error(401, 40110000, "request is not authorized")
        if route == "activities":
            self.stats["activity_requests"] += 1
        delay = self.chaos.rest_delay()
        fault = self.chaos.rest_fault()
        if fault == "error":
            self.stats["rest_faults"] += 1
            return _error(500, 50010000, "internal server error", delay=delay)
        if fault == "rate_limited":
            self.stats["rest_faults"] += 1
            retry = str(math.ceil(self.config.chaos.rest_retry_after))
            return _error(
                429, 42910000, "rate limit exceeded", delay=delay, headers=(("Retry-After", retry),)
            )
        try:
            body = self._answer(route, path, query)
        except ValueError as exc:
            return _error(422, 42210000, str(exc), delay=delay)
        if body is None:
            return _error(404, 40410000, "order not found", delay=delay)
        return RestResponse(200, _dumps(body), (("Content-Type", "application/json"),), delay)

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        key = headers.get("apca-api-key-id", "")
        secret = headers.get("apca-api-secret-key", "")
        # Both comparisons always run: no early exit that times which one was wrong.
        ok_key = hmac.compare_digest(key.encode(), self.config.key_id.encode())
        ok_secret = hmac.compare_digest(secret.encode(), self.config.secret_key.encode())
        return ok_key and ok_secret

    def _answer(self, route: str, path: str, query: dict[str, str]) -> Any:
        if route == "account":
            return self.account()
        if route == "positions":
            return self.positions()
        if route == "order":
            return self.order(path.rsplit("/", 1)[1])
        if route == "orders":
            return self.orders(
                status=query.get("status") or "open",
                limit=_int_param(query, "limit", ORDERS_DEFAULT_LIMIT),
                after=query.get("after") or None,
                direction=query.get("direction") or "desc",
            )
        requested = _int_param(query, "page_size", ACTIVITY_PAGE_MAX)
        if requested < 1:
            raise ValueError("page_size must be positive")
        return self.fill_activities(
            after=query.get("after") or None,
            until=query.get("until") or None,
            direction=query.get("direction") or "asc",
            page_size=self.chaos.page_size(min(requested, ACTIVITY_PAGE_MAX)),
            page_token=query.get("page_token") or None,
        )


# ---------------------------------------------------------------------- helpers


def _route(path: str) -> str | None:
    if path == "/v2/account":
        return "account"
    if path == "/v2/account/activities/FILL":
        return "activities"
    if path == "/v2/orders":
        return "orders"
    if path.startswith("/v2/orders/") and path.count("/") == 3:
        return "order"
    if path == "/v2/positions":
        return "positions"
    return None


def _error(
    status: int,
    code: int,
    message: str,
    *,
    delay: float = 0.0,
    headers: tuple[tuple[str, str], ...] = (),
) -> RestResponse:
    body = _dumps({"code": code, "message": message})
    return RestResponse(status, body, (("Content-Type", "application/json"), *headers), delay)


def _int_param(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"invalid {name}") from None


def _parse_time(text: str | None, name: str) -> int | None:
    """RFC 3339 (any offset, up to ns) or a bare date, as epoch nanoseconds."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
            return int(day.timestamp()) * _NS
        return parse_timestamp(text)[1]
    except (TimestampError, ValueError):
        raise ValueError(f"invalid {name}: {text[:40]!r}") from None


def _uuid4(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _text(value: Decimal) -> str:
    """Decimal as the broker writes it: `353`, `0.974`, `-16.253`; never exponents."""
    if value == 0:
        return "0"
    return format(value.normalize(_CTX), "f")


def _text_opt(value: Decimal | None) -> str | None:
    return None if value is None else _text(value)


def _round12(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(_TWELVE, context=_CTX)


def _money(value: Decimal) -> str:
    return format(value, "f")


def _utc_us(ns: int) -> str:
    stamp = datetime.fromtimestamp(ns // _NS, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{(ns % _NS) // 1000:06d}Z"


def _utc_us_opt(ns: int | None) -> str | None:
    return None if ns is None else _utc_us(ns)


def _rfc3339_ns(ns: int, *, eastern: bool) -> str:
    """The stream's `timestamp`: nanoseconds, in UTC (`Z`) or US/Eastern (`-05:00`)."""
    if eastern:
        stamp = datetime.fromtimestamp(ns // _NS, _EASTERN)
        return f"{stamp:%Y-%m-%dT%H:%M:%S}.{ns % _NS:09d}-05:00"
    stamp = datetime.fromtimestamp(ns // _NS, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{ns % _NS:09d}Z"


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
