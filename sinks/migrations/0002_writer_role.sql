-- sluice_writer: the role the workers run under. It may append to audit_log
-- and read it, and read and write what a commit touches in the other tables,
-- but never UPDATE, DELETE or TRUNCATE audit_log: the privilege check refuses
-- those before the append-only trigger is even reached, and a role that does
-- not own the table cannot disable the trigger or drop it. Only the owner
-- (whoever runs `sluice db migrate`) can.
--
-- Roles belong to the cluster, grants to this schema: the role is created
-- once, and every migrated schema grants it what it needs. NOLOGIN: log in as
-- a member role instead (README, "Audit trail"), e.g.
--     CREATE ROLE sluice_worker LOGIN PASSWORD '...' IN ROLE sluice_writer;

DO $$
BEGIN
    -- Creating needs CREATEROLE; an administrator may have made the role
    -- already, and then the migration itself needs no such right.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'sluice_writer') THEN
        CREATE ROLE sluice_writer NOLOGIN;
    END IF;
EXCEPTION
    -- Another schema's migration created it at the same moment.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO sluice_writer', current_schema());
END
$$;

-- Start from nothing, so re-running this on a schema where someone granted
-- more by hand converges on exactly this.
REVOKE ALL ON audit_log, audit_chains, step_offsets, step_state, results, schema_migrations
    FROM sluice_writer;

-- The audit trail: append and read, nothing else.
GRANT SELECT, INSERT ON audit_log TO sluice_writer;
-- Chain heads and offsets are reserved (INSERT), locked (SELECT ... FOR
-- UPDATE, which needs UPDATE) and advanced; keyed state is upserted.
GRANT SELECT, INSERT, UPDATE ON audit_chains, step_offsets, step_state TO sluice_writer;
-- Results are inserted once (ON CONFLICT DO NOTHING) and read back.
GRANT SELECT, INSERT ON results TO sluice_writer;
-- Workers check on start that the schema is migrated (they never migrate).
GRANT SELECT ON schema_migrations TO sluice_writer;
