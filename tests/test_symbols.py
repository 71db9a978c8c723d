"""symbols.py: one canonical spelling per instrument, whatever spelling the broker used."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_supervisor.symbols import (
    AssetClass,
    OptionContract,
    asset_class_of,
    canonical_symbol,
    compact_symbol,
    multiplier,
    parse_occ,
)

bases = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=5)
quotes = st.sampled_from(["USD", "USDT", "USDC", "BTC"])
contracts = st.builds(
    OptionContract,
    underlying=st.from_regex(r"[A-Z]{1,5}", fullmatch=True),
    expiry=st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31)),
    right=st.sampled_from(["call", "put"]),
    strike=st.integers(min_value=1, max_value=99_999_999).map(lambda t: Decimal(t) / 1000),
)


@given(bases.filter(lambda b: not b.endswith(("USD", "BTC", "USDT", "USDC"))), quotes)
def test_a_crypto_pair_has_one_spelling_whichever_the_broker_used(base: str, quote: str) -> None:
    pair = f"{base}/{quote}"
    assert canonical_symbol(pair) == pair
    assert canonical_symbol(compact_symbol(pair), "crypto") == pair
    assert canonical_symbol(canonical_symbol(pair)) == pair


def test_the_longest_quote_wins() -> None:
    assert canonical_symbol("BTCUSDT", "crypto") == "BTC/USDT"
    assert canonical_symbol("ETHBTC", "crypto") == "ETH/BTC"
    assert canonical_symbol("BTCUSD", "crypto") == "BTC/USD"


def test_a_ticker_without_a_class_is_never_read_as_a_pair() -> None:
    assert canonical_symbol("BTCUSD") == "BTCUSD"
    assert asset_class_of("BTCUSD") is AssetClass.US_EQUITY
    assert canonical_symbol(" AAPL ") == "AAPL"
    assert canonical_symbol("BRK.B", "us_equity") == "BRK.B"


@given(contracts)
def test_an_occ_symbol_round_trips(contract: OptionContract) -> None:
    assert parse_occ(contract.symbol) == contract
    assert asset_class_of(contract.symbol) is AssetClass.US_OPTION
    padded = f"{contract.underlying:<6}{contract.symbol[len(contract.underlying):]}"
    assert len(padded) == 21
    assert canonical_symbol(padded) == contract.symbol


def test_an_occ_symbol_names_its_contract() -> None:
    contract = parse_occ("AAPL240119P00190500")
    assert contract == OptionContract("AAPL", date(2024, 1, 19), "put", Decimal("190.5"))
    assert parse_occ("AAPL") is None
    assert parse_occ("AAPL241332C00190000") is None  # no 32nd of the 13th month


def test_multipliers_and_classes() -> None:
    assert multiplier("us_option") == 100
    assert multiplier(AssetClass.CRYPTO) == 1
    assert multiplier("us_equity") == 1
    assert asset_class_of("SPY", "us_option") is AssetClass.US_OPTION
    with pytest.raises(ValueError, match="unknown asset class 'forex'"):
        asset_class_of("EURUSD", "forex")
