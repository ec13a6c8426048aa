-- harvest PostgreSQL schema, version 1.
--
-- Times are milliseconds since the Unix epoch (bigint): the store never reads the clock, the
-- caller passes "now", so storing the caller's integers keeps tests exact and avoids time zones.
-- A session's immutable part (client context, job spec, options) is one versioned bincode value
-- (`spec`); everything a transition changes is a column, so every transition is one SQL
-- compare-and-set without a read-modify-write round trip.

CREATE TABLE sessions (
    id                    text PRIMARY KEY,
    seq                   bigserial NOT NULL UNIQUE,
    client_id             text NOT NULL,
    agent                 text,
    status                text NOT NULL
        CHECK (status IN ('PENDING', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    priority              integer NOT NULL,
    run_at                bigint NOT NULL,
    max_attempts          integer NOT NULL CHECK (max_attempts >= 1),
    attempt               integer NOT NULL CHECK (attempt >= 0),
    failures              integer NOT NULL CHECK (failures >= 0),
    progress_this_attempt boolean NOT NULL,
    lease_owner           text,
    lease_expires_at      bigint,
    cancel_requested      boolean NOT NULL,
    created_at            bigint NOT NULL,
    updated_at            bigint NOT NULL,
    cleanup_at            bigint,
    start_time            bigint,
    end_time              bigint,
    pages_processed       bigint NOT NULL,
    processed_elements    bigint NOT NULL,
    http_requests         bigint NOT NULL,
    http_errors           bigint NOT NULL,
    bytes_received        bigint NOT NULL,
    retries               bigint NOT NULL,
    robots_blocked        bigint NOT NULL,
    error_kind            text,
    error_message         text,
    checkpoints           bigint NOT NULL,
    spec                  bytea NOT NULL
);

-- Claim: due PENDING sessions in (priority desc, run_at, seq) order.
CREATE INDEX sessions_claim_idx ON sessions (priority DESC, run_at, seq) WHERE status = 'PENDING';
-- List newest first, optionally by client.
CREATE INDEX sessions_client_idx ON sessions (client_id, seq);
-- List by status, and the per-status counts (index-only scan).
CREATE INDEX sessions_status_idx ON sessions (status, seq);
-- Lease reclaim.
CREATE INDEX sessions_lease_idx ON sessions (lease_expires_at) WHERE status = 'RUNNING';
-- Cleanup deadline of terminal sessions.
CREATE INDEX sessions_cleanup_idx ON sessions (cleanup_at) WHERE cleanup_at IS NOT NULL;
-- Single-session agents: is one active?
CREATE INDEX sessions_agent_active_idx ON sessions (client_id, agent)
    WHERE agent IS NOT NULL AND status IN ('PENDING', 'RUNNING');

CREATE TABLE records (
    session_id text NOT NULL,
    seq        bigint NOT NULL,
    data       jsonb NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE frontier (
    session_id text NOT NULL,
    url        text NOT NULL,
    depth      integer NOT NULL,
    page       text,
    pos        bigserial NOT NULL,
    PRIMARY KEY (session_id, url)
);
-- Resume reads the frontier in the order it was added.
CREATE INDEX frontier_pos_idx ON frontier (session_id, pos);

CREATE TABLE seen (
    session_id text NOT NULL,
    url        text NOT NULL,
    PRIMARY KEY (session_id, url)
);

CREATE TABLE log (
    session_id text NOT NULL,
    id         bigserial NOT NULL,
    at         bigint NOT NULL,
    level      text NOT NULL,
    message    text NOT NULL,
    PRIMARY KEY (session_id, id)
);

CREATE TABLE agents (
    client_id text NOT NULL,
    name      text NOT NULL,
    body      bytea NOT NULL,
    PRIMARY KEY (client_id, name)
);
