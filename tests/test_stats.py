"""`stream-supervisor stats` on real PostgreSQL: a hand-built history whose every figure is
worked out here, the same against a Python reference and against empyrical, re-runs,
locks, a SIGKILL mid-run, the command line, and the HTML report."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_supervisor.cli import build_parser, run_cli
from stream_supervisor.errors import ConfigError
from stream_supervisor.migrate import apply_migrations
from stream_supervisor.settings import load_settings
from stream_supervisor.stats import (
    PER_DAY_COLUMNS,
    STATS_LOCK_KEY,
    STRATEGY_COLUMNS,
    SYMBOL_COLUMNS,
    DayRange,
    compute_stats,
    nightly_range,
    requested_range,
)
from stream_supervisor.strategy import DEFAULT_STRATEGY_PATTERN, StrategyPattern

from .stats_reference import Closed, expected_tables, mismatches

DEFAULT = StrategyPattern.parse(DEFAULT_STRATEGY_PATTERN)
D1, D2, D3 = date(2026, 3, 2), date(2026, 3, 3), date(2026, 3, 5)
WAIT = 60.0  # seconds: a hung process fails the test, not the suite


def at(day: date, clock: str) -> datetime:
    return datetime.fromisoformat(f"{day.isoformat()}T{clock}+00:00")


def closed(pid: int, account: str, symbol: str, cid: str | None, pnl: str, opened: datetime,
           closed_at: datetime, *, fees: str = "0", origin: str = "fill",
           side: str = "long") -> Closed:
    return Closed(pid, account, symbol, cid, Decimal(pnl), opened, closed_at, Decimal(fees),
                  origin, side)


# --------------------------------------------------------------------- the history

HISTORY = [
    # alpha, day 1: two wins, six losses, two breakevens (one of them made by fees).
    closed(1, "A1", "AAPL", "alpha-1", "100", at(D1, "09:30"), at(D1, "10:00"), fees="1"),
    # reduced in steps, then closed: one position, one trade
    closed(2, "A1", "AAPL", "alpha-2", "-50", at(D1, "10:00"), at(D1, "10:30")),
    closed(3, "A1", "MSFT", "alpha:3", "-20.5", at(D1, "10:15"), at(D1, "11:15"), fees="0.5",
           side="short"),
    # a flip: the long side closes here, the short side (5) opens at the same instant
    closed(4, "A1", "AAPL", "alpha-4", "30", at(D1, "11:00"), at(D1, "12:00")),
    closed(6, "A1", "MSFT", "alpha-6", "0", at(D1, "12:30"), at(D1, "13:00")),
    closed(7, "A1", "MSFT", "alpha-7", "-10", at(D1, "13:00"), at(D1, "14:00")),
    closed(8, "A1", "AAPL", "alpha-8", "-5", at(D1, "14:30"), at(D1, "15:00")),
    closed(9, "A1", "MSFT", "alpha-9", "2", at(D1, "15:00"), at(D1, "16:00"), fees="2"),
    closed(10, "A1", "AAPL", "alpha-10", "-1", at(D1, "23:00"), at(D1, "23:59:59.5")),
    closed(11, "A1", "MSFT", "alpha-11", "-3", at(D1, "23:59"), at(D1, "23:59:59.9")),
    # alpha, day 2: the flip's short side closes at midnight, which is day 2
    closed(5, "A1", "AAPL", "alpha-4", "12", at(D1, "12:00"), at(D2, "00:00"), side="short"),
    closed(12, "A1", "AAPL", "alpha-12", "-100", at(D2, "09:00"), at(D2, "09:30")),
    closed(13, "A1", "MSFT", "alpha-13", "40", at(D2, "10:00"), at(D2, "11:00"), fees="1.25"),
    # alpha, day 3 (nothing on the day between): a single trade, opened the day before
    closed(14, "A1", "AAPL", "alpha-14", "7.5", at(D3 - timedelta(days=1), "22:00"),
           at(D3, "01:00"), fees="0.5"),
    # beta: only wins on day 1 (no deviation, no profit factor), only a loss on day 2
    closed(20, "A1", "TSLA", "beta:1", "10", at(D1, "09:40"), at(D1, "09:50")),
    closed(21, "A1", "TSLA", "beta:2", "10", at(D1, "10:00"), at(D1, "10:20")),
    closed(22, "A1", "TSLA", "beta-3", "-25", at(D2, "09:00"), at(D2, "09:10")),
    # unattributed: no client order id, no separator, nothing before the separator
    closed(30, "A1", "SPY", None, "5", at(D1, "09:00"), at(D1, "09:01")),
    closed(31, "A1", "SPY", "manualorder", "-5", at(D1, "09:02"), at(D1, "09:04")),
    closed(32, "A1", "SPY", "-leading", "1", at(D1, "09:05"), at(D1, "09:08")),
    # baseline: opened before the service knew them; the client id does not matter
    closed(40, "A1", "AAPL", "alpha-40", "250", at(date(2026, 2, 20), "14:30"),
           at(D1, "10:00"), origin="baseline"),
    closed(41, "A1", "NVDA", None, "-30", at(date(2026, 2, 20), "14:30"), at(D1, "11:00"),
           origin="baseline"),
    # another account: its own alpha
    closed(50, "A2", "AAPL", "alpha-50", "1000", at(D1, "09:30"), at(D1, "10:30")),
]


def insert(url: str, rows: Sequence[Closed]) -> None:
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO position_history (position_id, account_id, symbol, side, qty, peak_qty,"
            " avg_entry_price, realized_pnl, alpaca_order_id, client_order_id, opened_at,"
            " closed_at, origin, fees) VALUES (%s, %s, %s, %s, 0, 300, 10, %s, %s, %s, %s, %s,"
            " %s, %s)",
            [(t.position_id, t.account_id, t.symbol, t.side, t.realized_pnl,
              f"order-{t.position_id}", t.client_order_id, t.opened_at, t.closed_at, t.origin,
              t.fees) for t in rows],
        )


def table(url: str, name: str, currency: str = "USD") -> dict[tuple[Any, ...], dict[str, Any]]:
    """The rows of one quote currency, keyed by (account, strategy[, symbol], day)."""
    columns = STRATEGY_COLUMNS if name == "strategy_stats" else SYMBOL_COLUMNS
    width = 3 if name == "strategy_stats" else 4
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM {name} WHERE currency = %s",
                            [currency]).fetchall()
    return {row[:width]: dict(zip(columns[width:], row[width:], strict=True)) for row in rows}


def snapshot(url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return (
            conn.execute("SELECT * FROM strategy_stats ORDER BY 1, 2, 3").fetchall(),
            conn.execute("SELECT * FROM strategy_symbol_stats ORDER BY 1, 2, 3, 4").fetchall(),
        )


def sqn_of(*nets: float) -> float:
    return math.sqrt(len(nets)) * statistics.mean(nets) / statistics.stdev(nets)


def sharpe_of(*daily: float) -> float:
    return statistics.mean(daily) / statistics.stdev(daily) * math.sqrt(252)


D = Decimal


def row(**columns: Any) -> dict[str, Any]:
    return columns

ALPHA_NETS = (99, -50, -21, 30, 0, -10, -5, 0, -1, -3, 12, -100, 38.75, 7)

# Every column of every strategy_stats row, worked out by hand from HISTORY.
HAND: dict[tuple[str, str, date], dict[str, Any]] = {
    ("A1", "alpha", D1): row(
        # nets in closed_at order: 99, -50, -21, 30, 0, -10, -5, 0, -1, -3
        trades=10, wins=2, losses=6, breakevens=2, win_rate=0.2,
        gross_profit=D(129), gross_loss=D(90), net_pnl=D(39), profit_factor=129 / 90,
        expectancy=D("3.9"), avg_win=D("64.5"), avg_loss=D(-15), largest_win=D(99),
        largest_loss=D(-50),
        # 4 x 1800 s, 4 x 3600 s, 3599.5 s, 59.9 s
        avg_holding_seconds=25259.4 / 10, median_holding_seconds=(1800 + 3599.5) / 2,
        # -50 -21 | 30 | 0 | -10 -5 | 0 | -1 -3: a breakeven ends a run
        max_consecutive_losses=2,
        # curve 99 49 28 58 58 48 43 43 42 39: peak 99, lowest after it 28
        cum_net_pnl=D(39), max_drawdown=D(71), sqn=sqn_of(*ALPHA_NETS[:10]), sharpe_daily=None,
    ),
    ("A1", "alpha", D2): row(
        # 12 (the flip's short side, closed at midnight), -100, 40 - 1.25
        trades=3, wins=2, losses=1, breakevens=0, win_rate=2 / 3,
        gross_profit=D("50.75"), gross_loss=D(100), net_pnl=D("-49.25"),
        profit_factor=0.5075, expectancy=D("-49.25") / 3, avg_win=D("25.375"),
        avg_loss=D(-100), largest_win=D("38.75"), largest_loss=D(-100),
        avg_holding_seconds=(43200 + 1800 + 3600) / 3, median_holding_seconds=3600.0,
        max_consecutive_losses=1,
        # curve 51 -49 -10.25 under the peak of 99
        cum_net_pnl=D("-10.25"), max_drawdown=D(148), sqn=sqn_of(*ALPHA_NETS[:13]),
        sharpe_daily=sharpe_of(39, -49.25),
    ),
    ("A1", "alpha", D3): row(
        trades=1, wins=1, losses=0, breakevens=0, win_rate=1.0,
        gross_profit=D(7), gross_loss=D(0), net_pnl=D(7), profit_factor=None,
        expectancy=D(7), avg_win=D(7), avg_loss=None, largest_win=D(7), largest_loss=None,
        avg_holding_seconds=10800.0, median_holding_seconds=10800.0, max_consecutive_losses=0,
        cum_net_pnl=D("-3.25"), max_drawdown=D(148), sqn=sqn_of(*ALPHA_NETS),
        sharpe_daily=sharpe_of(39, -49.25, 7),
    ),
    ("A1", "beta", D1): row(
        trades=2, wins=2, losses=0, breakevens=0, win_rate=1.0,
        gross_profit=D(20), gross_loss=D(0), net_pnl=D(20), profit_factor=None,
        expectancy=D(10), avg_win=D(10), avg_loss=None, largest_win=D(10), largest_loss=None,
        avg_holding_seconds=900.0, median_holding_seconds=900.0, max_consecutive_losses=0,
        cum_net_pnl=D(20), max_drawdown=D(0), sqn=None,  # two equal trades: no deviation
        sharpe_daily=None,
    ),
    ("A1", "beta", D2): row(
        trades=1, wins=0, losses=1, breakevens=0, win_rate=0.0,
        gross_profit=D(0), gross_loss=D(25), net_pnl=D(-25), profit_factor=0.0,
        expectancy=D(-25), avg_win=None, avg_loss=D(-25), largest_win=None,
        largest_loss=D(-25), avg_holding_seconds=600.0, median_holding_seconds=600.0,
        max_consecutive_losses=1,
        cum_net_pnl=D(-5), max_drawdown=D(25), sqn=sqn_of(10, 10, -25),
        sharpe_daily=sharpe_of(20, -25),
    ),
    ("A1", "unattributed", D1): row(
        trades=3, wins=2, losses=1, breakevens=0, win_rate=2 / 3,
        gross_profit=D(6), gross_loss=D(5), net_pnl=D(1), profit_factor=1.2,
        expectancy=D(1) / 3, avg_win=D(3), avg_loss=D(-5), largest_win=D(5),
        largest_loss=D(-5), avg_holding_seconds=120.0, median_holding_seconds=120.0,
        max_consecutive_losses=1,
        cum_net_pnl=D(1), max_drawdown=D(5), sqn=sqn_of(5, -5, 1), sharpe_daily=None,
    ),
    ("A1", "baseline", D1): row(
        trades=2, wins=1, losses=1, breakevens=0, win_rate=0.5,
        gross_profit=D(250), gross_loss=D(30), net_pnl=D(220), profit_factor=250 / 30,
        expectancy=D(110), avg_win=D(250), avg_loss=D(-30), largest_win=D(250),
        largest_loss=D(-30),
        # 10 days less 4.5 h, and an hour more
        avg_holding_seconds=(847800 + 851400) / 2, median_holding_seconds=849600.0,
        max_consecutive_losses=1,
        cum_net_pnl=D(220), max_drawdown=D(30), sqn=110 / 140, sharpe_daily=None,
    ),
    ("A2", "alpha", D1): row(
        trades=1, wins=1, losses=0, breakevens=0, win_rate=1.0,
        gross_profit=D(1000), gross_loss=D(0), net_pnl=D(1000), profit_factor=None,
        expectancy=D(1000), avg_win=D(1000), avg_loss=None, largest_win=D(1000),
        largest_loss=None, avg_holding_seconds=3600.0, median_holding_seconds=3600.0,
        max_consecutive_losses=0, cum_net_pnl=D(1000), max_drawdown=D(0), sqn=None,
        sharpe_daily=None,
    ),
}

HAND_SYMBOLS: dict[tuple[str, str, str, date], dict[str, Any]] = {
    ("A1", "alpha", "AAPL", D1): row(
        # 99, -50, 30, -5, -1
        trades=5, wins=2, losses=3, breakevens=0, win_rate=0.4,
        gross_profit=D(129), gross_loss=D(56), net_pnl=D(73), profit_factor=129 / 56,
        expectancy=D("14.6"), avg_win=D("64.5"), avg_loss=D(-56) / 3, largest_win=D(99),
        largest_loss=D(-50), avg_holding_seconds=(1800 * 3 + 3600 + 3599.5) / 5,
        median_holding_seconds=1800.0, max_consecutive_losses=2,
    ),
    ("A1", "alpha", "MSFT", D1): row(
        # -21, 0, -10, 0, -3: the breakevens keep every run at one
        trades=5, wins=0, losses=3, breakevens=2, win_rate=0.0,
        gross_profit=D(0), gross_loss=D(34), net_pnl=D(-34), profit_factor=0.0,
        expectancy=D("-6.8"), avg_win=None, avg_loss=D(-34) / 3, largest_win=None,
        largest_loss=D(-21), avg_holding_seconds=(3600 + 1800 + 3600 + 3600 + 59.9) / 5,
        median_holding_seconds=3600.0, max_consecutive_losses=1,
    ),
}


@pytest.fixture
def history_url(database_url: str) -> str:
    insert(database_url, HISTORY)
    return database_url


def run(url: str, first: date = D1, last: date = D3, **kw: Any) -> Any:
    return compute_stats(url, kw.pop("pattern", DEFAULT), DayRange(first, last), **kw)


# --------------------------------------------------------------------- every figure


def test_every_column_matches_the_figures_worked_out_by_hand(history_url: str) -> None:
    result = run(history_url)

    assert result.days == 4 and result.trades == len(HISTORY)
    assert result.per_day == {"2026-03-02": 5, "2026-03-03": 2, "2026-03-04": 0,
                              "2026-03-05": 1}
    assert not mismatches(table(history_url, "strategy_stats"), HAND)
    symbols = table(history_url, "strategy_symbol_stats")
    assert not mismatches({k: symbols[k] for k in HAND_SYMBOLS}, HAND_SYMBOLS)
    # Money is exact, ratios are doubles, and a day without trades has no row.
    row = table(history_url, "strategy_stats")[("A1", "alpha", D2)]
    assert isinstance(row["net_pnl"], Decimal) and isinstance(row["sharpe_daily"], float)
    assert ("A1", "alpha", D3 - timedelta(days=1)) not in table(history_url, "strategy_stats")


def test_both_tables_match_the_python_reference(history_url: str) -> None:
    run(history_url)

    strategy_rows, symbol_rows = expected_tables(HISTORY, DEFAULT_STRATEGY_PATTERN,
                                                 DayRange(D1, D3).days())
    assert not mismatches(table(history_url, "strategy_stats"), strategy_rows)
    assert not mismatches(table(history_url, "strategy_symbol_stats"), symbol_rows)
    # The reference itself agrees with the hand-worked figures.
    assert not mismatches({k: strategy_rows[k] for k in HAND}, HAND)


def test_sharpe_and_drawdown_agree_with_empyrical(history_url: str) -> None:
    """empyrical (the library under pyfolio) on the same series, to 1e-9."""
    import empyrical  # type: ignore[import-untyped]

    run(history_url)
    stored = table(history_url, "strategy_stats")

    daily = np.array([39, -49.25, 7])
    assert stored[("A1", "alpha", D3)]["sharpe_daily"] == pytest.approx(
        empyrical.sharpe_ratio(daily, annualization=252), abs=1e-9)
    assert stored[("A1", "beta", D2)]["sharpe_daily"] == pytest.approx(
        empyrical.sharpe_ratio(np.array([20.0, -25.0]), annualization=252), abs=1e-9)
    assert float(stored[("A1", "alpha", D3)]["max_drawdown"]) == pytest.approx(
        money_drawdown(ALPHA_NETS), abs=1e-9)
    assert float(stored[("A1", "beta", D2)]["max_drawdown"]) == pytest.approx(
        money_drawdown([10, 10, -25]), abs=1e-9)


def money_drawdown(nets: Sequence[float]) -> float:
    """empyrical's max_drawdown of our additive P&L curve.

    empyrical measures drawdowns of a compounded equity curve, as a fraction of the peak,
    anchored at a start value. exp() turns our additive curve into exactly such a curve
    (exp(a + b) = exp(a) exp(b): returns expm1(net / scale) compound to exp(cum / scale)),
    and being increasing it keeps every peak and trough on the same trade, the start
    (cum 0) included; so the money drawdown is -scale * log1p(empyrical's figure)."""
    import empyrical

    scale = max(abs(float(n)) for n in nets) * len(nets)
    returns = np.expm1(np.array([float(n) for n in nets]) / scale)
    return float(-scale * np.log1p(empyrical.max_drawdown(returns)))


# --------------------------------------------------------------------- re-runs


def test_a_rerun_gives_identical_rows(history_url: str) -> None:
    run(history_url)
    first = snapshot(history_url)
    run(history_url)
    run(history_url, D2, D2)
    assert snapshot(history_url) == first
    assert len(first[0]) == len(HAND) and len(first[1]) > len(first[0])


def test_a_day_is_replaced_whole_and_late_closes_are_picked_up(history_url: str) -> None:
    run(history_url)
    before = table(history_url, "strategy_stats")
    # A close lands late for day 2 (after a backfill): the nightly lookback recomputes it.
    late = closed(60, "A1", "AAPL", "gamma-1", "3", at(D2, "12:00"), at(D2, "13:00"))
    insert(history_url, [late])
    run(history_url, D2, D2)

    rows = table(history_url, "strategy_stats")
    assert rows[("A1", "gamma", D2)]["net_pnl"] == 3
    assert set(rows) - set(before) == {("A1", "gamma", D2)}
    assert all(rows[k] == before[k] for k in before)
    # Another pattern: day 1 is rebuilt with the new strategies only, nothing of the old.
    by_digit = StrategyPattern.parse(r"-(?P<strategy>\d)")
    run(history_url, D1, D1, pattern=by_digit)
    day1 = {k[1] for k in table(history_url, "strategy_stats") if k[2] == D1}
    # alpha-1, -10, -11 -> 1; alpha:3 and beta:1 have no "-digit"; alpha-50 is A2's 5
    assert day1 == {"1", "2", "4", "5", "6", "7", "8", "9", "baseline", "unattributed"}
    assert {k[1] for k in table(history_url, "strategy_symbol_stats") if k[3] == D1} == day1


def test_one_account_leaves_the_others_rows_alone(history_url: str) -> None:
    run(history_url)
    before = table(history_url, "strategy_stats")
    insert(history_url, [closed(61, "A2", "AAPL", "alpha-61", "-1", at(D1, "11:00"),
                                at(D1, "12:00")),
                         closed(62, "A1", "AAPL", "alpha-62", "-1", at(D1, "11:00"),
                                at(D1, "12:00"))])
    run(history_url, D1, D1, account_id="A2")

    after = table(history_url, "strategy_stats")
    assert after[("A2", "alpha", D1)]["trades"] == 2
    assert after[("A1", "alpha", D1)] == before[("A1", "alpha", D1)]  # not A2's to touch


# --------------------------------------------------------------------- the pipeline


async def test_the_store_copies_origin_and_fees_into_the_history(database_url: str) -> None:
    """Positions written by the real store, one of them marked as a baseline with fees (as
    the baseline import will), go through history into the statistics."""
    import trio

    from stream_supervisor.events import Event, fill_key
    from stream_supervisor.pgstore import PgStore
    from stream_supervisor.store import Batch

    def fill(order: str, side: str, qty: str, price: str, minute: int) -> Event:
        ts = at(D1, "14:00") + timedelta(minutes=minute)
        return Event(key=fill_key(order, Decimal(qty)), event="fill", source="stream",
                     order_id=order, symbol="XYZ", side=side, status="filled",
                     cum_qty=Decimal(qty), timestamp=ts, ts_ns=int(ts.timestamp()) * 10**9,
                     client_order_id=f"swing-{order}", order_qty=Decimal(qty),
                     cum_avg_price=Decimal(price), fill_qty=Decimal(qty),
                     fill_price=Decimal(price))

    store = PgStore(database_url)
    with trio.fail_after(WAIT):
        await store.open()
        await store.commit_batch(Batch("A1", [fill("o1", "buy", "10", "100", 1)]))
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("UPDATE active_positions SET origin = 'baseline', fees = 2.5")
        # sell 15: the long closes (+100) and a short of 5 opens; buy 5 closes it (+25)
        await store.commit_batch(Batch("A1", [fill("o2", "sell", "15", "110", 2)]))
        await store.commit_batch(Batch("A1", [fill("o3", "buy", "5", "105", 3)]))
        await store.aclose()

    with psycopg.connect(database_url, autocommit=True) as conn:
        history = conn.execute("SELECT client_order_id, origin, fees, realized_pnl"
                               " FROM position_history ORDER BY position_id").fetchall()
    assert history == [("swing-o1", "baseline", D("2.5"), D(100)),
                       ("swing-o2", "fill", D(0), D(25))]
    run(database_url, D1, D1)
    rows = table(database_url, "strategy_stats")
    assert {k[1]: v["net_pnl"] for k, v in rows.items()} == {"baseline": D("97.5"),
                                                              "swing": D(25)}


# --------------------------------------------------------------------- what the ledger leaves out


def store_fill(order: str, cid: str | None, symbol: str, side: str, qty: str, price: str,
               ts: datetime, asset_class: str | None = None) -> Any:
    from stream_supervisor.events import Event, fill_key

    return Event(key=fill_key(order, Decimal(qty)), event="fill", source="stream",
                 order_id=order, symbol=symbol, side=side, status="filled",
                 cum_qty=Decimal(qty), timestamp=ts, ts_ns=int(ts.timestamp() * 10**6) * 1000,
                 client_order_id=cid, order_qty=Decimal(qty), cum_avg_price=Decimal(price),
                 fill_qty=Decimal(qty), fill_price=Decimal(price), asset_class=asset_class)


def store_activity(activity_id: str, kind: str, symbol: str, qty: str, *,
                   day: date | None = None, ts: datetime | None = None,
                   price: str | None = None) -> Any:
    from stream_supervisor.activities import WireNonTrade, non_trade_to_event

    return non_trade_to_event(WireNonTrade(
        id=activity_id, activity_type=kind, symbol=symbol, qty=Decimal(qty),
        date=day.isoformat() if day else None, transaction_time=ts.isoformat() if ts else None,
        price=Decimal(price) if price is not None else None))


async def through_the_store(url: str, *batches: Sequence[Any], account: str = "A1") -> None:
    """Each batch committed by the real store, as the service would."""
    import trio

    from stream_supervisor.pgstore import PgStore
    from stream_supervisor.store import Batch

    store = PgStore(url)
    with trio.fail_after(WAIT):
        await store.open()
        for events in batches:
            await store.commit_batch(Batch(account, list(events)))
        await store.aclose()


async def test_a_crypto_fee_taken_from_the_coin_is_paid_in_net_pnl(database_url: str) -> None:
    """Buy 1 BTC at 50,000, the fee takes 0.0025 BTC, sell the 0.9975 left at 51,000: the
    cash result is 0.9975 x 51,000 - 50,000 = 872.5. The ledger realizes 997.5 on what was
    sold and lets the fee's coin go at the average (0.0025 x 50,000 = 125)."""
    t = at(D1, "14:00")
    await through_the_store(
        database_url,
        [store_fill("b1", "alpha-1", "BTC/USD", "buy", "1", "50000", t, "crypto")],
        [store_fill("s1", "alpha-2", "BTC/USD", "sell", "0.9975", "51000",
                    t + timedelta(minutes=30), "crypto")],
        # Alpaca documents a date only: stamped at the day's end (21:00 UTC), after both.
        [store_activity("20260302000000000::f1", "CFEE", "BTCUSD", "-0.0025", day=D1,
                        price="50000")],
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT realized_pnl, fees FROM position_history").fetchall() == [
            (D("997.5"), D(0))]
    run(database_url, D1, D1)
    rows = table(database_url, "strategy_stats")
    got = rows[("A1", "alpha", D1)]
    assert (got["trades"], got["wins"], got["net_pnl"]) == (1, 1, D("872.5"))
    assert got["avg_holding_seconds"] == 7 * 3600.0  # 14:00 to the fee's 21:00


async def test_a_close_stamped_before_its_open_holds_for_zero_seconds(
        database_url: str) -> None:
    """Bought and sold after 21:00 UTC (still the same New York day), the fee dust closes
    the row at the date-only fee's 21:00 stamp: before it opened. Holding time is 0, not
    negative."""
    t = at(D1, "22:30")
    await through_the_store(
        database_url,
        [store_fill("b1", "alpha-1", "BTC/USD", "buy", "1", "50000", t, "crypto")],
        [store_fill("s1", "alpha-2", "BTC/USD", "sell", "0.9975", "50000",
                    t + timedelta(minutes=30), "crypto")],
        [store_activity("20260302000000000::f1", "CFEE", "BTCUSD", "-0.0025", day=D1,
                        price="50000")],
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        [(opened, closed_at)] = conn.execute(
            "SELECT opened_at, closed_at FROM position_history").fetchall()
    assert closed_at < opened
    run(database_url, D1, D1)
    got = table(database_url, "strategy_stats")[("A1", "alpha", D1)]
    assert got["avg_holding_seconds"] == got["median_holding_seconds"] == 0.0
    assert (got["losses"], got["net_pnl"]) == (1, D(-125))


async def test_pnl_in_another_coin_is_never_added_to_dollars(database_url: str,
                                                             tmp_path: Path) -> None:
    """ETH/BTC realizes its P&L in BTC: 10 ETH bought at 0.05 BTC, sold at 0.04, is
    -0.1 BTC (some -5,000 dollars), beside +10 dollars of AAPL in the same strategy."""
    t = at(D1, "15:00")
    await through_the_store(
        database_url,
        [store_fill("e1", "alpha-e1", "ETH/BTC", "buy", "10", "0.05", t, "crypto"),
         store_fill("a1", "alpha-a1", "AAPL", "buy", "10", "100", t, "us_equity")],
        [store_fill("e2", "alpha-e2", "ETH/BTC", "sell", "10", "0.04",
                    t + timedelta(minutes=5), "crypto"),
         store_fill("a2", "alpha-a2", "AAPL", "sell", "10", "101", t + timedelta(minutes=5),
                    "us_equity")],
    )
    run(database_url, D1, D1)

    dollars = table(database_url, "strategy_stats")[("A1", "alpha", D1)]
    coins = table(database_url, "strategy_stats", "BTC")[("A1", "alpha", D1)]
    assert (dollars["trades"], dollars["net_pnl"], dollars["cum_net_pnl"]) == (1, D(10), D(10))
    assert dollars["profit_factor"] is None
    assert (coins["trades"], coins["losses"], coins["net_pnl"], coins["cum_net_pnl"],
            coins["max_drawdown"]) == (1, 1, D("-0.1"), D("-0.1"), D("0.1"))
    symbols = table(database_url, "strategy_symbol_stats", "BTC")
    assert list(symbols) == [("A1", "alpha", "ETH/BTC", D1)]
    # The report: one section per currency, never a sum of both.
    path = tmp_path / "report.html"
    assert run_cli(["stats", "--database-url", database_url, "--no-compute",
                    "--report", str(path)]) == 0
    assert set(plotly_figures(path.read_text())) == {"alpha (A1, USD)", "alpha (A1, BTC)"}


def test_stats_refuses_a_database_without_the_currency_migration(
        empty_database_url: str, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1] / "migrations"
    before = tmp_path / "migrations"
    before.mkdir()
    for sql in sorted(repo.glob("*.sql"))[:8]:
        (before / sql.name).write_bytes(sql.read_bytes())
    apply_migrations(empty_database_url, before)
    with pytest.raises(ConfigError, match="0009_stats_currency not applied"):
        run(empty_database_url, D1, D1)


async def broker_word(url: str, reason: str, taken_at: datetime,
                      positions: Sequence[tuple[str, str, str]], account: str = "A1") -> None:
    """A reconcile (or rebaseline) taking the broker's (symbol, qty, avg) for those symbols."""
    import trio

    from stream_supervisor.adjustments import BrokerPosition
    from stream_supervisor.pgstore import PgStore
    from stream_supervisor.store import BrokerWord

    store = PgStore(url)
    with trio.fail_after(WAIT):
        await store.open()
        assert await store.try_leadership(account)
        await store.apply_broker_word(BrokerWord(
            account, reason, taken_at,
            [BrokerPosition(sym, Decimal(q), Decimal(avg)) for sym, q, avg in positions],
            symbols=[sym for sym, _, _ in positions]))
        await store.aclose()


async def test_a_reconciled_position_stays_one_trade_of_its_strategy(database_url: str) -> None:
    """alpha buys 10 at 100; its second buy of 2 never reached us, so a reconcile takes the
    broker's 12 (closing our row, opening one with no order of its own); alpha sells 12 at
    110. One trade of alpha's, +120, held from its first buy; not a breakeven of alpha's
    and a win of nobody's."""
    from stream_supervisor.adjustments import RECONCILE

    t = at(D1, "15:00")
    await through_the_store(database_url, [store_fill("o1", "alpha-1", "XYZ", "buy", "10",
                                                      "100", t + timedelta(minutes=1))])
    await broker_word(database_url, RECONCILE, t + timedelta(minutes=3), [("XYZ", "12", "100")])
    await through_the_store(database_url, [store_fill("o3", "alpha-3", "XYZ", "sell", "12",
                                                      "110", t + timedelta(minutes=10))])
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT close_reason, realized_pnl FROM position_history"
                            " ORDER BY position_id").fetchall() == [("reconcile", D(0)),
                                                                    (None, D(120))]
    run(database_url, D1, D1)

    rows = table(database_url, "strategy_stats")
    assert set(rows) == {("A1", "alpha", D1)}
    got = rows[("A1", "alpha", D1)]
    assert (got["trades"], got["wins"], got["breakevens"], got["net_pnl"], got["win_rate"]) == (
        1, 1, 0, D(120), 1.0)
    assert got["avg_holding_seconds"] == 9 * 60.0  # from alpha's buy, not the reconcile


async def test_a_baseline_position_is_held_from_the_snapshot(database_url: str) -> None:
    """The broker's positions carry no opening time: a baseline row opens at the moment of
    the snapshot, and its holding time starts there (docs/statistics.md)."""
    from stream_supervisor.adjustments import BASELINE

    t = at(D1, "15:00")
    await broker_word(database_url, BASELINE, t, [("XYZ", "10", "100")])
    await through_the_store(database_url, [store_fill("o1", "alpha-1", "XYZ", "sell", "10",
                                                      "101", t + timedelta(hours=2))])
    run(database_url, D1, D1)
    got = table(database_url, "strategy_stats")[("A1", "baseline", D1)]
    assert (got["net_pnl"], got["avg_holding_seconds"]) == (D(10), 2 * 3600.0)


async def test_closes_that_are_not_trades_are_not_counted(database_url: str) -> None:
    """A row a reconcile flattened (the broker holds none: its sale never reached us) and a
    row transferred out (ACATS) were not closed by a trade of the strategy."""
    from stream_supervisor.adjustments import RECONCILE

    t = at(D1, "15:00")
    await through_the_store(database_url, [
        store_fill("o1", "alpha-1", "XYZ", "buy", "10", "100", t),
        store_fill("o2", "alpha-2", "ABC", "buy", "5", "20", t),
        store_fill("o3", "beta-3", "QQQ", "buy", "1", "400", t),
    ])
    await broker_word(database_url, RECONCILE, t + timedelta(minutes=3), [("XYZ", "0", "0")])
    await through_the_store(database_url, [
        store_activity("20260302150500000::t1", "ACATS", "ABC", "-5",
                       ts=t + timedelta(minutes=5)),
        store_fill("o4", "beta-4", "QQQ", "sell", "1", "401", t + timedelta(minutes=6)),
    ])
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM position_history").fetchall() == [(3,)]
    run(database_url, D1, D1)

    rows = table(database_url, "strategy_stats")
    assert set(rows) == {("A1", "beta", D1)}
    assert rows[("A1", "beta", D1)]["net_pnl"] == D(1)


async def test_an_assigned_options_stock_keeps_the_options_strategy(database_url: str) -> None:
    """The wheel: sell a put for 2.00, get assigned 100 shares at the 100 strike (a row with
    no order of its own), sell them at 105 by hand. Both are the wheel's trades."""
    put = "XYZ260116P00100000"
    t = at(D1, "15:00")
    await through_the_store(
        database_url,
        [store_fill("o1", "wheel-1", put, "sell", "1", "2.00", t, "us_option")],
        [store_activity("20260302160000000::a1", "OPASN", put, "1",
                        ts=t + timedelta(hours=1))],
        [store_fill("o2", "manual-2", "XYZ", "sell", "100", "105", t + timedelta(hours=2),
                    "us_equity")],
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT symbol, client_order_id, realized_pnl FROM position_history"
                            " ORDER BY position_id").fetchall() == [
            (put, "wheel-1", D(200)), ("XYZ", None, D(500))]
    run(database_url, D1, D1)

    rows = table(database_url, "strategy_stats")
    assert set(rows) == {("A1", "wheel", D1)}
    got = rows[("A1", "wheel", D1)]
    assert (got["trades"], got["wins"], got["net_pnl"]) == (2, 2, D(700))


# --------------------------------------------------------------------- strategy pattern


def test_a_pattern_postgres_reads_differently_is_refused_before_anything_is_written(
        history_url: str) -> None:
    # Python's `.` stops at a newline, PostgreSQL's does not.
    insert(history_url, [closed(70, "A1", "AAPL", "a\nb-1", "1", at(D1, "09:00"),
                                at(D1, "09:30"))])
    dotted = StrategyPattern.parse(r"^(?P<strategy>.+)-")
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_STRATEGY_PATTERN.*'a\\\\nb-1'"):
        run(history_url, pattern=dotted)
    assert table(history_url, "strategy_stats") == {}


def test_a_pattern_postgres_cannot_compile_is_a_config_error(database_url: str) -> None:
    possessive = StrategyPattern.parse(r"^(?P<strategy>\w++)-")  # Python 3.11+ only
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_STRATEGY_PATTERN"):
        run(database_url, pattern=possessive)


# --------------------------------------------------------------------- locks and kills


def cli(url: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_supervisor", "stats", *args],
        env={**os.environ, "DATABASE_URL": url, "STREAM_SUPERVISOR_LOG_FORMAT": "json", **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def summary(stdout: str) -> dict[str, Any]:
    """The command's result: the last line of stdout (the JSON log lines come before)."""
    result = json.loads(stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def wait_for(url: str, query: str, what: str) -> None:
    deadline = time.monotonic() + WAIT
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(query).fetchone()
            if row and row[0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}")
            time.sleep(0.05)


STATS_WAITING = ("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                 " 'stream-supervisor stats' AND wait_event_type = 'Lock'")
STATS_GONE = ("SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name ="
              " 'stream-supervisor stats'")


def test_a_second_run_waits_for_the_first(history_url: str) -> None:
    with psycopg.connect(history_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [STATS_LOCK_KEY])  # "the first run"
        proc = cli(history_url, "--from", D1.isoformat(), "--to", D3.isoformat())
        wait_for(history_url, STATS_WAITING, "the run to wait for the stats lock")
        assert table(history_url, "strategy_stats") == {}
        holder.execute("SELECT pg_advisory_unlock(%s)", [STATS_LOCK_KEY])
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert summary(out)["strategy_rows"] == len(HAND)
    assert "stats_lock_wait" in out


def test_a_run_that_waits_too_long_exits_1_naming_the_lock(history_url: str) -> None:
    with psycopg.connect(history_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [STATS_LOCK_KEY])
        proc = cli(history_url, "--date", D1.isoformat(), "--lock-wait", "0.5")
        _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1
    assert "another stats run has held the stats lock" in err
    assert table(history_url, "strategy_stats") == {}


def test_the_lock_wait_is_not_cut_short_by_the_statement_timeout(
        history_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--lock-wait longer than the bound on each statement (1800 s against 600 s by
    default; 2.5 s against 1 s here): the run waits the whole --lock-wait, then fails
    naming the lock."""
    from stream_supervisor import stats

    monkeypatch.setattr(stats, "STATEMENT_TIMEOUT_MS", 1000)
    with psycopg.connect(history_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", [STATS_LOCK_KEY])
        started = time.monotonic()
        with pytest.raises(stats.StatsError, match="held the stats lock .* 2.5 s"):
            run(history_url, D1, D1, lock_wait_s=2.5)
        assert time.monotonic() - started >= 2.5
    assert table(history_url, "strategy_stats") == {}


def test_two_runs_at_once_both_succeed_with_the_same_rows(history_url: str) -> None:
    procs = [cli(history_url, "--from", D1.isoformat(), "--to", D3.isoformat())
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
    strategy_rows, _ = expected_tables(HISTORY, DEFAULT_STRATEGY_PATTERN, DayRange(D1, D3).days())
    assert not mismatches(table(history_url, "strategy_stats"), strategy_rows)


def test_sigkill_mid_run_leaves_whole_days_and_a_rerun_matches_an_uninterrupted_run(
        database_url: str, empty_database_url: str) -> None:
    first, last = date(2026, 4, 1), date(2026, 4, 10)
    days = list(DayRange(first, last).days())
    early = busy_history(days, 0)
    late = busy_history(days, 1000)  # a backfill: more closes on every day
    insert(database_url, early)
    run(database_url, first, last)
    old = by_day(database_url)
    insert(database_url, late)

    # The kill must land after some days committed and before the rest: a lock held on
    # the 5th day's rows stops the run inside that day's transaction, deterministically.
    stuck = days[4]
    with psycopg.connect(database_url) as holder:
        holder.execute("SELECT 1 FROM strategy_stats WHERE day = %s FOR UPDATE", [stuck])
        proc = cli(database_url, "--from", first.isoformat(), "--to", last.isoformat())
        wait_for(database_url, STATS_WAITING, "the run to block on the 5th day")
        committed = by_day(database_url)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WAIT)
        holder.rollback()
    assert proc.returncode == -signal.SIGKILL
    wait_for(database_url, STATS_GONE, "the killed run's session to end")

    apply_migrations(empty_database_url)
    insert(empty_database_url, early + late)
    run(empty_database_url, first, last)
    new = by_day(empty_database_url)
    after_kill = by_day(database_url)
    assert committed == after_kill
    for day in days:  # each day whole: every row as before, or every row as recomputed
        assert after_kill[day] == (new[day] if day < stuck else old[day]), day
    assert old[stuck] != new[stuck]

    proc = cli(database_url, "--from", first.isoformat(), "--to", last.isoformat())
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert snapshot(database_url) == snapshot(empty_database_url)


def busy_history(days: Sequence[date], first_id: int) -> list[Closed]:
    """Per day, three strategies with a few trades each in two symbols."""
    out = []
    pid = first_id
    for n, day in enumerate(days):
        for s, strategy in enumerate(("alpha", "beta", "gamma")):
            for k in range(4):
                pid += 1
                pnl = D((pid * 37 + n * 11 + s) % 23 - 11) / 4
                opened = at(day, f"{9 + k:02d}:{(pid * 7) % 60:02d}")
                out.append(closed(pid, "A1", ("AAPL", "MSFT")[k % 2], f"{strategy}-{pid}",
                                  str(pnl), opened, opened + timedelta(minutes=5 + pid % 50),
                                  fees=str(D(pid % 3) / 10)))
    return out


def by_day(url: str) -> dict[date, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    strategy_rows, symbol_rows = snapshot(url)
    days = {r[2] for r in strategy_rows} | {r[3] for r in symbol_rows}
    return {d: ([r for r in strategy_rows if r[2] == d], [r for r in symbol_rows if r[3] == d])
            for d in days}


# --------------------------------------------------------------------- command line


def args_for(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["stats", *argv])


def test_days_asked_for() -> None:
    today = date(2026, 3, 10)
    plain = load_settings({})
    assert requested_range(args_for(), plain, today) == DayRange(date(2026, 3, 6),
                                                                 date(2026, 3, 9))
    week = load_settings({"STREAM_SUPERVISOR_STATS_LOOKBACK_DAYS": "6"})
    assert requested_range(args_for(), week, today).first == date(2026, 3, 3)
    assert nightly_range(today, 0) == DayRange(date(2026, 3, 9), date(2026, 3, 9))
    assert requested_range(args_for("--date", "2026-01-05"), plain, today) == DayRange(
        date(2026, 1, 5), date(2026, 1, 5))
    assert requested_range(args_for("--from", "2026-01-05", "--to", "2026-02-01"), plain,
                           today) == DayRange(date(2026, 1, 5), date(2026, 2, 1))
    assert requested_range(args_for("--from", "2026-01-05"), plain, today).last == date(
        2026, 3, 9)
    for bad in (("--to", "2026-01-05"), ("--from", "2026-02-01", "--to", "2026-01-05")):
        with pytest.raises(ValueError):
            requested_range(args_for(*bad), plain, today)


def test_exit_codes(history_url: str, capsys: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> None:
    url = ["--database-url", history_url]
    assert run_cli(["stats", *url, "--date", D2.isoformat()]) == 0
    assert summary(capsys.readouterr().out)["strategy_rows"] == 2
    assert run_cli(["stats", *url, "--to", "2026-01-01"]) == 2
    assert run_cli(["stats", *url, "--no-compute"]) == 2
    with pytest.raises(SystemExit) as usage:
        run_cli(["stats", "--date", "yesterday"])
    assert usage.value.code == 2
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert run_cli(["stats"]) == 78
    monkeypatch.setenv("STREAM_SUPERVISOR_STRATEGY_PATTERN", "(?P<strat>x)")
    assert run_cli(["stats", *url]) == 78
    assert "STREAM_SUPERVISOR_STRATEGY_PATTERN" in capsys.readouterr().err
    monkeypatch.delenv("STREAM_SUPERVISOR_STRATEGY_PATTERN")
    assert run_cli(["stats", "--database-url", "postgresql://u@127.0.0.1:1/x"]) == 1


@pytest.mark.parametrize(("value", "why"), [
    ("(", "not a valid regular expression"),
    ("^[a-z]+-", "no named group"),
    ("(?P<strategy>x)(?P=strategy)", "named backreference"),
    ("", "no named group"),
])
def test_a_bad_pattern_names_the_variable(value: str, why: str) -> None:
    # Loading the settings, as `run` does, accepts it: only `stats` needs the pattern.
    settings = load_settings({"STREAM_SUPERVISOR_STRATEGY_PATTERN": value})
    with pytest.raises(ConfigError, match=f"STREAM_SUPERVISOR_STRATEGY_PATTERN.*{why}"):
        settings.strategy()


def test_a_bad_lookback_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="STREAM_SUPERVISOR_STATS_LOOKBACK_DAYS"):
        load_settings({"STREAM_SUPERVISOR_STATS_LOOKBACK_DAYS": "three"})


# --------------------------------------------------------------------- report


def test_the_report_has_one_curve_per_strategy_and_opens_offline(
        history_url: str, tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    assert run_cli(["stats", "--database-url", history_url, "--from", D1.isoformat(),
                    "--to", D3.isoformat(), "--report", str(path)]) == 0

    page = path.read_text()
    figures = plotly_figures(page)
    wanted = {(a, s) for a, s, _ in HAND}
    assert {title for title in figures} == {f"{s} ({a}, USD)" for a, s in wanted}
    for (account, strategy) in wanted:
        traces = figures[f"{strategy} ({account}, USD)"]
        curves = [t for t in traces if t["name"] == "cumulative net P&L"]
        assert len(curves) == 1
        last_day = max(d for a, s, d in HAND if (a, s) == (account, strategy))
        assert curves[0]["y"][0] == 0  # the curve starts at 0
        assert curves[0]["y"][-1] == pytest.approx(
            float(HAND[(account, strategy, last_day)]["cum_net_pnl"]))
        assert curves[0]["fill"] == "tonexty"  # shaded down from the running peak
    # Self-contained: plotly.js is inline, nothing is fetched.
    assert "src=\"http" not in page and "Plotly.newPlot" in page
    assert len(page) > 1_000_000
    assert page.count('class="latest"') == len(wanted)
    assert "Not every day with trades is stored" not in page  # every day is


def test_the_report_says_which_figures_cover_only_the_stored_days(
        database_url: str, tmp_path: Path) -> None:
    """Ten days of -100 then a +50 day, only the last one stored (as a nightly run with a
    short lookback leaves it): the counts are labelled as of the stored days, a warning
    gives what the days not stored made, and the curve starts from it, not from 0."""
    from stream_supervisor.stats_report import write_report

    days = [D1 + timedelta(days=i) for i in range(11)]
    insert(database_url, [closed(n + 1, "A1", "AAPL", "alpha-1", "-100" if n < 10 else "50",
                                 at(day, "14:00"), at(day, "15:00"))
                          for n, day in enumerate(days)])
    run(database_url, days[-1], days[-1])
    page = Path(write_report(database_url, tmp_path / "r.html")).read_text()

    table_html = page[page.index('<table class="latest">'):]
    assert "<th>trades (stored days)</th>" in table_html
    assert "<th>net P&amp;L to date</th>" in table_html
    assert "Not every day with trades is stored" in page and "-1,000.00 net" in page
    [curve] = [t for t in plotly_figures(page)["alpha (A1, USD)"]
               if t["name"] == "cumulative net P&L"]
    assert curve["y"] == [-1000.0, -950.0]


def test_the_report_reads_one_snapshot(history_url: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A stats run committing a new strategy between the report's two reads: the report
    shows the strategies of one moment (a KeyError on the new one before)."""
    from stream_supervisor import pgconn
    from stream_supervisor.stats_report import write_report

    run(history_url, D1, D1)
    real = pgconn.connect
    fired: list[bool] = []

    class Between:
        """The report's connection; another run commits after its first read."""

        def __init__(self, conn: Any) -> None:
            self.conn, self.reads = conn, 0

        def __enter__(self) -> Any:
            self.conn.__enter__()
            return self

        def __exit__(self, *exc: object) -> Any:
            return self.conn.__exit__(*exc)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

        def __setattr__(self, name: str, value: Any) -> None:
            if name in ("conn", "reads"):
                object.__setattr__(self, name, value)
            else:
                setattr(self.conn, name, value)

        def execute(self, *args: Any, **kw: Any) -> Any:
            self.reads += 1
            if self.reads == 2 and not fired:
                fired.append(True)
                insert(history_url, [closed(90, "A1", "AAPL", "gamma-1", "5", at(D3, "09:00"),
                                            at(D3, "10:00"))])
                run(history_url, D3, D3)
            return self.conn.execute(*args, **kw)

    monkeypatch.setattr(pgconn, "connect", lambda *a, **k: Between(real(*a, **k)))
    page = Path(write_report(history_url, tmp_path / "r.html")).read_text()
    monkeypatch.undo()
    assert ("A1", "gamma", D3) in table(history_url, "strategy_stats")  # it did commit
    assert "gamma (A1, USD)" not in plotly_figures(page)
    assert "alpha (A1, USD)" in plotly_figures(page)


def test_a_report_path_that_cannot_be_written_is_refused_before_any_work(
        history_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "r.html"
    assert run_cli(["stats", "--database-url", history_url, "--date", D1.isoformat(),
                    "--report", str(missing)]) == 1
    assert f"cannot write the report: no directory {missing.parent}" in capsys.readouterr().err
    assert table(history_url, "strategy_stats") == {}
    assert run_cli(["stats", "--database-url", history_url, "--date", D1.isoformat(),
                    "--report", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def plotly_figures(page: str) -> dict[str, list[dict[str, Any]]]:
    """Figure title -> traces, read back from each Plotly.newPlot call."""
    decoder = json.JSONDecoder()
    out: dict[str, list[dict[str, Any]]] = {}
    at_ = 0
    while (at_ := page.find("Plotly.newPlot(", at_)) >= 0:
        at_ = page.index(",", at_) + 1  # past the div id
        traces, end = decoder.raw_decode(page, page.index("[", at_))
        layout, end = decoder.raw_decode(page, page.index("{", end))
        out[layout["title"]["text"]] = traces
        at_ = end
    return out


def test_the_report_without_plotly_names_the_extra(history_url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "plotly", None)  # as if not installed
    code = run_cli(["stats", "--database-url", history_url, "--report",
                    str(tmp_path / "r.html")])
    assert code == 78
    assert "pip install 'stream-supervisor[report]'" in capsys.readouterr().err
    assert table(history_url, "strategy_stats") == {}  # refused before any work
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------------------------- properties


CLIENT_IDS = st.one_of(
    st.none(),
    st.text(alphabet="ab-:_.x1\n", max_size=8),
    st.builds(lambda s, sep, rest: f"{s}{sep}{rest}", st.sampled_from(["alpha", "beta", "c"]),
              st.sampled_from(["-", ":"]), st.text(alphabet="0123456789abc", max_size=5)),
)


@st.composite
def histories(draw: st.DrawFn) -> list[Closed]:
    base = datetime(2026, 5, 4, tzinfo=UTC)
    out = []
    for pid in range(1, draw(st.integers(1, 25)) + 1):
        opened = base + timedelta(seconds=draw(st.integers(0, 4 * 86400)))
        closed_at = opened + timedelta(seconds=draw(st.integers(0, 2 * 86400)),
                                       microseconds=draw(st.integers(0, 999_999)))
        out.append(closed(
            pid, "P", draw(st.sampled_from(["AAPL", "MSFT"])), draw(CLIENT_IDS),
            str(D(draw(st.integers(-500, 500))) / 4), opened, closed_at,
            fees=str(D(draw(st.integers(0, 3))) / 4),
            origin=draw(st.sampled_from(["fill", "fill", "fill", "baseline"])),
        ))
    return out


@pytest.fixture(scope="module")
def property_db(pg_admin_uri: str, migrated_template: str) -> Iterator[str]:
    from stream_supervisor.embedded import create_database, drop_database

    name = f"ss_stats_props_{os.getpid()}"
    url = create_database(pg_admin_uri, name, template=migrated_template)
    try:
        yield url
    finally:
        drop_database(pg_admin_uri, name)


EXAMPLES = itertools.count(1)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories())
def test_any_history_matches_the_reference(property_db: str, history: list[Closed]) -> None:
    # position_history is append-only: each example writes under its own account and ids.
    n = next(EXAMPLES)
    account = f"P{n}"
    history = [dataclasses.replace(t, account_id=account, position_id=n * 1000 + t.position_id)
               for t in history]
    insert(property_db, history)
    days = DayRange(min(t.day for t in history), max(t.day for t in history))
    run(property_db, days.first, days.last, account_id=account)

    strategy_rows, symbol_rows = expected_tables(history, DEFAULT_STRATEGY_PATTERN, days.days())
    got = {k: v for k, v in table(property_db, "strategy_stats").items() if k[0] == account}
    assert not mismatches(got, strategy_rows, tol=1e-9)
    got_symbols = {k: v for k, v in table(property_db, "strategy_symbol_stats").items()
                   if k[0] == account}
    assert not mismatches(got_symbols, symbol_rows, tol=1e-9)


# Patterns in the common ground of both dialects (`.` and `$` are not: they differ on
# newlines, which the test above shows is caught); \b and \x need translating.
PATTERNS = [DEFAULT_STRATEGY_PATTERN, r"(?P<strategy>[a-z]+)\b", r"^(?:x|a)(?P<strategy>[^:]*)",
            r"(?P<pre>[a-z])(?P<strategy>\d*)", r"[.](?P<strategy>[\x61-c]+)\B"]


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=st.sampled_from(PATTERNS), client_order_id=CLIENT_IDS,
       origin=st.sampled_from(["fill", "baseline", "transfer"]))
def test_the_server_attributes_strategies_as_python_does(property_db: str, pattern: str,
                                                         client_order_id: str | None,
                                                         origin: str) -> None:
    from stream_supervisor.stats import _strategy_sql  # the expression `stats` runs

    parsed = StrategyPattern.parse(pattern)
    with psycopg.connect(property_db, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT {_strategy_sql('%(origin)s::text', '%(cid)s::text')}",
            {"pattern": parsed.postgres, "group": parsed.group, "origin": origin,
             "cid": client_order_id},
        ).fetchone()
    assert row is not None and row[0] == parsed.strategy_of(client_order_id, origin)


def test_column_lists_match_the_tables(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for name, columns in (("strategy_stats", STRATEGY_COLUMNS),
                              ("strategy_symbol_stats", SYMBOL_COLUMNS)):
            stored = [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                " ORDER BY ordinal_position", [name])]
            assert tuple(stored) == columns
            undocumented = conn.execute(
                "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = %s::regclass"
                " AND a.attnum > 0 AND col_description(a.attrelid, a.attnum) IS NULL",
                [name]).fetchall()
            assert undocumented == []
    assert set(PER_DAY_COLUMNS) < set(STRATEGY_COLUMNS)


def test_the_benchmark_runs_at_a_tiny_size_and_checks_its_rows(pg_admin_uri: str,
                                                                tmp_path: Path) -> None:
    """The harness end to end; BENCHMARKS.md has the figures, this asserts no speed."""
    from benchmarks.stats import main

    out = tmp_path / "stats-bench.json"
    assert main(["--database-url", pg_admin_uri, "--days", "6", "--strategies", "2",
                 "--trades", "3", "--nightly-runs", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["verified"] is True and results["problems"] == []
    assert results["parameters"]["closed_positions"] == 6 * 2 * 3
    assert results["strategy_rows"] == 6 * 3  # two strategies and the baseline, each day
    assert results["backfill_wall_s"] > 0 and results["nightly_wall_s"] > 0


def test_the_migration_keeps_existing_history_and_its_guard(empty_database_url: str,
                                                            tmp_path: Path) -> None:
    """0002 on a database that already has closed positions: they read as fills with no
    known fees, and the history stays append-only."""
    repo = Path(__file__).resolve().parents[1] / "migrations"
    only_first = tmp_path / "migrations"
    only_first.mkdir()
    (only_first / "0001_initial.sql").write_bytes((repo / "0001_initial.sql").read_bytes())
    apply_migrations(empty_database_url, only_first)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO position_history (position_id, account_id, symbol, side, qty, peak_qty,"
            " avg_entry_price, realized_pnl, alpaca_order_id, opened_at, closed_at)"
            " VALUES (1, 'A1', 'AAPL', 'long', 0, 1, 10, 5, 'o1', now(), now())")
    assert len(apply_migrations(empty_database_url, repo)) >= 1
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert conn.execute("SELECT origin, fees FROM position_history").fetchall() == [
            ("fill", D(0))]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE position_history SET fees = 1")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO active_positions (account_id, symbol, side, qty, avg_entry_price,"
                " alpaca_order_id, status, opened_at, peak_qty, origin)"
                " VALUES ('A1', 'AAPL', 'long', 1, 10, 'o2', 'open', now(), 1, 'Not A Word')")
