"""`stream-supervisor check`: integrity checks on the stored tables, layer by layer.

Every check is one query over a single consistent snapshot (a read-only repeatable-read
transaction), so a running writer cannot produce false alarms. Each finding names its
layer (event, order, position, cursor), what is wrong, and the rows involved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from . import pgconn
from .errors import SchemaNotMigrated, StoreError
from .pgstore import TABLES

#: A cursor this far ahead of the database clock is "in the future" (broker vs our clock).
CURSOR_FUTURE_TOLERANCE: Final = "5 minutes"
#: At most this many rows are reported per check (the count is always given).
MAX_ROWS_PER_CHECK: Final = 20


@dataclass(frozen=True, slots=True)
class Violation:
    layer: str  # event, order, position, cursor
    what: str  # a short name for the rule broken
    detail: str  # the rows involved

    def __str__(self) -> str:
        return f"[{self.layer}] {self.what}: {self.detail}"


# Each query takes %(acct)s (NULL = every account) and returns rows whose columns are
# formatted into the detail. `fill_keys` parses `fill:<order id>:<cumulative qty>`.
_FILL_KEYS = r"""
fill_keys AS (
    SELECT event_key, account_id,
           substring(event_key FROM '^fill:(.*):[^:]*$') AS order_id,
           substring(event_key FROM ':([^:]*)$') AS cum_text
    FROM alpaca_event_dedupe
    WHERE event_key LIKE 'fill:%%'
      AND (%(acct)s::text IS NULL OR account_id = %(acct)s)
),
parsed AS (
    SELECT event_key, account_id, order_id,
           CASE WHEN cum_text ~ '^[0-9]+(\.[0-9]+)?$' THEN cum_text::numeric END AS cum_qty
    FROM fill_keys
)
"""

_ACCT = "(%(acct)s::text IS NULL OR account_id = %(acct)s)"
#: A multi-leg parent has no symbol or side of its own, and its average may be a net
#: credit (negative): its legs are the orders that trade (docs/design.md, section 10).
_NOT_MLEG = "AND order_class IS DISTINCT FROM 'mleg' "


@dataclass(frozen=True, slots=True)
class _Check:
    layer: str
    what: str
    sql: str
    detail: Callable[[tuple[Any, ...]], str]


_CHECKS: Final = (
    _Check(
        "event",
        "malformed fill key",
        f"WITH {_FILL_KEYS} SELECT event_key FROM parsed "
        "WHERE order_id IS NULL OR order_id = '' OR cum_qty IS NULL OR cum_qty <= 0 "
        "ORDER BY event_key",
        lambda r: f"key {r[0]!r} is not fill:<order id>:<positive cumulative qty>",
    ),
    _Check(
        "event",
        "duplicate fill keys",
        f"WITH {_FILL_KEYS} SELECT order_id, cum_qty, array_agg(event_key ORDER BY event_key) "
        "FROM parsed WHERE cum_qty IS NOT NULL GROUP BY order_id, cum_qty HAVING count(*) > 1 "
        "ORDER BY order_id, cum_qty",
        lambda r: f"order {r[0]} cumulative qty {r[1]} stored under {len(r[2])} keys: "
        + ", ".join(r[2]),
    ),
    _Check(
        "event",
        "fill key beyond the order",
        f"WITH {_FILL_KEYS} SELECT p.event_key, o.filled_qty FROM parsed p "
        "LEFT JOIN broker_orders o ON o.alpaca_order_id = p.order_id "
        "WHERE p.cum_qty IS NOT NULL AND (o.alpaca_order_id IS NULL OR p.cum_qty > o.filled_qty) "
        "ORDER BY p.event_key",
        lambda r: f"key {r[0]} but the order's stored filled_qty is "
        + ("missing (no broker_orders row)" if r[1] is None else str(r[1])),
    ),
    _Check(
        "order",
        "negative quantity or price",
        "SELECT alpaca_order_id, qty, filled_qty, filled_avg_price FROM broker_orders "
        f"WHERE {_ACCT} AND (filled_qty < 0 OR qty < 0 OR filled_avg_price < 0) {_NOT_MLEG}"
        "ORDER BY alpaca_order_id",
        lambda r: f"order {r[0]}: qty {r[1]}, filled_qty {r[2]}, filled_avg_price {r[3]}",
    ),
    _Check(
        "order",
        "filled more than ordered",
        "SELECT alpaca_order_id, qty, filled_qty FROM broker_orders "
        f"WHERE {_ACCT} AND qty IS NOT NULL AND filled_qty > qty ORDER BY alpaca_order_id",
        lambda r: f"order {r[0]}: filled_qty {r[2]} > qty {r[1]}",
    ),
    _Check(
        "order",
        "fill without an average price",
        "SELECT alpaca_order_id, filled_qty FROM broker_orders "
        f"WHERE {_ACCT} AND filled_qty > 0 AND filled_avg_price IS NULL {_NOT_MLEG}"
        "ORDER BY alpaca_order_id",
        lambda r: f"order {r[0]}: filled_qty {r[1]} but filled_avg_price is NULL",
    ),
    _Check(
        "order",
        "unknown side",
        f"SELECT alpaca_order_id, side FROM broker_orders WHERE {_ACCT} "
        f"AND side NOT IN ('buy', 'sell') {_NOT_MLEG}ORDER BY alpaca_order_id",
        lambda r: f"order {r[0]}: side {r[1]!r}",
    ),
    _Check(
        "position",
        "several open positions for one symbol",
        "SELECT account_id, symbol, array_agg(id ORDER BY id) FROM active_positions "
        f"WHERE {_ACCT} AND status = 'open' GROUP BY account_id, symbol HAVING count(*) > 1 "
        "ORDER BY account_id, symbol",
        lambda r: f"account {r[0]} {r[1]}: open positions {', '.join(map(str, r[2]))}",
    ),
    _Check(
        "position",
        "net position differs from the orders",
        f"""
        WITH held AS (
            SELECT account_id, symbol,
                   sum(CASE side WHEN 'long' THEN qty ELSE -qty END) AS qty
            FROM active_positions WHERE {_ACCT} AND status = 'open'
            GROUP BY account_id, symbol
        ), traded AS (
            -- Fills count beyond each order's baseline; adjustments (section 9) carry the
            -- rest: a baseline, a rebaseline or a reconcile moved the net by after - before;
            -- non-trade activities (section 10) by their effects. A multi-leg parent
            -- trades through its legs.
            SELECT account_id, symbol, sum(qty) AS qty FROM (
                SELECT account_id, symbol,
                       CASE side WHEN 'buy' THEN filled_qty - baseline_qty
                                 WHEN 'sell' THEN baseline_qty - filled_qty
                                 ELSE 0 END AS qty
                FROM broker_orders WHERE {_ACCT} {_NOT_MLEG}
                UNION ALL
                SELECT account_id, symbol, qty_after - qty_before
                FROM position_adjustments WHERE {_ACCT}
                UNION ALL
                SELECT account_id, e.key, e.value::numeric
                FROM account_activities, jsonb_each_text(effects) AS e
                WHERE {_ACCT}
            ) moves
            GROUP BY account_id, symbol
        )
        SELECT account_id, symbol, coalesce(h.qty, 0), coalesce(t.qty, 0)
        FROM held h FULL JOIN traded t USING (account_id, symbol)
        WHERE coalesce(h.qty, 0) <> coalesce(t.qty, 0)
        ORDER BY account_id, symbol
        """,
        lambda r: f"account {r[0]} {r[1]}: open positions net {r[2]}, "
        f"orders' signed filled_qty beyond their baselines plus adjustments {r[3]}",
    ),
    _Check(
        "position",
        "closed position without history",
        "SELECT p.id, p.account_id, p.symbol FROM active_positions p "
        "LEFT JOIN position_history h ON h.position_id = p.id "
        "WHERE (%(acct)s::text IS NULL OR p.account_id = %(acct)s) AND p.status = 'closed' "
        "AND h.position_id IS NULL ORDER BY p.id",
        lambda r: f"position {r[0]} (account {r[1]} {r[2]}) is closed but not in position_history",
    ),
    _Check(
        "position",
        "history without a closed position",
        "SELECT h.position_id, h.account_id, h.symbol, p.status FROM position_history h "
        "JOIN active_positions p ON p.id = h.position_id "
        "WHERE (%(acct)s::text IS NULL OR h.account_id = %(acct)s) "
        "AND p.status <> 'closed' ORDER BY h.position_id",
        # A closed row gone is what `prune` does once history holds it: not a violation.
        lambda r: f"position_history {r[0]} (account {r[1]} {r[2]}): its active_positions "
        f"row is {r[3]}",
    ),
    _Check(
        "position",
        "history differs from its closed position",
        "SELECT h.position_id, h.account_id, h.symbol FROM position_history h "
        "JOIN active_positions p ON p.id = h.position_id AND p.status = 'closed' "
        "WHERE (%(acct)s::text IS NULL OR h.account_id = %(acct)s) AND "
        "(h.account_id, h.symbol, h.side, h.qty, h.peak_qty, h.avg_entry_price, h.realized_pnl, "
        " h.alpaca_order_id, h.opened_at, h.closed_at) IS DISTINCT FROM "
        "(p.account_id, p.symbol, p.side, p.qty, p.peak_qty, p.avg_entry_price, p.realized_pnl, "
        " p.alpaca_order_id, p.opened_at, p.closed_at) ORDER BY h.position_id",
        lambda r: f"position {r[0]} (account {r[1]} {r[2]}): history row and closed row disagree",
    ),
    _Check(
        "cursor",
        "cursor in the future",
        "SELECT account_id, fill_time FROM stream_cursors "
        f"WHERE {_ACCT} AND fill_time > now() + interval '{CURSOR_FUTURE_TOLERANCE}' "
        "ORDER BY account_id",
        lambda r: f"account {r[0]}: fill_time {r[1].isoformat()} is ahead of the database clock",
    ),
    _Check(
        "cursor",
        "fills stored but no cursor",
        "SELECT o.account_id, count(*) FROM broker_orders o "
        "LEFT JOIN stream_cursors c ON c.account_id = o.account_id "
        "WHERE (%(acct)s::text IS NULL OR o.account_id = %(acct)s) AND o.filled_qty > 0 "
        "AND c.fill_time IS NULL GROUP BY o.account_id ORDER BY o.account_id",
        lambda r: f"account {r[0]}: {r[1]} order(s) with fills, but the cursor never moved",
    ),
)


def run_checks(conninfo: str, account_id: str | None = None) -> list[Violation]:
    """Every violation found, in layer order (an empty list means all checks passed).

    Raises `store.StoreUnavailable` / `settings.ConfigError` when the database cannot be
    reached, `pgstore.SchemaNotMigrated` when it has no schema, `store.StoreError` when a
    query fails; messages never hold the password.
    """
    out: list[Violation] = []
    params = {"acct": account_id}
    with pgconn.connect(
        conninfo, autocommit=True, application_name="stream-supervisor check",
        prepare_threshold=None,
    ) as conn:
        try:
            missing = conn.execute(
                "SELECT array(SELECT t FROM unnest(%s::text[]) t WHERE to_regclass(t) IS NULL)",
                [list(TABLES)],
            ).fetchone()
            if missing and missing[0]:
                raise SchemaNotMigrated(
                    f"the database ({pgconn.describe(conninfo)}) is not migrated (missing "
                    f"tables: {', '.join(missing[0])}): run `stream-supervisor migrate` first"
                )
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                for check in _CHECKS:
                    rows = conn.execute(check.sql, params).fetchall()
                    for row in rows[:MAX_ROWS_PER_CHECK]:
                        out.append(Violation(check.layer, check.what, check.detail(tuple(row))))
                    if len(rows) > MAX_ROWS_PER_CHECK:
                        out.append(Violation(
                            check.layer, check.what,
                            f"... and {len(rows) - MAX_ROWS_PER_CHECK} more",
                        ))
        except psycopg.Error as exc:
            raise StoreError(f"check failed: {pgconn.error_text(exc, conninfo)}") from None
    return out


def format_violations(violations: list[Violation]) -> str:
    """Human-readable report: one line per violation, grouped by layer, with a verdict."""
    if not violations:
        return "check: OK, no violations (event, order, position, cursor layers)"
    lines = [f"check: {len(violations)} violation(s)"]
    for layer in ("event", "order", "position", "cursor"):
        found = [v for v in violations if v.layer == layer]
        if found:
            lines.append(f"{layer} layer:")
            lines.extend(f"  {v.what}: {v.detail}" for v in found)
    others = [v for v in violations if v.layer not in ("event", "order", "position", "cursor")]
    lines.extend(str(v) for v in others)
    return "\n".join(lines)


__all__ = ["Violation", "format_violations", "run_checks"]
