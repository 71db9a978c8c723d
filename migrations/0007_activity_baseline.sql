-- stream-supervisor schema, version 7: non-trade activities and baselines (docs/design.md,
-- section 10).
--
-- A baseline takes the broker's positions, which already hold every activity whose effect
-- came before it (a crypto fee charged at its fill, a split, an expiry); such an activity
-- posting later is stored but not applied. baseline_moments records, per account and per
-- symbol, the broker-clock moment of the latest baseline. position_changes records every
-- change a non-trade activity made to a position, including those that leave it open (a
-- split, a fee, a partial assignment), with the activity's id.
--
-- Never edit this file once applied anywhere; add the next one.

CREATE TABLE baseline_moments (
    account_id   text NOT NULL,
    symbol       text COLLATE "C" NOT NULL,
    moment       timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, symbol)
);

COMMENT ON TABLE baseline_moments IS
    'The broker-clock moment of the latest baseline (or rebaseline), per account and symbol, and of the latest reconcile that adjusted a symbol (that symbol only): a non-trade activity whose effect is at or before it is already in the positions the baseline or reconcile took, so it is stored (account_activities, outcome "in the baseline") and not applied. Moments only move forward.';
COMMENT ON COLUMN baseline_moments.account_id IS 'Broker account.';
COMMENT ON COLUMN baseline_moments.symbol IS 'Stored spelling of the symbol; the empty string is the whole account: the broker''s clock (GET /v2/clock) read before any of the baseline''s reads.';
COMMENT ON COLUMN baseline_moments.moment IS 'For the account (symbol ''''): the broker''s clock read before any of the baseline''s reads. For a symbol: the broker''s clock read at the start of the round the symbol settled in (at least the transaction_time of its newest fill read; a fill between the clock read and the positions read is in them, and so is its fee); for a symbol a reconcile adjusted (reconcile --apply, or the scheduled reconcile), the clock read before its positions read, where later. docs/design.md, section 10.';
COMMENT ON COLUMN baseline_moments.recorded_at IS 'When this service wrote it.';

CREATE TABLE position_changes (
    account_id       text NOT NULL,
    activity_id      text COLLATE "C" NOT NULL,
    symbol           text NOT NULL,
    position_id      bigint,
    activity_type    text NOT NULL,
    qty_before       numeric NOT NULL,
    qty_after        numeric NOT NULL,
    avg_before       numeric,
    avg_after        numeric,
    realized_pnl     numeric NOT NULL,
    changed_at       timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, activity_id, symbol)
);

CREATE INDEX position_changes_position ON position_changes (position_id);

CREATE FUNCTION position_changes_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'position_changes is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Changes made by non-trade activities are an audit record; they are never updated or deleted.';
END
$$;

CREATE TRIGGER position_changes_no_update_delete
    BEFORE UPDATE OR DELETE ON position_changes
    FOR EACH ROW EXECUTE FUNCTION position_changes_append_only();
CREATE TRIGGER position_changes_no_truncate
    BEFORE TRUNCATE ON position_changes
    FOR EACH STATEMENT EXECUTE FUNCTION position_changes_append_only();

COMMENT ON TABLE position_changes IS
    'Every change a non-trade activity made to a position (a fee, a split, an expiry, an assignment and the stock it moved, a transfer), one row per activity and symbol, written in the transaction that applied it. Append-only. A change that closes the row also copies it to position_history (closing_activity_id), which stays one row per closed position.';
COMMENT ON COLUMN position_changes.account_id IS 'Broker account.';
COMMENT ON COLUMN position_changes.activity_id IS 'The account_activities row that made the change.';
COMMENT ON COLUMN position_changes.symbol IS 'The symbol changed (an assignment changes the option and its underlying).';
COMMENT ON COLUMN position_changes.position_id IS 'active_positions.id of the row changed (the row opened, for a transfer into a flat symbol); NULL only if that row was opened and closed within one batch.';
COMMENT ON COLUMN position_changes.activity_type IS 'CFEE, OPEXP, OPASN, OPEXC, SPLIT, ACATC or ACATS.';
COMMENT ON COLUMN position_changes.qty_before IS 'Signed open quantity before the change (0 when flat).';
COMMENT ON COLUMN position_changes.qty_after IS 'Signed open quantity after it (0 when it closed the row).';
COMMENT ON COLUMN position_changes.avg_before IS 'Average entry price before (NULL when flat).';
COMMENT ON COLUMN position_changes.avg_after IS 'Average entry price after (a split scales it back; unchanged by a fee or a transfer out).';
COMMENT ON COLUMN position_changes.realized_pnl IS 'The row''s realized P&L after the change (an expiry realizes the premium).';
COMMENT ON COLUMN position_changes.changed_at IS 'Broker time of the activity (account_activities.occurred_at).';
COMMENT ON COLUMN position_changes.recorded_at IS 'Commit time of the batch that applied it.';
