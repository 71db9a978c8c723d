-- stream-supervisor schema, version 4: real accounts (docs/design.md, section 9).
--
-- An account that held positions and open orders before the service first started is
-- taken at the broker's word (a baseline); the broker stays the final word afterwards
-- (`reconcile --apply`). Every such change is an explicit row of position_adjustments,
-- never a silent overwrite. Never edit this file once applied anywhere; add the next one.

CREATE TABLE position_adjustments (
    id               bigserial PRIMARY KEY,
    account_id       text NOT NULL,
    symbol           text NOT NULL,
    asset_id         text,
    reason           text NOT NULL
        CONSTRAINT position_adjustments_reason_is_a_word CHECK (reason ~ '^[a-z][a-z_]*$'),
    qty_before       numeric NOT NULL,
    qty_after        numeric NOT NULL,
    avg_entry_price  numeric,
    taken_at         timestamptz NOT NULL,
    closed_position_id  bigint,
    opened_position_id  bigint,
    recorded_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX position_adjustments_account_symbol
    ON position_adjustments (account_id, symbol, id);

CREATE TRIGGER position_adjustments_no_update_delete
    BEFORE UPDATE OR DELETE ON position_adjustments
    FOR EACH ROW EXECUTE FUNCTION position_history_append_only();

COMMENT ON TABLE position_adjustments IS
    'Every change to a position that did not come from a fill: the broker''s positions taken at the first start (baseline), by `stream-supervisor rebaseline` (rebaseline), or by `reconcile --apply` (reconcile). Append-only. The open net quantity of a symbol always equals the signed sum of its orders'' (filled_qty - baseline_qty) plus the sum of its adjustments'' (qty_after - qty_before); `check` holds it.';
COMMENT ON COLUMN position_adjustments.symbol IS 'Symbol, in the canonical spelling (crypto pairs with their slash).';
COMMENT ON COLUMN position_adjustments.asset_id IS 'The broker''s asset id, when it gave one.';
COMMENT ON COLUMN position_adjustments.reason IS 'baseline, rebaseline or reconcile.';
COMMENT ON COLUMN position_adjustments.qty_before IS 'Our signed open quantity before (shorts negative).';
COMMENT ON COLUMN position_adjustments.qty_after IS 'The broker''s signed quantity, which the position was set to.';
COMMENT ON COLUMN position_adjustments.avg_entry_price IS 'The broker''s avg_entry_price for the new open row; NULL when flat.';
COMMENT ON COLUMN position_adjustments.taken_at IS 'The moment of the broker snapshot the adjustment is taken from.';
COMMENT ON COLUMN position_adjustments.closed_position_id IS 'The open row the adjustment closed (close_reason says why), if any.';
COMMENT ON COLUMN position_adjustments.opened_position_id IS 'The row it opened with the broker''s quantity and average (origin says why), if any.';

-- No CHECK against filled_qty: a bust (section 11) of a fill from before the baseline
-- lowers filled_qty below the mark, and must still be stored.
ALTER TABLE broker_orders
    ADD COLUMN baseline_qty numeric NOT NULL DEFAULT 0
        CONSTRAINT broker_orders_baseline_not_negative CHECK (baseline_qty >= 0);
COMMENT ON COLUMN broker_orders.baseline_qty IS
    'Part of filled_qty that was already in the broker''s positions when a baseline was taken (its high-water mark then): those fills are in an adjustment, not counted again.';

ALTER TABLE active_positions
    ADD COLUMN asset_id text,
    ADD COLUMN close_reason text
        CONSTRAINT active_positions_close_reason_is_a_word
            CHECK (close_reason ~ '^[a-z][a-z_]*$');
ALTER TABLE position_history
    ADD COLUMN asset_id text,
    ADD COLUMN close_reason text;
COMMENT ON COLUMN active_positions.asset_id IS 'The broker''s asset id, when a baseline or reconcile gave it.';
COMMENT ON COLUMN active_positions.close_reason IS 'NULL when a fill closed the row; otherwise the adjustment that did (baseline, rebaseline, reconcile).';
COMMENT ON COLUMN position_history.asset_id IS 'active_positions.asset_id, copied when the position closed.';
COMMENT ON COLUMN position_history.close_reason IS 'active_positions.close_reason, copied when the position closed.';
