"""Held actions in the gate: remembering them, and resuming them once decided.

A ``hold`` decision sends ``action.held`` to ``actions.held`` (the responder
learns to wait for it), asks for an approval (``Context.request_approval``,
committed with the checkpoint) and keeps what the continuation needs in the
session's gate state, under ``held``. Nothing waits: the session's next
events and the partition go on.

The gate's ``tick`` (about once a second, on sessions with nothing in flight)
asks the :class:`~sluicegate.streams.approvals.ApprovalDesk` about every held
id of its sessions. The desk denies what passed its deadline
(``approval_timeout``) and returns what is decided; for each, the gate emits
the continuation (``action.allowed`` to the tools when approved,
``action.denied`` to the responder otherwise, with an id derived from the
approval's, so a replay emits the same event), writes an ``approval`` audit
row (who, why) and forgets the entry, all in the next checkpoint. Outputs
are produced before that checkpoint commits, so a crash in between emits
them again with the same ids, which the next steps absorb. The entries live
in the gate's state in Postgres: a worker killed while actions are held
loses none, and the next owner of the partition resumes them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from datetime import datetime
from typing import Any, Final

from sluicegate.policy import ledger
from sluicegate.policy.decision import ALLOW, DENY, REDACT, Decision
from sluicegate.policy.schemas import (
    ACTION_ALLOWED,
    ACTION_DENIED,
    ACTION_PROPOSED,
    ACTIONS_ALLOWED,
    ACTIONS_DENIED,
)
from sluicegate.streams.approvals import APPROVAL_TIMEOUT, ApprovalOutcome
from sluicegate.streams.envelope import Event
from sluicegate.streams.errors import SluiceError
from sluicegate.streams.step import Output, StateKey, TickContext

log = logging.getLogger("sluicegate.policy")

HELD_KEY: Final = "held"


class ApprovalsUnavailable(SluiceError, RuntimeError):
    """The approvals could not be read (Postgres away); retried at the next tick."""

    retriable = True


APPROVAL_KIND: Final = "approval"
APPROVAL_GRANTED: Final = "approval_granted"
APPROVAL_DENIED: Final = "approval_denied"


def remember(
    state: MutableMapping[str, Any],
    approval_id: str,
    *,
    data: Mapping[str, Any],
    decision: Decision,
    event: Event,
    deadline: datetime,
) -> None:
    """Keep a held action in the session's state until it is decided."""
    held = state.get(HELD_KEY)
    if not isinstance(held, dict):
        held = state[HELD_KEY] = {}
    held[approval_id] = {
        "data": dict(data),
        # What the tools step runs it as once approved: masked args make it a redact.
        "resume_as": REDACT if decision.masks else ALLOW,
        "cost": decision.cost,
        "event_id": event.id,
        "event_ms": int(event.time.timestamp() * 1000),
        "traceparent": event.traceparent,
        "deadline": deadline.isoformat(),
    }


async def resume(tc: TickContext, now: datetime, window_ms: int) -> list[Output]:
    """Emit the continuation of every held action of these sessions that was decided."""
    waiting: dict[str, tuple[StateKey, MutableMapping[str, Any]]] = {}
    # Only the sessions holding something: the gate keeps state for every session.
    for key, state in tc.states_with(HELD_KEY):
        held = state.get(HELD_KEY)
        if isinstance(held, dict):
            for approval_id in held:
                waiting[approval_id] = (key, state)
    if not waiting or tc.approvals is None:
        return []
    try:
        outcomes = await tc.approvals.settle_approvals(tc.step, sorted(waiting), now)
    except Exception as exc:  # the store away: nothing resumes (fail closed), next tick retries
        raise ApprovalsUnavailable(" ".join(str(exc).split()) or type(exc).__name__) from exc
    outputs = []
    for outcome in outcomes:
        key, state = waiting[outcome.id]
        entry = state[HELD_KEY].pop(outcome.id)
        if not state[HELD_KEY]:
            del state[HELD_KEY]
        outputs.append(_continue(tc, key, state, outcome, entry, window_ms))
    return outputs


def _continue(
    tc: TickContext,
    key: StateKey,
    state: MutableMapping[str, Any],
    outcome: ApprovalOutcome,
    entry: Any,
    window_ms: int,
) -> Output:
    entry = entry if isinstance(entry, dict) else {}
    data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    traceparent = entry.get("traceparent") if isinstance(entry.get("traceparent"), str) else None
    approved = outcome.approved and bool(data)
    code = (
        APPROVAL_GRANTED
        if approved
        else (APPROVAL_TIMEOUT if outcome.timed_out else APPROVAL_DENIED)
    )
    if approved:
        try:
            book = ledger.load(state)
            book.charge(entry.get("cost", 0), int(entry.get("event_ms", 0)), window_ms)
            ledger.store(state, book)
        except (ledger.LedgerError, TypeError, ValueError) as exc:
            # Fail closed: what cannot be charged is not run.
            log.error("gate: approved action %s not run, bad gate state: %s", outcome.id, exc)
            approved, code = False, "policy_error"
    approval = {
        "id": outcome.id,
        "by": outcome.by,
        "reason": outcome.reason,
        "decided_at": outcome.decided_at.isoformat(),
    }
    tc.record(
        key,
        APPROVAL_KIND,
        event_id=str(entry.get("event_id") or outcome.id),
        event_type=ACTION_PROPOSED,
        decision=ALLOW if approved else DENY,
        reasons=(code,),
        policy_version=data.get("policy_version"),
        causation_id=outcome.id,
        traceparent=traceparent,
        detail={**approval, "task_id": data.get("task_id"), "tool": data.get("tool")},
    )
    if approved:
        resumed = {**data, "decision": entry.get("resume_as", ALLOW), "approval": approval}
        topic, kind = ACTIONS_ALLOWED, ACTION_ALLOWED
    else:
        resumed = {**data, "decision": DENY, "reasons": [code], "approval": approval}
        topic, kind = ACTIONS_DENIED, ACTION_DENIED
    resumed.pop("deadline", None)
    return tc.output(key, topic, kind, resumed, seed=outcome.id, traceparent=traceparent)
