-- harvest PostgreSQL schema, version 5: a session's context, its variables when it ended (a
-- Web-Harvest config's top-level variables, a scraper config's [vars]), written with its last
-- checkpoint and removed with the session.
CREATE TABLE context (
    session_id text PRIMARY KEY,
    variables  jsonb NOT NULL
);
