"""`stream-supervisor reconcile`: stored open positions against the broker's
`GET /v2/positions`, symbol by symbol. Exit 1 on any difference."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .activities import APPLIED, ActivityRecord
from .logs import get_logger
from .protocol import stored_symbol
from .settings import Settings
from .wiring import http_rest, pg_store

log = get_logger("stream_supervisor.reconcile")


def compare_positions(
    stored: dict[str, Decimal], broker: list[dict[str, Any]]
) -> list[tuple[str, Decimal, Decimal]]:
    """(symbol, ours, broker's) for every symbol whose signed net quantity differs."""
    theirs: dict[str, Decimal] = {}
    for row in broker:
        qty = Decimal(str(row["qty"]))
        if str(row.get("side", "long")) == "short" and qty > 0:
            qty = -qty  # Alpaca reports short quantities negative; be lenient if not
        # The broker spells a crypto pair without its slash here (`BTCUSD`): compare under
        # the stored spelling (docs/design.md, section 10).
        cls = row.get("asset_class")
        theirs[stored_symbol(str(row["symbol"]), str(cls) if cls else None)] = qty
    out = []
    for symbol in sorted(set(stored) | set(theirs)):
        ours, broker_qty = stored.get(symbol, Decimal(0)), theirs.get(symbol, Decimal(0))
        if ours != broker_qty:
            out.append((symbol, ours, broker_qty))
    return out


def unapplied_activities(activities: list[ActivityRecord]) -> list[str]:
    """One line per stored non-trade activity that changed nothing: a type the service
    does not understand, or one that found no position to change. Never guessed at;
    an operator decides (docs/design.md, section 10)."""
    return [
        f"activity {a.activity_id} {a.activity_type} {a.symbol or '-'} qty {a.qty}: {a.outcome}"
        for a in activities if a.outcome != APPLIED
    ]


async def reconcile(settings: Settings) -> int:
    async with http_rest(settings) as rest:
        account_id = settings.account_id or await rest.account_id()
        broker = await rest.positions()
    store = pg_store(settings)
    await store.open()
    try:
        snapshot = await store.snapshot(account_id)
    finally:
        await store.aclose()
    stored: dict[str, Decimal] = {}
    for pos in snapshot.positions:
        if pos.is_open:
            stored[pos.symbol] = stored.get(pos.symbol, Decimal(0)) + pos.qty
    diffs = compare_positions(stored, broker)
    for symbol, ours, theirs in diffs:
        log.warning("reconcile_difference", symbol=symbol, ours=str(ours), broker=str(theirs))
        print(f"{symbol}: stored {ours}, broker {theirs}")
    for line in unapplied_activities(snapshot.activities):
        log.warning("reconcile_unapplied_activity", detail=line)
        print(line)
    print(f"reconcile: {len(stored) + len(broker)} positions compared, {len(diffs)} differ")
    return 1 if diffs else 0
