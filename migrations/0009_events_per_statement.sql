-- harvest PostgreSQL schema, version 9: an UPDATE of sessions writes its events with one INSERT
-- per statement instead of one per row.
--
-- A claim updates up to a few hundred sessions in one statement, and since this version a batch
-- of finishes does too. Version 8's row trigger ran its INSERT once per row: each a plpgsql call
-- and an executor start-up of its own, a quarter of the server's time in a burn-down (perf:
-- AfterTriggerEndQuery 25% of postgres's samples, half of it starting executors). With a
-- statement trigger reading the transition tables, 100 updates of 256 rows each in one session
-- of this database took, per run, for claims and then finishes: 1.40 and 1.46 s (row trigger),
-- 1.16 and 0.86 s (this one), 0.88 and 0.90 s (no trigger at all). For an UPDATE of one row
-- the statement trigger costs about 10-30% more than the row trigger (5,000 single-row
-- updates: 0.55-0.73 s against 0.49-0.56 s), so INSERT, whose common case is one submission,
-- and DELETE keep version 8's row trigger.
--
-- The function copies the session's columns by name, listed from the catalog when this
-- migration runs (`spec` as NULL, as version 8 does). A later migration that adds, drops or
-- retypes a column of `sessions` must do the same to `events` (version 8's rule) and recreate
-- this function the same way; `store_postgres::events_mirror_the_sessions_columns` checks
-- both. The function sets its own planner settings, so that a caller's pinned plan (a finish
-- forbids hash joins) does not turn its join of the transition tables into a nested loop.
DROP TRIGGER sessions_events ON sessions;
CREATE TRIGGER sessions_events AFTER INSERT OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION harvest_session_event();

DO $migration$
DECLARE
    columns text;
BEGIN
    SELECT string_agg(CASE WHEN attname = 'spec' THEN 'NULL' ELSE 'n.' || quote_ident(attname) END,
                      ', ' ORDER BY attnum)
        INTO columns
        FROM pg_attribute
        WHERE attrelid = 'sessions'::regclass AND attnum > 0 AND NOT attisdropped;
    EXECUTE format($create$
        CREATE FUNCTION harvest_session_events_updated() RETURNS trigger
        LANGUAGE plpgsql
        SET search_path FROM CURRENT
        SET enable_seqscan = on SET enable_bitmapscan = on SET enable_sort = on
        SET enable_hashjoin = on SET enable_mergejoin = on
        AS $body$
        BEGIN
            INSERT INTO events
            SELECT nextval('events_id_seq'), k.kind, clock_timestamp(), %s
            FROM new_rows n
            JOIN old_rows o ON o.seq = n.seq
            CROSS JOIN LATERAL (SELECT CASE
                WHEN n.status IS DISTINCT FROM o.status THEN
                    CASE n.status
                        WHEN 'RUNNING' THEN 'started'
                        WHEN 'PENDING' THEN 'requeued'
                        ELSE lower(n.status)
                    END
                WHEN n.status = 'RUNNING' AND n.attempt <> o.attempt THEN 'started'
                WHEN n.status = 'RUNNING' AND n.checkpoints <> o.checkpoints THEN 'progress'
            END AS kind) k
            WHERE k.kind IS NOT NULL;
            RETURN NULL;
        END
        $body$
    $create$, columns);
END
$migration$;

CREATE TRIGGER sessions_events_updated AFTER UPDATE ON sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION harvest_session_events_updated();
