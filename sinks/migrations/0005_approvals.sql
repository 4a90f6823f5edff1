-- Held actions (DESIGN.md, "Policy gate": the `hold` decision). A worker
-- inserts a row in the checkpoint that holds the action (in the same
-- transaction as the decision's audit row and the gate's state), an operator
-- decides it (`sluice approvals approve|deny`), and the gate's tick reads the
-- answer, or denies the row itself once its deadline passed
-- (`approval_timeout`). A decided row never changes again: every UPDATE
-- below is guarded by `status = 'pending'`.
CREATE TABLE approvals (
    id             text        PRIMARY KEY,
    step           text        NOT NULL,
    tenant         text        NOT NULL,
    session        text        NOT NULL,
    partition      int         NOT NULL,
    task_id        text        NOT NULL,
    tool           text        NOT NULL,
    -- As the policy left them: PII it redacts is masked.
    args           jsonb       NOT NULL DEFAULT '{}',
    reasons        jsonb       NOT NULL DEFAULT '[]',
    policy_version text,
    event_id       text        NOT NULL,
    trace_id       text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    deadline       timestamptz NOT NULL,
    status         text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'approved', 'denied')),
    decided_by     text,
    decided_reason text,
    decided_at     timestamptz,
    CHECK ((status = 'pending') = (decided_at IS NULL))
);
-- `sluice approvals list` and the deadline sweep read only what is pending.
CREATE INDEX approvals_pending ON approvals (deadline) WHERE status = 'pending';

-- Workers insert held actions and mark timeouts; operators decide through
-- the same role or the owner.
GRANT SELECT, INSERT, UPDATE ON approvals TO sluice_writer;

-- An approval's decision joins the audit chain as a row of kind 'approval'
-- (who decided, why), written by the gate when it acts on it.
ALTER TABLE audit_log DROP CONSTRAINT audit_log_kind_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_kind_check
    CHECK (kind IN ('processed', 'decision', 'dead_letter', 'shadow_divergence', 'dlq_replay',
                    'approval'));
