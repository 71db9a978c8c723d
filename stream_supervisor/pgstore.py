"""The store contract on PostgreSQL: what production writes through.

One synchronous psycopg connection, driven from one worker thread at a time (Trio's
`to_thread` under a `CapacityLimiter(1)`; psycopg's async API is asyncio-only). A batch
is one transaction in two pipelined round trips, set-based whatever its size: claim the
dedupe keys and lock the touched state; then, after the pure ledger has run, write
orders, positions, history, cursor and dead letters, and commit.

Longer than our other modules on purpose: half of it is the SQL text, kept beside the
code that binds each statement's parameters so a reader checks both in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, Final, TypeVar

import msgspec
import psycopg
import trio
from psycopg import pq
from psycopg.types.json import Jsonb

from . import pgconn
from .activities import ACCOUNT_WIDE, ActivityRecord, PositionChange
from .adjustments import (
    RECONCILE,
    Adjustment,
    baseline_order,
    origin_of,
    plan_adjustments,
    unsettled_symbols,
)
from .errors import (
    ConfigError,
    LostLeadership,
    SchemaNotMigrated,
    StoreDataError,
    StoreError,
    StoreRejected,
    StoreUnavailable,
)
from .events import DeadLetter, Event, decimal_text
from .ledger import Cursor, apply_events, cursor_of, recorded_moments, touched
from .logs import get_logger
from .orders import TERMINAL_STATUSES, OrderState
from .positions import Position
from .store import (
    Batch,
    BatchResult,
    BrokerWord,
    ReplayMark,
    StoredDeadLetter,
    StoreSnapshot,
    replay_outcome,
)
from .threadhop import run_in_thread

T = TypeVar("T")

log = get_logger("stream_supervisor.pgstore")

_json_encode: Final = msgspec.json.Encoder().encode

#: Tables the store reads and writes; `open()` refuses a database without them.
TABLES: Final = (
    "alpaca_event_dedupe",
    "broker_orders",
    "active_positions",
    "position_history",
    "stream_cursors",
    "dead_letters",
    "position_adjustments",
    "account_activities",
    "baseline_moments",
    "position_changes",
)
#: The newest migration this code needs (`migrations/<name>.sql`): the history insert
#: copies `origin` and `fees` (0002), the replay marks write `dead_letters.replayed_at`
#: and `replay_result` and the leader reads `replay_requested_at` (0003); baselines and
#: reconcile write `position_adjustments` and `broker_orders.baseline_qty` (0004, whose
#: table is in TABLES too); positions carry their asset class and multiplier, orders their
#: class and parent, and `account_activities` holds the non-trade activities (0006);
#: `baseline_moments` decides which activities a baseline already holds, and
#: `position_changes` records what each activity did (0007); a reconcile's moment says
#: which later fills it already holds (`baseline_moments.reconciled_at`, 0008, which also
#: lets replicas say which accounts they serve).
REQUIRED_MIGRATION: Final = "0010_upgrade_repairs"
#: Prepare every statement on first use: the batch statements run on every batch with
#: the same text (arrays or one JSON document, not per-row SQL), so each is parsed once
#: per session. They are still planned per execution (`plan_cache_mode` in `_SESSION`): a
#: generic plan is made without the parameters' values (how many keys, orders, symbols a
#: batch holds), and the ones PostgreSQL settled on after five executions tripled the
#: server's CPU per event as the tables grew (BENCHMARKS.md).
PREPARE_THRESHOLD: Final = 0
#: A session left idle inside a transaction (a stuck thread) is ended by the server, so it
#: cannot hold row locks for ever; it is never shorter than this.
MIN_IDLE_IN_TRANSACTION_MS: Final = 60_000


# --- SQL -------------------------------------------------------------------------------

#: The server's side of TCP keepalives too (the client's are `pgconn.KEEPALIVE_DEFAULTS`):
#: a leader whose host froze or fell off the network holds the writer lock only until
#: the server gives up on its idle session, ~25 s, not the 2 hours of the usual kernel
#: defaults (docs/design.md, section 7). Ignored on a Unix socket.
_SESSION = """
SELECT set_config('statement_timeout', %s, false),
       set_config('idle_in_transaction_session_timeout', %s, false),
       set_config('TimeZone', 'UTC', false),
       set_config('plan_cache_mode', 'force_custom_plan', false),
       set_config('tcp_keepalives_idle', '10', false),
       set_config('tcp_keepalives_interval', '5', false),
       set_config('tcp_keepalives_count', '3', false)
"""

_SCHEMA_CHECK = """
SELECT array(SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NULL),
       to_regclass('stream_supervisor_migrations') IS NOT NULL
"""
_MIGRATION_APPLIED = (
    "SELECT EXISTS (SELECT 1 FROM stream_supervisor_migrations WHERE version = %s)"
)

# The batch statements of every batch (the key claim, orders, positions) take their rows
# as one JSON parameter (an array of arrays, in batch order), encoded by msgspec:
# psycopg's array dumpers, one Python call per element, cost more of the writer's Python
# than anything else but the ledger (BENCHMARKS.md).
# Text is NUL-free by then (`_text`: jsonb refuses \u0000, as text columns refuse NUL),
# decimals travel as their exact text and timestamps as RFC 3339.
_CLAIM_KEYS = """
INSERT INTO alpaca_event_dedupe (event_key, account_id, event_type, source)
SELECT r->>0, %(acct)s, r->>1, r->>2
FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS u(r, n)
ORDER BY n
ON CONFLICT (event_key) DO NOTHING
RETURNING event_key
"""

_ORDER_COLUMNS = """alpaca_order_id, symbol, side, status, filled_qty, filled_avg_price,
    client_order_id, qty, order_type, asset_class, created_at, updated_at, revised_at,
    order_class, parent_order_id"""

_LOCK_ORDERS = f"""
SELECT {_ORDER_COLUMNS} FROM broker_orders
WHERE alpaca_order_id = ANY(%(ids)b::text[])
ORDER BY alpaca_order_id
FOR UPDATE
"""

_POSITION_COLUMNS = """id, account_id, symbol, side, qty, avg_entry_price, alpaca_order_id,
    client_order_id, opened_at, realized_pnl, closed_at, peak_qty, multiplier, asset_class,
    closing_activity_id"""

_LOCK_OPEN_POSITIONS = f"""
SELECT {_POSITION_COLUMNS} FROM active_positions
WHERE account_id = %(acct)s AND symbol = ANY(%(symbols)b::text[]) AND status = 'open'
ORDER BY symbol
FOR UPDATE
"""

_LOAD_CURSOR = "SELECT fill_time, activity_id FROM stream_cursors WHERE account_id = %(acct)s"
#: A Broker API events stream's position (docs/design.md, section 11): only forward.
_ADVANCE_STREAM_POSITION = """
INSERT INTO event_stream_positions AS p (stream, event_id) VALUES (%(stream)s, %(event_id)s)
ON CONFLICT (stream) DO UPDATE SET event_id = GREATEST(p.event_id, EXCLUDED.event_id),
    updated_at = now()
"""
_LOAD_STREAM_POSITION = "SELECT event_id FROM event_stream_positions WHERE stream = %s"

_UPSERT_ORDERS = """
INSERT INTO broker_orders AS o (alpaca_order_id, account_id, client_order_id, symbol, side,
    order_type, asset_class, qty, filled_qty, filled_avg_price, status, created_at, updated_at,
    revised_at, order_class, parent_order_id)
SELECT r->>0, %(acct)s, r->>1, r->>2, r->>3, r->>4, r->>5, (r->>6)::numeric,
    (r->>7)::numeric, (r->>8)::numeric, r->>9, (r->>10)::timestamptz, (r->>11)::timestamptz,
    (r->>12)::timestamptz, r->>13, r->>14
FROM jsonb_array_elements(%(rows)s::jsonb) AS v(r)
ON CONFLICT (alpaca_order_id) DO UPDATE SET
    order_class = EXCLUDED.order_class,
    parent_order_id = EXCLUDED.parent_order_id,
    client_order_id = EXCLUDED.client_order_id,
    order_type = EXCLUDED.order_type,
    asset_class = EXCLUDED.asset_class,
    qty = EXCLUDED.qty,
    filled_qty = EXCLUDED.filled_qty,
    filled_avg_price = EXCLUDED.filled_avg_price,
    status = EXCLUDED.status,
    created_at = EXCLUDED.created_at,
    updated_at = EXCLUDED.updated_at,
    revised_at = EXCLUDED.revised_at,
    last_stored_at = now()
"""

# origin and fees come from the row as stored (set by whoever opened it, e.g. a baseline
# import), not from the ledger, which knows neither.
_HISTORY_INSERT = """
INSERT INTO position_history (position_id, account_id, symbol, side, qty, peak_qty,
    avg_entry_price, realized_pnl, alpaca_order_id, client_order_id, opened_at, closed_at,
    origin, fees, asset_id, close_reason, multiplier, asset_class, closing_activity_id)
SELECT id, account_id, symbol, side, qty, peak_qty, avg_entry_price, realized_pnl,
    alpaca_order_id, client_order_id, opened_at, closed_at, origin, fees, asset_id,
    close_reason, multiplier, asset_class, closing_activity_id
"""

# Closing rows first (its own statement, before the insert) keeps the partial unique index
# satisfied when a flip closes a row and opens another for the same symbol.
_UPDATE_POSITIONS = f"""
WITH upd AS (
    UPDATE active_positions AS ap SET
        qty = v.qty,
        avg_entry_price = v.avg,
        realized_pnl = v.pnl,
        peak_qty = v.peak,
        closed_at = v.closed_at,
        closing_activity_id = v.act,
        status = CASE WHEN v.closed_at IS NULL THEN 'open' ELSE 'closed' END,
        updated_at = now()
    FROM (SELECT (r->>0)::bigint, (r->>1)::numeric, (r->>2)::numeric, (r->>3)::numeric,
                 (r->>4)::numeric, (r->>5)::timestamptz, r->>6
          FROM jsonb_array_elements(%(rows)s::jsonb) AS j(r))
        AS v(id, qty, avg, pnl, peak, closed_at, act)
    WHERE ap.id = v.id AND ap.status = 'open'
    RETURNING ap.*
)
{_HISTORY_INSERT} FROM upd WHERE status = 'closed'
ON CONFLICT (position_id) DO NOTHING
"""

_INSERT_POSITIONS = f"""
WITH ins AS (
    INSERT INTO active_positions (account_id, symbol, side, qty, avg_entry_price,
        alpaca_order_id, client_order_id, status, realized_pnl, opened_at, closed_at, peak_qty,
        multiplier, asset_class, closing_activity_id)
    SELECT %(acct)s, sym, side, qty, avg, oid, cid,
        CASE WHEN closed_at IS NULL THEN 'open' ELSE 'closed' END, pnl, opened_at, closed_at, peak,
        mult, cls, act
    FROM (SELECT r->>0, r->>1, (r->>2)::numeric, (r->>3)::numeric, r->>4, r->>5,
                 (r->>6)::numeric, (r->>7)::timestamptz, (r->>8)::timestamptz,
                 (r->>9)::numeric, (r->>10)::numeric, r->>11, r->>12, n
          FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS j(r, n))
        AS v(sym, side, qty, avg, oid, cid, pnl, opened_at, closed_at, peak, mult, cls, act, n)
    ORDER BY n
    RETURNING *
)
{_HISTORY_INSERT} FROM ins WHERE status = 'closed'
"""

# GREATEST ignores NULLs, like `Cursor.advanced`; activity_id is COLLATE "C", so text
# order is Python's code-point order.
_ADVANCE_CURSOR = """
INSERT INTO stream_cursors AS c (account_id, fill_time, activity_id)
VALUES (%(acct)s, %(fill_time)s, %(activity_id)s)
ON CONFLICT (account_id) DO UPDATE SET
    fill_time = GREATEST(c.fill_time, EXCLUDED.fill_time),
    activity_id = GREATEST(c.activity_id, EXCLUDED.activity_id),
    updated_at = now()
RETURNING fill_time, activity_id
"""

# Non-trade activities of the batch, once each (docs/design.md, section 10).
_INSERT_ACTIVITIES = """
INSERT INTO account_activities (activity_id, account_id, activity_type, symbol, qty, price,
    occurred_at, outcome, effects, payload)
SELECT i, %(acct)s, t, sym, q, p, at, o, e, pl
FROM unnest(%(ids)b::text[], %(types)b::text[], %(syms)b::text[], %(qtys)s::numeric[],
            %(prices)s::numeric[], %(ats)b::timestamptz[], %(outcomes)b::text[],
            %(effects)s::jsonb[], %(payloads)b::bytea[])
    AS v(i, t, sym, q, p, at, o, e, pl)
ON CONFLICT (account_id, activity_id) DO NOTHING
"""

#: Fills (and revisions) already in the broker's word (`ledger.apply_events`): their
#: orders' marks moved (the upsert before this), and `baseline_qty` with them.
_GROW_BASELINE_QTY = """
UPDATE broker_orders AS o SET baseline_qty = o.baseline_qty + (v.r->>1)::numeric
FROM jsonb_array_elements(%(rows)s::jsonb) AS v(r)
WHERE o.alpaca_order_id = v.r->>0
"""
# The moments of the latest baseline, and of the latest reconcile that adjusted them, for
# the symbols a batch touches (sections 9 and 10).
_LOAD_BASELINE_MOMENTS = """
SELECT symbol, moment, reconciled_at FROM baseline_moments
WHERE account_id = %(acct)s AND symbol = ANY(%(symbols)s::text[])
"""
_UPSERT_BASELINE_MOMENT = """
INSERT INTO baseline_moments AS b (account_id, symbol, moment, reconciled_at)
VALUES (%(acct)s, %(sym)s, %(at)s, %(reconciled)s)
ON CONFLICT (account_id, symbol) DO UPDATE SET
    moment = GREATEST(b.moment, EXCLUDED.moment),
    reconciled_at = GREATEST(b.reconciled_at, EXCLUDED.reconciled_at), recorded_at = now()
"""
# What each activity did to a position; a row opened in this batch (a transfer into a
# flat symbol) is found as the symbol's open row, written just before.
_INSERT_CHANGES = """
INSERT INTO position_changes (account_id, activity_id, symbol, position_id, activity_type,
    qty_before, qty_after, avg_before, avg_after, realized_pnl, changed_at)
SELECT %(acct)s, a, sym, COALESCE(pid, (SELECT id FROM active_positions ap
        WHERE ap.account_id = %(acct)s AND ap.symbol = v.sym AND ap.status = 'open')),
    t, qb, qa, ab, aa, pnl, at
FROM unnest(%(ids)b::text[], %(syms)b::text[], %(pids)b::bigint[], %(types)b::text[],
            %(qbs)s::numeric[], %(qas)s::numeric[], %(abs)s::numeric[], %(aas)s::numeric[],
            %(pnls)s::numeric[], %(ats)b::timestamptz[])
    AS v(a, sym, pid, t, qb, qa, ab, aa, pnl, at)
ON CONFLICT (account_id, activity_id, symbol) DO NOTHING
"""
_SNAPSHOT_CHANGES = """
SELECT activity_id, activity_type, symbol, position_id, qty_before, qty_after, avg_before,
    avg_after, realized_pnl, changed_at
FROM position_changes WHERE account_id = %s ORDER BY activity_id, symbol
"""
_SNAPSHOT_MOMENTS = """
SELECT symbol, moment, reconciled_at FROM baseline_moments WHERE account_id = %s
"""

_ACTIVITY_CURSOR = """
SELECT max(activity_id) FROM account_activities WHERE account_id = %s
"""
_SNAPSHOT_ACTIVITIES = """
SELECT activity_id, activity_type, symbol, qty, price, occurred_at, outcome, effects, payload
FROM account_activities WHERE account_id = %s ORDER BY activity_id
"""

_INSERT_DEAD_LETTERS = """
INSERT INTO dead_letters (account_id, reason, payload, source, letter_key)
SELECT %(acct)s, r, p, s, k
FROM unnest(%(reasons)b::text[], %(payloads)b::bytea[], %(sources)b::text[],
            %(keys)b::text[])
    WITH ORDINALITY AS v(r, p, s, k, n)
ORDER BY n
ON CONFLICT (letter_key) DO NOTHING
"""

# The outcome of each replayed dead letter, in the transaction of the batch it rode in.
_MARK_REPLAYED = """
UPDATE dead_letters AS d SET replayed_at = now(), replay_result = v.r
FROM unnest(%(ids)s::bigint[], %(results)b::text[]) AS v(id, r)
WHERE d.id = v.id AND d.account_id = %(acct)s
"""

DEAD_LETTER_COLUMNS: Final = """id, account_id, received_at, reason, payload, source,
    replay_requested_at, replayed_at, replay_result"""
_PENDING_REPLAYS = f"""
SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters
WHERE account_id = %s AND replay_requested_at IS NOT NULL AND replayed_at IS NULL
ORDER BY replay_requested_at, id
LIMIT %s
"""

# A session-level advisory lock per account elects the one writer (docs/design.md, section
# 7). It lives and dies with the connection, which is why a leader never reconnects silently.
LEADER_LOCK_PREFIX: Final = "stream-supervisor/writer/"
_TRY_LEADER_LOCK = "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))"
#: A standby, or a primary turned read-only (a failover in progress, with DNS still
#: naming the old writer): no batch would commit there.
_READ_ONLY = ("SELECT pg_is_in_recovery() OR "
              "current_setting('transaction_read_only') = 'on'")
#: SQLSTATE read_only_sql_transaction: the session's server stopped taking writes.
_READ_ONLY_STATE: Final = "25006"
#: The session's own backend, as the server knows it (a pooler in session mode may show
#: the client another pid), and when it started: a pid alone can be reused.
_BACKEND_IDENTITY = """
SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()
"""
#: Whether the store's main session (by its backend's pid) still holds the account's
#: writer lock: a batch finished on a claim-ahead connection asks before it writes
#: (design.md, section 7). pg_locks shows a lock on a bigint key as two oids.
_LEADER_HELD = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.pid = %(pid)s
      AND a.backend_start = %(started)s AND l.objsubid = 1
      AND l.classid = ((hashtextextended(%(lock)s, 0) >> 32) & x'FFFFFFFF'::bigint)::oid
      AND l.objid = (hashtextextended(%(lock)s, 0) & x'FFFFFFFF'::bigint)::oid)
"""
_RELEASE_LEADER_LOCKS = "SELECT pg_advisory_unlock_all()"

_HAS_KEY = "SELECT EXISTS (SELECT 1 FROM alpaca_event_dedupe WHERE event_key = %s)"

_RECENT_KEYS = """
SELECT event_key FROM alpaca_event_dedupe WHERE account_id = %s ORDER BY seq DESC LIMIT %s
"""

# The literal list matches the partial index broker_orders_account_working.
_TERMINAL_SQL: Final = ", ".join(f"'{s}'" for s in sorted(TERMINAL_STATUSES))
_OPEN_ORDER_IDS = f"""
SELECT alpaca_order_id FROM broker_orders
WHERE account_id = %s AND status NOT IN ({_TERMINAL_SQL})
ORDER BY first_stored_at, alpaca_order_id
"""
_OPEN_ORDER_IDS_OF = f"""
SELECT alpaca_order_id FROM broker_orders
WHERE account_id = %s AND status NOT IN ({_TERMINAL_SQL}) AND symbol = ANY(%s::text[])
ORDER BY first_stored_at, alpaca_order_id
"""

_SNAPSHOT_KEYS = "SELECT event_key FROM alpaca_event_dedupe WHERE account_id = %s"
_SNAPSHOT_ORDERS = f"""
SELECT {_ORDER_COLUMNS} FROM broker_orders WHERE account_id = %s
ORDER BY first_stored_at, alpaca_order_id
"""
_SNAPSHOT_POSITIONS = f"""
SELECT {_POSITION_COLUMNS} FROM active_positions WHERE account_id = %s ORDER BY id
"""
_SNAPSHOT_HISTORY = """
SELECT position_id, account_id, symbol, side, qty, avg_entry_price, alpaca_order_id,
    client_order_id, opened_at, realized_pnl, closed_at, peak_qty, multiplier, asset_class,
    closing_activity_id
FROM position_history WHERE account_id = %s ORDER BY closed_at, position_id
"""
_SNAPSHOT_CURSOR = "SELECT fill_time, activity_id FROM stream_cursors WHERE account_id = %s"
_SNAPSHOT_ADJUSTMENTS = """
SELECT symbol, reason, qty_before, qty_after, avg_entry_price, asset_id, taken_at
FROM position_adjustments WHERE account_id = %s ORDER BY id
"""
_SNAPSHOT_BASELINES = """
SELECT alpaca_order_id, baseline_qty FROM broker_orders
WHERE account_id = %s AND baseline_qty <> 0
"""

# --- the broker's word (docs/design.md, section 9): rare, so one row per statement ----

_OPEN_POSITIONS = f"""
SELECT {_POSITION_COLUMNS} FROM active_positions
WHERE account_id = %s AND status = 'open' ORDER BY symbol
"""
_LOCK_ALL_OPEN = f"""
SELECT {_POSITION_COLUMNS} FROM active_positions
WHERE account_id = %s AND status = 'open' ORDER BY symbol FOR UPDATE
"""
#: Orders of the account still working, by symbol (a reconcile leaves a symbol with one
#: the broker filled further than we have: `adjustments.unsettled_symbols`).
_WORKING_ORDERS = """
SELECT symbol, alpaca_order_id, filled_qty FROM broker_orders
WHERE account_id = %s AND symbol = ANY(%s::text[]) AND status <> ALL(%s::text[])
"""
_LOCK_BASELINE_ORDERS = f"""
SELECT {_ORDER_COLUMNS}, baseline_qty FROM broker_orders
WHERE alpaca_order_id = ANY(%s::text[]) ORDER BY alpaca_order_id FOR UPDATE
"""
_CLOSE_FOR_ADJUSTMENT = f"""
WITH upd AS (
    UPDATE active_positions SET qty = 0, status = 'closed', closed_at = %(at)s,
        close_reason = %(reason)s, updated_at = now()
    WHERE id = %(id)s AND status = 'open'
    RETURNING *
)
{_HISTORY_INSERT} FROM upd
"""
_OPEN_FROM_BROKER = """
INSERT INTO active_positions (account_id, symbol, side, qty, avg_entry_price,
    alpaca_order_id, status, realized_pnl, opened_at, peak_qty, origin, asset_id,
    multiplier, asset_class)
VALUES (%(acct)s, %(sym)s, %(side)s, %(qty)s, %(avg)s, %(reason)s, 'open', 0, %(at)s,
    %(qty)s, %(origin)s, %(asset)s, %(mult)s, %(cls)s)
RETURNING id
"""
_INSERT_ADJUSTMENT = """
INSERT INTO position_adjustments (account_id, symbol, asset_id, reason, qty_before,
    qty_after, avg_entry_price, taken_at, closed_position_id, opened_position_id)
VALUES (%(acct)s, %(sym)s, %(asset)s, %(reason)s, %(before)s, %(after)s, %(avg)s, %(at)s,
    %(closed)s, %(opened)s)
"""
_UPSERT_BASELINE_ORDER = """
INSERT INTO broker_orders AS o (alpaca_order_id, account_id, client_order_id, symbol, side,
    order_type, asset_class, qty, filled_qty, filled_avg_price, status, created_at,
    updated_at, baseline_qty)
VALUES (%(id)s, %(acct)s, %(cid)s, %(sym)s, %(side)s, %(typ)s, %(cls)s, %(qty)s, %(fq)s,
    %(fap)s, %(st)s, %(ca)s, %(ua)s, %(base)s)
ON CONFLICT (alpaca_order_id) DO UPDATE SET
    client_order_id = EXCLUDED.client_order_id, qty = EXCLUDED.qty,
    asset_class = EXCLUDED.asset_class, filled_qty = EXCLUDED.filled_qty,
    filled_avg_price = EXCLUDED.filled_avg_price, status = EXCLUDED.status,
    updated_at = EXCLUDED.updated_at, baseline_qty = EXCLUDED.baseline_qty,
    last_stored_at = now()
"""
_SNAPSHOT_DEAD_LETTERS = """
SELECT reason, payload, source, letter_key FROM dead_letters WHERE account_id = %s ORDER BY id
"""


# --- rows <-> values -------------------------------------------------------------------


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and JSON can ("\u0000"): without this one odd frame
    # would make its batch fail on every retry, for ever.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _order(row: Sequence[Any]) -> OrderState:
    return OrderState(
        order_id=row[0],
        symbol=row[1],
        side=row[2],
        status=row[3],
        filled_qty=row[4],
        filled_avg_price=row[5],
        client_order_id=row[6],
        order_qty=row[7],
        order_type=row[8],
        asset_class=row[9],
        created_at=row[10],
        updated_at=row[11],
        revised_at=row[12],
        order_class=row[13],
        parent_order_id=row[14],
    )


def _position(row: Sequence[Any]) -> Position:
    # The table keeps side + absolute quantities; the domain keeps signed ones.
    sign = 1 if row[3] == "long" else -1
    return Position(
        account_id=row[1],
        symbol=row[2],
        qty=row[4] * sign,
        avg_entry_price=row[5],
        opened_by_order_id=row[6],
        opened_by_client_order_id=row[7],
        opened_at=row[8],
        realized_pnl=row[9],
        closed_at=row[10],
        peak_qty=row[11] * sign,
        position_id=row[0],
        multiplier=row[12],
        asset_class=row[13],
        closing_activity_id=row[14],
    )


def _cursor(row: Sequence[Any] | None) -> Cursor | None:
    return None if row is None else Cursor(row[0], row[1])


def stored_dead_letter(row: Sequence[Any]) -> StoredDeadLetter:
    """A row of `DEAD_LETTER_COLUMNS`."""
    return StoredDeadLetter(
        id=row[0], account_id=row[1], received_at=row[2], reason=row[3],
        payload=bytes(row[4]), source=row[5], replay_requested_at=row[6],
        replayed_at=row[7], replay_result=row[8],
    )


#: How JSON spells NUL (msgspec escapes it so): a batch's encoded rows holding it hold a
#: NUL somewhere (or the six characters themselves, after a backslash, which is harmless).
_JSON_NUL: Final = b"\\u0000"


def _scrubbed(value: Any) -> Any:
    return _text(value) if isinstance(value, str) else value


def _rows(rows: list[tuple[Any, ...]]) -> str:
    """A batch statement's rows as its one JSON parameter, every text NUL-free (`_text`).

    Checked on the encoded batch, in one scan, rather than value by value: the text of
    almost every batch holds no NUL, and a function call per column cost the writer more
    than the encoding (BENCHMARKS.md). Only a batch that does is encoded again, scrubbed."""
    encoded = _json_encode(rows)
    if _JSON_NUL in encoded:
        encoded = _json_encode([tuple(map(_scrubbed, row)) for row in rows])
    return encoded.decode()


def _claim_params(account_id: str, first: dict[str, Event],
                  by_stored_key: dict[str, str]) -> dict[str, Any]:
    """The keys to claim (stored spelling -> the batch's), each with its first update."""
    return {
        "acct": account_id,
        "rows": _rows([(k, first[key].event, first[key].source)
                       for k, key in by_stored_key.items()]),
    }


def _orders_params(account_id: str, orders: Iterable[OrderState]) -> dict[str, Any]:
    return {
        "acct": account_id,
        "rows": _rows([
            (o.order_id, o.client_order_id, o.symbol, o.side, o.order_type, o.asset_class,
             o.order_qty, o.filled_qty, o.filled_avg_price, o.status, o.created_at,
             o.updated_at, o.revised_at, o.order_class, o.parent_order_id)
            for o in orders]),
    }


def _update_params(rows: Sequence[Position]) -> dict[str, Any]:
    return {
        "rows": _rows([
            (p.position_id, abs(p.qty), p.avg_entry_price, p.realized_pnl, abs(p.peak_qty),
             p.closed_at, p.closing_activity_id)
            for p in rows]),
    }


def _insert_params(account_id: str, rows: Sequence[Position]) -> dict[str, Any]:
    return {
        "acct": account_id,
        "rows": _rows([
            (p.symbol, p.side, abs(p.qty), p.avg_entry_price, p.opened_by_order_id,
             p.opened_by_client_order_id, p.realized_pnl, p.opened_at, p.closed_at,
             abs(p.peak_qty), p.multiplier, p.asset_class, p.closing_activity_id)
            for p in rows]),
    }


def _activity_params(account_id: str, records: Sequence[ActivityRecord]) -> dict[str, Any]:
    return {
        "acct": account_id,
        "ids": [_text(r.activity_id) for r in records],
        "types": [_text(r.activity_type) for r in records],
        "syms": [_text(r.symbol) for r in records],
        "qtys": [r.qty for r in records],
        "prices": [r.price for r in records],
        "ats": [r.timestamp for r in records],
        "outcomes": [r.outcome for r in records],
        "effects": [Jsonb({_text(k): decimal_text(v) for k, v in r.effects.items()})
                    for r in records],
        "payloads": [bytes(r.raw) for r in records],
    }


def _change_params(account_id: str, changes: Sequence[PositionChange]) -> dict[str, Any]:
    return {
        "acct": account_id,
        "ids": [_text(c.activity_id) for c in changes],
        "syms": [_text(c.symbol) for c in changes],
        "pids": [c.position_id for c in changes],
        "types": [_text(c.activity_type) for c in changes],
        "qbs": [c.qty_before for c in changes],
        "qas": [c.qty_after for c in changes],
        "abs": [c.avg_before for c in changes],
        "aas": [c.avg_after for c in changes],
        "pnls": [c.realized_pnl for c in changes],
        "ats": [c.changed_at for c in changes],
    }


def _change(row: Sequence[Any]) -> PositionChange:
    return PositionChange(
        activity_id=row[0], activity_type=row[1], symbol=row[2], position_id=row[3],
        qty_before=row[4], qty_after=row[5], avg_before=row[6], avg_after=row[7],
        realized_pnl=row[8], changed_at=row[9])


def _activity(row: Sequence[Any]) -> ActivityRecord:
    return ActivityRecord(
        activity_id=row[0], activity_type=row[1], symbol=row[2], qty=row[3], price=row[4],
        timestamp=row[5], outcome=row[6],
        effects={k: Decimal(v) for k, v in row[7].items()}, raw=bytes(row[8]),
    )


def _dead_letter_params(account_id: str, letters: Sequence[DeadLetter]) -> dict[str, Any]:
    return {
        "acct": account_id,
        "reasons": [_text(d.reason) for d in letters],
        "payloads": [bytes(d.payload) for d in letters],
        "sources": [d.source for d in letters],
        "keys": [d.key for d in letters],
    }


def _replay_params(account_id: str, marks: Sequence[ReplayMark],
                   new_keys: set[str]) -> dict[str, Any]:
    return {
        "acct": account_id,
        "ids": [m.dead_letter_id for m in marks],
        "results": [_text(replay_outcome(m, new_keys))[:1000] for m in marks],
    }


# --- the store -------------------------------------------------------------------------


@dataclass(eq=False)
class _Side:
    """One of the two connections that claim batches ahead, with its own worker-thread
    limiter: one statement at a time on it, as on the main connection."""

    limiter: trio.CapacityLimiter
    conn: psycopg.Connection[Any] | None = None


@dataclass(frozen=True, slots=True)
class _Claim:
    """What claiming a batch's keys found, kept for the commit that finishes it: each
    key's first update, the keys as stored (NUL replaced) -> as given, and the new ones."""

    first: dict[str, Event]
    by_stored_key: dict[str, str]
    new_keys: frozenset[str]


@dataclass(eq=False)
class _Ahead:
    """A batch whose transaction is open on `side`, with its claim once it has returned."""

    batch: Batch
    side: _Side
    claimed: _Claim | None = None
    dropped: bool = False


class PgStore:
    """`store.Store` on PostgreSQL. Not shared between tasks running concurrently beyond
    what the limiter serialises: one connection, one statement at a time."""

    def __init__(
        self,
        conninfo: str,
        *,
        statement_timeout_ms: int = 10_000,
        connect_timeout_s: float = 5.0,
        application_name: str = "stream-supervisor",
    ) -> None:
        self._conninfo = conninfo
        self._statement_timeout_ms = statement_timeout_ms
        self._connect_timeout_s = connect_timeout_s
        self._application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        self._limiter = trio.CapacityLimiter(1)
        # Set once this store's connection holds the account's advisory lock. From then on
        # a lost connection is lost leadership: reconnecting would write without the lock.
        self._leader_of: str | None = None
        # Why the last connection was dropped: what a LostLeadership names as its cause.
        self._dropped_because: str | None = None
        # The main session's backend (pid, start), once it holds the writer lock: batches
        # finished on a claim-ahead connection check that it still does.
        self._leader_backend: tuple[int, Any] | None = None
        # Claim ahead (docs/design.md, section 4): two connections of the writer's, taken
        # in turn, so that the batch claimed ahead never waits for the side the batch
        # before it is finishing on; and the batch claimed ahead, if any.
        self._sides = (_Side(trio.CapacityLimiter(1)), _Side(trio.CapacityLimiter(1)))
        self._turn = 0
        self._ahead: _Ahead | None = None
        # The last batch failed: nothing is claimed ahead until one commits again.
        self._failing = False

    def __repr__(self) -> str:
        return f"PgStore({pgconn.describe(self._conninfo)})"

    # -- plumbing: every call runs in the worker thread, one at a time ------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        # Not abandoned on cancel: the connection must never be used by two threads, so a
        # cancelled caller waits for the statement, which statement_timeout bounds.
        return await run_in_thread(fn, self._limiter)

    def _connect(self) -> psycopg.Connection[Any]:
        conn = pgconn.connect(
            self._conninfo,
            connect_timeout_s=self._connect_timeout_s,
            application_name=self._application_name,
            autocommit=True,  # transactions are explicit: reads never leave one open
            prepare_threshold=PREPARE_THRESHOLD,
        )
        idle_ms = max(MIN_IDLE_IN_TRANSACTION_MS, 3 * self._statement_timeout_ms)
        try:
            conn.execute(_SESSION, [f"{self._statement_timeout_ms}ms", f"{idle_ms}ms"])
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable(self._error("session setup failed", exc)) from None
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            if self._leader_of is not None:
                # Say why it went; whether another replica holds the lock now is for the
                # next election to find out (it logs `standby` if so).
                raise LostLeadership(
                    f"the connection holding the writer lock of account {self._leader_of} "
                    f"is gone ({self._dropped_because or 'closed'}), and the lock with it: "
                    "this process stops writing and stands for election again"
                )
            self._conn = self._connect()
        return self._conn

    def _error(self, what: str, exc: BaseException) -> str:
        return f"{what}: {pgconn.error_text(exc, self._conninfo)}"

    def _discard(self, because: str | None = None) -> None:
        """Drop the connection (a broken session, or closing): the server rolls back
        whatever was open, and the next call starts clean."""
        if because is not None and self._conn is not None:
            self._dropped_because = because
        conn, self._conn = self._conn, None
        if conn is not None:
            _close_quietly(conn)

    def _guarded(self, what: str, op: Callable[[psycopg.Connection[Any]], T]) -> T:
        return self._attempt(self._connection(), self._discard, what, op)

    def _attempt(self, conn: psycopg.Connection[Any], drop: Callable[[str], None], what: str,
                 op: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`op(conn)`, its failures as the writer must see them; `drop(why)` closes the
        connection (the main one, or a claim-ahead one) when the session cannot go on."""
        try:
            return op(conn)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                message = self._error(f"{what}: connection lost", exc)
                drop(message)
                raise StoreUnavailable(message) from None
            if not _back_to_idle(conn):
                message = self._error(f"{what}: could not roll back", exc)
                drop(message)
                raise StoreUnavailable(message) from None
            if exc.sqlstate == _READ_ONLY_STATE:
                # The server stopped taking writes (a failover turned it into a replica):
                # waited out as a lost connection is, not a refusal counted toward a
                # crash; the session (and the lock on a server that no longer writes)
                # goes, and the next connection resolves the address again.
                message = self._error(f"{what}: the server is read-only", exc)
                drop(message)
                raise StoreUnavailable(message) from None
            # The server refused the statement and the session is idle and clean again:
            # it stays, and with it the writer lock. ROLLBACK also makes psycopg forget what
            # the session had prepared, so nothing stale survives a refusal either.
            raise _refusal(self._error(what, exc), exc) from None
        except BaseException as exc:
            # Not a database failure (a bug in pure code, say, or a lost writer lock found
            # by a batch claimed ahead): undo the transaction and let it propagate
            # unchanged, so the supervisor's crash policy sees it.
            drop(f"{what}: {type(exc).__name__} while the transaction was open")
            raise

    # -- Store --------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def has_key(self, key: str) -> bool:
        def query(conn: psycopg.Connection[Any]) -> bool:
            row = conn.execute(_HAS_KEY, [_text(key)]).fetchone()
            return bool(row and row[0])

        return await self._run(lambda: self._guarded("dedupe key check", query))

    async def try_leadership(self, account_id: str) -> bool:
        def attempt(conn: psycopg.Connection[Any]) -> bool:
            read_only = conn.execute(_READ_ONLY).fetchone()
            if read_only is not None and read_only[0]:
                # Leading there would only have every batch refused; the connection is
                # dropped (`_attempt`), so the next try resolves the address again.
                raise StoreUnavailable(
                    "leader lock: the server is read-only (a standby, or a failover in "
                    "progress): waiting for a writable one")
            lock = LEADER_LOCK_PREFIX + account_id
            row = conn.execute(_TRY_LEADER_LOCK, [lock]).fetchone()
            held = bool(row and row[0])
            if held:
                me = conn.execute(_BACKEND_IDENTITY).fetchone()
                self._leader_backend = (int(me[0]), me[1]) if me is not None else None
                mine = conn.execute(_LEADER_HELD, {"pid": me[0], "started": me[1],
                                                   "lock": lock}).fetchone() if me else None
                if not _held(mine):
                    # The lock was taken by another server session than the statement
                    # after it ran on: a pooler handing out sessions per transaction.
                    conn.execute(_RELEASE_LEADER_LOCKS)
                    raise ConfigError(
                        f"the writer lock of account {account_id} and the statement after "
                        "it ran on different server sessions: a connection pooler in "
                        "transaction or statement mode cannot keep a session's advisory "
                        "lock (docs/design.md, section 7); connect directly, or through a "
                        "pooler in session mode")
            return held

        held = await self._run(lambda: self._guarded("leader lock", attempt))
        if held:
            self._leader_of = account_id
        return held

    def _open_sync(self) -> None:
        self._guarded("schema check", self._check_schema)

    def _check_schema(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(_SCHEMA_CHECK, [list(TABLES)]).fetchone()
        assert row is not None
        missing, has_migrations = list(row[0]), bool(row[1])
        applied = False
        if has_migrations:
            found = conn.execute(_MIGRATION_APPLIED, [REQUIRED_MIGRATION]).fetchone()
            applied = bool(found and found[0])
        if missing or not applied:
            detail = f"missing tables: {', '.join(missing)}" if missing else (
                f"migration {REQUIRED_MIGRATION} not applied"
            )
            raise SchemaNotMigrated(
                f"the database ({pgconn.describe(self._conninfo)}) is not migrated ({detail}): "
                "run `stream-supervisor migrate` first"
            )

    async def aclose(self) -> None:
        # Shielded (with a deadline): a caller being cancelled must still close the
        # connection, or it and any writer lock it holds linger until garbage collection.
        with trio.move_on_after(5, shield=True):
            # The main session first: it gives the writer lock back, whatever the claim-ahead
            # connections then take to close (their open claims roll back with them).
            await self._run(self._close)
            self._ahead = None
            for side in self._sides:
                await run_in_thread(partial(self._discard_side, side), side.limiter)

    def _close(self) -> None:
        """Give the writer lock back before closing: the server frees a session's
        advisory locks only when its backend exits, a moment after the client has gone,
        so a standby replica taking over after a graceful stop would find it still held
        and wait a retry for nothing."""
        conn = self._conn
        if self._leader_of is not None and conn is not None and not (conn.broken
                                                                     or conn.closed):
            try:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
                conn.execute(_RELEASE_LEADER_LOCKS)
            except psycopg.Error:
                pass  # closing frees it anyway, only later
        self._discard()

    async def recent_keys(self, account_id: str, limit: int) -> list[str]:
        if limit <= 0:
            return []

        def op(conn: psycopg.Connection[Any]) -> list[str]:
            return [r[0] for r in conn.execute(_RECENT_KEYS, [account_id, limit])]

        return await self._run(lambda: self._guarded("recent_keys", op))

    async def load_cursor(self, account_id: str) -> Cursor | None:
        def op(conn: psycopg.Connection[Any]) -> Cursor | None:
            return _cursor(conn.execute(_LOAD_CURSOR, {"acct": account_id}).fetchone())

        return await self._run(lambda: self._guarded("load_cursor", op))

    async def load_activity_cursor(self, account_id: str) -> str | None:
        def op(conn: psycopg.Connection[Any]) -> str | None:
            row = conn.execute(_ACTIVITY_CURSOR, [account_id]).fetchone()
            return None if row is None else row[0]

        return await self._run(lambda: self._guarded("load_activity_cursor", op))

    async def load_stream_position(self, stream: str) -> str | None:
        def op(conn: psycopg.Connection[Any]) -> str | None:
            row = conn.execute(_LOAD_STREAM_POSITION, [stream]).fetchone()
            return None if row is None else str(row[0])

        return await self._run(lambda: self._guarded("load_stream_position", op))

    async def open_order_ids(self, account_id: str,
                             symbols: Collection[str] | None = None) -> list[str]:
        def op(conn: psycopg.Connection[Any]) -> list[str]:
            if symbols is None:
                return [r[0] for r in conn.execute(_OPEN_ORDER_IDS, [account_id])]
            return [r[0] for r in conn.execute(
                _OPEN_ORDER_IDS_OF, [account_id, [_text(sym) for sym in symbols]])]

        return await self._run(lambda: self._guarded("open_order_ids", op))

    async def commit_batch(self, batch: Batch) -> BatchResult:
        ahead = self._ahead
        try:
            if (ahead is not None and ahead.batch is batch and ahead.claimed is not None
                    and not ahead.dropped):
                self._ahead = None
                try:
                    # The main connection's turn too: the store's other writes (a
                    # reconcile's broker word, replay marks) and a batch's take turns, as
                    # they did before claim ahead (docs/design.md, section 4).
                    async with self._limiter:
                        result = await run_in_thread(
                            partial(self._finish_on, ahead.side, batch, ahead.claimed),
                            ahead.side.limiter)
                except BaseException:
                    # Also when cancelled before the finish started: nothing may stay open
                    # on the side (after a finish that ran, this finds it idle).
                    with trio.CancelScope(shield=True):
                        await run_in_thread(partial(self._reset, ahead.side),
                                            ahead.side.limiter)
                    raise
            else:
                if ahead is not None and ahead.batch is not batch:
                    # Another caller's batch (a dead-letter replay) on the main connection:
                    # one of its keys may be the claimed batch's, whose claim it would wait
                    # for while that batch's finish waits for the main connection. The
                    # claim is given up; the writer claims that batch again in its turn.
                    await self.release_ahead()
                result = await self._run(
                    lambda: self._guarded("commit_batch", lambda c: _commit(c, batch)))
        except Exception:
            # What a later batch claimed meanwhile is given up, and nothing more is
            # claimed until a batch commits: this one's retries, on the main connection,
            # never wait behind another batch's claims.
            self._failing = True
            await self.release_ahead()
            raise
        self._failing = False
        return result

    # -- claim ahead (docs/design.md, section 4) -----------------------------------------

    async def claim_ahead(self, batch: Batch) -> bool:
        """Open `batch`'s transaction on a connection of its own and claim its keys there
        while the batch before it commits; `commit_batch(batch)` then finishes that
        transaction (locks, reads, the core, the writes, COMMIT). The claim is the largest
        part of a batch's database work: it runs beside the previous batch's instead of
        after it. True if claimed (at once if `batch` is the one already claimed and still
        held); False, with nothing held, if not: `commit_batch` then does everything
        itself, as always. Not while the batch before it is failing, nor while another
        batch's claim waits for its commit (one batch ahead at most)."""
        held = self._ahead
        if held is not None:
            return held.batch is batch and held.claimed is not None and not held.dropped
        if (not batch.events or self._failing
                or (self._leader_of is not None and self._leader_backend is None)):
            return False
        side = self._sides[self._turn]
        self._turn = 1 - self._turn
        ahead = self._ahead = _Ahead(batch, side)
        claimed = await run_in_thread(partial(self._claim_on, side, batch), side.limiter)
        if ahead.dropped or self._ahead is not ahead:
            # Given up while its keys were being claimed: the claims roll back, even if
            # the caller is being cancelled (no transaction may be left holding them).
            with trio.CancelScope(shield=True):
                await run_in_thread(partial(self._reset, side), side.limiter)
            return False
        if claimed is None:
            self._ahead = None
            return False
        ahead.claimed = claimed
        return True

    async def release_ahead(self) -> None:
        """Give up the batch claimed ahead, if any (the writer stops, or a batch failed):
        its transaction rolls back, and its keys are free to claim again."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        ahead.dropped = True
        with trio.CancelScope(shield=True):  # whatever happens, nothing stays held
            await run_in_thread(partial(self._reset, ahead.side), ahead.side.limiter)

    def _claim_on(self, side: _Side, batch: Batch) -> _Claim | None:
        """In the side's thread: BEGIN and the key claim, left open. None if that failed
        (the batch's commit then claims its keys itself, and reports any failure)."""
        try:
            conn = side.conn
            if conn is None or conn.closed or conn.broken:
                side.conn = conn = self._connect()
            elif not _back_to_idle(conn):
                self._discard_side(side)
                return None
            return _claim_ahead(conn, batch)
        except StoreError as exc:
            log.debug("claim_ahead_failed", error=str(exc)[:300])
            return None
        except psycopg.Error as exc:
            log.debug("claim_ahead_failed", error=self._error("claim ahead", exc)[:300])
            self._reset(side)
            return None
        except BaseException:
            self._discard_side(side)
            raise

    def _finish_on(self, side: _Side, batch: Batch, claimed: _Claim) -> BatchResult:
        """In the side's thread: the rest of the transaction `_claim_on` opened. A failure
        means what it means on the main connection, but a lost claim-ahead connection is
        no lost leadership (the writer lock is the main session's): the retry goes there."""
        conn = side.conn
        if (conn is None or conn.closed
                or conn.info.transaction_status != pq.TransactionStatus.INTRANS):
            # Never finish outside the transaction that claimed the keys: each statement
            # would commit on its own.
            self._discard_side(side)
            raise StoreUnavailable("commit_batch: the transaction that claimed the batch's "
                                   "keys is gone")
        leader = (None if self._leader_of is None or self._leader_backend is None
                  else (*self._leader_backend, LEADER_LOCK_PREFIX + self._leader_of))
        return self._attempt(conn, lambda _why: self._discard_side(side), "commit_batch",
                             lambda c: _commit(c, batch, claimed, leader))

    def _reset(self, side: _Side) -> None:
        """Roll back whatever the side's connection holds open; drop it if that fails."""
        conn = side.conn
        if conn is not None and not _back_to_idle(conn):
            self._discard_side(side)

    def _discard_side(self, side: _Side) -> None:
        conn, side.conn = side.conn, None
        if conn is not None:
            _close_quietly(conn)

    async def snapshot(self, account_id: str) -> StoreSnapshot:
        return await self._run(lambda: self._guarded("snapshot", lambda c: _snapshot(c, account_id)))

    async def open_positions(self, account_id: str) -> list[Position]:
        def op(conn: psycopg.Connection[Any]) -> list[Position]:
            return [_position(r) for r in conn.execute(_OPEN_POSITIONS, [account_id])]

        return await self._run(lambda: self._guarded("open_positions", op))

    async def apply_broker_word(self, word: BrokerWord) -> list[Adjustment]:
        return await self._run(
            lambda: self._guarded("apply_broker_word", lambda c: _broker_word(c, word)))

    async def pending_replays(self, account_id: str, limit: int) -> list[StoredDeadLetter]:
        def op(conn: psycopg.Connection[Any]) -> list[StoredDeadLetter]:
            rows = conn.execute(_PENDING_REPLAYS, [account_id, limit]).fetchall()
            return [stored_dead_letter(r) for r in rows]

        return await self._run(lambda: self._guarded("pending_replays", op))


#: Failures of contention or of the moment: retried for as long as they last (statement
#: timeout, lock timeout, deadlock, serialization failure, the server short of resources
#: or shutting down). Other refusals are `StoreDataError` or `StoreRejected`.
_TRANSIENT: Final = (
    psycopg.errors.QueryCanceled,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)
_TRANSIENT_CLASSES: Final = ("40", "53", "57", "58")
#: Refused data, tied to a value of one row rather than to the connection or to other
#: rows: class 22 (data exception: numeric out of range, invalid text...), class 54
#: (program limit: an index row too large), 23502 (not null) and 23514 (check). Not
#: 23505/23P01 (unique, exclusion): those depend on rows another writer may hold, and
#: isolating an update for them could dead-letter a valid one.
_DATA_CLASSES: Final = ("22", "54")
_DATA_STATES: Final = frozenset({"23502", "23514"})


def _refusal(message: str, exc: psycopg.Error) -> StoreError:
    """The StoreError a server's (or psycopg's own) refusal means for the writer."""
    state = exc.sqlstate
    detail = " ".join(str(exc).split())[:500]
    if isinstance(exc, _TRANSIENT) or (state is not None and state[:2] in _TRANSIENT_CLASSES):
        return StoreError(message)
    # psycopg.DataError without a SQLSTATE: psycopg itself could not send a value (a
    # Decimal beyond numeric's binary format).
    if (isinstance(exc, psycopg.DataError) or (state is not None and (
            state[:2] in _DATA_CLASSES or state in _DATA_STATES))):
        return StoreDataError(message, sqlstate=state, detail=detail)
    return StoreRejected(message, sqlstate=state, detail=detail)


def _close_quietly(conn: psycopg.Connection[Any]) -> None:
    """Roll back whatever is open (the server would anyway) and close, come what may."""
    try:
        if not conn.broken and not conn.closed:
            conn.rollback()
    except psycopg.Error:
        pass
    finally:
        conn.close()


def _back_to_idle(conn: psycopg.Connection[Any]) -> bool:
    """After a failed statement on a live connection: roll back whatever is still open.
    True if the connection is idle and clean again."""
    try:
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.rollback()
    except psycopg.Error:
        return False
    return conn.info.transaction_status == pq.TransactionStatus.IDLE


# --- the batch transaction -------------------------------------------------------------


def _first_of(batch: Batch) -> dict[str, Event]:
    """Each key's first update in the batch, in batch order."""
    first: dict[str, Event] = {}
    for ev in batch.events:
        first.setdefault(ev.key, ev)
    return first


def _claim_ahead(conn: psycopg.Connection[Any], batch: Batch) -> _Claim:
    """Open the batch's transaction and claim its keys; the transaction stays open for
    `_commit(conn, batch, claim)`, which the claim saves work of. READ COMMITTED
    whatever the database's default: the transaction begins before the batch before it
    commits, and its locks and reads, later, must see that batch's rows."""
    first = _first_of(batch)
    by_stored_key = {_text(k): k for k in first}
    with conn.pipeline():
        conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        if not batch.durable:
            conn.execute("SET LOCAL synchronous_commit = off")
        claimed = conn.execute(_CLAIM_KEYS, _claim_params(batch.account_id, first,
                                                          by_stored_key))
    return _Claim(first, by_stored_key,
                  frozenset(by_stored_key[r[0]] for r in claimed.fetchall()))


def _commit(conn: psycopg.Connection[Any], batch: Batch, ahead: _Claim | None = None,
            leader: tuple[int, Any, str] | None = None) -> BatchResult:
    """The batch's transaction. `ahead`: what `_claim_ahead` found in the transaction it
    left open on `conn`, which this finishes; `leader`: the backend (pid, start) that must
    still hold the writer lock (its name) before this writes anything."""
    acct = batch.account_id
    # Keys are claimed in batch order (`seq` then says which are newest); rows are locked
    # in id / symbol order, so two writers racing on one account do not deadlock there.
    if ahead is None:
        first = _first_of(batch)
        by_stored_key = {_text(k): k for k in first}
    else:
        first, by_stored_key = ahead.first, ahead.by_stored_key
    keys = list(by_stored_key)
    claim = _claim_params(acct, first, by_stored_key) if ahead is None else None
    # Stored spelling -> the caller's, so loaded state is found under the events' own ids.
    touched_orders, touched_symbols = touched(first.values())
    order_ids = {_text(oid): oid for oid in touched_orders}
    symbols = {_text(sym): sym for sym in touched_symbols}

    with conn.pipeline(), conn.transaction() if ahead is None else nullcontext():
        if ahead is None and not batch.durable:
            conn.execute("SET LOCAL synchronous_commit = off")
        # Round trip 1: claim keys (unless claimed ahead), lock what they may touch, read
        # the cursor.
        claimed, orders_cur, positions_cur, cursor_cur, moments_cur, leader_cur = (
            conn.cursor() for _ in range(6))
        # The moments of the baselines and reconciles that took these symbols' quantities:
        # a non-trade activity stamped no later is already in them, and so is a fill
        # stamped no later than a reconcile's.
        if keys:
            moments_cur.execute(_LOAD_BASELINE_MOMENTS,
                                {"acct": acct, "symbols": [ACCOUNT_WIDE, *sorted(symbols)]})
            if claim is not None:
                claimed.execute(_CLAIM_KEYS, claim)
            orders_cur.execute(_LOCK_ORDERS, {"ids": sorted(order_ids)})
            positions_cur.execute(
                _LOCK_OPEN_POSITIONS, {"acct": acct, "symbols": sorted(symbols)}
            )
        cursor_cur.execute(_LOAD_CURSOR, {"acct": acct})
        if leader is not None:
            leader_cur.execute(_LEADER_HELD,
                               {"pid": leader[0], "started": leader[1], "lock": leader[2]})
        if ahead is not None:
            new_keys = set(ahead.new_keys)
        else:
            new_keys = {by_stored_key[r[0]] for r in claimed.fetchall()} if keys else set()
        orders = (
            {order_ids[o.order_id]: o for o in map(_order, orders_cur.fetchall())} if keys else {}
        )
        open_rows = (
            {symbols[p.symbol]: p for p in map(_position, positions_cur.fetchall())}
            if keys else {}
        )
        stored_cursor = _cursor(cursor_cur.fetchone())
        moment_rows = moments_cur.fetchall() if keys else []
        moments = {symbols.get(r[0], r[0]): r[1] for r in moment_rows}
        reconciled = {symbols.get(r[0], r[0]): r[2] for r in moment_rows if r[2] is not None}
        if leader is not None and not _held(leader_cur.fetchone()):
            raise LostLeadership(
                f"the session holding the writer lock of account {acct} (backend "
                f"{leader[0]}) no longer holds it: this batch is not committed")

        # The pure core, on the new events only, in batch order.
        new_events = [ev for key, ev in first.items() if key in new_keys]
        result = apply_events(acct, orders, open_rows, new_events, moments, reconciled)
        moved = cursor_of(new_events)
        cursor = moved if stored_cursor is None else stored_cursor.advanced(moved)

        # Round trip 2: write everything and commit.
        if result.orders:
            conn.execute(_UPSERT_ORDERS, _orders_params(acct, result.orders.values()))
        if result.in_broker_word:
            conn.execute(_GROW_BASELINE_QTY,
                         {"rows": _rows(list(result.in_broker_word.items()))})
        existing = [p for p in result.positions if p.position_id is not None]
        created = [p for p in result.positions if p.position_id is None]
        if existing:
            conn.execute(_UPDATE_POSITIONS, _update_params(existing))
        if created:
            conn.execute(_INSERT_POSITIONS, _insert_params(acct, created))
        advanced = conn.cursor()
        if cursor != stored_cursor:
            advanced.execute(
                _ADVANCE_CURSOR,
                {"acct": acct, "fill_time": cursor.fill_time, "activity_id": cursor.activity_id},
            )
        if result.activities:
            conn.execute(_INSERT_ACTIVITIES, _activity_params(acct, result.activities))
        if result.changes:
            conn.execute(_INSERT_CHANGES, _change_params(acct, result.changes))
        if batch.dead_letters:
            conn.execute(_INSERT_DEAD_LETTERS, _dead_letter_params(acct, batch.dead_letters))
        if batch.replays:
            conn.execute(_MARK_REPLAYED, _replay_params(acct, batch.replays, new_keys))
        if batch.stream_position is not None:
            conn.execute(_ADVANCE_STREAM_POSITION,
                         {"stream": _text(batch.stream_position.stream),
                          "event_id": _text(batch.stream_position.event_id)})
        if ahead is not None:
            conn.execute("COMMIT")
    # Committed (the transaction block exited cleanly): read what the cursor upsert said,
    # which also covers a concurrent writer having moved it further.
    if cursor != stored_cursor:
        row = advanced.fetchone()
        cursor = Cursor(row[0], row[1]) if row is not None else cursor
    return BatchResult(
        applied_keys=frozenset(new_keys),
        duplicate_keys=frozenset(first.keys() - new_keys),
        fills_applied=result.fills_applied,
        stale_fills=result.stale_fills,
        inexact_fills=result.inexact_fills,
        positions_closed=len(result.closed),
        drift=tuple(result.drift),
        cursor=cursor,
        dead_letters=len(batch.dead_letters),
    )


def _held(row: Sequence[Any] | None) -> bool:
    return bool(row is not None and row[0])


def _snapshot(conn: psycopg.Connection[Any], account_id: str) -> StoreSnapshot:
    queries = (
        _SNAPSHOT_KEYS, _SNAPSHOT_ORDERS, _SNAPSHOT_POSITIONS, _SNAPSHOT_HISTORY,
        _SNAPSHOT_DEAD_LETTERS, _SNAPSHOT_CURSOR, _SNAPSHOT_ADJUSTMENTS, _SNAPSHOT_BASELINES,
        _SNAPSHOT_ACTIVITIES, _SNAPSHOT_CHANGES, _SNAPSHOT_MOMENTS,
    )
    # One consistent view, in one round trip.
    with conn.pipeline(), conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        curs = [conn.cursor() for _ in queries]
        for cur, query in zip(curs, queries, strict=True):
            cur.execute(query, [account_id])
        (keys, orders, positions, history, letters, cursor, adjusted, baselines, activities,
         changes, moments) = (c.fetchall() for c in curs)
    return StoreSnapshot(
        event_keys=frozenset(r[0] for r in keys),
        orders={r[0]: _order(r) for r in orders},
        positions=[_position(r) for r in positions],
        history=[_position(r) for r in history],
        cursor=_cursor(cursor[0] if cursor else None),
        dead_letters=[DeadLetter(reason=r[0], payload=bytes(r[1]), source=r[2],
                                 **({"key": r[3]} if r[3] is not None else {}))
                      for r in letters],
        adjustments=[Adjustment(*r) for r in adjusted],
        baseline_qty={r[0]: r[1] for r in baselines},
        activities=[_activity(r) for r in activities],
        position_changes=[_change(r) for r in changes],
        baseline_moments={r[0]: r[1] for r in moments},
        reconcile_moments={r[0]: r[2] for r in moments if r[2] is not None},
    )


def _broker_word(conn: psycopg.Connection[Any], word: BrokerWord) -> list[Adjustment]:
    acct = word.account_id
    with conn.transaction():
        open_rows = {p.symbol: p for p in map(
            _position, conn.execute(_LOCK_ALL_OPEN, [acct]).fetchall())}
        stored = {r[0]: (_order(r), r[-1]) for r in conn.execute(
            _LOCK_BASELINE_ORDERS, [sorted(o.order_id for o in word.orders)]).fetchall()}
        working: set[str] = set()
        if word.reason == RECONCILE and word.symbols:
            working = unsettled_symbols(conn.execute(
                _WORKING_ORDERS, [acct, [_text(sym) for sym in word.symbols],
                                  sorted(TERMINAL_STATUSES)]).fetchall(),
                word.working_filled)
        changes = plan_adjustments(acct, open_rows, word.positions, reason=word.reason,
                                   taken_at=word.taken_at, symbols=word.symbols,
                                   expected=word.expected, working=working)
        for broker in word.orders:
            prev, base = stored.get(broker.order_id, (None, Decimal(0)))
            state, new_base = baseline_order(prev, base, broker)
            conn.execute(_UPSERT_BASELINE_ORDER, {
                "id": _text(state.order_id), "acct": acct,
                "cid": _opt_text(state.client_order_id), "sym": _text(state.symbol),
                "side": _text(state.side), "typ": _opt_text(state.order_type),
                "cls": _opt_text(state.asset_class), "qty": state.order_qty,
                "fq": state.filled_qty, "fap": state.filled_avg_price,
                "st": _text(state.status), "ca": state.created_at, "ua": state.updated_at,
                "base": new_base,
            })
        for change in changes:
            adj = change.adjustment
            closed_id = opened_id = None
            if change.closed is not None:
                closed_id = change.closed.position_id
                conn.execute(_CLOSE_FOR_ADJUSTMENT,
                             {"at": word.taken_at, "reason": word.reason, "id": closed_id})
            if change.opened is not None:
                row = conn.execute(_OPEN_FROM_BROKER, {
                    "acct": acct, "sym": _text(adj.symbol), "side": change.opened.side,
                    "qty": abs(adj.qty_after), "avg": adj.avg_entry_price,
                    "reason": word.reason, "at": word.taken_at, "asset": adj.asset_id,
                    "origin": origin_of(word.reason),
                    "mult": change.opened.multiplier,
                    "cls": _opt_text(change.opened.asset_class),
                }).fetchone()
                opened_id = row[0] if row else None
            conn.execute(_INSERT_ADJUSTMENT, {
                "acct": acct, "sym": _text(adj.symbol), "asset": adj.asset_id,
                "reason": adj.reason, "before": adj.qty_before, "after": adj.qty_after,
                "avg": adj.avg_entry_price, "at": adj.taken_at, "closed": closed_id,
                "opened": opened_id,
            })
        if word.cursor is not None:
            conn.execute(_ADVANCE_CURSOR, {"acct": acct, "fill_time": word.cursor.fill_time,
                                           "activity_id": word.cursor.activity_id})
        for symbol, at in recorded_moments(
                word.reason, word.taken_at, word.moments,
                (c.adjustment.symbol for c in changes)).items():
            conn.execute(_UPSERT_BASELINE_MOMENT, {
                "acct": acct, "sym": _text(symbol), "at": at,
                "reconciled": at if word.reason == RECONCILE else None})
    return [c.adjustment for c in changes]
