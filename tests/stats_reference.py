"""A Python reference for `stream_supervisor.stats`, for tests only: the same definitions
(docs/statistics.md) computed row by row in Decimal and float, with no SQL.

The tests compare every column the server computes with this, and this with figures
worked out by hand and with empyrical.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from stream_supervisor.strategy import strategy_of


@dataclass(frozen=True)
class Closed:
    """One position_history row, as much of it as statistics read."""

    position_id: int
    account_id: str
    symbol: str
    client_order_id: str | None
    realized_pnl: Decimal
    opened_at: datetime
    closed_at: datetime
    fees: Decimal = Decimal(0)
    origin: str = "fill"
    side: str = "long"

    @property
    def net(self) -> Decimal:
        return self.realized_pnl - self.fees

    @property
    def day(self) -> date:
        return self.closed_at.astimezone(UTC).date()

    @property
    def holding(self) -> Decimal:
        delta = self.closed_at - self.opened_at
        return Decimal(delta.days * 86400 + delta.seconds) + Decimal(delta.microseconds) / 10**6


def per_day(trades: Sequence[Closed]) -> dict[str, Any]:
    """The per-day columns over one group's trades (one strategy, or strategy and symbol,
    on one day)."""
    ordered = sorted(trades, key=lambda t: (t.closed_at, t.position_id))
    nets = [t.net for t in ordered]
    wins = [n for n in nets if n > 0]
    losses = [n for n in nets if n < 0]
    gross_profit = sum(wins, Decimal(0))
    gross_loss = -sum(losses, Decimal(0))
    holdings = sorted(float(t.holding) for t in ordered)
    streak = longest = 0
    for n in nets:
        streak = streak + 1 if n < 0 else 0
        longest = max(longest, streak)
    return {
        "trades": len(nets),
        "wins": len(wins),
        "losses": len(losses),
        "breakevens": sum(1 for n in nets if n == 0),
        "win_rate": len(wins) / len(nets),
        "gross_profit": gross_profit,
        "gross_loss": gross_loss,
        "net_pnl": sum(nets, Decimal(0)),
        "profit_factor": float(gross_profit / gross_loss) if gross_loss else None,
        "expectancy": sum(nets, Decimal(0)) / len(nets),
        "avg_win": gross_profit / len(wins) if wins else None,
        "avg_loss": -gross_loss / len(losses) if losses else None,
        "largest_win": max(wins) if wins else None,
        "largest_loss": min(losses) if losses else None,
        "avg_holding_seconds": float(sum((t.holding for t in ordered), Decimal(0)) / len(nets)),
        "median_holding_seconds": statistics.median(holdings),
        "max_consecutive_losses": longest,
    }


def to_date(history: Sequence[Closed], day: date) -> dict[str, Any]:
    """The to-date columns of one strategy at the end of `day`."""
    ordered = sorted((t for t in history if t.day <= day),
                     key=lambda t: (t.closed_at, t.position_id))
    nets = [t.net for t in ordered]
    cum = peak = Decimal(0)
    max_drawdown = Decimal(0)
    for n in nets:
        cum += n
        peak = max(peak, cum)
        max_drawdown = max(max_drawdown, peak - cum)
    daily: dict[date, Decimal] = defaultdict(Decimal)
    for t in ordered:
        daily[t.day] += t.net
    return {
        "cum_net_pnl": cum,
        "max_drawdown": max_drawdown,
        "sqn": _ratio(nets, math.sqrt(len(nets))),
        "sharpe_daily": _ratio(list(daily.values()), math.sqrt(252)),
    }


def _ratio(values: Sequence[Decimal], scale: float) -> float | None:
    """scale * mean / sample standard deviation; None under 2 values or no spread."""
    if len(values) < 2:
        return None
    sd = statistics.stdev(values)  # exact in Decimal, then one rounding
    if sd == 0:
        return None
    return scale * float(statistics.mean(values) / sd)


def expected_tables(history: Iterable[Closed], pattern: str, days: Iterable[date],
                    ) -> tuple[dict[tuple[Any, ...], dict[str, Any]],
                               dict[tuple[Any, ...], dict[str, Any]]]:
    """(strategy_stats, strategy_symbol_stats) rows for `days`, keyed like the tables."""
    wanted = set(days)
    by_strategy: dict[tuple[str, str], list[Closed]] = defaultdict(list)
    for t in history:
        by_strategy[(t.account_id, strategy_of(pattern, t.client_order_id, t.origin))].append(t)
    strategy_rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    symbol_rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for (account, strategy), trades in by_strategy.items():
        for day in sorted({t.day for t in trades} & wanted):
            today = [t for t in trades if t.day == day]
            strategy_rows[(account, strategy, day)] = per_day(today) | to_date(trades, day)
            for symbol in sorted({t.symbol for t in today}):
                symbol_rows[(account, strategy, symbol, day)] = per_day(
                    [t for t in today if t.symbol == symbol])
    return strategy_rows, symbol_rows


#: Columns whose value is a numeric division on the server (rounded to its scale there,
#: to Decimal's 28 digits here) or a float computed in a different order: compared
#: within a tolerance. Every other column must be equal.
APPROXIMATE = frozenset({
    "win_rate", "profit_factor", "expectancy", "avg_win", "avg_loss", "avg_holding_seconds",
    "median_holding_seconds", "sqn", "sharpe_daily",
})


def mismatches(got: dict[tuple[Any, ...], dict[str, Any]],
               want: dict[tuple[Any, ...], dict[str, Any]], tol: float = 1e-12) -> list[str]:
    out = []
    if set(got) != set(want):
        out.append(f"keys: extra {sorted(set(got) - set(want))}, "
                   f"missing {sorted(set(want) - set(got))}")
    for key in sorted(set(got) & set(want)):
        for column, value in want[key].items():
            actual = got[key][column]
            if column in APPROXIMATE and value is not None and actual is not None:
                if not math.isclose(float(actual), float(value), rel_tol=tol, abs_tol=tol):
                    out.append(f"{key} {column}: {actual!r} != {value!r}")
            elif actual != value:
                out.append(f"{key} {column}: {actual!r} != {value!r}")
    return out
