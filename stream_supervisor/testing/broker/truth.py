"""The simulated broker's ground truth: its orders, fills and positions as it knows them,
in the recorded fixture's schema, with what was streamed and every counter. This is what
`verify.py` holds a store against.
"""

from __future__ import annotations

import decimal
from typing import Any

from .feeds import Feeds
from .market import Market
from .wire import CTX, decimal_text, decimal_text_opt, round12


def ground_truth(
    market: Market, feeds: Feeds, stats: dict[str, int], injected: dict[str, int]
) -> dict[str, Any]:
    """The broker's final (or current) state, in the recorded fixture's schema.

    A fill is `streamed` once its update was handed to a listening client's socket
    (an abrupt reset right after may still lose it in flight); `updates_played`
    counts such updates, `stats["updates_unsent"]` the others.
    """
    crypto = {s.name for s in market.symbols if s.asset_class == "crypto"}
    with decimal.localcontext(CTX):
        orders = {
            o.id: {
                "symbol": o.symbol.name,
                "side": o.side,
                "qty": decimal_text(o.qty),
                "filled_qty": decimal_text(o.filled_qty),
                "filled_avg_price": decimal_text_opt(o.avg_price()),
                "status": o.status,
                **({"order_class": "mleg"} if o.legs else {}),
                "fills": [
                    {
                        "qty": decimal_text(f.qty),
                        "price": decimal_text(f.price),
                        "cum_qty": decimal_text(f.cum_qty),
                        "activity_id": f.activity_id,
                        "streamed": feeds.streamed(f.update_index),
                    }
                    for f in o.fills
                ],
            }
            for o in market.orders.values()
        }
        positions = {
            name: {
                "qty": decimal_text(p.qty),
                "avg_entry_price": decimal_text_opt(round12(p.avg)),
                "realized_pnl": decimal_text(p.realized),
                # A crypto fee leaves the broker's position at the fill and ours only when
                # its CFEE activity posts: buys in between average over a different
                # quantity, so the average and P&L are path-dependent (design.md, section 10).
                **({"prices_exact": False} if name in crypto else {}),
            }
            for name, p in market.positions.items()
        }
    config = market.config
    return {
        "orders": orders,
        "positions": positions,
        "fills_total": market.fills_total,
        "version": 1,
        "seed": config.seed,
        "scenario": config.scenario,
        "account_id": market.account_id,
        "symbols": list(config.symbols),
        "finished": market.finished,
        "updates_total": market.updates_total,
        "updates_played": feeds.updates_played,
        "injected": dict(injected),
        "stats": dict(stats),
    }
