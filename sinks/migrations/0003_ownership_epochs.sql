-- Fencing by ownership epoch (DESIGN.md, "Ownership, fencing and progress
-- identity"). A worker that takes a (step, partition) claims it: the epoch
-- goes up by one and the owner is recorded. Every checkpoint carries the
-- epochs it was made under; one whose epoch is no longer current comes from
-- a worker that lost the partition and is refused. Offsets cannot fence:
-- with many events in flight, commits above a gap are normal.

ALTER TABLE step_offsets
    ADD COLUMN epoch bigint NOT NULL DEFAULT 0,
    ADD COLUMN owner text;
