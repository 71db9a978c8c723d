-- stream-supervisor schema, version 3: replaying dead letters (docs/design.md, section 8).
--
-- `stream-supervisor dead-letters --replay ID` decodes a dead letter again with the code
-- of the day and commits it through the writer's exactly-once path. When no process
-- holds the account's writer lock, the command does it itself under that lock; when a
-- service holds it, the command sets replay_requested_at and the service's leader
-- replays the row through its own store connection. Either way the outcome is written to
-- the row in the transaction that commits the replayed update.
--
-- Never edit this file once applied anywhere; add the next one.

ALTER TABLE dead_letters
    ADD COLUMN letter_key text,
    ADD COLUMN replay_requested_at timestamptz,
    ADD COLUMN replayed_at timestamptz,
    ADD COLUMN replay_result text;

-- A batch retried after an ambiguous commit (the reply lost, the commit done) inserts its
-- dead letters again: the key, unique per dead letter, keeps them once. Rows from before
-- this migration have none (NULLs never conflict).
CREATE UNIQUE INDEX dead_letters_letter_key ON dead_letters (letter_key);

-- The leader looks for requested replays every few seconds: only pending rows are indexed.
CREATE INDEX dead_letters_replay_pending ON dead_letters (account_id, replay_requested_at)
    WHERE replay_requested_at IS NOT NULL AND replayed_at IS NULL;

COMMENT ON TABLE dead_letters IS
    'Updates that could not be stored, kept verbatim with the reason: frames that could not be decoded (malformed JSON, wrong types, oversized ...), values outside the bounds (stream_supervisor/bounds.py), and updates PostgreSQL refused (the reason is its message). The stream went on without them; `stream-supervisor dead-letters` lists them and replays one.';
COMMENT ON COLUMN dead_letters.reason IS 'Why it could not be stored: the decoder''s reason, or "refused by the database: <message>".';
COMMENT ON COLUMN dead_letters.payload IS 'The stream frame as received (oversized frames truncated), or the REST FILL activity''s or order''s JSON.';
COMMENT ON COLUMN dead_letters.letter_key IS 'Unique per dead letter (assigned when it was made): a retried batch stores it once.';
COMMENT ON COLUMN dead_letters.replay_requested_at IS 'When `dead-letters --replay` asked for this row to be replayed; NULL if never.';
COMMENT ON COLUMN dead_letters.replayed_at IS 'When the latest replay of this row ended (committed with its outcome); NULL while a request is pending or if never replayed.';
COMMENT ON COLUMN dead_letters.replay_result IS 'Outcome of the latest replay: stored, already stored, still refused: <reason>, refused by the database: <message>.';
