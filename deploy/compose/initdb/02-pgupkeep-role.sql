-- The least-privilege role pgupkeep connects as (docs/least-privilege.md explains every line).
-- The password is for this local trial only.
CREATE ROLE pgupkeep LOGIN PASSWORD 'pgupkeep';

-- Read-only jobs (health, long_running_queries, bloat): every session's state, all statistics,
-- pgstattuple_approx.
GRANT pg_monitor TO pgupkeep;

-- long_running_queries with cancel_after / terminate_after: signal other non-superusers' backends.
GRANT pg_signal_backend TO pgupkeep;

-- partitions and materialized_views (and bloat with vacuum: true): DDL, REFRESH and VACUUM need
-- the owner's rights, so pgupkeep is a member of the role that owns the tables and views ...
GRANT app_owner TO pgupkeep;
-- ... and creates each new partition as a table in the parent's schema before attaching it.
GRANT CREATE ON SCHEMA public TO pgupkeep;

-- pgstattuple_approx refines the bloat estimate; without the extension pgupkeep uses statistics only.
CREATE EXTENSION IF NOT EXISTS pgstattuple;
