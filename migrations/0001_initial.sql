-- stream-supervisor schema, version 1: the tables of DESIGN section 5.
--
-- Applied by `stream-supervisor migrate` inside one transaction and recorded in
-- schema_migrations with its checksum: never edit this file once applied anywhere;
-- add 0002_*.sql instead.
--
-- Constraints only guard values this service computes itself (position side, status,
-- quantities). Values the broker sends (order side, status, ...) are stored as they came:
-- a CHECK on them would turn one odd frame into a batch that can never commit.

-- Layer 1 of exactly-once: one row per distinct update ever applied. ----------------------

CREATE TABLE alpaca_event_dedupe (
    event_key   text COLLATE "C" PRIMARY KEY,
    account_id  text NOT NULL,
    event_type  text NOT NULL,
    source      text NOT NULL CHECK (source IN ('stream', 'rest')),
    stored_at   timestamptz NOT NULL DEFAULT now(),
    seq         bigint GENERATED ALWAYS AS IDENTITY
);

-- The dedupe cache warms from the newest keys of an account (ORDER BY seq DESC LIMIT n).
CREATE INDEX alpaca_event_dedupe_account_newest ON alpaca_event_dedupe (account_id, seq);
-- Retention deletes by age. Rows arrive in stored_at order, so a BRIN index serves that
-- range scan at a fraction of a btree's size and insert cost (this table takes every key).
CREATE INDEX alpaca_event_dedupe_stored_at ON alpaca_event_dedupe USING brin (stored_at);

COMMENT ON TABLE alpaca_event_dedupe IS
    'Exactly-once, event level: every trade update applied, once. Written with INSERT .. ON CONFLICT DO NOTHING in the batch transaction: a key already here means the update was applied before.';
COMMENT ON COLUMN alpaca_event_dedupe.event_key IS
    'fill:<order id>:<cumulative filled qty after the fill> for fills (shared by the stream and REST FILL activities); <event>:<order id>:<event time in ns> for other updates.';
COMMENT ON COLUMN alpaca_event_dedupe.account_id IS 'Broker account the update belongs to.';
COMMENT ON COLUMN alpaca_event_dedupe.event_type IS 'The update''s event: fill, partial_fill, new, canceled, ... (unknown events are kept too).';
COMMENT ON COLUMN alpaca_event_dedupe.source IS 'Where the update was first seen: stream (WebSocket) or rest (FILL activities backfill, order refresh).';
COMMENT ON COLUMN alpaca_event_dedupe.stored_at IS 'Commit time of the batch that stored the key; retention prunes by it.';
COMMENT ON COLUMN alpaca_event_dedupe.seq IS 'Insertion order: newest keys of an account first for the cache warm start.';

-- Layer 2: each order's cumulative fill, a high-water mark. -------------------------------

CREATE TABLE broker_orders (
    alpaca_order_id   text COLLATE "C" PRIMARY KEY,
    account_id        text NOT NULL,
    client_order_id   text,
    symbol            text NOT NULL,
    side              text NOT NULL,
    order_type        text,
    asset_class       text,
    qty               numeric,
    filled_qty        numeric NOT NULL DEFAULT 0 CHECK (filled_qty >= 0),
    filled_avg_price  numeric,
    status            text NOT NULL,
    created_at        timestamptz,
    updated_at        timestamptz,
    first_stored_at   timestamptz NOT NULL DEFAULT now(),
    last_stored_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX broker_orders_account_symbol ON broker_orders (account_id, symbol);
-- Orders still working (backfill refreshes them); matches the query's literal NOT IN list.
CREATE INDEX broker_orders_account_working ON broker_orders (account_id)
    WHERE status NOT IN ('canceled', 'expired', 'filled', 'rejected', 'replaced');

COMMENT ON TABLE broker_orders IS
    'Exactly-once, order level: one row per broker order. A fill whose cumulative quantity is not above filled_qty changes nothing; status never regresses.';
COMMENT ON COLUMN broker_orders.alpaca_order_id IS 'The broker''s order id (order.id).';
COMMENT ON COLUMN broker_orders.account_id IS 'Broker account of the order.';
COMMENT ON COLUMN broker_orders.client_order_id IS 'The client''s own id for the order, when known (REST fill activities do not carry it).';
COMMENT ON COLUMN broker_orders.symbol IS 'Traded symbol.';
COMMENT ON COLUMN broker_orders.side IS 'buy or sell, as the broker reported it.';
COMMENT ON COLUMN broker_orders.order_type IS 'market, limit, stop, ... when known.';
COMMENT ON COLUMN broker_orders.asset_class IS 'us_equity, crypto, ... when known.';
COMMENT ON COLUMN broker_orders.qty IS 'Ordered quantity, when known.';
COMMENT ON COLUMN broker_orders.filled_qty IS 'Cumulative filled quantity applied to positions so far (the order''s high-water mark).';
COMMENT ON COLUMN broker_orders.filled_avg_price IS 'Average price of filled_qty; NULL until the first fill.';
COMMENT ON COLUMN broker_orders.status IS 'Latest order status; never moves back (a late "new" does not undo "filled").';
COMMENT ON COLUMN broker_orders.created_at IS 'When the broker created the order.';
COMMENT ON COLUMN broker_orders.updated_at IS 'Time of the newest update applied to the order (broker time).';
COMMENT ON COLUMN broker_orders.first_stored_at IS 'When this service first stored the order.';
COMMENT ON COLUMN broker_orders.last_stored_at IS 'When this service last wrote the row.';

-- Layer 3: positions, at most one open per account and symbol. ----------------------------

CREATE TABLE active_positions (
    id               bigserial PRIMARY KEY,
    account_id       text NOT NULL,
    symbol           text NOT NULL,
    side             text NOT NULL CHECK (side IN ('long', 'short')),
    qty              numeric NOT NULL CHECK (qty >= 0),
    avg_entry_price  numeric NOT NULL,
    alpaca_order_id  text NOT NULL,
    client_order_id  text,
    status           text NOT NULL CHECK (status IN ('open', 'closed')),
    realized_pnl     numeric NOT NULL DEFAULT 0,
    opened_at        timestamptz NOT NULL,
    closed_at        timestamptz,
    peak_qty         numeric NOT NULL CHECK (peak_qty >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT active_positions_closed_at_matches_status
        CHECK ((status = 'open') = (closed_at IS NULL)),
    CONSTRAINT active_positions_qty_matches_status
        CHECK ((status = 'open' AND qty > 0) OR (status = 'closed' AND qty = 0))
);

CREATE UNIQUE INDEX active_positions_one_open_per_symbol
    ON active_positions (account_id, symbol) WHERE status = 'open';
CREATE INDEX active_positions_account_symbol ON active_positions (account_id, symbol, opened_at);

COMMENT ON TABLE active_positions IS
    'Exactly-once, symbol level: positions built from applied fills. At most one open row per account and symbol (partial unique index); a row that reaches zero closes, one that crosses zero closes and a new row opens for the remainder.';
COMMENT ON COLUMN active_positions.id IS 'Position id; position_history keys on it.';
COMMENT ON COLUMN active_positions.account_id IS 'Broker account.';
COMMENT ON COLUMN active_positions.symbol IS 'Symbol.';
COMMENT ON COLUMN active_positions.side IS 'long or short, fixed when the row opens (a flip opens a new row).';
COMMENT ON COLUMN active_positions.qty IS 'Absolute open quantity; 0 once closed. Signed net = qty for long, -qty for short.';
COMMENT ON COLUMN active_positions.avg_entry_price IS 'Average entry price of the open quantity.';
COMMENT ON COLUMN active_positions.alpaca_order_id IS 'The order whose fill opened the position.';
COMMENT ON COLUMN active_positions.client_order_id IS 'client_order_id of the opening order, when known.';
COMMENT ON COLUMN active_positions.status IS 'open or closed.';
COMMENT ON COLUMN active_positions.realized_pnl IS 'Realized profit and loss: sum of closed_qty * (price - avg_entry_price) * direction.';
COMMENT ON COLUMN active_positions.opened_at IS 'Broker time of the opening fill.';
COMMENT ON COLUMN active_positions.closed_at IS 'Broker time of the closing fill; NULL while open.';
COMMENT ON COLUMN active_positions.peak_qty IS 'Largest absolute quantity the position reached.';
COMMENT ON COLUMN active_positions.updated_at IS 'When this service last wrote the row.';

-- Closed positions, append-only, never pruned. --------------------------------------------

CREATE TABLE position_history (
    position_id      bigint PRIMARY KEY,
    account_id       text NOT NULL,
    symbol           text NOT NULL,
    side             text NOT NULL CHECK (side IN ('long', 'short')),
    qty              numeric NOT NULL,
    peak_qty         numeric NOT NULL,
    avg_entry_price  numeric NOT NULL,
    realized_pnl     numeric NOT NULL,
    alpaca_order_id  text NOT NULL,
    client_order_id  text,
    opened_at        timestamptz NOT NULL,
    closed_at        timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX position_history_account_symbol ON position_history (account_id, symbol, closed_at);

CREATE FUNCTION position_history_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'position_history is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Closed positions are an audit record; they are never updated or deleted.';
END
$$;

CREATE TRIGGER position_history_no_update_delete
    BEFORE UPDATE OR DELETE ON position_history
    FOR EACH ROW EXECUTE FUNCTION position_history_append_only();
CREATE TRIGGER position_history_no_truncate
    BEFORE TRUNCATE ON position_history
    FOR EACH STATEMENT EXECUTE FUNCTION position_history_append_only();

COMMENT ON TABLE position_history IS
    'Every position that closed, copied whole in the transaction that closed it. Append-only (triggers refuse UPDATE, DELETE, TRUNCATE); statistics and audits read it, retention never prunes it.';
COMMENT ON COLUMN position_history.position_id IS 'active_positions.id of the position: each position enters once.';
COMMENT ON COLUMN position_history.account_id IS 'Broker account.';
COMMENT ON COLUMN position_history.symbol IS 'Symbol.';
COMMENT ON COLUMN position_history.side IS 'long or short.';
COMMENT ON COLUMN position_history.qty IS 'Open quantity at close: always 0.';
COMMENT ON COLUMN position_history.peak_qty IS 'Largest absolute quantity the position reached.';
COMMENT ON COLUMN position_history.avg_entry_price IS 'Average entry price when it closed.';
COMMENT ON COLUMN position_history.realized_pnl IS 'Realized profit and loss of the whole position.';
COMMENT ON COLUMN position_history.alpaca_order_id IS 'The order whose fill opened the position.';
COMMENT ON COLUMN position_history.client_order_id IS 'client_order_id of the opening order, when known.';
COMMENT ON COLUMN position_history.opened_at IS 'Broker time of the opening fill.';
COMMENT ON COLUMN position_history.closed_at IS 'Broker time of the closing fill.';
COMMENT ON COLUMN position_history.recorded_at IS 'Commit time of the batch that closed it.';

-- How far each account's fill history is durably applied. ---------------------------------

CREATE TABLE stream_cursors (
    account_id   text PRIMARY KEY,
    fill_time    timestamptz,
    activity_id  text COLLATE "C",
    updated_at   timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE stream_cursors IS
    'Per account, how far fills are durably applied; written in the same transaction as the fills, and only ever forward. REST backfill resumes from here (with an overlap window).';
COMMENT ON COLUMN stream_cursors.account_id IS 'Broker account.';
COMMENT ON COLUMN stream_cursors.fill_time IS 'Broker time of the newest applied fill.';
COMMENT ON COLUMN stream_cursors.activity_id IS 'Newest applied REST FILL activity id (ids sort in time order, compared bytewise).';
COMMENT ON COLUMN stream_cursors.updated_at IS 'When the cursor last moved.';

-- Frames that could not be decoded, kept verbatim. ----------------------------------------

CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    account_id   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    reason       text NOT NULL,
    payload      bytea NOT NULL,
    source       text NOT NULL
);

CREATE INDEX dead_letters_account_received ON dead_letters (account_id, received_at);

COMMENT ON TABLE dead_letters IS
    'Frames that could not become events (malformed JSON, wrong types, oversized ...), kept with the reason; the stream went on without them.';
COMMENT ON COLUMN dead_letters.id IS 'Arrival order.';
COMMENT ON COLUMN dead_letters.account_id IS 'Broker account whose stream sent it.';
COMMENT ON COLUMN dead_letters.received_at IS 'Commit time of the batch that stored it.';
COMMENT ON COLUMN dead_letters.reason IS 'Why it could not be decoded.';
COMMENT ON COLUMN dead_letters.payload IS 'The frame as received (oversized frames truncated).';
COMMENT ON COLUMN dead_letters.source IS 'stream or rest.';
