"""The simulated market's other asset classes (docs/design.md, section 10): a crypto pair
traded in fractions of a coin with its fee taken in the coin, a call and a put on the
first symbol, and the day's end as the broker books it: crypto fees posted as `CFEE`, a
short put assigned (`OPASN`), every other option expired (`OPEXP`), and a 4-for-1 split
of the last symbol (`SPLIT`). The books follow the broker's arithmetic; the activities
are what `GET /v2/account/activities` shows of it.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any, Final, Protocol

from ...symbols import OptionContract, parse_occ
from .records import Order, Position, Symbol
from .wire import NS, ZERO, decimal_text, utc_us, uuid4

CRYPTO_PAIR: Final = "BTC/USD"
#: Alpaca's crypto fee for a taker at the lowest volume tier: 0.25%, in the coin received.
CRYPTO_FEE_RATE: Final = Decimal("0.0025")
COIN: Final = Decimal("1e-9")
OPTION_MULTIPLIER: Final = Decimal(100)
SPLIT_RATIO: Final = 4


class Books(Protocol):
    """What the asset mix needs of the market (`market.Market`), which owns it."""

    config: Any
    epoch_ns: int
    now_ns: int
    symbols: list[Symbol]
    positions: dict[str, Position]
    cash: Decimal

    def record_non_trade(self, activity: dict[str, Any], ts: int) -> None: ...


class AssetMix:
    """The crypto pair and options of one market, and what they owe at the day's end."""

    def __init__(self, market: Books) -> None:
        self.market = market
        rng = random.Random(f"{market.config.seed}/assets")
        under = market.symbols[0]
        expiry = datetime.fromtimestamp(market.epoch_ns // NS, UTC).date()
        strike = Decimal(int(under.price))
        self.contracts = {
            right: OptionContract(under.name, expiry, right, strike) for right in ("call", "put")
        }
        market.symbols.append(Symbol(CRYPTO_PAIR, str(uuid4(rng)),
                                     Decimal(rng.randint(4_000_000, 6_000_000)) / 100, True,
                                     "crypto"))
        for contract in self.contracts.values():
            market.symbols.append(Symbol(contract.symbol, str(uuid4(rng)),
                                         Decimal(rng.randint(50, 900)) / 100, False,
                                         "us_option", OPTION_MULTIPLIER))
        #: (fill time, fee in the coin, fill price): charged at the fill, posted at the end.
        self.fees: list[tuple[int, Decimal, Decimal]] = []
        self.split_symbol = market.symbols[len(market.config.symbols) - 1] \
            if len(market.config.symbols) > 1 else None

    def preexisting(self) -> list[tuple[str, Position]]:
        """An account with history holds some of each class before the session: coin
        (its fees charged long ago), and short puts or long calls, which the day's end
        assigns or expires after whatever baseline took them (docs/design.md, section 10).
        A generator of its own, so the session's draws stay what they were."""
        rng = random.Random(f"{self.market.config.seed}/assets/held")
        crypto = next(s for s in self.market.symbols if s.asset_class == "crypto")
        held = [(crypto.name, Position(Decimal(rng.randint(1, 500_000_000)) * COIN,
                                       crypto.price))]
        contract = self.contracts[rng.choice(("call", "put"))]
        sym = next(s for s in self.market.symbols if s.name == contract.symbol)
        contracts = Decimal(rng.randint(1, 5))
        held.append((contract.symbol, Position(
            -contracts if contract.right == "put" else contracts, sym.price)))
        return held

    def random_qty(self, sym: Symbol, rng: random.Random) -> Decimal:
        if sym.asset_class == "crypto":
            return Decimal(rng.randint(1, 200_000_000)) * COIN  # up to 0.2 coin
        return Decimal(rng.randint(1, 10))  # contracts

    def crypto_order(self, held: Decimal, rng: random.Random) -> tuple[str, Decimal]:
        """Crypto is never shorted; a sale leaves some coin (the fees owed are taken from
        it at the day's end), so the broker's position stays open until then."""
        if held <= Decimal("0.001") or rng.random() < 0.6:
            return "buy", Decimal(rng.randint(1, 200_000_000)) * COIN
        share = Decimal(rng.randint(1, 80)) / 100
        qty = (held * share).quantize(COIN, rounding=ROUND_DOWN)
        return ("sell", qty) if qty > 0 else ("buy", COIN)

    def after_fill(self, order: Order, signed: Decimal, price: Decimal, ts: int) -> None:
        """A crypto buy pays its fee in the coin at once; the activity posts later."""
        if order.symbol.asset_class != "crypto" or signed <= 0:
            return
        fee = (signed * CRYPTO_FEE_RATE).quantize(COIN, rounding=ROUND_DOWN)
        if fee > 0:
            self.market.positions[order.symbol.name].qty -= fee
            self.fees.append((ts, fee, price))

    def end_of_day(self) -> None:
        """Post the fees, settle the options, split the last symbol."""
        market = self.market
        ts = market.now_ns + NS
        day = _day(ts)
        for charged, fee, price in self.fees:
            # Posted now (its id), stamped with its fill's time: the moment the fee left
            # the position (Alpaca documents a `date` only; docs/design.md, section 10).
            market.record_non_trade({
                "activity_type": "CFEE", "date": _day(charged),
                "transaction_time": utc_us(charged),
                "symbol": CRYPTO_PAIR.replace("/", ""), "qty": decimal_text(-fee),
                "price": decimal_text(price), "net_amount": "0",
                "description": "crypto fee, charged in the coin", "status": "executed",
            }, ts)
        self.fees.clear()
        for contract in self.contracts.values():
            self._settle(contract, ts, day)
        self._split(ts, day)
        # The books changed at `ts`: the broker's clock (`GET /v2/clock`) is there too,
        # so a baseline taken after the day's end has a moment at or after its changes.
        market.now_ns = max(market.now_ns, ts)

    def _settle(self, contract: OptionContract, ts: int, day: str) -> None:
        market = self.market
        option = market.positions[contract.symbol]
        held = option.qty
        if held == 0:
            return
        assigned = contract.right == "put" and held < 0
        option.apply(-held, ZERO, OPTION_MULTIPLIER)  # closes at 0: the premium realized
        body: dict[str, Any] = {
            "activity_type": "OPASN" if assigned else "OPEXP", "date": day,
            "transaction_time": utc_us(ts), "symbol": contract.symbol,
            "qty": decimal_text(abs(held) if assigned else -held), "net_amount": "0",
            "status": "executed",
        }
        if assigned:
            # A short put assigned buys 100 shares a contract at the strike.
            shares = abs(held) * OPTION_MULTIPLIER
            market.positions[contract.underlying].apply(shares, contract.strike)
            market.cash -= shares * contract.strike
            body["price"] = decimal_text(contract.strike)
            body["description"] = f"assignment: {decimal_text(shares)} {contract.underlying}"
        market.record_non_trade(body, ts)

    def _split(self, ts: int, day: str) -> None:
        sym = self.split_symbol
        if sym is None:
            return
        sym.price = sym.price / SPLIT_RATIO
        position = self.market.positions[sym.name]
        if position.qty == 0 or position.avg is None:
            return
        added = abs(position.qty) * (SPLIT_RATIO - 1)
        position.qty *= SPLIT_RATIO
        position.avg = position.avg / SPLIT_RATIO
        self.market.record_non_trade({
            "activity_type": "SPLIT", "date": day, "transaction_time": utc_us(ts),
            "symbol": sym.name, "qty": decimal_text(added), "net_amount": "0",
            "description": f"{SPLIT_RATIO}-for-1 split", "status": "executed",
        }, ts)

    def asset(self, symbol: str) -> dict[str, Any] | None:
        """`GET /v2/assets/{symbol}` (any spelling the broker accepts)."""
        for sym in self.market.symbols:
            if symbol in (sym.name, sym.compact):
                return asset_record(sym)
        return None


def asset_record(sym: Symbol) -> dict[str, Any]:
    contract = parse_occ(sym.name)
    return {
        "id": sym.asset_id, "class": sym.asset_class,
        "exchange": "CRYPTO" if sym.asset_class == "crypto" else (
            "" if contract is not None else "NASDAQ"),
        "symbol": sym.name, "name": sym.name, "status": "active", "tradable": True,
        "marginable": sym.asset_class == "us_equity", "shortable": sym.asset_class != "crypto",
        "easy_to_borrow": sym.asset_class == "us_equity", "fractionable": sym.fractional,
        "attributes": [],
    }


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts // NS, UTC).date().isoformat()
