-- stream-supervisor schema, version 10: what earlier versions left behind that later code
-- reads differently, repaired once (docs/design.md, section 9 "Migrations").
--
-- Never edit this file once applied anywhere; add the next one.
--
-- Option positions open across migration 0006. Code before it stored option fills as
-- contracts at a per-share price, and 0006 gave every existing row multiplier 1: a
-- position opened then and closed now realized per share, a hundredth of the money. An
-- open row with no asset class whose symbol is an OCC option symbol is a standard option
-- (100 a contract); what it realized so far was per share, so it is scaled too. Rows
-- already closed stay as they were (position_history is append-only): statistics of
-- option trades closed before 0006 are per share (docs/statistics.md).
UPDATE active_positions
   SET asset_class = 'us_option', multiplier = 100, realized_pnl = realized_pnl * 100,
       updated_at = now()
 WHERE status = 'open' AND asset_class IS NULL
   AND symbol ~ '^[A-Z][A-Z0-9.]{0,5}[0-9]{6}[CP][0-9]{8}$';

-- Reconciles done before migration 0008 recorded their moment (the broker's clock read
-- before the positions read) in baseline_moments.moment only. 0008 added reconciled_at,
-- NULL for them: a fill they had already taken, reaching us after the upgrade (a dead
-- letter replayed), moved the position again. Where a symbol's latest adjustment is a
-- reconcile taken at or after its moment, that moment is the reconcile's.
UPDATE baseline_moments m
   SET reconciled_at = m.moment
 WHERE m.reconciled_at IS NULL AND m.symbol <> ''
   AND EXISTS (
       SELECT 1 FROM position_adjustments a
        WHERE a.account_id = m.account_id AND a.symbol = m.symbol
          AND a.reason = 'reconcile' AND a.taken_at >= m.moment
          AND NOT EXISTS (
              SELECT 1 FROM position_adjustments later
               WHERE later.account_id = a.account_id AND later.symbol = a.symbol
                 AND later.reason <> 'reconcile' AND later.taken_at > a.taken_at));
