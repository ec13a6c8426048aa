-- harvest PostgreSQL schema, version 4: sessions keep their own record count (a job may count
-- elements other than records), the records removed after an export, their attempts and their
-- running time, and whether usage is tracked (so the checkpoint statement can honour it).
ALTER TABLE sessions
    ADD COLUMN records bigint NOT NULL DEFAULT 0 CHECK (records >= 0),
    ADD COLUMN records_removed bigint NOT NULL DEFAULT 0 CHECK (records_removed >= 0),
    ADD COLUMN running_ms bigint NOT NULL DEFAULT 0 CHECK (running_ms >= 0),
    ADD COLUMN running_since bigint,
    -- [{"attempt": n, "started_at": ms, "ended_at": ms | null, "outcome": text | null}], the
    -- newest 20, oldest first.
    ADD COLUMN attempts jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN token_tracking boolean NOT NULL DEFAULT true;
-- Until now a session's elements were its records, and a RUNNING session's start its attempt's.
UPDATE sessions SET records = processed_elements;
UPDATE sessions SET running_since = start_time WHERE status = 'RUNNING';
-- A tenant's sessions of one agent, newest first (the console's last run of each agent).
CREATE INDEX sessions_client_agent_idx ON sessions (client_id, agent, seq) WHERE agent IS NOT NULL;
