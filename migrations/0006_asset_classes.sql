-- stream-supervisor schema, version 6: every asset class, multi-leg orders and the broker's
-- non-trade activities (docs/design.md, section 10).
--
-- Options carry a contract multiplier (100 shares a contract), so positions record their
-- asset class and multiplier; multi-leg orders are stored as a parent with its legs; the
-- activities that move a position without a fill (expiry, assignment, exercise, splits,
-- crypto fees, transfers) are a second source of keyed events with a table of their own.
--
-- Never edit this file once applied anywhere; add the next one.

ALTER TABLE broker_orders
    ADD COLUMN order_class text,
    ADD COLUMN parent_order_id text;

CREATE INDEX broker_orders_parent ON broker_orders (parent_order_id)
    WHERE parent_order_id IS NOT NULL;

COMMENT ON COLUMN broker_orders.order_class IS 'The broker''s order class: mleg for a multi-leg order, whose own symbol and side are empty and whose legs are orders of their own; NULL when the broker did not say (simple).';
COMMENT ON COLUMN broker_orders.parent_order_id IS 'For a leg of a multi-leg order: the parent order''s id. A leg''s fills change its own symbol''s position; the parent''s never change any.';

ALTER TABLE active_positions
    ADD COLUMN asset_class text,
    ADD COLUMN multiplier numeric NOT NULL DEFAULT 1 CHECK (multiplier > 0),
    ADD COLUMN closing_activity_id text;

ALTER TABLE position_history
    ADD COLUMN asset_class text,
    ADD COLUMN multiplier numeric NOT NULL DEFAULT 1,
    ADD COLUMN closing_activity_id text;

COMMENT ON COLUMN active_positions.asset_class IS 'us_equity, us_option or crypto (NULL for rows from before migration 0006).';
COMMENT ON COLUMN active_positions.multiplier IS 'Contract multiplier: 100 for a standard option (price is per share, a contract is 100 shares), 1 for shares and coins. Realized P&L, cost basis (qty * avg_entry_price * multiplier) and exposure are in money.';
COMMENT ON COLUMN active_positions.closing_activity_id IS 'The non-trade activity (account_activities) that closed the row: an expiry, an assignment, an exercise, a transfer out; NULL when a fill closed it.';
COMMENT ON COLUMN position_history.closing_activity_id IS 'The non-trade activity that closed the position, if one did.';

CREATE TABLE account_activities (
    activity_id      text COLLATE "C" NOT NULL,
    account_id       text NOT NULL,
    activity_type    text NOT NULL,
    symbol           text NOT NULL,
    qty              numeric,
    price            numeric,
    occurred_at      timestamptz NOT NULL,
    outcome          text NOT NULL,
    effects          jsonb NOT NULL DEFAULT '{}',
    payload          bytea NOT NULL,
    stored_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, activity_id)
);

COMMENT ON TABLE account_activities IS
    'Non-trade activities that move positions (OPEXP, OPASN, OPEXC, SPLIT, CFEE, ACATC, ACATS, and REORG, SPIN, MA, NC stored but not applied), each once, applied in the batch transaction that stored it. The newest activity_id per account is where the next activities backfill resumes.';
COMMENT ON COLUMN account_activities.outcome IS 'applied; not understood (stored and reported by reconcile, never guessed at); no open position; more than the position holds.';
COMMENT ON COLUMN account_activities.effects IS 'What it did: signed quantity change per symbol, as {"symbol": "qty"}. check adds these to the orders'' fills.';
COMMENT ON COLUMN account_activities.payload IS 'The activity as the broker sent it (JSON).';
COMMENT ON COLUMN position_history.asset_class IS 'us_equity, us_option or crypto, as on the closed position.';
COMMENT ON COLUMN position_history.multiplier IS 'Contract multiplier of the closed position (100 for a standard option).';
COMMENT ON COLUMN account_activities.activity_id IS 'The broker''s activity id (<17-digit time>::<uuid>, ordered): the key of exactly-once for activities.';
COMMENT ON COLUMN account_activities.account_id IS 'Broker account.';
COMMENT ON COLUMN account_activities.activity_type IS 'The broker''s activity type: OPEXP, OPASN, OPEXC, SPLIT, CFEE, ACATC, ACATS, REORG, SPIN, MA, NC, ...';
COMMENT ON COLUMN account_activities.symbol IS 'The symbol it names, stored spelling (crypto with its slash).';
COMMENT ON COLUMN account_activities.qty IS 'The quantity the broker states (contracts for options; the coin for CFEE, negative; shares added for SPLIT).';
COMMENT ON COLUMN account_activities.price IS 'The price or per-share value the broker states, when it does.';
COMMENT ON COLUMN account_activities.occurred_at IS 'Broker time of the activity (its date, end of the trading day, when only a date is given).';
COMMENT ON COLUMN account_activities.stored_at IS 'When this service stored it.';
