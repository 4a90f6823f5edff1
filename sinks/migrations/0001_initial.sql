-- The step runtime's tables: progress (step_offsets), keyed state (step_state),
-- final answers (results) and the hash-chained audit trail (audit_log, with
-- its chain heads in audit_chains). Run by sinks.migrate with search_path set
-- to the target schema, inside one transaction.

CREATE TABLE step_offsets (
    step        text        NOT NULL,
    topic       text        NOT NULL,
    partition   int         NOT NULL,
    -- NULL only while a step's first commit on this partition is in flight:
    -- the commit reserves the row to lock it, and sets it before COMMIT.
    last_offset bigint,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step, topic, partition)
);

CREATE TABLE step_state (
    step       text        NOT NULL,
    tenant     text        NOT NULL,
    session    text        NOT NULL,
    partition  int         NOT NULL,
    state      jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (step, tenant, session)
);
-- Loading a step's partitions on assignment.
CREATE INDEX step_state_step_partition ON step_state (step, partition);

CREATE TABLE results (
    task_id    text PRIMARY KEY,
    tenant     text        NOT NULL,
    session    text        NOT NULL,
    status     text        NOT NULL,
    answer     jsonb       NOT NULL,
    trace_id   text,
    -- The step whose commit stored the result.
    step       text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX results_tenant_created ON results (tenant, created_at);
CREATE INDEX results_session ON results (session);

CREATE TABLE audit_log (
    -- The chain a row belongs to: the committing step and its input partition.
    chain_step      text        NOT NULL,
    chain_partition int         NOT NULL,
    seq             bigint      NOT NULL CHECK (seq >= 1),
    time            timestamptz NOT NULL,
    tenant          text        NOT NULL,
    session         text        NOT NULL,
    event_id        text        NOT NULL,
    causation_id    text,
    step            text        NOT NULL,
    event_type      text        NOT NULL,
    kind            text        NOT NULL
        CHECK (kind IN ('processed', 'decision', 'dead_letter', 'shadow_divergence')),
    decision        text,
    reasons         jsonb       NOT NULL DEFAULT '[]',
    policy_version  text,
    trace_id        text,
    detail          jsonb       NOT NULL DEFAULT '{}',
    prev_hash       text        NOT NULL,
    hash            text        NOT NULL,
    PRIMARY KEY (chain_step, chain_partition, seq)
);
CREATE INDEX audit_log_session ON audit_log (session, time);
CREATE INDEX audit_log_tenant_time ON audit_log (tenant, time);
CREATE INDEX audit_log_event_id ON audit_log (event_id);
CREATE INDEX audit_log_trace_id ON audit_log (trace_id) WHERE trace_id IS NOT NULL;

-- The head (last seq and hash) of each chain. A commit locks the heads it
-- extends, so two writers can never fork a chain.
CREATE TABLE audit_chains (
    step      text   NOT NULL,
    partition int    NOT NULL,
    seq       bigint NOT NULL,
    hash      text   NOT NULL,
    PRIMARY KEY (step, partition)
);

-- Append-only: the trail is evidence, so nothing may rewrite or remove it.
-- Statement-level, so an UPDATE or DELETE is refused even when it matches no
-- row, and TRUNCATE (which has no row-level triggers) is covered too.
CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Audit rows are hash-chained evidence; append corrections as new rows.';
END;
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
