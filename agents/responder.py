"""The ``responder`` step: joins the outcomes of one plan into one final result.

Inputs are ``tool.result`` (``tool.results``) and ``action.denied``
(``actions.denied``), and ``action.held`` (``actions.held``): a held action's
outcome comes once a person decides it or its approval deadline passes, so
it moves the task's deadline to that deadline plus the step's own.
Outcomes are collected per task in keyed state until
all ``action_count`` have arrived (in any order; a repeated index is
absorbed), then exactly one ``task.completed`` goes to ``results`` and the
result is stored with ``ctx.result``. Status:

- ``completed``: every action succeeded;
- ``denied``: every action was denied;
- ``partial``: some succeeded, others were denied or failed;
- ``failed``: none succeeded and not all were denied, or an outcome is
  malformed (inconsistent plan size, conflicting outcomes for one action,
  ``ok`` without output or a failure without error) — fail closed, at once;
- ``timeout``: the deadline passed first (see :meth:`ResponderStep.tick`).

Finished task ids are remembered (bounded), so late or re-produced outcomes
never cause a second result.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from sluicegate.agents import topics
from sluicegate.agents.api import Step
from sluicegate.agents.keyed import data_as, duplicate, remember
from sluicegate.agents.schemas import (
    ACTION_DENIED,
    ACTION_HELD,
    TASK_COMPLETED,
    TOOL_RESULT,
    ActionDenied,
    ActionHeld,
    Answer,
    Outcome,
    Status,
    TaskCompleted,
    ToolResult,
)
from sluicegate.streams.approvals import TIMEOUT_APPROVER
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output, StateKey, TickContext

PENDING_KEY = "pending"
DONE_KEY = "done_tasks"
MAX_SUMMARY_CHARS = 300

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def outcome_of(data: ToolResult | ActionDenied) -> tuple[Outcome, str | None]:
    """The outcome an input reports, and what is wrong with its shape, if anything."""
    if isinstance(data, ActionDenied):
        outcome = Outcome(
            action_index=data.action_index,
            tool=data.tool,
            status="denied",
            reasons=list(data.reasons),
            approval=data.approval,
        )
        return outcome, None
    problem = None
    if data.ok and data.output is None:
        problem = "a successful tool result has no output"
    elif data.ok and data.error is not None:
        problem = "a successful tool result carries an error"
    elif not data.ok and not data.error:
        problem = "a failed tool result has no error"
    outcome = Outcome(
        action_index=data.action_index,
        tool=data.tool,
        status="ok" if data.ok else "error",
        output=data.output,
        error=data.error,
        approval=data.approval,
    )
    return outcome, problem


def status_of(outcomes: list[Outcome], action_count: int) -> Status:
    statuses = [o.status for o in outcomes]
    if len(outcomes) == action_count and all(s == "ok" for s in statuses):
        return "completed"
    if len(outcomes) == action_count and all(s == "denied" for s in statuses):
        return "denied"
    if any(s == "ok" for s in statuses):
        return "partial"
    return "failed"


def _describe(outcome: Outcome) -> str:
    tool = outcome.tool or "?"
    if outcome.status == "ok":
        summary = (outcome.output or {}).get("summary")
        text = summary if isinstance(summary, str) else "done"
    elif outcome.status == "denied":
        text = "denied" + (f" ({'; '.join(outcome.reasons)})" if outcome.reasons else "")
    elif outcome.status == "error":
        text = f"failed: {outcome.error}"
    else:
        text = "no outcome received"
    approval = outcome.approval
    if approval is not None and approval.by != TIMEOUT_APPROVER:
        # A held action: who let it through or refused it, and why.
        text += f" [{approval.by}: {approval.reason}]"
    if len(text) > MAX_SUMMARY_CHARS:
        text = text[: MAX_SUMMARY_CHARS - 1] + "…"
    return f"{outcome.action_index + 1}. {tool}: {text}"


_HEADLINES: dict[str, str] = {
    "completed": "All {n} action(s) succeeded.",
    "partial": "{ok} of {n} action(s) succeeded.",
    "denied": "All {n} action(s) were denied by policy.",
    "failed": "The task failed.",
    "timeout": "Timed out with {got} of {n} outcome(s).",
}


def answer_for(
    status: Status, outcomes: list[Outcome], action_count: int, problem: str | None = None
) -> Answer:
    """The final answer: a headline, one line per action, and the outcomes in plan order."""
    by_index = {o.action_index: o for o in outcomes}
    listed = [
        by_index.get(i) or Outcome(action_index=i, status="missing") for i in range(action_count)
    ]
    # Outcomes with an index outside the plan only occur in malformed joins; keep them visible.
    listed += [
        o for o in sorted(outcomes, key=lambda o: o.action_index) if o.action_index >= action_count
    ]
    headline = _HEADLINES[status].format(
        n=action_count, ok=sum(o.status == "ok" for o in outcomes), got=len(outcomes)
    )
    if problem:
        headline += f" Malformed outcome: {problem}."
    lines = [headline, *(_describe(o) for o in listed)]
    return Answer(text="\n".join(lines), outcomes=listed)


def _stored_outcomes(join: MutableMapping[str, Any]) -> tuple[list[Outcome], str | None]:
    """The outcomes kept in a join; a stored entry that no longer validates is a problem."""
    outcomes = []
    entries = join.get("outcomes")
    if not isinstance(entries, dict):
        return [], "stored join is corrupt"
    for entry in entries.values():
        try:
            outcomes.append(Outcome.model_validate(entry["outcome"]))
        except (ValidationError, KeyError, TypeError):
            return outcomes, "stored outcome is corrupt"
    return outcomes, None


def _count_of(join: MutableMapping[str, Any], *, default: int) -> int:
    count = join.get("action_count")
    return count if type(count) is int and count > 0 else default


class ResponderStep(Step):
    name = "responder"
    inputs = (topics.TOOL_RESULTS, topics.ACTIONS_DENIED, topics.ACTIONS_HELD)
    outputs = (topics.RESULTS,)
    accepts = {TOOL_RESULT: ToolResult, ACTION_DENIED: ActionDenied, ACTION_HELD: ActionHeld}

    def __init__(
        self, *, deadline: float = 30.0, remember_ids: int = 1024, clock: Clock = _utcnow
    ) -> None:
        # Seconds from a task's first outcome until tick gives up on the rest.
        self.deadline = timedelta(seconds=deadline)
        self.remember_ids = remember_ids
        # Processing time, not event time: a consumer catching up on a backlog
        # must not time out joins whose remaining outcomes are queued behind.
        self._clock = clock

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        if event.type == ACTION_HELD:
            return self._held(event, ctx)
        data: ToolResult | ActionDenied
        if event.type == ACTION_DENIED:
            data = data_as(ctx, event, ActionDenied)
        else:
            data = data_as(ctx, event, ToolResult)
        state = ctx.state
        done = state.get(DONE_KEY)
        if isinstance(done, list) and data.task_id in done:
            return duplicate(ctx)  # late or re-produced outcome of a finished task
        pending = state.setdefault(PENDING_KEY, {})
        join = pending.get(data.task_id)
        if not isinstance(join, dict):
            join = {
                "action_count": data.action_count,
                "agent": data.agent,
                "deadline": (self._clock() + self.deadline).isoformat(),
                "traceparent": event.traceparent,
                "outcomes": {},
            }
            pending[data.task_id] = join
        outcome, problem = outcome_of(data)
        entries = join.get("outcomes")
        if not isinstance(entries, dict):
            # Corrupt stored state: fail the task rather than guess (fail closed).
            entries, problem = {}, problem or "stored join is corrupt"
        slot = str(outcome.action_index)
        previous = entries.get(slot)
        if isinstance(previous, dict) and previous.get("event_id") == event.id:
            return duplicate(ctx)  # the same event again
        if problem is None and join.get("action_count") != data.action_count:
            problem = f"plan size {data.action_count} disagrees with {join.get('action_count')}"
        if problem is None and isinstance(previous, dict):
            if previous.get("outcome") == outcome.model_dump(mode="json"):
                return duplicate(ctx)  # the same outcome from another copy
            problem = f"conflicting outcomes for action {outcome.action_index}"
        if problem is None:
            entries[slot] = {"event_id": event.id, "outcome": outcome.model_dump(mode="json")}
        outcomes, stored_problem = _stored_outcomes(join)
        problem = problem or stored_problem
        count = _count_of(join, default=data.action_count)
        if problem is None and len(outcomes) < count:
            return []
        status: Status = "failed" if problem else status_of(outcomes, count)
        if problem:
            outcomes.append(outcome)
        final = self._finish(state, data.task_id, join, status, outcomes, count, problem)
        ctx.result(data.task_id, status, final.answer.model_dump(mode="json"))
        return [ctx.output(topics.RESULTS, TASK_COMPLETED, final.model_dump(mode="json"))]

    def _held(self, event: Event, ctx: Context) -> list[Output]:
        """Wait for a held action's outcome until its approval deadline, plus ours."""
        held = data_as(ctx, event, ActionHeld)
        state = ctx.state
        done = state.get(DONE_KEY)
        if isinstance(done, list) and held.task_id in done:
            return duplicate(ctx)
        pending = state.setdefault(PENDING_KEY, {})
        join = pending.get(held.task_id)
        if not isinstance(join, dict):
            join = pending[held.task_id] = {
                "action_count": held.action_count,
                "agent": held.agent,
                "traceparent": event.traceparent,
                "outcomes": {},
            }
        wait_until = held.deadline + self.deadline
        if wait_until.tzinfo is None:
            wait_until = wait_until.replace(tzinfo=UTC)
        try:
            current = datetime.fromisoformat(join["deadline"])
        except (KeyError, TypeError, ValueError):
            current = None
        if current is None or current.tzinfo is None or current < wait_until:
            join["deadline"] = wait_until.isoformat()
        return []

    def _finish(
        self,
        state: MutableMapping[str, Any],
        task_id: str,
        join: MutableMapping[str, Any],
        status: Status,
        outcomes: list[Outcome],
        count: int,
        problem: str | None = None,
    ) -> TaskCompleted:
        """Build the final result and move the task from pending to done."""
        # On a malformed join several outcomes may share an index; keep the first of each.
        unique: dict[int, Outcome] = {}
        for o in outcomes:
            unique.setdefault(o.action_index, o)
        answer = answer_for(status, list(unique.values()), count, problem)
        agent = join.get("agent") if isinstance(join.get("agent"), str) else None
        pending = state.get(PENDING_KEY)
        if isinstance(pending, dict):
            pending.pop(task_id, None)
        remember(state, DONE_KEY, task_id, self.remember_ids)
        return TaskCompleted(
            task_id=task_id,
            agent=agent or "assistant",
            status=status,
            action_count=count,
            answer=answer,
        )

    async def tick(self, now: datetime, tc: TickContext) -> list[Output]:
        """Give up on joins past their deadline: each gets a ``timeout`` result."""
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        outputs: list[Output] = []
        for key, state in tc.states():
            pending = state.get(PENDING_KEY)
            if not isinstance(pending, dict):
                continue
            for task_id in sorted(pending):
                outputs.extend(self._expire(key, state, task_id, pending[task_id], now, tc))
        return outputs

    def _expire(
        self,
        key: StateKey,
        state: MutableMapping[str, Any],
        task_id: str,
        join: Any,
        now: datetime,
        tc: TickContext,
    ) -> list[Output]:
        if not isinstance(join, dict):
            join = {}
        try:
            deadline = datetime.fromisoformat(join["deadline"])
        except (KeyError, TypeError, ValueError):
            deadline = now  # unreadable deadline: expire it rather than keep it forever
        if deadline.tzinfo is None:
            deadline = deadline.replace(tzinfo=UTC)
        if deadline > now:
            return []
        outcomes, _problem = _stored_outcomes(join)
        count = _count_of(join, default=len(outcomes))
        final = self._finish(state, task_id, join, "timeout", outcomes, count)
        traceparent = join.get("traceparent") if isinstance(join.get("traceparent"), str) else None
        tc.result(
            key, task_id, "timeout", final.answer.model_dump(mode="json"), traceparent=traceparent
        )
        return [
            tc.output(
                key,
                topics.RESULTS,
                TASK_COMPLETED,
                final.model_dump(mode="json"),
                seed=task_id,
                traceparent=traceparent,
            )
        ]
