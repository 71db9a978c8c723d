-- stream-supervisor schema, version 2: where positions came from, the fees they paid, and
-- the nightly per-strategy statistics (`stream-supervisor stats`).
--
-- Applied once, checksummed like 0001: never edit it once applied; add a new file.
-- Conventions (trades, breakevens, NULLs, days without trades) are in docs/statistics.md.

-- Where a position came from, and what it paid. -------------------------------------------
--
-- Both columns are added with a constant default: PostgreSQL records it in the catalog
-- and rewrites nothing, so this is instant on a big table and position_history's
-- append-only triggers (which fire on UPDATE) never see it.

ALTER TABLE active_positions
    ADD COLUMN origin text NOT NULL DEFAULT 'fill'
        CONSTRAINT active_positions_origin_is_a_word CHECK (origin ~ '^[a-z][a-z_]*$'),
    ADD COLUMN fees numeric NOT NULL DEFAULT 0;

ALTER TABLE position_history
    ADD COLUMN origin text NOT NULL DEFAULT 'fill'
        CONSTRAINT position_history_origin_is_a_word CHECK (origin ~ '^[a-z][a-z_]*$'),
    ADD COLUMN fees numeric NOT NULL DEFAULT 0;

COMMENT ON COLUMN active_positions.origin IS
    'How the position came to be: fill = opened by a fill this service applied; baseline = taken from the broker''s positions at the service''s first start (opened before the service knew it). Later origins (transfer, assignment, ...) are lowercase words. Statistics put baseline positions under the strategy "baseline".';
COMMENT ON COLUMN active_positions.fees IS
    'Fees this service knows for the position, in money (commissions, regulatory fees ...): positive = paid, negative = a rebate. 0 when none are known. Net P&L = realized_pnl - fees.';
COMMENT ON COLUMN position_history.origin IS
    'active_positions.origin, copied when the position closed: fill or baseline (or a later origin).';
COMMENT ON COLUMN position_history.fees IS
    'active_positions.fees, copied when the position closed: fees known for the whole position (positive = paid). Net P&L = realized_pnl - fees.';

-- Per strategy and day. ----------------------------------------------------------------------

CREATE TABLE strategy_stats (
    account_id              text NOT NULL,
    strategy                text NOT NULL,
    day                     date NOT NULL,
    trades                  integer NOT NULL CHECK (trades > 0),
    wins                    integer NOT NULL CHECK (wins >= 0),
    losses                  integer NOT NULL CHECK (losses >= 0),
    breakevens              integer NOT NULL CHECK (breakevens >= 0),
    win_rate                double precision NOT NULL,
    gross_profit            numeric NOT NULL,
    gross_loss              numeric NOT NULL,
    net_pnl                 numeric NOT NULL,
    profit_factor           double precision,
    expectancy              numeric NOT NULL,
    avg_win                 numeric,
    avg_loss                numeric,
    largest_win             numeric,
    largest_loss            numeric,
    avg_holding_seconds     double precision NOT NULL,
    median_holding_seconds  double precision NOT NULL,
    max_consecutive_losses  integer NOT NULL,
    cum_net_pnl             numeric NOT NULL,
    max_drawdown            numeric NOT NULL CHECK (max_drawdown >= 0),
    sqn                     double precision,
    sharpe_daily            double precision,
    PRIMARY KEY (account_id, strategy, day),
    CONSTRAINT strategy_stats_trades_add_up CHECK (wins + losses + breakevens = trades)
);

-- `stats` replaces a whole day at a time (every account, or one).
CREATE INDEX strategy_stats_day ON strategy_stats (day);

COMMENT ON TABLE strategy_stats IS
    'Closed positions (position_history) aggregated per account, strategy and UTC day by `stream-supervisor stats`, nightly: one row per strategy per day with at least one trade (no row for a day without trades). A trade is one closed position, counted on the UTC day of its closed_at; its P&L is realized_pnl - fees. Each day is replaced whole in one transaction. Conventions: docs/statistics.md.';
COMMENT ON COLUMN strategy_stats.account_id IS 'Broker account.';
COMMENT ON COLUMN strategy_stats.strategy IS
    'From the opening order''s client_order_id by STREAM_SUPERVISOR_STRATEGY_PATTERN (its group "strategy"; default: the text before the first - or :); "unattributed" when there is no client_order_id, no match or an empty match; "baseline" for positions whose origin is baseline.';
COMMENT ON COLUMN strategy_stats.day IS 'UTC calendar day of the trades'' closed_at.';
COMMENT ON COLUMN strategy_stats.trades IS 'Closed positions that day (a position reduced in steps then closed is one; a flip''s closed side is one).';
COMMENT ON COLUMN strategy_stats.wins IS 'Trades with net P&L > 0.';
COMMENT ON COLUMN strategy_stats.losses IS 'Trades with net P&L < 0.';
COMMENT ON COLUMN strategy_stats.breakevens IS 'Trades with net P&L = 0 exactly.';
COMMENT ON COLUMN strategy_stats.win_rate IS 'wins / trades, 0 to 1; breakevens stay in the denominator.';
COMMENT ON COLUMN strategy_stats.gross_profit IS 'Sum of winning trades'' net P&L (0 when none).';
COMMENT ON COLUMN strategy_stats.gross_loss IS 'Sum of losing trades'' net P&L as a positive number (0 when none).';
COMMENT ON COLUMN strategy_stats.net_pnl IS 'Sum of net P&L (= gross_profit - gross_loss).';
COMMENT ON COLUMN strategy_stats.profit_factor IS 'gross_profit / gross_loss; NULL when gross_loss is 0.';
COMMENT ON COLUMN strategy_stats.expectancy IS 'net_pnl / trades: mean net P&L per trade.';
COMMENT ON COLUMN strategy_stats.avg_win IS 'gross_profit / wins; NULL when no wins.';
COMMENT ON COLUMN strategy_stats.avg_loss IS 'Mean net P&L of the losing trades, a negative number (-gross_loss / losses); NULL when no losses.';
COMMENT ON COLUMN strategy_stats.largest_win IS 'Largest net P&L of a winning trade; NULL when no wins.';
COMMENT ON COLUMN strategy_stats.largest_loss IS 'Net P&L of the worst losing trade, a negative number; NULL when no losses.';
COMMENT ON COLUMN strategy_stats.avg_holding_seconds IS 'Mean of closed_at - opened_at over the day''s trades, in seconds.';
COMMENT ON COLUMN strategy_stats.median_holding_seconds IS 'Median of closed_at - opened_at, in seconds (the mean of the two middle values for an even count).';
COMMENT ON COLUMN strategy_stats.max_consecutive_losses IS 'Longest run of losing trades within the day, trades ordered by closed_at (then position id); a win or a breakeven ends a run; 0 when no losses.';
COMMENT ON COLUMN strategy_stats.cum_net_pnl IS 'To date: sum of net P&L over all of the strategy''s trades up to the end of this day.';
COMMENT ON COLUMN strategy_stats.max_drawdown IS 'To date: the largest fall, in money, of the cumulative net P&L curve (trade by trade, in closed_at order, starting at 0 before the first trade) from a running peak, up to the end of this day; 0 when it never fell.';
COMMENT ON COLUMN strategy_stats.sqn IS 'To date: System Quality Number over all trades up to this day: sqrt(N) * mean / sample standard deviation of trade net P&L; NULL for fewer than 2 trades or a zero deviation.';
COMMENT ON COLUMN strategy_stats.sharpe_daily IS 'To date: mean / sample standard deviation of daily net P&L over the days with trades up to this day, * sqrt(252), no risk-free rate (a ratio of money to money: no capital base needed); NULL under 2 days or a zero deviation.';

-- Per strategy, symbol and day: the per-day columns only. --------------------------------

CREATE TABLE strategy_symbol_stats (
    account_id              text NOT NULL,
    strategy                text NOT NULL,
    symbol                  text NOT NULL,
    day                     date NOT NULL,
    trades                  integer NOT NULL CHECK (trades > 0),
    wins                    integer NOT NULL CHECK (wins >= 0),
    losses                  integer NOT NULL CHECK (losses >= 0),
    breakevens              integer NOT NULL CHECK (breakevens >= 0),
    win_rate                double precision NOT NULL,
    gross_profit            numeric NOT NULL,
    gross_loss              numeric NOT NULL,
    net_pnl                 numeric NOT NULL,
    profit_factor           double precision,
    expectancy              numeric NOT NULL,
    avg_win                 numeric,
    avg_loss                numeric,
    largest_win             numeric,
    largest_loss            numeric,
    avg_holding_seconds     double precision NOT NULL,
    median_holding_seconds  double precision NOT NULL,
    max_consecutive_losses  integer NOT NULL,
    PRIMARY KEY (account_id, strategy, symbol, day),
    CONSTRAINT strategy_symbol_stats_trades_add_up CHECK (wins + losses + breakevens = trades)
);

CREATE INDEX strategy_symbol_stats_day ON strategy_symbol_stats (day);

COMMENT ON TABLE strategy_symbol_stats IS
    'strategy_stats broken down by symbol: the same per-day columns, with the same definitions, over the strategy''s trades in one symbol (no to-date columns). Written in the same transaction as the day''s strategy_stats rows.';
COMMENT ON COLUMN strategy_symbol_stats.account_id IS 'Broker account.';
COMMENT ON COLUMN strategy_symbol_stats.strategy IS 'As strategy_stats.strategy.';
COMMENT ON COLUMN strategy_symbol_stats.symbol IS 'Symbol of the positions.';
COMMENT ON COLUMN strategy_symbol_stats.day IS 'UTC calendar day of the trades'' closed_at.';
COMMENT ON COLUMN strategy_symbol_stats.trades IS 'Closed positions in this symbol that day.';
COMMENT ON COLUMN strategy_symbol_stats.wins IS 'Trades with net P&L > 0.';
COMMENT ON COLUMN strategy_symbol_stats.losses IS 'Trades with net P&L < 0.';
COMMENT ON COLUMN strategy_symbol_stats.breakevens IS 'Trades with net P&L = 0 exactly.';
COMMENT ON COLUMN strategy_symbol_stats.win_rate IS 'wins / trades; breakevens stay in the denominator.';
COMMENT ON COLUMN strategy_symbol_stats.gross_profit IS 'Sum of winning trades'' net P&L (0 when none).';
COMMENT ON COLUMN strategy_symbol_stats.gross_loss IS 'Sum of losing trades'' net P&L as a positive number (0 when none).';
COMMENT ON COLUMN strategy_symbol_stats.net_pnl IS 'Sum of net P&L.';
COMMENT ON COLUMN strategy_symbol_stats.profit_factor IS 'gross_profit / gross_loss; NULL when gross_loss is 0.';
COMMENT ON COLUMN strategy_symbol_stats.expectancy IS 'net_pnl / trades.';
COMMENT ON COLUMN strategy_symbol_stats.avg_win IS 'gross_profit / wins; NULL when no wins.';
COMMENT ON COLUMN strategy_symbol_stats.avg_loss IS 'Mean net P&L of the losing trades, negative; NULL when no losses.';
COMMENT ON COLUMN strategy_symbol_stats.largest_win IS 'Largest winning net P&L; NULL when no wins.';
COMMENT ON COLUMN strategy_symbol_stats.largest_loss IS 'Worst losing net P&L, negative; NULL when no losses.';
COMMENT ON COLUMN strategy_symbol_stats.avg_holding_seconds IS 'Mean of closed_at - opened_at, in seconds.';
COMMENT ON COLUMN strategy_symbol_stats.median_holding_seconds IS 'Median of closed_at - opened_at, in seconds.';
COMMENT ON COLUMN strategy_symbol_stats.max_consecutive_losses IS 'Longest run of losing trades in this symbol within the day (closed_at order); a win or a breakeven ends a run.';
