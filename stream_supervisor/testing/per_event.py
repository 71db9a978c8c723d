"""The per-event consumer users write today, for the demo to run beside the service.

What the SDK's stream client plus a hand-written handler amounts to: connect, listen, and
for every update one transaction (a row per fill, the position moved by the fill's
quantity); on a disconnect, reconnect and carry on from whatever arrives next. No event
keys, no dedupe table, no REST backfill, no cursor. A repeated frame is applied twice and
the fills of an outage are never seen: exactly the failures stream-supervisor exists for.
It writes into a schema of its own (`per_event`) so its rows never mix with the service's.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import psycopg
import trio

from ..errors import TransportClosed, UpgradeRejected
from ..events import Event
from ..protocol import Authorization, Listening, authenticate_message, decode_frame, listen_message
from ..wsclient import websocket_connector

SCHEMA: Final = "per_event"
#: How long the handler waits before reconnecting (an SDK's fixed retry delay).
RECONNECT_DELAY: Final = 0.5

_CREATE: Final = f"""
DROP SCHEMA IF EXISTS {SCHEMA} CASCADE;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.fills (
    id bigserial PRIMARY KEY, order_id text NOT NULL, symbol text NOT NULL,
    side text NOT NULL, qty numeric NOT NULL, price numeric NOT NULL,
    order_filled_qty numeric NOT NULL, received_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {SCHEMA}.positions (symbol text PRIMARY KEY, qty numeric NOT NULL);
CREATE TABLE {SCHEMA}.orders (order_id text PRIMARY KEY, status text NOT NULL);
"""
_FILL: Final = f"""INSERT INTO {SCHEMA}.fills (order_id, symbol, side, qty, price,
    order_filled_qty) VALUES (%s, %s, %s, %s, %s, %s)"""
_MOVE: Final = f"""INSERT INTO {SCHEMA}.positions AS p (symbol, qty) VALUES (%s, %s)
ON CONFLICT (symbol) DO UPDATE SET qty = p.qty + EXCLUDED.qty"""
_STATUS: Final = f"""INSERT INTO {SCHEMA}.orders AS o (order_id, status) VALUES (%s, %s)
ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status"""


@dataclass
class PerEventStats:
    updates: int = 0
    connections: int = 0
    refused: int = 0  # upgrades answered 429 while the broker held the old session


def create_schema(database_url: str) -> None:
    """A fresh `per_event` schema (dropped and made again: one demo at a time)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_CREATE)


def _handle(conn: psycopg.Connection[Any], ev: Event) -> None:
    """One update, one transaction: what a per-event handler does."""
    with conn.transaction():
        if ev.is_fill and ev.fill_qty is not None and ev.fill_price is not None:
            conn.execute(_FILL, [ev.order_id, ev.symbol, ev.side, ev.fill_qty, ev.fill_price,
                                 ev.cum_qty])
            signed = ev.fill_qty if ev.side == "buy" else -ev.fill_qty
            conn.execute(_MOVE, [ev.symbol, signed])
        conn.execute(_STATUS, [ev.order_id, ev.status])


async def run_per_event_consumer(
    ws_url: str,
    key_id: str,
    secret_key: str,
    database_url: str,
    stats: PerEventStats,
    *,
    connect_timeout: float = 5.0,
    listening: trio.Event | None = None,
) -> None:
    """Consume until cancelled. The database work runs in a worker thread, so the event
    loop it shares with the demo's supervisor keeps going (a real one would block).
    `listening` is set once the broker first confirms the subscription: a market started
    before that would trade fills this consumer never had a chance to see."""
    conn: psycopg.Connection[Any] = await trio.to_thread.run_sync(
        lambda: psycopg.connect(database_url))
    connector = websocket_connector(connect_timeout=connect_timeout)
    try:
        while True:
            try:
                async with connector(ws_url) as ws:
                    await ws.send_message(authenticate_message(key_id, secret_key))
                    if not isinstance(decode_frame(await ws.get_message()), Authorization):
                        raise TransportClosed("not authorized")
                    await ws.send_message(listen_message())
                    stats.connections += 1
                    while True:
                        for message in await ws.get_messages():
                            frame = decode_frame(message)
                            if isinstance(frame, Event):
                                stats.updates += 1
                                await trio.to_thread.run_sync(_handle, conn, frame)
                            elif isinstance(frame, Listening) and listening is not None:
                                listening.set()
            except UpgradeRejected:
                stats.refused += 1
            except TransportClosed:
                pass
            await trio.sleep(RECONNECT_DELAY)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close)


@dataclass(frozen=True, slots=True)
class PerEventResult:
    positions: dict[str, Decimal]  # symbol -> net quantity
    fill_rows: int
    duplicate_fill_rows: int  # rows beyond the first for one (order, cumulative qty)
    fills_seen: frozenset[tuple[str, Decimal]]  # (order id, cumulative qty after the fill)


def read_result(database_url: str) -> PerEventResult:
    with psycopg.connect(database_url) as conn:
        positions = {sym: qty for sym, qty in conn.execute(
            f"SELECT symbol, qty FROM {SCHEMA}.positions")}
        rows = conn.execute(
            f"SELECT order_id, order_filled_qty FROM {SCHEMA}.fills"
        ).fetchall()
    seen = frozenset((order_id, Decimal(cum)) for order_id, cum in rows)
    return PerEventResult(positions, len(rows), len(rows) - len(seen), seen)

__all__ = ["PerEventResult", "PerEventStats", "create_schema", "read_result",
           "run_per_event_consumer"]
