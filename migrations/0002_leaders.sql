-- harvest PostgreSQL schema, version 2: leader election.
--
-- One row per leadership (e.g. 'maintenance'): who holds it and until when (milliseconds since
-- the Unix epoch, the caller's clock, like every other time in this schema). A process takes or
-- renews it with one INSERT ... ON CONFLICT DO UPDATE ... WHERE (owner is me OR term expired):
-- a compare-and-set that concurrent callers serialize on the row lock.
CREATE TABLE leaders (
    name       text PRIMARY KEY,
    owner      text NOT NULL,
    expires_at bigint NOT NULL
);
