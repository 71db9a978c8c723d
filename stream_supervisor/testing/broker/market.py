"""The simulated market: seeded order flow for one account, recorded as stream updates
and FILL activities, with the positions and cash it moves (`records.py`). No sockets and
no sessions: `feeds.py` publishes what `step()` makes, `rest.py` and `truth.py` read it.
"""

from __future__ import annotations

import bisect
import decimal
import hashlib
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import trio

from .assets import AssetMix
from .chaos import ChaosConfig
from .ratelimit import DEFAULT_RATE_LIMIT
from .records import Fill, Order, Position, Step, Symbol
from .wire import (
    CENT,
    CTX,
    EASTERN,
    MS_NS,
    NS,
    ZERO,
    decimal_text,
    dumps,
    rfc3339_ns,
    utc_us,
    uuid4,
)

MLEG_PROB: Final = 0.12
"""With the asset mix: the share of new orders that are two-leg option orders."""
MAX_LIVE_ORDERS: Final = 4
"""Orders in flight at once; their updates interleave on the stream."""
DEFAULT_STEP_NS: Final = 5_800_000
"""Simulated time between updates when `rate` is 0 (about the recording's spacing)."""
SAME_MS_PAIR_PROB: Final = 0.12
"""Chance that two consecutive fills of an order land in the same millisecond."""
EASTERN_TIMESTAMP_PROB: Final = 0.3
STARTING_CASH: Final = Decimal(100000)


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
    strategies: tuple[str, ...] = ()
    """Prefix each client order id with one of these (`momentum-<uuid>`), as a bot tags
    its orders; empty: bare uuids, as the recorded session has them."""
    burst: tuple[int, int] = (0, 0)
    """(after this many updates, this many more): a burst the market plays as fast as it
    can, without pacing, before going back to `rate`."""
    asset_mix: bool = False
    """Trade a crypto pair and two options on the first symbol too, and end the day with
    the non-trade activities they bring (`assets.py`, docs/design.md, section 10)."""
    activity_delay: float = 5.0
    """Seconds of Trio time after the market finishes before its end-of-day activities
    show on REST: they post after the close, once the day's updates are delivered."""
    replace_prob: float = 0.0
    """Chance that an order filling in several pieces is replaced part way: `replaced` on
    the old order (its fills stay with it), `new` with `replaces` on the replacing one,
    which fills the rest. Drawn from a generator of its own: 0 leaves every session as
    it was."""
    activities_retention: float | None = None
    """Seconds of market time the broker keeps FILL activities for (None: all). Older
    ones are gone from REST, as a real broker's are after its window."""
    preexisting: tuple[tuple[str, str, str], ...] = ()
    """(symbol, signed quantity, average entry): positions the account held before the
    session, long or short (an account with history, docs/design.md, section 9)."""
    rest_rate_limit: int = DEFAULT_RATE_LIMIT
    """REST requests per 60 s window for the account, Alpaca's limit (0: no limit)."""


class Market:
    """One account's seeded order flow and everything it has recorded so far.

    The attributes are the broker's books, read by REST and the ground truth; only the
    market writes them.
    """

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        # Market randomness only: chaos and the account id draw from their own streams,
        # so a chaos knob never changes which orders the market makes.
        self._rng = random.Random(config.seed)
        self._strategy_rng = random.Random(f"{config.seed}/strategy")
        self._replace_rng = random.Random(f"{config.seed}/replace")
        self.account_id = config.account_id or str(uuid4(random.Random(f"{config.seed}/account")))
        # Order ids are unique at Alpaca across accounts, and event keys rely on it: a
        # session on an account of its own gets ids of its own even from a seed used
        # before (the same draws, mixed with the account), so two runs of one seed can
        # share a database. Without an explicit account the ids are the seed's alone.
        self._id_salt = (
            int.from_bytes(hashlib.sha256(config.account_id.encode()).digest()[:16], "big")
            if config.account_id else 0
        )
        start = config.start_time or datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("SimConfig.start_time must be timezone-aware")
        epoch = start.astimezone(UTC)
        self.epoch_ns = int(epoch.replace(microsecond=0).timestamp()) * NS + (
            epoch.microsecond * 1000
        )
        self.now_ns = self.epoch_ns
        self._step_ns = int(NS / config.rate) if config.rate > 0 else DEFAULT_STEP_NS

        self.symbols = [
            Symbol(
                name=name,
                asset_id=str(uuid4(self._rng)),
                price=Decimal(self._rng.randint(2_000, 60_000)) / 100,
                # Alternate so both fractional and whole-share symbols are always exercised.
                fractional=(i % 2 == 0),
            )
            for i, name in enumerate(config.symbols)
        ]
        if not self.symbols:
            raise ValueError("SimConfig.symbols must not be empty")
        # Non-trade activities (expiries, assignments, fees, a split), sorted by id.
        self.non_trade: list[dict[str, Any]] = []
        self.non_trade_ns: dict[str, int] = {}
        self.non_trade_visible_at = 0.0
        self.assets = AssetMix(self) if config.asset_mix else None
        self.positions = {s.name: Position() for s in self.symbols}
        for name, qty, avg in config.preexisting:
            if name not in self.positions:
                raise ValueError(f"SimConfig.preexisting: {name} is not one of the session's "
                                 f"symbols ({', '.join(config.symbols)})")
            self.positions[name] = Position(Decimal(qty), Decimal(avg))
        if self.assets is not None and config.preexisting:
            self.positions.update(self.assets.preexisting())
        self.cash = STARTING_CASH

        self.orders: dict[str, Order] = {}
        self._live: list[Order] = []
        self._created = 0
        self.updates: list[dict[str, Any]] = []
        self.frames: list[bytes] = []
        # FILL activities sorted by id, as REST pages them; `activity_ns` is each one's
        # transaction time.
        self.activity_ids: list[str] = []
        self.activities: list[dict[str, Any]] = []
        self.activity_ns: dict[str, int] = {}
        self.fills_total = 0

        self.finished = config.orders <= 0
        self._finished_event = trio.Event()
        if self.finished:
            self._finished_event.set()

    async def wait_finished(self) -> None:
        await self._finished_event.wait()

    def start_clock(self, moment: datetime) -> None:
        """Before the first update: the market's clock starts at `moment` (the wall clock
        when it starts trading, say, so its times are the wall clock's as a broker's are)."""
        if self.updates:
            raise RuntimeError("the market's clock can only be set before it trades")
        if moment.tzinfo is None:
            raise ValueError("start_clock needs a timezone-aware moment")
        epoch = moment.astimezone(UTC)
        self.epoch_ns = self.now_ns = int(epoch.replace(microsecond=0).timestamp()) * NS + (
            epoch.microsecond * 1000)

    def step(self) -> list[int] | None:
        """Make and record the next batch of updates; their indices, or None once finished."""
        if self.finished:
            return None
        with decimal.localcontext(CTX):
            indices = self._advance()
        if self._created >= self.config.orders and not self._live:
            if self.assets is not None:
                with decimal.localcontext(CTX):
                    self.assets.end_of_day()
                self.non_trade_visible_at = _trio_now() + self.config.activity_delay
            self.finished = True
            self._finished_event.set()
        return indices

    @property
    def updates_total(self) -> int:
        return len(self.updates)

    def update(self, index: int) -> dict[str, Any]:
        return self.updates[index]

    def frame(self, index: int) -> bytes:
        """The update's wire frame: compact UTF-8 JSON, rendered once."""
        return self.frames[index]

    def current_time_text(self) -> str:
        """Now in simulated time, in the stream's timestamp style."""
        return rfc3339_ns(self.now_ns, eastern=False)

    def sample_order(self, rng: random.Random) -> dict[str, Any] | None:
        """A current snapshot of some existing order (for injected unknown events)."""
        if not self.orders:
            return None
        return rng.choice(list(self.orders.values())).snapshot()

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
        now = self.now_ns
        if same_ms:
            room = (now // MS_NS + 1) * MS_NS - now - 1
            if room > 0:
                now += rng.randint(1, room)
        else:
            now += max(1, int(self._step_ns * rng.uniform(0.5, 1.5)))
            # The real broker often stamps on a whole millisecond ("...770000000Z").
            if snap or rng.random() < 0.15:
                now = -(-now // MS_NS) * MS_NS
        self.now_ns = now
        return now

    def _random_qty(self, sym: Symbol) -> Decimal:
        rng = self._rng
        if sym.asset_class != "us_equity":
            assert self.assets is not None
            return self.assets.random_qty(sym, rng)
        if sym.fractional and rng.random() < 0.5:
            return Decimal(rng.randint(1, 60_000)) / 1000  # e.g. 0.974, 17.026
        return Decimal(rng.randint(1, 100))

    def _open_order(self) -> Order:
        rng = self._rng
        if self.assets is not None and rng.random() < MLEG_PROB:
            return self._open_mleg()
        sym = rng.choice(self.symbols)
        held = self.positions[sym.name].qty
        r = rng.random()
        if sym.asset_class == "crypto":
            assert self.assets is not None
            # Coin already promised to sell orders still working is not there to sell.
            selling = sum((o.qty - o.filled_qty for o in self._live
                           if o.symbol is sym and o.side == "sell"), ZERO)
            side, qty = self.assets.crypto_order(held - selling, rng)
        elif held != 0 and r < 0.30:
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
            limit = sym.price + offset if side == "buy" else max(CENT, sym.price - offset)
        if side == "buy":
            intent = "buy_to_close" if held < 0 else "buy_to_open"
        else:
            intent = "sell_to_close" if held > 0 else "sell_to_open"

        unit = Decimal(1) if not fractional_qty else (
            Decimal("1e-9") if sym.asset_class == "crypto" else Decimal("0.001"))
        pieces = self._split(qty, unit)
        plan: list[tuple[Step, Decimal]] = [("pending_new", ZERO), ("new", ZERO)]
        fate = rng.random()
        if fate < 0.12:
            k = rng.randint(1, len(pieces) - 1) if len(pieces) > 1 else 0
            plan += [("fill", p) for p in pieces[:k]]
            plan += [("pending_cancel", ZERO), ("canceled", ZERO)]
        elif fate < 0.18 and order_type == "limit" and tif == "day":
            k = rng.randint(1, len(pieces) - 1) if len(pieces) > 1 else 0
            plan += [("fill", p) for p in pieces[:k]]
            plan.append(("expired", ZERO))
        else:
            fills: list[tuple[Step, Decimal]] = [("fill", p) for p in pieces]
            if (len(fills) >= 2 and self.config.replace_prob
                    and self._replace_rng.random() < self.config.replace_prob):
                # Replaced between two fills: some before on this order, the rest after
                # on the replacing one.
                k = self._replace_rng.randint(1, len(fills) - 1)
                fills.insert(k, ("replace", ZERO))
            plan += fills

        self._created += 1
        order = Order(
            id=str(uuid.UUID(int=uuid4(rng).int ^ self._id_salt, version=4)),
            client_order_id=self._client_order_id(uuid4(rng)),
            symbol=sym,
            side=side,
            qty=qty,
            order_type=order_type,
            time_in_force=tif,
            limit_price=limit,
            position_intent=intent,
            plan=plan,
        )
        self.orders[order.id] = order
        return order

    def _open_mleg(self) -> Order:
        """A two-leg option order (buy the call, sell the put: a synthetic long), its legs
        filled piece by piece in any order, each leg an order of its own."""
        rng = self._rng
        assert self.assets is not None
        call, put = (next(s for s in self.symbols if s.name == c.symbol)
                     for c in self.assets.contracts.values())
        units = Decimal(rng.randint(1, 5))
        parent_id = str(uuid.UUID(int=uuid4(rng).int ^ self._id_salt, version=4))
        legs = []
        for sym, side in ((call, "buy"), (put, "sell")):
            leg = Order(
                id=str(uuid.UUID(int=uuid4(rng).int ^ self._id_salt, version=4)),
                client_order_id=self._client_order_id(uuid4(rng)), symbol=sym, side=side,
                qty=units, order_type="market", time_in_force="day", limit_price=None,
                position_intent=f"{side}_to_open", plan=[], parent_id=parent_id)
            legs.append(leg)
        pieces = [(i, p) for i in range(len(legs)) for p in self._split(units, Decimal(1))]
        rng.shuffle(pieces)
        plan: list[tuple[Step, Decimal]] = [("pending_new", ZERO), ("new", ZERO)]
        plan += [("fill", p) for _, p in pieces]
        parent = Order(
            id=parent_id, client_order_id=self._client_order_id(uuid4(rng)), symbol=call,
            side="buy", qty=units, order_type="market", time_in_force="day", limit_price=None,
            position_intent="buy_to_open", plan=plan, order_class="mleg", legs=legs,
            leg_plan=[i for i, _ in pieces])
        self._created += 1
        self.orders[parent.id] = parent
        for leg in legs:
            self.orders[leg.id] = leg
        return parent

    def _fill_leg(self, order: Order, fill_qty: Decimal, ts: int) -> dict[str, str]:
        """One fill of one leg of a multi-leg order: the leg's own order, position and FILL
        activity; the parent counts whole units (the least-filled leg)."""
        leg = order.legs[order.leg_plan.pop(0)]
        price = self._fill_price(leg)
        leg.filled_qty += fill_qty
        leg.notional += fill_qty * price
        leg.updated_ns = ts
        leg_done = leg.filled_qty == leg.qty
        leg.status = "filled" if leg_done else "partially_filled"
        if leg_done:
            leg.filled_ns = ts
        signed = fill_qty if leg.side == "buy" else -fill_qty
        self.positions[leg.symbol.name].apply(signed, price, leg.symbol.multiplier)
        self.cash -= signed * price * leg.symbol.multiplier
        activity_id = self._record_activity(
            leg, "fill" if leg_done else "partial_fill", fill_qty, price, ts, self._rng)
        leg.fills.append(Fill(fill_qty, price, leg.filled_qty, activity_id, len(self.updates)))
        self.fills_total += 1
        order.filled_qty = min(leg.filled_qty for leg in order.legs)
        done = all(leg.filled_qty == leg.qty for leg in order.legs)
        order.status = "filled" if done else "partially_filled"
        if done:
            order.filled_ns = ts
        return {"price": decimal_text(price), "qty": decimal_text(fill_qty)}

    def _client_order_id(self, unique: object) -> str:
        strategies = self.config.strategies
        if not strategies:
            return str(unique)
        return f"{self._strategy_rng.choice(strategies)}-{unique}"

    def _split(self, qty: Decimal, unit: Decimal) -> list[Decimal]:
        """Cut `qty` into 1..5 fills of whole `unit`s."""
        units = int(qty / unit)
        k = min(self._rng.randint(1, 5), units)
        cuts = sorted(self._rng.sample(range(1, units), k - 1)) if k > 1 else []
        bounds = [0, *cuts, units]
        return [(bounds[i + 1] - bounds[i]) * unit for i in range(len(bounds) - 1)]

    def _fill_price(self, order: Order) -> Decimal:
        sym = order.symbol
        if sym.asset_class == "us_option":
            sym.price = max(CENT, sym.price + Decimal(self._rng.randint(-5, 5)) / 100)
        else:
            sym.price = max(Decimal(1), sym.price + Decimal(self._rng.randint(-40, 40)) / 100)
        price = sym.price
        if order.limit_price is not None:
            price = (
                min(price, order.limit_price)
                if order.side == "buy"
                else max(price, order.limit_price)
            )
        return price

    def _play(self, order: Order, ts: int) -> int:
        rng = self._rng
        step, fill_qty = order.plan.pop(0)
        order.updated_ns = ts
        execution_id = None if step == "pending_new" else str(uuid4(rng))
        extra: dict[str, str] = {}
        event: str = step
        if step == "pending_new":
            order.created_ns = ts
            order.status = "pending_new"
            for leg in order.legs:
                leg.created_ns = leg.updated_ns = ts
                leg.status = "pending_new"
        elif step == "new":
            order.status = "new"
            for leg in order.legs:
                leg.status, leg.updated_ns = "new", ts
        elif step == "fill" and order.legs:
            extra = self._fill_leg(order, fill_qty, ts)
            event = "fill" if order.status == "filled" else "partial_fill"
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
            position = self.positions[order.symbol.name]
            position.apply(signed, price, order.symbol.multiplier)
            self.cash -= signed * price * order.symbol.multiplier
            if self.assets is not None:
                self.assets.after_fill(order, signed, price, ts)
            activity_id = self._record_activity(order, event, fill_qty, price, ts, rng)
            order.fills.append(
                Fill(fill_qty, price, order.filled_qty, activity_id, len(self.updates))
            )
            self.fills_total += 1
            extra = {
                "price": decimal_text(price),
                "qty": decimal_text(fill_qty),
                "position_qty": decimal_text(position.qty),
            }
        elif step == "replace":
            event = "replaced"
            order.status = "replaced"
            order.replaced_ns = ts
            successor = self._replacement(order)
            order.replaced_by = successor.id
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
            "timestamp": rfc3339_ns(ts, eastern=rng.random() < EASTERN_TIMESTAMP_PROB),
        }
        data.update(extra)
        return self._record_update(data)

    def _replacement(self, old: Order) -> Order:
        """The order that replaces `old`: what is left to fill, its remaining fill steps;
        its first update is `new` (with `replaces`), played like any step."""
        rng = self._replace_rng
        rest = [s for s in old.plan if s[0] == "fill"]
        old.plan.clear()
        new = Order(
            id=str(uuid.UUID(int=uuid4(rng).int ^ self._id_salt, version=4)),
            client_order_id=self._client_order_id(uuid4(rng)),
            symbol=old.symbol, side=old.side, qty=old.qty - old.filled_qty,
            order_type=old.order_type, time_in_force=old.time_in_force,
            limit_price=old.limit_price, position_intent=old.position_intent,
            plan=[("new", ZERO), *rest], status="new", created_ns=self.now_ns,
            updated_ns=self.now_ns, replaces=old.id,
        )
        self.orders[new.id] = new
        self._live.append(new)
        return new

    def _record_activity(
        self, order: Order, event: str, qty: Decimal, price: Decimal, ts: int, rng: random.Random
    ) -> str:
        local = datetime.fromtimestamp(ts // NS, EASTERN)
        activity_id = f"{local:%Y%m%d%H%M%S}{(ts % NS) // MS_NS:03d}::{uuid4(rng)}"
        activity = {
            "id": activity_id,
            "activity_type": "FILL",
            "transaction_time": utc_us(ts),
            "type": event,
            "price": decimal_text(price),
            "qty": decimal_text(qty),
            "side": order.side,
            "symbol": order.symbol.compact,
            "leaves_qty": decimal_text(order.qty - order.filled_qty),
            "order_id": order.id,
            "cum_qty": decimal_text(order.filled_qty),
            "order_status": order.status,
        }
        at = bisect.bisect(self.activity_ids, activity_id)
        self.activity_ids.insert(at, activity_id)
        self.activities.insert(at, activity)
        # Compare `after`/`until` at the precision clients see: microseconds.
        self.activity_ns[activity_id] = ts - ts % 1000
        return activity_id


    def record_non_trade(self, activity: dict[str, Any], ts: int) -> None:
        """Post a non-trade activity at simulated time `ts` (its id says when)."""
        local = datetime.fromtimestamp(ts // NS, EASTERN)
        activity_id = f"{local:%Y%m%d%H%M%S}{(ts % NS) // MS_NS:03d}::{uuid4(self._rng)}"
        activity = {"id": activity_id, "description": "", **activity}
        ids = [a["id"] for a in self.non_trade]
        at = bisect.bisect(ids, activity_id)
        self.non_trade.insert(at, activity)
        self.non_trade_ns[activity_id] = ts - ts % 1000

    def non_trade_visible(self) -> bool:
        return _trio_now() >= self.non_trade_visible_at

    def _record_update(self, data: dict[str, Any]) -> int:
        index = len(self.updates)
        self.updates.append(data)
        self.frames.append(dumps({"stream": "trade_updates", "data": data}))
        return index


def _trio_now() -> float:
    """Trio's clock when the market runs under Trio; 0 when stepped by hand."""
    try:
        return trio.current_time()
    except RuntimeError:
        return 0.0
