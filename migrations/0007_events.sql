-- harvest PostgreSQL schema: session events, so that every process sees every session's events.
--
-- A trigger on `sessions` writes one row per event in the same transaction as the transition
-- (so an event is recorded exactly when its change commits, whichever process made it):
-- INSERT is `created`, DELETE `removed`; an UPDATE that changes the status is `started`
-- (to RUNNING), `requeued` (to PENDING), or the terminal status; one that starts a new attempt
-- is `started`; one that commits a checkpoint of a RUNNING session (`checkpoints` grows) is
-- `progress`. Other updates (heartbeats, the cancel flag, record removal) are not events.
--
-- `session` is the row after the change as JSON (before it, for `removed`), without the
-- immutable `spec` except for `removed` (readers take it from the live row, matched by `seq`):
-- progress events are frequent and the spec holds the whole config. `at` is the database's
-- clock, for the retention window maintenance applies. Ids come from a sequence in the order
-- the triggers ran; a reader that sees a gap waits briefly for the transaction holding it
-- (it commits or rolls back within moments). No NOTIFY here: a notifying transaction
-- serializes every commit; the store sends `NOTIFY harvest_events` after its commits.
CREATE TABLE events (
    id         bigserial PRIMARY KEY,
    kind       text NOT NULL,
    session_id text NOT NULL,
    client_id  text NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    session    jsonb NOT NULL
);
CREATE INDEX events_at_idx ON events (at);

-- `SET search_path FROM CURRENT`: the function finds this schema's `events` whatever the
-- search path of the connection that changes a session.
CREATE FUNCTION harvest_session_event() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    k text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        k := 'created';
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO events (kind, session_id, client_id, session)
            VALUES ('removed', OLD.id, OLD.client_id, to_jsonb(OLD));
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
    INSERT INTO events (kind, session_id, client_id, session)
        VALUES (k, NEW.id, NEW.client_id, to_jsonb(NEW) - 'spec');
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_events AFTER INSERT OR UPDATE OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION harvest_session_event();
