-- harvest PostgreSQL schema, version 8: an event keeps its session as columns, not as JSON.
--
-- Version 7's trigger stored `to_jsonb(NEW) - 'spec'`: building that document deforms and
-- converts every column of the row, and was the largest single cost of a transition after the
-- update itself (a trigger-disabled run submitted 40% more sessions per second). Copying the
-- row into columns of the same types costs about half of it: 20,000 single-row inserts,
-- then two 20,000-row updates, in one session of this database took 2.07 s, 1.41 s and 1.55 s
-- with the JSON trigger, 1.58 s, 0.94 s and 1.03 s with this one, and 1.06 s, 0.45 s and
-- 0.50 s with no trigger at all. (A statement-level trigger with transition tables was slower
-- for both: 5.8 s and 2.1 s.)
--
-- `events` is `event_id`, `event_kind`, `event_at`, then every column of `sessions` in its
-- order (`LIKE sessions`), so that the trigger copies a row with `NEW.*`, by position. A later
-- migration that adds, drops or retypes a column of `sessions` must do the same to `events`
-- (an added column is appended to both). A forgotten addition fails every transition ("INSERT
-- has more expressions than target columns"); a forgotten drop or type change may not fail,
-- and would shift or cast values, so `store_postgres::events_mirror_the_sessions_columns`
-- compares the two tables' columns. `spec` is NULL except for `removed`, as before: readers
-- take it from the live row of the same `seq`.
--
-- Rows written by version 7 are copied into the new table; ids continue from the same
-- sequence, so a client resuming with `Last-Event-ID` across the upgrade misses nothing. The
-- copy runs inside the migration's transaction: a log of millions of events (a long
-- `event_retention_secs` on a busy queue) makes the upgrade take a while.
DROP TRIGGER sessions_events ON sessions;
ALTER TABLE events RENAME TO events_v7;
ALTER INDEX events_pkey RENAME TO events_v7_pkey;
ALTER INDEX events_at_idx RENAME TO events_v7_at_idx;
ALTER SEQUENCE events_id_seq OWNED BY NONE;

CREATE TABLE events (
    event_id   bigint PRIMARY KEY DEFAULT nextval('events_id_seq'),
    event_kind text NOT NULL,
    event_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    LIKE sessions
);
ALTER SEQUENCE events_id_seq OWNED BY events.event_id;
ALTER TABLE events ALTER COLUMN spec DROP NOT NULL;

INSERT INTO events
    SELECT o.id, o.kind, o.at, r.*
    FROM events_v7 o CROSS JOIN LATERAL jsonb_populate_record(NULL::sessions, o.session) r;
DROP TABLE events_v7;
CREATE INDEX events_at_idx ON events (event_at);

-- As in version 7, but the row is copied by column. `NEW.spec := NULL` changes only this
-- function's copy of the row (the trigger runs AFTER the change).
CREATE OR REPLACE FUNCTION harvest_session_event() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    k text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        k := 'created';
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO events SELECT nextval('events_id_seq'), 'removed', clock_timestamp(), OLD.*;
        RETURN NULL;
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        k := CASE NEW.status
                 WHEN 'RUNNING' THEN 'started'
                 WHEN 'PENDING' THEN 'requeued'
                 ELSE lower(NEW.status)
             END;
    ELSIF NEW.status = 'RUNNING' AND NEW.attempt <> OLD.attempt THEN
        k := 'started';
    ELSIF NEW.status = 'RUNNING' AND NEW.checkpoints <> OLD.checkpoints THEN
        k := 'progress';
    ELSE
        RETURN NULL;
    END IF;
    NEW.spec := NULL;
    INSERT INTO events SELECT nextval('events_id_seq'), k, clock_timestamp(), NEW.*;
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_events AFTER INSERT OR UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION harvest_session_event();
