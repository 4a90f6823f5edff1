"""Held actions: what a step asks a person to decide, and how it reads the answer.

A step that holds an action (the policy gate on a ``hold`` decision) adds an
:class:`ApprovalRequest` to its context; the runner commits it with the rest
of the checkpoint, in the same transaction as the audit row of the decision
and the step's state, so a hold is recorded exactly when the input that made
it counts as done. An operator then approves or denies it in the store
(``sluice approvals``); a step that ticks reads the answers through the
:class:`ApprovalDesk` the runner hands its tick (the checkpoint store), which
also denies, durably and once, every pending request past its deadline
(reason ``approval_timeout``: fail closed). Nothing here waits: a held action
holds back neither its session nor its partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol, runtime_checkable

from sluicegate.streams.errors import SluiceError

# The reason of a request nobody decided before its deadline.
APPROVAL_TIMEOUT: Final = "approval_timeout"
# Who "decided" a timeout, in the approvals table and the audit trail.
TIMEOUT_APPROVER: Final = "sluicegate"
PENDING: Final = "pending"
APPROVED: Final = "approved"
DENIED: Final = "denied"


class ApprovalError(SluiceError):
    """An approval that cannot be decided as asked (unknown, already decided): one line."""


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One held action, as the ``approvals`` table keeps it until someone decides."""

    id: str
    step: str
    tenant: str
    session: str
    partition: int
    task_id: str
    tool: str
    # As the policy left them: PII it redacts is already masked.
    args: dict[str, Any]
    reasons: tuple[str, ...]
    deadline: datetime
    # The input that was held (``action.proposed``) and the decision's bundle.
    event_id: str
    policy_version: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class ApprovalOutcome:
    """A decided request: approved or denied, by whom, why and when."""

    id: str
    approved: bool
    by: str
    reason: str
    decided_at: datetime

    @property
    def timed_out(self) -> bool:
        return not self.approved and self.by == TIMEOUT_APPROVER and self.reason == APPROVAL_TIMEOUT


@runtime_checkable
class ApprovalDesk(Protocol):
    """Where a ticking step reads the answers to its held actions."""

    async def settle_approvals(
        self, step: str, ids: Sequence[str], now: datetime
    ) -> list[ApprovalOutcome]:
        """The decided requests among ``ids`` of ``step``.

        Pending ones whose deadline is at or before ``now`` are first denied
        with ``approval_timeout`` by ``sluicegate``, durably, so an operator
        can no longer approve what the pipeline already refused. Ids unknown
        to the store are left out (their hold is not committed yet).
        """
        ...
