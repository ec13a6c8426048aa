-- harvest PostgreSQL schema, version 3: each session's own cleanup delay.
--
-- A lease reclaim ends sessions FAILED or CANCELLED in one UPDATE; to give each its own
-- `session_timeout_secs` (kept only inside `spec`) the delay must be a column. NULL: the
-- session has none, the caller's default applies (also for sessions written before version 3).
ALTER TABLE sessions ADD COLUMN cleanup_after_ms bigint CHECK (cleanup_after_ms >= 0);
