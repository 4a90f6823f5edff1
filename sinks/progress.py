"""Stored progress (``step_offsets``) for operators: read it, and rewrite a watermark.

``step_offsets`` holds one row per (step, input log, partition): the
watermark (``last_offset``, the last processed offset; NULL when nothing is
processed yet), the ownership epoch and the last claimer (``owner``). The
``topic`` column names the log: ``<transport>:<full name>@<incarnation>``
(``nats:sluice_tasks@2026-12-07T15:14:00.123456+00:00``,
``kafka:sluice.tasks@01a25131-...``); a value without ``:`` is a row kept
before progress was keyed by log identity (the logical topic name).

``reset_offsets`` is what ``sluice offsets reset`` writes: the new watermark,
the epoch raised by one (so a worker still holding the partition is fenced:
its next checkpoint is refused) and the owner ``reset by <who>``. It is one
INSERT ... ON CONFLICT DO UPDATE per batch, which the ``sluice_writer`` role
may run (it may not DELETE): resets need no more rights than the workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row

Conn = psycopg.AsyncConnection[Any]

LogKind = Literal["current", "older incarnation", "other transport", "legacy", "other log"]


@dataclass(frozen=True, slots=True)
class StoredOffset:
    """One ``step_offsets`` row."""

    step: str
    topic: str  # the log identity (or a legacy plain topic name)
    partition: int
    last_offset: int | None
    epoch: int
    owner: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class LogId:
    """A parsed log identity: ``<transport>:<name>@<incarnation>``."""

    transport: str
    name: str
    incarnation: str

    @classmethod
    def parse(cls, text: str) -> LogId | None:
        """The parts of ``text``, or None for a legacy row (a plain topic name)."""
        transport, colon, rest = text.partition(":")
        if not colon:
            return None
        # Neither Kafka topic names nor NATS stream names may hold '@'; the
        # incarnation (an ISO time on NATS) may hold ':'.
        name, _at, incarnation = rest.partition("@")
        return cls(transport, name, incarnation)


def classify(topic: str, current: Sequence[str]) -> LogKind:
    """How a stored row's log relates to the step's current logs (``current``).

    ``older incarnation``: the same transport and name as a current log, but
    a stream or topic since deleted and created again; ``other transport``:
    progress kept on the other broker; ``legacy``: kept before progress was
    keyed by log identity; ``other log``: none of these (a topic the step no
    longer reads, another prefix).
    """
    if topic in current:
        return "current"
    parsed = LogId.parse(topic)
    if parsed is None:
        return "legacy"
    known = [p for p in (LogId.parse(c) for c in current) if p is not None]
    if any(p.transport == parsed.transport and p.name == parsed.name for p in known):
        return "older incarnation"
    if known and all(p.transport != parsed.transport for p in known):
        return "other transport"
    return "other log"


_SELECT = """
SELECT step, topic, partition, last_offset, epoch, owner, updated_at
FROM step_offsets
"""


async def step_offsets(
    conn: Conn, *, steps: Sequence[str] | None = None, partition: int | None = None
) -> list[StoredOffset]:
    """Rows of ``steps`` (all when None), optionally of one partition, ordered."""
    clauses: list[str] = []
    params: list[object] = []
    if steps is not None:
        clauses.append("step = ANY(%s)")
        params.append(list(steps))
    if partition is not None:
        clauses.append("partition = %s")
        params.append(partition)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    cur = conn.cursor(row_factory=class_row(StoredOffset))
    await cur.execute(_SELECT + where + " ORDER BY step, topic, partition", params)
    return await cur.fetchall()


@dataclass(frozen=True, slots=True)
class OffsetChange:
    """One partition's watermark rewritten by ``reset_offsets``: before and after."""

    topic: str
    partition: int
    before: StoredOffset | None  # None: the row did not exist
    after: StoredOffset


# Rows that exist are locked first (in key order, as the workers' commits
# lock them), so a commit in flight either lands before the reset, which then
# overwrites it, or waits and is refused for its stale epoch.
_LOCK = """
SELECT step, topic, partition, last_offset, epoch, owner, updated_at
FROM step_offsets
WHERE step = %s AND (topic, partition) IN (
    SELECT * FROM unnest(%s::text[], %s::int[])
)
ORDER BY topic, partition
FOR UPDATE
"""
_RESET = """
INSERT INTO step_offsets AS o (step, topic, partition, last_offset, epoch, owner, updated_at)
SELECT %s, b.topic, b.partition, b.last_offset, 1, %s, now()
FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS b(topic, partition, last_offset)
ORDER BY b.topic, b.partition
ON CONFLICT (step, topic, partition) DO UPDATE
SET last_offset = EXCLUDED.last_offset, epoch = o.epoch + 1, owner = EXCLUDED.owner,
    updated_at = now()
RETURNING o.step, o.topic, o.partition, o.last_offset, o.epoch, o.owner, o.updated_at
"""


async def reset_offsets(
    conn: Conn,
    step: str,
    targets: Sequence[tuple[str, int, int | None]],
    *,
    owner: str,
) -> list[OffsetChange]:
    """Set the watermark of each ``(log, partition, last_offset)``, in one transaction.

    ``last_offset`` None means nothing processed: the next owner starts at the
    log's start. Every row's epoch goes up by one (a new row starts at 1) and
    its owner becomes ``owner``. Returns each row before and after, in order.
    """
    if not targets:
        return []
    ordered = sorted(targets, key=lambda t: (t[0], t[1]))
    topics = [t[0] for t in ordered]
    partitions = [t[1] for t in ordered]
    offsets = [t[2] for t in ordered]
    async with conn.transaction():
        lock = conn.cursor(row_factory=class_row(StoredOffset))
        await lock.execute(_LOCK, (step, topics, partitions))
        before = {(r.topic, r.partition): r for r in await lock.fetchall()}
        write = conn.cursor(row_factory=class_row(StoredOffset))
        await write.execute(_RESET, (step, owner, topics, partitions, offsets))
        after = {(r.topic, r.partition): r for r in await write.fetchall()}
    return [
        OffsetChange(topic, partition, before.get((topic, partition)), after[(topic, partition)])
        for topic, partition, _ in ordered
    ]
