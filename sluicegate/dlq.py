"""Dead letters for operators: list them, find their bytes, replay them (``sluice dlq``).

A dead letter is known twice: its audit row (``kind = 'dead_letter'``: which
step, why, the source topic/partition/offset, tenant and session) and its
message on the ``dlq`` topic (the original bytes, with the ``sluice-dlq-*``
headers). Listing reads Postgres only; showing and replaying also read the
``dlq`` topic to find the bytes.

A dead letter's id is its audit row's position, ``<step>/<partition>/<seq>``
(the chain it was written to): unique, stable and printed by ``sluice dlq
list``. A replay republishes the original bytes to the source topic with the
``sluice-replay`` header, then writes a ``dlq_replay`` audit row naming the
dead letter (chain ``dlq``); publishing comes first, so a failure between the
two can only mean a replay that is not yet recorded, which a second replay
repeats harmlessly (the runner absorbs an id it has processed). A dead letter
with a replay row is not replayed again unless asked (``again``).
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from sluicegate.streams.checkpoint import CheckpointStore, CommitBatch
from sluicegate.streams.dead_letters import (
    DLQ_TOPIC,
    H_DLQ_SOURCE,
    H_DLQ_STEP,
    H_REPLAY,
)
from sluicegate.streams.errors import SluiceError
from sluicegate.streams.step import AuditRecord
from sluicegate.streams.transport import Message, OutMessage, TopicPartition, Transport

Conn = psycopg.AsyncConnection[Any]

REPLAY_KIND = "dlq_replay"
REPLAY_CHAIN = "dlq"


class DeadLetterError(SluiceError):
    """A dead letter that cannot be shown or replayed as asked (one line)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter, from its audit row, with how often it was replayed."""

    id: str
    time: datetime
    step: str
    reason: str
    error: str
    message: str
    topic: str
    partition: int
    offset: int
    event_id: str
    event_type: str
    tenant: str
    session: str
    trace_id: str | None
    replays: int = 0
    last_replay: datetime | None = None

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time.isoformat(),
            "step": self.step,
            "reason": self.reason,
            "error": self.error,
            "message": self.message,
            "source": self.source,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "tenant": self.tenant,
            "session": self.session,
            "trace_id": self.trace_id,
            "replays": self.replays,
            "last_replay": self.last_replay.isoformat() if self.last_replay else None,
        }


@dataclass(frozen=True, slots=True)
class Filters:
    reason: str | None = None
    step: str | None = None
    tenant: str | None = None
    session: str | None = None
    since: datetime | None = None
    ids: tuple[str, ...] = ()
    limit: int | None = None


_LIST = """
SELECT d.chain_step, d.chain_partition, d.seq, d.time, d.step, d.reasons, d.detail,
       d.event_id, d.event_type, d.tenant, d.session, d.trace_id,
       r.replays, r.last_replay
FROM audit_log d
LEFT JOIN (
    SELECT detail->>'dead_letter' AS dead_letter, count(*) AS replays, max(time) AS last_replay
    FROM audit_log WHERE kind = 'dlq_replay' GROUP BY 1
) r ON r.dead_letter = d.chain_step || '/' || d.chain_partition || '/' || d.seq
WHERE d.kind = 'dead_letter'
  AND (%(step)s::text IS NULL OR d.step = %(step)s)
  AND (%(reason)s::text IS NULL OR d.reasons ? %(reason)s)
  AND (%(tenant)s::text IS NULL OR d.tenant = %(tenant)s)
  AND (%(session)s::text IS NULL OR d.session = %(session)s)
  AND (%(since)s::timestamptz IS NULL OR d.time >= %(since)s)
  AND (cardinality(%(ids)s::text[]) = 0
       OR d.chain_step || '/' || d.chain_partition || '/' || d.seq = ANY(%(ids)s))
ORDER BY d.time, d.chain_step, d.chain_partition, d.seq
"""


async def list_dead_letters(conn: Conn, filters: Filters) -> list[DeadLetter]:
    """Dead letters matching ``filters``, oldest first."""
    query = _LIST + (f" LIMIT {int(filters.limit)}" if filters.limit is not None else "")
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        query,
        {
            "step": filters.step,
            "reason": filters.reason,
            "tenant": filters.tenant,
            "session": filters.session,
            "since": filters.since,
            "ids": list(filters.ids),
        },
    )
    return [_dead_letter(row) for row in await cur.fetchall()]


def _dead_letter(row: dict[str, Any]) -> DeadLetter:
    detail = row["detail"] if isinstance(row["detail"], dict) else {}
    reasons = row["reasons"] if isinstance(row["reasons"], list) else []
    return DeadLetter(
        id=f"{row['chain_step']}/{row['chain_partition']}/{row['seq']}",
        time=row["time"],
        step=row["step"],
        reason=str(reasons[0]) if reasons else "",
        error=str(detail.get("error", "")),
        message=str(detail.get("message", "")),
        topic=str(detail.get("topic", "")),
        partition=int(detail.get("partition", -1)),
        offset=int(detail.get("offset", -1)),
        event_id=row["event_id"],
        event_type=row["event_type"],
        tenant=row["tenant"],
        session=row["session"],
        trace_id=row["trace_id"],
        replays=int(row["replays"] or 0),
        last_replay=row["last_replay"],
    )


# --- the bytes, on the dlq topic ----------------------------------------------------


async def find_messages(
    transport: Transport,
    wanted: Sequence[DeadLetter],
    *,
    poll_s: float = 0.5,
    idle_polls: int = 4,
) -> dict[str, Message]:
    """The ``dlq`` message of each of ``wanted`` that is still kept, by dead letter id.

    Reads ``dlq`` from its start to its end as an observer (no group, no
    commits). Stops when every partition reached the end it had when the
    read began, or after ``idle_polls`` empty fetches in a row (a broker
    that reports an end it never delivers must not hang the command).
    """
    if not wanted:
        return {}
    # A dead letter's message is found by its step and source position.
    by_key = {(d.step, d.source): d for d in wanted}
    partitions = [TopicPartition(DLQ_TOPIC, p) for p in range(transport.partitions)]
    ends = await transport.log_ends(partitions)
    empty_end = 0 if transport.name == "nats" else -1
    remaining = {tp.partition: end for tp, end in ends.items() if end > empty_end}
    found: dict[str, Message] = {}
    if not remaining:
        return found
    sub = await transport.subscribe([DLQ_TOPIC], group=None, start="earliest")
    try:
        idle = 0
        while remaining and idle < idle_polls and len(found) < len(by_key):
            batch = await sub.fetch(1000, poll_s)
            idle = 0 if batch else idle + 1
            for msg in batch:
                key = (msg.headers.get(H_DLQ_STEP, ""), msg.headers.get(H_DLQ_SOURCE, ""))
                match = by_key.get(key)
                if match is not None:
                    found[match.id] = msg  # the latest copy wins (a re-produced dead letter)
                end = remaining.get(msg.partition)
                if end is not None and msg.offset >= end:
                    del remaining[msg.partition]
    finally:
        await sub.close()
    return found


# --- replay -----------------------------------------------------------------------------


@dataclass(slots=True)
class ReplayOutcome:
    replayed: list[DeadLetter] = field(default_factory=list)
    already: list[DeadLetter] = field(default_factory=list)  # replayed before, no --again
    missing: list[DeadLetter] = field(default_factory=list)  # bytes no longer on dlq


def replay_message(dead: DeadLetter, msg: Message) -> OutMessage:
    """The original bytes, to the source topic, with the replay header (no dlq headers)."""
    headers = {k: v for k, v in msg.headers.items() if not k.startswith("sluice-dlq-")}
    headers[H_REPLAY] = f"{dead.id}#{dead.replays + 1}"  # which replay, for the runner
    return OutMessage(dead.topic, msg.value, key=msg.key, headers=headers)


def replay_record(dead: DeadLetter, replay_id: str, by: str) -> AuditRecord:
    return AuditRecord(
        kind=REPLAY_KIND,
        step=dead.step,
        event_id=dead.event_id,
        event_type=dead.event_type,
        tenant=dead.tenant,
        session=dead.session,
        reasons=(dead.reason,),
        trace_id=dead.trace_id,
        detail={"dead_letter": dead.id, "replay": replay_id, "topic": dead.topic, "by": by},
    )


def operator() -> str:
    """Who replays: user@host, for the audit row."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def replay(
    transport: Transport,
    store: CheckpointStore,
    dead_letters: Sequence[DeadLetter],
    *,
    again: bool = False,
    dry_run: bool = False,
) -> ReplayOutcome:
    """Republish each dead letter's original bytes once, and audit each replay."""
    outcome = ReplayOutcome()
    todo: list[DeadLetter] = []
    for dead in dead_letters:
        (todo if again or dead.replays == 0 else outcome.already).append(dead)
    found = await find_messages(transport, todo)
    by = operator()
    for dead in todo:
        msg = found.get(dead.id)
        if msg is None:
            outcome.missing.append(dead)
            continue
        if not dry_run:
            out = replay_message(dead, msg)
            await transport.publish_batch([out])
            # One transaction per replay, after its publish: an audit row
            # never claims a replay that did not happen.
            batch = CommitBatch(step=REPLAY_CHAIN)
            replay_id = f"{dead.id}#{dead.replays + 1}"
            batch.audit.append((msg.partition, replay_record(dead, replay_id, by)))
            await store.commit(batch)
        outcome.replayed.append(dead)
    return outcome
