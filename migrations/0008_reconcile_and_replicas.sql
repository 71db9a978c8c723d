-- stream-supervisor schema, version 8: the moment a reconcile took a symbol's quantity
-- (docs/design.md, section 9), and the accounts each replica serves (section 11).
--
-- A reconcile sets a symbol to the broker's quantity, which holds every fill the broker
-- executed before its positions read, including one that never reached us (a dead letter,
-- a fill the stream lost). Should that fill reach us later (the dead letter replayed, a
-- backfill's overlap), it is already in the quantity the reconcile took: stamped at or
-- before the reconcile's moment, it moves its order's mark and baseline_qty, not the
-- position. A baseline's moments are not used that way: a baseline's own marks decide
-- which fills it holds, and its per-symbol moments may be later than its positions read.
--
-- Never edit this file once applied anywhere; add the next one.

ALTER TABLE baseline_moments ADD COLUMN reconciled_at timestamptz;

COMMENT ON COLUMN baseline_moments.reconciled_at IS
    'For a symbol a reconcile adjusted: the broker''s clock read before that reconcile''s positions read (the latest such reconcile; only moves forward). A fill of the symbol stamped at or before it is already in the quantity the reconcile took: it moves its order''s filled_qty and baseline_qty, not the position. NULL: never reconciled.';

COMMENT ON COLUMN account_activities.outcome IS
    'applied; not understood (stored and reported by reconcile, never guessed at); no open position; more than the position holds; the position opened after it took effect (a split posted after the sales that closed what it split); in the baseline; baseline within its day. Every outcome but applied changed nothing, and reconcile lists it.';

-- A bust or correction reaching us after the reconcile that took its effect moves its
-- order's filled_qty down, and baseline_qty with it: below zero where the fills it undoes
-- were ours. The identity check holds (position = side x (filled_qty - baseline_qty),
-- summed, plus adjustments); only the sign rule goes.
ALTER TABLE broker_orders DROP CONSTRAINT broker_orders_baseline_not_negative;
COMMENT ON COLUMN broker_orders.baseline_qty IS
    'Part of filled_qty whose effect on positions came through the broker''s word, not through our fills: what a baseline found filled (its high-water mark then), plus fills and revisions that reached us only after the reconcile that adjusted their symbol (negative where such a bust undid fills we had applied). Those are in an adjustment, not counted again.';

-- Replicas whose accounts differ (a unit per account, stream-supervisor@NAME, or a rolling
-- deploy of a changed accounts file): each says which accounts it serves, and an account
-- is assigned only to a replica that serves it (docs/design.md, section 11). NULL: a
-- replica from before, taken to serve every account.
ALTER TABLE stream_supervisor_replicas ADD COLUMN account_names text[];
COMMENT ON COLUMN stream_supervisor_replicas.account_names IS
    'The names of the accounts this replica serves (its accounts file, or the one account of a per-account unit): accounts are assigned only among the live replicas that serve them. NULL: a replica from before this column, taken to serve every account.';
