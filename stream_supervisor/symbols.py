"""Symbols: one canonical spelling per asset class, and what a symbol says about its asset.

Pure, no I/O. The broker spells one instrument more than one way: a crypto pair is
`BTC/USD` in orders and on the stream but `BTCUSD` in `GET /v2/positions` and in account
activities; an option is its OCC symbol (`AAPL240119C00190000`, the official 21-character
form pads the root with spaces). Everything the service stores or compares goes through
`canonical_symbol` first, so one position never shows up under two names.

- `AssetClass`: the broker's three classes, by their wire names.
- `asset_class_of`: the class a symbol belongs to (the broker's own word when given).
- `canonical_symbol`: the stored spelling (crypto with its slash, options unpadded).
- `parse_occ` / `OptionContract`: an option's underlying, expiry, right and strike.
- `multiplier`: the standard contract multiplier of a class (100 for options); an adjusted
  option's real multiplier comes from the broker's asset record, not from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Final


class AssetClass(StrEnum):
    """Alpaca's asset classes, valued by their spelling on the wire."""

    US_EQUITY = "us_equity"
    US_OPTION = "us_option"
    CRYPTO = "crypto"


#: Quote currencies of Alpaca's crypto pairs, longest first so `BTCUSDT` is BTC/USDT,
#: not USDT's prefix read as USD.
CRYPTO_QUOTES: Final = ("USDT", "USDC", "USD", "BTC")

#: OCC option symbol: root (1-6, padded to 6 with spaces in the official form), expiry
#: YYMMDD, C or P, strike times 1000 in 8 digits.
_OCC: Final = re.compile(r"^([A-Z][A-Z0-9.]{0,5}) *(\d{2})(\d{2})(\d{2})([CP])(\d{8})$")

_STANDARD_MULTIPLIER: Final = {
    AssetClass.US_EQUITY: Decimal(1),
    AssetClass.US_OPTION: Decimal(100),
    AssetClass.CRYPTO: Decimal(1),
}


@dataclass(frozen=True, slots=True)
class OptionContract:
    """What an OCC symbol names."""

    underlying: str
    expiry: date
    right: str  # "call" or "put"
    strike: Decimal

    @property
    def symbol(self) -> str:
        """The unpadded OCC symbol, the spelling Alpaca uses and we store."""
        thousandths = int(self.strike * 1000)
        code = "C" if self.right == "call" else "P"
        return f"{self.underlying}{self.expiry:%y%m%d}{code}{thousandths:08d}"


def parse_occ(symbol: str) -> OptionContract | None:
    """The contract an OCC option symbol names, or None when `symbol` is not one."""
    match = _OCC.match(symbol.strip())
    if match is None:
        return None
    root, yy, mm, dd, code, strike = match.groups()
    try:
        expiry = date(2000 + int(yy), int(mm), int(dd))
    except ValueError:
        return None
    return OptionContract(
        underlying=root,
        expiry=expiry,
        right="call" if code == "C" else "put",
        strike=Decimal(int(strike)) / 1000,
    )


def asset_class_of(symbol: str, hint: str | None = None) -> AssetClass:
    """The asset class of `symbol`: the broker's `hint` when it gives one, else the shape.

    Raises ValueError naming the value when `hint` is not one of Alpaca's classes.
    """
    if hint:
        try:
            return AssetClass(hint)
        except ValueError:
            known = ", ".join(c.value for c in AssetClass)
            raise ValueError(f"unknown asset class {hint!r} (known: {known})") from None
    if "/" in symbol:
        return AssetClass.CRYPTO
    if parse_occ(symbol) is not None:
        return AssetClass.US_OPTION
    return AssetClass.US_EQUITY


def canonical_symbol(symbol: str, asset_class: str | None = None) -> str:
    """The one spelling we store for `symbol`.

    Crypto pairs carry their slash (`BTCUSD` -> `BTC/USD` when the class says crypto; a
    pair without a class is recognised only by its slash, since `BTCUSD` could be a
    ticker); option symbols lose the OCC padding; anything else is returned stripped.
    """
    text = symbol.strip()
    cls = asset_class_of(text, asset_class)
    if cls is AssetClass.CRYPTO and "/" not in text:
        for quote in CRYPTO_QUOTES:
            if text.endswith(quote) and len(text) > len(quote):
                return f"{text[: -len(quote)]}/{quote}"
        return text
    if cls is AssetClass.US_OPTION:
        contract = parse_occ(text)
        if contract is not None:
            return contract.symbol
    return text


def compact_symbol(symbol: str) -> str:
    """The broker's spelling in positions and activities: crypto pairs without the slash."""
    return symbol.replace("/", "")


def multiplier(asset_class: str | AssetClass) -> Decimal:
    """The standard contract multiplier of `asset_class` (100 for options, else 1)."""
    return _STANDARD_MULTIPLIER[AssetClass(asset_class)]
