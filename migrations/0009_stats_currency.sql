-- stream-supervisor schema, version 9: statistics per quote currency (docs/statistics.md).
--
-- A crypto pair quoted in another coin (ETH/BTC) realizes its P&L in that coin: summed
-- with dollars it gave figures in no currency at all. Each row of the statistics now
-- holds one currency, the quote currency of its trades: USD for equities and options,
-- the pair's quote for crypto (BTC/USD: USD, ETH/BTC: BTC, BTC/USDT: USDT). The tables
-- are derived data: rows from before this migration read as USD; recompute the days of
-- any crypto pair not quoted in USD (`stats --from <its first day>`).
--
-- Never edit this file once applied anywhere; add the next one.

ALTER TABLE strategy_stats ADD COLUMN currency text NOT NULL DEFAULT 'USD';
ALTER TABLE strategy_stats ALTER COLUMN currency DROP DEFAULT;
ALTER TABLE strategy_stats DROP CONSTRAINT strategy_stats_pkey,
    ADD CONSTRAINT strategy_stats_pkey PRIMARY KEY (account_id, strategy, currency, day);

ALTER TABLE strategy_symbol_stats ADD COLUMN currency text NOT NULL DEFAULT 'USD';
ALTER TABLE strategy_symbol_stats ALTER COLUMN currency DROP DEFAULT;
ALTER TABLE strategy_symbol_stats DROP CONSTRAINT strategy_symbol_stats_pkey,
    ADD CONSTRAINT strategy_symbol_stats_pkey
        PRIMARY KEY (account_id, strategy, currency, symbol, day);

COMMENT ON TABLE strategy_stats IS
    'Closed positions aggregated per account, strategy, quote currency and UTC day by `stream-supervisor stats`, nightly: one row per strategy and currency per day with at least one trade (no row for a day without trades). A trade is one position, flat to flat, counted on the UTC day it closed; its P&L is realized_pnl - fees - the cost of crypto fees taken in the coin, in the currency of the row. Each day is replaced whole in one transaction. Conventions: docs/statistics.md.';
COMMENT ON COLUMN strategy_stats.currency IS
    'Quote currency of the trades, and of every money column of the row: USD for equities and options, the pair''s quote for crypto (ETH/BTC: BTC). The to-date columns run over the strategy''s trades in this currency.';
COMMENT ON COLUMN strategy_symbol_stats.currency IS
    'Quote currency of the symbol (USD for equities and options, the pair''s quote for crypto), and of every money column of the row.';
COMMENT ON COLUMN strategy_stats.cum_net_pnl IS 'To date: sum of net P&L over all of the strategy''s trades in this currency up to the end of this day.';
