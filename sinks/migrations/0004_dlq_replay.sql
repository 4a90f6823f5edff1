-- Dead-letter replay (DESIGN.md, "The CLI contract": sluice dlq replay).
-- Each republished dead letter is audited: a row of kind 'dlq_replay' in the
-- chain of the step that dead-lettered it, naming the dead letter (its audit
-- row, step/partition/seq) and who replayed it. A dead letter with such a
-- row is not replayed again unless asked (--again).

ALTER TABLE audit_log DROP CONSTRAINT audit_log_kind_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_kind_check
    CHECK (kind IN ('processed', 'decision', 'dead_letter', 'shadow_divergence', 'dlq_replay'));

-- `sluice dlq list` and `sluice audit show --kind dead_letter` read dead
-- letters and replays across all sessions: without this they would scan
-- the whole trail.
CREATE INDEX audit_log_dead_letters ON audit_log (kind, time)
    WHERE kind IN ('dead_letter', 'dlq_replay');
