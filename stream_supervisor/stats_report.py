"""`stats --report FILE`: one self-contained HTML page of the stored statistics.

Per account, strategy and quote currency: the cumulative net P&L curve (one point per day
with trades, starting at 0) with its drawdowns shaded between the curve and its running
peak, and a table of the latest figures. plotly draws it and its JavaScript is inlined, so the file
opens offline; plotly is an optional extra (`stream-supervisor[report]`).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError
from .logs import get_logger

log = get_logger("stream_supervisor.stats_report")

REPORT_EXTRA: Final = "pip install 'stream-supervisor[report]'"
#: The trace every strategy's figure has exactly one of (tests look for it by name).
CURVE_NAME: Final = "cumulative net P&L"
PEAK_NAME: Final = "running peak"

_SERIES = """
SELECT account_id, strategy, currency, day, cum_net_pnl, net_pnl
FROM strategy_stats
WHERE %(account)s::text IS NULL OR account_id = %(account)s::text
ORDER BY account_id, strategy, currency, day
"""

# Totals over every stored day, the to-date figures of the latest one, and the net P&L of
# the days with trades that are not stored (the to-date figures hold them, the totals not).
_LATEST = """
WITH totals AS (
    SELECT account_id, strategy, currency, min(day) AS first_day, count(*) AS days,
           sum(trades) AS trades, sum(wins) AS wins, sum(losses) AS losses,
           sum(gross_profit) AS gross_profit, sum(gross_loss) AS gross_loss,
           sum(net_pnl) AS net
    FROM strategy_stats
    WHERE %(account)s::text IS NULL OR account_id = %(account)s::text
    GROUP BY account_id, strategy, currency
),
latest AS (
    SELECT DISTINCT ON (account_id, strategy, currency) account_id, strategy, currency, day,
           cum_net_pnl, max_drawdown, sqn, sharpe_daily
    FROM strategy_stats
    WHERE %(account)s::text IS NULL OR account_id = %(account)s::text
    ORDER BY account_id, strategy, currency, day DESC
)
SELECT t.account_id, t.strategy, t.currency, t.first_day, l.day, t.days, t.trades, t.wins,
       t.losses, t.wins::float8 / t.trades,
       CASE WHEN t.gross_loss > 0 THEN (t.gross_profit / t.gross_loss)::float8 END,
       l.cum_net_pnl, l.max_drawdown, l.sqn, l.sharpe_daily, l.cum_net_pnl - t.net
FROM totals t JOIN latest l USING (account_id, strategy, currency)
ORDER BY t.account_id, t.strategy, t.currency
"""

#: The table's columns: the counts and ratios are of the stored days only, the to-date
#: figures of the whole history (they differ when `stats` has not stored every day).
_LATEST_COLUMNS: Final = (
    "first stored day", "latest day", "days stored", "trades (stored days)",
    "wins (stored days)", "losses (stored days)", "win rate (stored days)",
    "profit factor (stored days)", "net P&L to date", "max drawdown to date", "SQN to date",
    "Sharpe to date (daily, annualised)",
)


def require_plotting() -> None:
    """ConfigError naming the extra when plotly is not installed."""
    try:
        import plotly  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"the HTML report needs plotly, which is an optional extra: {REPORT_EXTRA}"
        ) from None


def unwritable(path: str | Path) -> str | None:
    """Why the report cannot be written to `path` (checked before any work), or None."""
    out = Path(path)
    parent = out.parent
    if out.is_dir():
        return f"{out} is a directory"
    if not parent.is_dir():
        return f"no directory {parent}"
    if out.exists() and not os.access(out, os.W_OK):
        return f"{out} is not writable"
    if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable"
    return None


@dataclass(slots=True)
class _Strategy:
    account_id: str
    strategy: str
    currency: str
    days: list[date] = field(default_factory=list)
    cum: list[Decimal] = field(default_factory=list)
    first_net: Decimal = Decimal(0)
    latest: tuple[Any, ...] = ()
    #: Net P&L of days with trades that are not stored: 0 when the stored days are all.
    unstored: Decimal = Decimal(0)


def write_report(conninfo: str, path: str | Path, *, account_id: str | None = None) -> str:
    """Write the report of every stored strategy (of `account_id`, or all) to `path`;
    returns the path written."""
    require_plotting()
    import psycopg

    from . import pgconn
    from .errors import StoreError

    try:
        with pgconn.connect(conninfo, autocommit=True, prepare_threshold=None,
                            application_name="stream-supervisor stats report") as conn:
            # Both reads in one snapshot: a stats run committing between them would give
            # table figures for a strategy whose curve was never read.
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            params = {"account": account_id}
            strategies: dict[tuple[str, str, str], _Strategy] = {}
            with conn.transaction():
                for acct, strategy, currency, day, cum, net in conn.execute(_SERIES, params):
                    entry = strategies.setdefault((acct, strategy, currency),
                                                  _Strategy(acct, strategy, currency,
                                                            first_net=net))
                    entry.days.append(day)
                    entry.cum.append(cum)
                for row in conn.execute(_LATEST, params):
                    entry = strategies[(row[0], row[1], row[2])]
                    entry.latest, entry.unstored = tuple(row[3:-1]), row[-1]
    except psycopg.Error as exc:
        raise StoreError(f"stats report failed: {pgconn.error_text(exc, conninfo)}") from None
    page = render(list(strategies.values()))
    out = Path(path)
    out.write_text(page, encoding="utf-8")
    log.info("stats_report_written", path=str(out), strategies=len(strategies),
             bytes=len(page.encode()))
    return str(out)


def render(strategies: Sequence[_Strategy]) -> str:
    import plotly.io as pio  # type: ignore[import-untyped]

    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections: list[str] = []
    for n, s in enumerate(strategies):
        figure = _figure(s)
        # plotly.js once, inline, in the first figure; the others reuse it.
        div = pio.to_html(figure, include_plotlyjs=(n == 0), full_html=False,
                          div_id=f"curve-{n}", default_height="420px")
        sections.append(
            f'<section class="strategy" data-account="{_e(s.account_id)}" '
            f'data-strategy="{_e(s.strategy)}" data-currency="{_e(s.currency)}">\n'
            f'<h2>{_e(s.strategy)} <small>account {_e(s.account_id)}, P&amp;L in '
            f'{_e(s.currency)}</small></h2>\n{div}\n'
            f'{_latest_table(s)}\n</section>'
        )
    body = "\n".join(sections) or "<p>No statistics stored yet: run <code>stream-supervisor " \
        "stats</code> first.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>stream-supervisor strategy statistics</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f4f4f4; }}
small {{ color: #777; font-weight: normal; }}
</style>
</head>
<body>
<h1>Strategy statistics</h1>
<p>Generated {generated} from <code>strategy_stats</code>. Net P&amp;L is realized P&amp;L
less known fees, in the quote currency of the trades (USD for equities and options, the
pair's quote for crypto), one section per strategy and currency: figures in different
currencies are never added. The curve has one point per stored day and starts at 0
(or at what days before the first stored one made); the shaded area is the drawdown from
the curve's running peak. In the table, counts and ratios are over the stored days, the
to-date figures over the whole history; the max drawdown is measured trade by trade, so
it can exceed what the daily curve shows.</p>
{body}
</body>
</html>
"""


def _figure(s: _Strategy) -> Any:
    import plotly.graph_objects as go  # type: ignore[import-untyped]

    # The curve before the first stored day: 0 before the first trade, or what the days
    # before it (not stored) had made.
    start = s.days[0] - timedelta(days=1)
    x = [start.isoformat()] + [d.isoformat() for d in s.days]
    y = [float(s.cum[0] - s.first_net)] + [float(v) for v in s.cum]
    peak: list[float] = []
    for value in y:
        peak.append(max(value, peak[-1] if peak else 0.0))
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=x, y=peak, name=PEAK_NAME, mode="lines",
                                line={"color": "rgba(120,120,120,0.8)", "width": 1,
                                      "dash": "dot"}))
    figure.add_trace(go.Scatter(x=x, y=y, name=CURVE_NAME, mode="lines",
                                line={"color": "#1f5fa8", "width": 2}, fill="tonexty",
                                fillcolor="rgba(214,39,40,0.25)"))
    figure.update_layout(title={"text": f"{s.strategy} ({s.account_id}, {s.currency})"},
                         yaxis_title=f"net P&L ({s.currency})", hovermode="x unified",
                         margin={"l": 60, "r": 20, "t": 50, "b": 40},
                         legend={"orientation": "h"})
    return figure


def _latest_table(s: _Strategy) -> str:
    cells = "".join(f"<td>{_e(_fmt(v))}</td>" for v in s.latest)
    head = "".join(f"<th>{_e(c)}</th>" for c in _LATEST_COLUMNS)
    table = f'<table class="latest"><tr>{head}</tr><tr>{cells}</tr></table>'
    if s.unstored == 0:
        return table
    return (f'<p class="partial"><strong>Not every day with trades is stored</strong>: the '
            f'counts and ratios cover the stored days only, the to-date figures the whole '
            f'history, whose days not stored made {_e(_fmt(s.unstored))} net. Run '
            f'<code>stream-supervisor stats --from &lt;first day&gt;</code> to store them.'
            f'</p>\n{table}')


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, Decimal):
        return f"{value:,.2f}"
    return str(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
