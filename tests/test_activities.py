"""activities.py and the ledger's asset-aware math: pure, property-tested
(docs/design.md, section 10)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_supervisor.activities import (
    ACCOUNT_WIDE,
    APPLIED,
    BASELINE_WITHIN_ITS_DAY,
    IN_BASELINE,
    MORE_THAN_HELD,
    NO_POSITION,
    OPENED_AFTER_IT,
    PARTLY_IN_BASELINE,
    WireNonTrade,
    baseline_verdict,
    non_trade_to_event,
)
from stream_supervisor.events import Event, fill_key
from stream_supervisor.ledger import LedgerResult, apply_events
from stream_supervisor.positions import Position
from stream_supervisor.symbols import asset_class_of

T0 = datetime(2026, 1, 5, 15, tzinfo=UTC)
COIN = Decimal("1e-9")


def fill(n: int, symbol: str, side: str, qty: Decimal, price: Decimal,
         asset_class: str = "us_equity") -> Event:
    ts = T0 + timedelta(seconds=n)
    return Event(key=fill_key(f"o{n}", qty), event="fill", source="stream", order_id=f"o{n}",
                 symbol=symbol, side=side, status="filled", cum_qty=qty, timestamp=ts,
                 ts_ns=n, order_qty=qty, cum_avg_price=price, fill_qty=qty, fill_price=price,
                 asset_class=asset_class)


def activity(n: int, kind: str, symbol: str, qty: str, price: str | None = None) -> Event:
    return non_trade_to_event(WireNonTrade(
        id=f"2026010510000{n:04d}::a", activity_type=kind,
        transaction_time=(T0 + timedelta(seconds=n)).isoformat(), symbol=symbol,
        qty=Decimal(qty), price=None if price is None else Decimal(price)))


def run(*events: Event) -> dict[str, Position]:
    result = apply_events("a", {}, {}, list(events))
    return {p.symbol: p for p in result.positions if p.is_open}


def run_all(*events: Event) -> list[Position]:
    return apply_events("a", {}, {}, list(events)).positions


coins = st.integers(min_value=1, max_value=10**9).map(lambda n: n * COIN)


@given(st.lists(st.tuples(coins, st.integers(1, 90)), min_size=1, max_size=12),
       st.integers(min_value=1, max_value=100_000))
def test_fractional_crypto_with_fees_closes_to_exactly_zero(
        steps: list[tuple[Decimal, int]], price_cents: int) -> None:
    """Buys, partial sales and fees in the coin, then a sale of what is left: the row
    closes with qty exactly 0, never a residue."""
    price = Decimal(price_cents) / 100
    events, held, n = [], Decimal(0), 0
    for bought, sell_pct in steps:
        n += 1
        events.append(fill(n, "BTC/USD", "buy", bought, price, "crypto"))
        fee = (bought * Decimal("0.0025")).quantize(COIN)
        held += bought
        if fee:
            n += 1
            events.append(activity(n, "CFEE", "BTCUSD", str(-fee), str(price)))
            held -= fee
        sold = (held * sell_pct / 100).quantize(COIN)
        if 0 < sold < held:
            n += 1
            events.append(fill(n, "BTC/USD", "sell", sold, price, "crypto"))
            held -= sold
    events.append(fill(n + 1, "BTC/USD", "sell", held, price, "crypto"))
    rows = run_all(*events)
    assert [p for p in rows if p.is_open] == []
    assert rows[-1].qty == 0 and rows[-1].closed_at is not None


@given(st.integers(1, 1000), st.integers(1, 1000), st.integers(100, 100_000),
       st.integers(100, 100_000), st.sampled_from([2, 3, 4, 10]))
def test_a_split_posted_late_leaves_the_same_quantity_and_cost_basis(
        first: int, second: int, p1: int, p2: int, ratio: int) -> None:
    """The broker's split says how many shares it adds, so applying it before or after a
    later purchase gives the same shares and the same cost basis."""
    split = activity(5, "SPLIT", "NVDA", str(first * (ratio - 1)))
    buy1 = fill(1, "NVDA", "buy", Decimal(first), Decimal(p1) / 100)
    buy2 = fill(9, "NVDA", "buy", Decimal(second), Decimal(p2) / 100 / ratio)
    in_order = run(buy1, split, buy2)["NVDA"]
    late = run(buy1, buy2, split)["NVDA"]
    assert in_order.qty == late.qty == first * ratio + second
    assert abs(in_order.cost_basis - late.cost_basis) < Decimal("1e-18")


@given(st.integers(1, 1000), st.integers(1, 99), st.integers(100, 100_000),
       st.integers(100, 100_000), st.sampled_from([2, 3, 4, 10]))
def test_a_split_posted_after_a_sale_gives_the_brokers_quantity_and_total_pnl(
        held: int, sold_pct: int, p1: int, p2: int, ratio: int) -> None:
    """A sale after the split, of part of what it left, posted before the split: the
    quantity is the broker's, and realized P&L minus the cost basis left (what total
    P&L is made of) is as if in order; only how it splits between them differs."""
    sold = max(1, held * ratio * sold_pct // 100)
    if sold >= held:
        return  # the sale closes (or turns) the row: the next test
    split = activity(5, "SPLIT", "NVDA", str(held * (ratio - 1)))
    buy = fill(1, "NVDA", "buy", Decimal(held), Decimal(p1) / 100)
    sale = fill(9, "NVDA", "sell", Decimal(sold), Decimal(p2) / 100 / ratio)
    in_order = run(buy, split, sale)["NVDA"]
    late = run(buy, sale, split)["NVDA"]
    assert in_order.qty == late.qty == held * ratio - sold
    assert abs((in_order.realized_pnl - in_order.cost_basis)
               - (late.realized_pnl - late.cost_basis)) < Decimal("1e-18")


@pytest.mark.parametrize("sold", [10, 15, 20])
def test_a_split_posted_after_the_sales_that_closed_what_it_split_is_not_guessed(
        sold: int) -> None:
    """Long 10, a 2-for-1 split (20), sales after it of 10, 15 or 20, and the split
    posted last: the row it split is closed. Its shares added now would go the wrong
    way (short 5 made short 15) or nowhere; it is stored, not applied, and `reconcile`
    shows what the broker holds."""
    result = apply_events("a", {}, {}, [
        fill(1, "NVDA", "buy", Decimal(10), Decimal(100)),
        fill(9, "NVDA", "sell", Decimal(sold), Decimal(51)),
        activity(5, "SPLIT", "NVDA", "10")])
    [record] = result.activities
    assert record.outcome in (NO_POSITION, OPENED_AFTER_IT) and not record.effects
    held = {p.symbol: p.qty for p in result.positions if p.is_open}
    assert held == ({} if sold <= 10 else {"NVDA": Decimal(10 - sold)})


def test_a_partial_assignment_leaves_the_rest_of_the_short_puts() -> None:
    put = "AAPL240119P00190000"
    held = run(fill(1, put, "sell", Decimal(3), Decimal("2.00"), "us_option"),
               activity(2, "OPASN", put, "2"))
    assert held[put].qty == -1 and held["AAPL"].qty == 200
    assert held["AAPL"].avg_entry_price == 190


def test_an_exercised_long_put_sells_the_shares() -> None:
    put = "AAPL240119P00190000"
    held = run(fill(1, "AAPL", "buy", Decimal(100), Decimal(170)),
               fill(2, put, "buy", Decimal(1), Decimal("5.00"), "us_option"),
               activity(3, "OPEXC", put, "1"))
    assert held == {}
    rows = run_all(fill(1, "AAPL", "buy", Decimal(100), Decimal(170)),
                   fill(2, put, "buy", Decimal(1), Decimal("5.00"), "us_option"),
                   activity(3, "OPEXC", put, "1"))
    pnl = {p.symbol: p.realized_pnl for p in rows}
    assert pnl == {"AAPL": 100 * Decimal(20), put: Decimal(-500)}


def test_transfers_move_shares_in_at_the_stated_value_and_out_at_cost() -> None:
    held = run(fill(1, "MSFT", "buy", Decimal(10), Decimal(300)),
               activity(2, "ACATC", "MSFT", "10", "400"),
               activity(3, "ACATS", "MSFT", "-5"))
    assert (held["MSFT"].qty, held["MSFT"].avg_entry_price) == (Decimal(15), Decimal(350))


def test_what_an_activity_cannot_do_is_recorded_and_changes_nothing() -> None:
    result = apply_events("a", {}, {}, [
        activity(1, "OPEXP", "AAPL240119C00190000", "-1"),
        fill(2, "BTC/USD", "buy", Decimal("0.001"), Decimal(50_000), "crypto"),
        activity(3, "CFEE", "BTCUSD", "-0.01"),
    ])
    assert [r.outcome for r in result.activities] == [NO_POSITION, MORE_THAN_HELD]
    [row] = [p for p in result.positions if p.is_open]
    assert row.qty == Decimal("0.001")


def test_the_first_fill_fixes_the_multiplier_and_a_flip_keeps_it() -> None:
    call = "AAPL240119C00190000"
    rows = run_all(fill(1, call, "buy", Decimal(2), Decimal("1.00"), "us_option"),
                   fill(2, call, "sell", Decimal(3), Decimal("1.50"), "us_option"))
    assert [(p.qty, p.multiplier, p.realized_pnl) for p in rows] == [
        (Decimal(0), Decimal(100), Decimal(100)), (Decimal(-1), Decimal(100), Decimal(0))]
    assert all(r.outcome == APPLIED for r in apply_events("a", {}, {}, [
        fill(1, call, "buy", Decimal(2), Decimal("1.00"), "us_option"),
        activity(2, "OPEXP", call, "-2")]).activities)


@given(st.permutations(range(8)), st.lists(st.integers(0, 7), max_size=6))
def test_any_order_of_duplicated_multi_leg_updates_gives_each_leg_the_brokers_position(
        order: list[int], repeats: list[int]) -> None:
    """Multi-leg parent updates (legs inside) and the legs' FILL activities, in any order,
    some twice: each leg's symbol ends at the broker's quantity, the parent at its own."""
    from stream_supervisor.protocol import WireActivity, activity_to_event

    from .test_asset_classes import CALL, MLEG_UPDATES

    leg_fills = [activity_to_event(WireActivity(
        id=f"2024011915000{i}::leg", order_id=oid, symbol=sym, side=side, price=Decimal(p),
        qty=Decimal(1), cum_qty=Decimal(c), transaction_time="2024-01-19T15:00:00Z"))
        for i, (oid, sym, side, p, c) in enumerate([
            ("leg-1", CALL, "buy", "2.10", "1"), ("leg-2", "AAPL240119C00200000", "sell",
                                                  "1.30", "1"),
            ("leg-1", CALL, "buy", "2.00", "2"), ("leg-2", "AAPL240119C00200000", "sell",
                                                  "1.20", "2")])]
    pool = [*MLEG_UPDATES, *leg_fills]
    seen: set[str] = set()
    events = []
    for i in [*order, *repeats]:
        if pool[i].key not in seen:  # the dedupe table: a key once
            seen.add(pool[i].key)
            events.append(pool[i])
    result = apply_events("a", {}, {}, events)
    held = {p.symbol: p.qty for p in result.positions if p.is_open}
    assert held == {CALL: 2, "AAPL240119C00200000": -2}
    assert result.orders["mleg-1"].filled_qty == 2
    assert {result.orders[leg].parent_order_id for leg in ("leg-1", "leg-2")} == {"mleg-1"}


# --- activities a baseline already holds (docs/design.md, section 10) -------------------


def dated(kind: str, symbol: str, qty: str, day: str) -> Event:
    """An activity as Alpaca documents it: a `date`, no `transaction_time`."""
    return non_trade_to_event(WireNonTrade(
        id=f"{day.replace('-', '')}000000000::d", activity_type=kind, date=day,
        symbol=symbol, qty=Decimal(qty)))


def baselined(symbol: str, qty: str, avg: str, *events: Event,
              moment: datetime, own: datetime | None = None) -> LedgerResult:
    """`events` applied to a row a baseline at `moment` opened (the symbol's own moment
    `own`, when later)."""
    row = Position("a", symbol, Decimal(qty), Decimal(avg), "baseline", None, moment,
                   position_id=7, asset_class=asset_class_of(symbol).value)
    moments = {ACCOUNT_WIDE: moment} | ({symbol: own} if own is not None else {})
    return apply_events("a", {}, {symbol: row}, list(events), moments)


def test_a_fee_of_a_fill_before_the_baseline_is_stored_not_applied() -> None:
    """The broker's position at the baseline already lacks the fee (charged at the fill):
    the CFEE posted later is kept and reported, and the quantity stays the broker's."""
    fee = activity(5, "CFEE", "BTCUSD", "-0.0025")
    result = baselined("BTC/USD", "0.9975", "50000", fee, moment=T0 + timedelta(seconds=10))
    assert [r.outcome for r in result.activities] == [IN_BASELINE]
    assert result.positions == [] and result.changes == []


def test_a_fee_of_a_fill_after_the_baseline_is_applied() -> None:
    fee = activity(20, "CFEE", "BTCUSD", "-0.0025")
    result = baselined("BTC/USD", "1", "50000", fee, moment=T0 + timedelta(seconds=10))
    assert [r.outcome for r in result.activities] == [APPLIED]
    assert [p.qty for p in result.positions] == [Decimal("0.9975")]


def test_a_fill_between_the_clock_read_and_the_positions_read_carries_its_fee() -> None:
    """The account's moment is the broker's clock read first; a symbol whose positions
    were read with a later fill has that fill's time as its own moment, and the fee of
    that fill (stamped with its time) is in them too."""
    fee = activity(12, "CFEE", "BTCUSD", "-0.0025")
    account_only = baselined("BTC/USD", "0.9975", "50000", fee,
                             moment=T0 + timedelta(seconds=10))
    assert [r.outcome for r in account_only.activities] == [APPLIED]
    with_own = baselined("BTC/USD", "0.9975", "50000", fee, moment=T0 + timedelta(seconds=10),
                         own=T0 + timedelta(seconds=12))
    assert [r.outcome for r in with_own.activities] == [IN_BASELINE]


def test_a_split_or_an_expiry_before_the_baseline_is_not_applied_again() -> None:
    split = activity(5, "SPLIT", "NVDA", "300")
    result = baselined("NVDA", "400", "25", split, moment=T0 + timedelta(seconds=6))
    assert [r.outcome for r in result.activities] == [IN_BASELINE]
    assert result.positions == []
    expiry = activity(5, "OPEXP", "AAPL240119C00190000", "-1")
    assigned = activity(5, "OPASN", "AAPL240119P00190000", "1")
    result = apply_events("a", {}, {}, [expiry, assigned],
                          {ACCOUNT_WIDE: T0 + timedelta(seconds=5)})
    assert [r.outcome for r in result.activities] == [IN_BASELINE, IN_BASELINE]
    assert result.positions == []


def test_a_dated_activity_is_the_whole_new_york_day() -> None:
    """Alpaca documents a `date` only: before that day's New York midnight, apply; after
    the next one, held; a baseline within the day cannot tell, and changes nothing."""
    split = dated("SPLIT", "NVDA", "300", "2026-01-05")
    midnight = datetime(2026, 1, 5, 5, tzinfo=UTC)  # 00:00 in New York (EST)
    for moment, outcome in [
        (midnight - timedelta(seconds=1), APPLIED),
        (midnight, BASELINE_WITHIN_ITS_DAY),
        (midnight + timedelta(hours=23, minutes=59), BASELINE_WITHIN_ITS_DAY),
        (midnight + timedelta(days=1), IN_BASELINE),
    ]:
        result = baselined("NVDA", "100", "100", split, moment=moment)
        assert [r.outcome for r in result.activities] == [outcome], moment
        assert bool(result.positions) == (outcome == APPLIED)


@given(st.integers(-100, 100), st.integers(-100, 100), st.integers(0, 86_400))
def test_the_verdict_is_by_the_effect_window_alone(
        effect: int, moment: int, width: int) -> None:
    """Held exactly when the whole effect is at or before the moment; applied exactly
    when all of it is after; otherwise neither."""
    start = T0 + timedelta(seconds=effect)
    window = (start, start + timedelta(seconds=width))
    at = T0 + timedelta(seconds=moment)
    verdict = baseline_verdict(window, at)
    assert (verdict == IN_BASELINE) == (window[1] <= at)
    assert (verdict is None) == (window[0] > at)
    assert baseline_verdict(window, None) is None


def test_every_change_an_activity_makes_is_recorded_with_its_id() -> None:
    """A split, a fee and a partial assignment leave the row open; each is a change."""
    result = apply_events("a", {}, {}, [
        fill(1, "NVDA", "buy", Decimal(10), Decimal(100)),
        activity(2, "SPLIT", "NVDA", "30"),
        fill(3, "BTC/USD", "buy", Decimal(1), Decimal(50_000), "crypto"),
        activity(4, "CFEE", "BTCUSD", "-0.0025"),
        fill(5, "AAPL240119P00190000", "sell", Decimal(3), Decimal(2), "us_option"),
        activity(6, "OPASN", "AAPL240119P00190000", "1"),
    ])
    assert [(c.activity_type, c.symbol, c.qty_before, c.qty_after, c.avg_after)
            for c in result.changes] == [
        ("SPLIT", "NVDA", Decimal(10), Decimal(40), Decimal(25)),
        ("CFEE", "BTC/USD", Decimal(1), Decimal("0.9975"), Decimal(50_000)),
        ("OPASN", "AAPL240119P00190000", Decimal(-3), Decimal(-2), Decimal(2)),
        ("OPASN", "AAPL", Decimal(0), Decimal(100), Decimal(190)),
    ]
    assert [c.activity_id for c in result.changes] == [
        "2026010510000" + f"{n:04d}::a" for n in (2, 4, 6, 6)]


def test_an_assignment_applies_only_the_leg_the_baseline_did_not_hold() -> None:
    """The option settled in an earlier round of the baseline than its underlying: the
    assignment (after the option's moment, before the stock's) closes the short put but
    adds no shares, which the stock's positions read already held."""
    put = "AAPL240119P00190000"
    short = Position("a", put, Decimal(-2), Decimal(3), "baseline", None, T0, position_id=1,
                     multiplier=Decimal(100), asset_class="us_option")
    assigned = activity(5, "OPASN", put, "2")
    moments = {ACCOUNT_WIDE: T0, put: T0 + timedelta(seconds=2),
               "AAPL": T0 + timedelta(seconds=8)}
    result = apply_events("a", {}, {put: short}, [assigned], moments)
    [record] = result.activities
    assert record.outcome == PARTLY_IN_BASELINE
    assert record.effects == {put: Decimal(2)}
    assert [(p.symbol, p.qty, p.is_open) for p in result.positions] == [(put, Decimal(0), False)]
    # The other way round: the stock leg alone, its side from the type (an assignment
    # is of a short put: it buys), though the baseline closed the option.
    moments = {ACCOUNT_WIDE: T0, put: T0 + timedelta(seconds=8)}
    result = apply_events("a", {}, {}, [assigned], moments)
    assert result.activities[0].effects == {"AAPL": Decimal(200)}
    assert [(p.symbol, p.qty, p.avg_entry_price) for p in result.positions] == [
        ("AAPL", Decimal(200), Decimal(190))]
