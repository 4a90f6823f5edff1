"""The ``approvals`` table: held actions, their deadlines and who decided them.

Three writers, none of which can undo another's decision (every update is
guarded by ``status = 'pending'``, so the first decision wins):

- a worker's checkpoint inserts the held actions of its batch
  (``INSERT_APPROVALS``, in the checkpoint transaction, ``ON CONFLICT DO
  NOTHING`` so a re-processed hold keeps its first row and deadline);
- an operator approves or denies (:func:`decide`, ``sluice approvals``);
- the gate's tick denies what passed its deadline (:func:`settle`,
  ``approval_timeout``) and reads the decided rows it is waiting for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row

from sluicegate.streams.approvals import (
    APPROVAL_TIMEOUT,
    APPROVED,
    DENIED,
    PENDING,
    TIMEOUT_APPROVER,
    ApprovalError,
    ApprovalOutcome,
    ApprovalRequest,
)

Conn = psycopg.AsyncConnection[Any]

# Rides in the checkpoint's last pipeline, like the results.
INSERT_APPROVALS = """
INSERT INTO approvals (id, step, tenant, session, partition, task_id, tool, args, reasons,
                       policy_version, event_id, trace_id, deadline)
SELECT b.id, %b, b.tenant, b.session, b.partition, b.task_id, b.tool, b.args::jsonb,
       b.reasons::jsonb, b.policy_version, b.event_id, b.trace_id, b.deadline
FROM unnest(%b::text[], %b::text[], %b::text[], %b::int[], %b::text[], %b::text[], %b::text[],
            %b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[])
    AS b(id, tenant, session, partition, task_id, tool, args, reasons, policy_version,
         event_id, trace_id, deadline)
ON CONFLICT (id) DO NOTHING
"""

_TIME_OUT = """
UPDATE approvals SET status = 'denied', decided_by = %(by)s, decided_reason = %(reason)s,
       decided_at = %(now)s
WHERE id = ANY(%(ids)s::text[]) AND step = %(step)s AND status = 'pending'
  AND deadline <= %(now)s
"""
_DECIDED = """
SELECT id, status, decided_by, decided_reason, decided_at FROM approvals
WHERE id = ANY(%(ids)s::text[]) AND step = %(step)s AND status <> 'pending'
"""
_DECIDE = """
UPDATE approvals SET status = %(status)s, decided_by = %(by)s, decided_reason = %(reason)s,
       decided_at = %(now)s
WHERE id = %(id)s AND status = 'pending' AND deadline > %(now)s
RETURNING id
"""
_LIST = """
SELECT * FROM approvals
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
ORDER BY created_at, id
LIMIT %(limit)s
"""
_ONE = "SELECT * FROM approvals WHERE id = %(id)s"


def insert_columns(step: str, requests: Sequence[ApprovalRequest]) -> tuple[Any, ...]:
    """``INSERT_APPROVALS``'s parameters for a batch's held actions."""
    return (
        step,
        [r.id for r in requests],
        [r.tenant for r in requests],
        [r.session for r in requests],
        [r.partition for r in requests],
        [r.task_id for r in requests],
        [r.tool for r in requests],
        [orjson.dumps(r.args).decode() for r in requests],
        [orjson.dumps(list(r.reasons)).decode() for r in requests],
        [r.policy_version for r in requests],
        [r.event_id for r in requests],
        [r.trace_id for r in requests],
        [r.deadline for r in requests],
    )


async def settle(conn: Conn, step: str, ids: Sequence[str], now: datetime) -> list[ApprovalOutcome]:
    """Deny what passed its deadline, then return every decided row among ``ids``.

    One transaction, so a timeout and the read that reports it agree.
    """
    params = {
        "ids": list(ids),
        "step": step,
        "now": now,
        "by": TIMEOUT_APPROVER,
        "reason": APPROVAL_TIMEOUT,
    }
    async with conn.transaction():
        await conn.execute(_TIME_OUT, params)
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(_DECIDED, params)
        rows = await cur.fetchall()
    return [
        ApprovalOutcome(
            id=row["id"],
            approved=row["status"] == APPROVED,
            by=row["decided_by"] or "",
            reason=row["decided_reason"] or "",
            decided_at=row["decided_at"],
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class Approval:
    """One row of ``approvals``, for operators."""

    id: str
    step: str
    tenant: str
    session: str
    partition: int
    task_id: str
    tool: str
    args: dict[str, Any]
    reasons: list[str]
    policy_version: str | None
    event_id: str
    trace_id: str | None
    created_at: datetime
    deadline: datetime
    status: str
    decided_by: str | None
    decided_reason: str | None
    decided_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        """The contract's object (DESIGN.md, ``sluice approvals list --json``), and more."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "session": self.session,
            "task_id": self.task_id,
            "tool": self.tool,
            "args": self.args,
            "reasons": self.reasons,
            "deadline": _iso(self.deadline),
            "status": self.status,
            "created_at": _iso(self.created_at),
            "policy_version": self.policy_version,
            "trace_id": self.trace_id,
            "decided_by": self.decided_by,
            "decided_reason": self.decided_reason,
            "decided_at": _iso(self.decided_at) if self.decided_at else None,
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def list_approvals(
    conn: Conn, *, status: str | None = PENDING, tenant: str | None = None, limit: int = 1000
) -> list[Approval]:
    """Approvals, oldest first: the pending ones by default (``status=None``: all)."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_LIST, {"status": status, "tenant": tenant, "limit": limit})
    return [Approval(**row) for row in await cur.fetchall()]


async def get_approval(conn: Conn, approval_id: str) -> Approval | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_ONE, {"id": approval_id})
    row = await cur.fetchone()
    return Approval(**row) if row else None


async def decide(
    conn: Conn, approval_id: str, *, approved: bool, by: str, reason: str, now: datetime
) -> Approval:
    """Approve or deny a pending action; ApprovalError (one line) when it cannot be.

    A pending action past its deadline is denied with ``approval_timeout``
    here and then, as the gate would: an operator cannot approve it late.
    """
    params = {
        "id": approval_id,
        "status": APPROVED if approved else DENIED,
        "by": by,
        "reason": reason,
        "now": now,
    }
    async with conn.transaction():
        cur = await conn.execute(_DECIDE, params)
        changed = await cur.fetchone()
        if changed is None:
            await conn.execute(
                _TIME_OUT,
                {
                    "ids": [approval_id],
                    "step": (await _step_of(conn, approval_id)) or "",
                    "now": now,
                    "by": TIMEOUT_APPROVER,
                    "reason": APPROVAL_TIMEOUT,
                },
            )
    row = await get_approval(conn, approval_id)
    if row is None:
        raise ApprovalError(f"no held action with id {approval_id}")
    if changed is None:
        raise ApprovalError(
            f"held action {approval_id} is already {row.status} "
            f"(by {row.decided_by}: {row.decided_reason})"
        )
    return row


async def _step_of(conn: Conn, approval_id: str) -> str | None:
    cur = await conn.execute("SELECT step FROM approvals WHERE id = %s", (approval_id,))
    row = await cur.fetchone()
    return str(row[0]) if row else None
