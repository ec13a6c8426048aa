-- harvest PostgreSQL schema, version 6: session ids are scoped to their tenant. Two tenants may
-- each have a session `a1`; `(tenant, id)` is the key of a session and of everything stored
-- under it. `tenant` is the configured client's id, or '' for the single namespace (no
-- [[clients]]; configured client ids are never empty). Sessions stored before this version
-- were in one namespace: they go to ''.
ALTER TABLE sessions ADD COLUMN tenant text NOT NULL DEFAULT '';
ALTER TABLE sessions DROP CONSTRAINT sessions_pkey, ADD PRIMARY KEY (tenant, id);

ALTER TABLE records ADD COLUMN tenant text NOT NULL DEFAULT '';
ALTER TABLE records DROP CONSTRAINT records_pkey, ADD PRIMARY KEY (tenant, session_id, seq);

ALTER TABLE frontier ADD COLUMN tenant text NOT NULL DEFAULT '';
ALTER TABLE frontier DROP CONSTRAINT frontier_pkey, ADD PRIMARY KEY (tenant, session_id, url);
DROP INDEX frontier_pos_idx;
CREATE INDEX frontier_pos_idx ON frontier (tenant, session_id, pos);

ALTER TABLE seen ADD COLUMN tenant text NOT NULL DEFAULT '';
ALTER TABLE seen DROP CONSTRAINT seen_pkey, ADD PRIMARY KEY (tenant, session_id, url);

ALTER TABLE log ADD COLUMN tenant text NOT NULL DEFAULT '';
ALTER TABLE log DROP CONSTRAINT log_pkey, ADD PRIMARY KEY (tenant, session_id, id);

ALTER TABLE context ADD COLUMN tenant text NOT NULL DEFAULT '';
ALTER TABLE context DROP CONSTRAINT context_pkey, ADD PRIMARY KEY (tenant, session_id);

-- From now on every write names the tenant.
ALTER TABLE sessions ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE records ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE frontier ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE seen ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE log ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE context ALTER COLUMN tenant DROP DEFAULT;
