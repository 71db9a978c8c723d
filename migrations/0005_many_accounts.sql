-- stream-supervisor schema, version 5: many accounts (replicas that share accounts out,
-- busts and corrections; docs/design.md, section 11).
--
-- Every process started with an accounts file registers here and keeps its row fresh.
-- A replica is live while its row's heartbeat is recent and the database session that
-- registered it still exists (pg_stat_activity: a SIGKILLed process's session ends with
-- its socket, so survivors see it gone within a poll). Live replicas compute the same
-- assignment of the file's accounts to themselves (about M/N each); the accounts' writer
-- locks (section 7) still decide who writes.
--
-- Never edit this file once applied anywhere; add the next one.

CREATE TABLE stream_supervisor_replicas (
    replica_id    text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    backend_pid   integer NOT NULL,
    backend_start timestamptz NOT NULL,
    accounts      integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE stream_supervisor_replicas IS
    'Processes serving an accounts file, for sharing its accounts out (docs/design.md, section 11). Rows of dead replicas are removed by the survivors.';
COMMENT ON COLUMN stream_supervisor_replicas.backend_pid IS 'pg_backend_pid() of the registering session: the replica counts as live only while that session exists.';
COMMENT ON COLUMN stream_supervisor_replicas.heartbeat_at IS 'Refreshed every poll (about 0.5 s); a replica whose heartbeat is older than 10 s counts as dead.';

-- Busts and corrections of the Broker API's events stream (docs/design.md, section 11):
-- the time of the latest one applied to an order. A fill stamped no later than it is
-- already inside the revised cumulative figures, and changes nothing.
ALTER TABLE broker_orders ADD COLUMN revised_at timestamptz;
COMMENT ON COLUMN broker_orders.revised_at IS
    'Time of the latest trade_bust or trade_correct applied to this order; fills stamped no later are stale (docs/design.md, section 11).';

-- The Broker API's events stream (`GET /v2/events/trades`) resumes with `since_id`, the
-- ULID of an event. Its position moves in the transaction of the batch that applied the
-- events up to it, and only forward; the source resumes from a little before it.
CREATE TABLE event_stream_positions (
    stream     text PRIMARY KEY,
    event_id   text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE event_stream_positions IS
    'Per Broker API events stream (its name in the accounts file): the event_id (ULID) of the newest event of a committed batch (docs/design.md, section 11).';
