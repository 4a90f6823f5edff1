"""The ``planner`` step, the ``Planner`` protocol, and the choice of planner.

``context.packed`` becomes one ``action.proposed`` per tool call of the
plan, on ``actions.proposed``, each saying its index and the plan's size so
the responder knows when it has every outcome. A plan always has at least
one action (an accepted task must end in exactly one result), and a planner
that raises or returns nothing usable fails closed into a single echo
saying so.

Token usage. A planner that asks a model (:class:`OpenAIPlanner`, or any
planner with a ``plan_and_report`` method) reports what the call cost, and
the step records it four ways:

- in the audit detail of the input: ``detail["model"] = {"model",
  "prompt_tokens", "completion_tokens", "total_tokens", "attempts",
  "latency_ms"}`` (plus ``"error"`` when the call failed; no token fields
  when the endpoint reported none);
- in the session's keyed state, ``state["tokens"] = {"prompt", "completion",
  "total", "calls"}``, running totals of the (tenant, session) over the calls
  that reported usage, committed with the batch like any state: they survive
  restarts, and an input processed again after a crash is counted once
  (though the model was asked twice). Keyed state is per (tenant, session):
  a tenant-wide total is the sum over its sessions, which the audit trail
  (``detail.model``) or the ``sluice.model.tokens`` metric gives, not one
  row of state;
- in the metrics ``sluice.model.tokens``, ``sluice.model.call.duration`` and
  ``sluice.model.retries`` (:mod:`agents.model_metrics`, recorded by the
  model client);
- on each ``action.proposed`` of the plan, as ``usage = {"total_tokens",
  "session_total_tokens"}``: the call's total and the session's running total
  after it (``state["tokens"]["total"]``), so the policy gate can budget
  tokens. Absent when the call reported no usage, and for the rule-based
  planner.

The rule-based planner asks no model and reports nothing.

Budgeting on it. The gate passes ``usage`` into the policy input, and the
reference bundle denies an action (``token_budget_exceeded``) when
``input.usage.session_total_tokens`` exceeds the tenant's ``token_budget``
(bundle data; a tenant without one is unlimited). The gate keeps no token
state of its own. As with the spend budget (:mod:`policy.ledger`), the budget
is set per tenant and applied per session: keyed state is per (tenant,
session), and a total shared by all of a tenant's sessions would need state
keyed by tenant (a step partitioned by tenant, one hot partition per large
tenant) or a counter outside the stream with its own story on replay; neither
exists. The plan whose call passes the budget is itself denied (its tokens
are spent already; what is refused is acting on them), and so is every
later plan of the session.

Rolling upgrade: gates before planners. A gate older than ``usage`` forbids
unknown fields and would dead-letter every action of a planner that sends
it. The key is left out (not null) when there is no usage, so actions of the
rule-based planner stay valid for old gates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

from sluicegate.agents import topics
from sluicegate.agents.api import Step
from sluicegate.agents.envvars import optional_positive_float, positive_float, positive_int
from sluicegate.agents.model_client import DEFAULT_CONCURRENCY, DEFAULT_MAX_ATTEMPTS, CallReport
from sluicegate.agents.openai_planner import (
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT_S,
    OpenAIPlanner,
    PlanOutcome,
    plan_failed,
)
from sluicegate.agents.rule_planner import RuleBasedPlanner
from sluicegate.agents.schemas import (
    ACTION_PROPOSED,
    CONTEXT_PACKED,
    MAX_ACTIONS,
    ActionProposed,
    ContextPacked,
    HistoryTurn,
    TaskAccepted,
    TokenUsage,
    ToolCall,
)
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output


@runtime_checkable
class Planner(Protocol):
    async def plan(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> list[ToolCall]:
        """The tool calls for ``task``, in order; ``history`` is the session's earlier prompts."""
        ...


@runtime_checkable
class ReportingPlanner(Protocol):
    """A planner that also says what its model call cost (see the module docstring)."""

    async def plan_and_report(
        self, task: TaskAccepted, history: Sequence[HistoryTurn]
    ) -> PlanOutcome: ...


# Keyed state: the session's running token totals.
TOKENS_KEY = "tokens"


def make_planner(env: Mapping[str, str] | None = None) -> Planner:
    """``OpenAIPlanner`` when ``SLUICE_LLM_URL`` is set, else the rule-based planner.

    Also read: ``SLUICE_LLM_MODEL``, ``SLUICE_LLM_API_KEY``,
    ``SLUICE_LLM_TIMEOUT`` (seconds per attempt, default 20),
    ``SLUICE_LLM_CONCURRENCY`` (requests in flight to the endpoint, default
    64), ``SLUICE_LLM_RPM`` (requests a minute, default no limit) and
    ``SLUICE_LLM_MAX_ATTEMPTS`` (default 4). A bad number raises
    :class:`ValueError` naming the variable and its value, with or without a
    URL, so a typo never passes unnoticed.
    """
    env = os.environ if env is None else env
    timeout = positive_float(env, "SLUICE_LLM_TIMEOUT", DEFAULT_TIMEOUT_S)
    concurrency = positive_int(env, "SLUICE_LLM_CONCURRENCY", DEFAULT_CONCURRENCY)
    rpm = optional_positive_float(env, "SLUICE_LLM_RPM")
    max_attempts = positive_int(env, "SLUICE_LLM_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)
    url = env.get("SLUICE_LLM_URL", "").strip()
    if not url:
        return RuleBasedPlanner()
    return OpenAIPlanner(
        url,
        model=env.get("SLUICE_LLM_MODEL") or DEFAULT_MODEL,
        api_key=env.get("SLUICE_LLM_API_KEY") or None,
        timeout=timeout,
        max_attempts=max_attempts,
        concurrency=concurrency,
        rpm=rpm,
    )


def add_usage(state: MutableMapping[str, Any], report: CallReport) -> dict[str, int]:
    """Add the call's tokens to the session's running totals in ``state``; the new totals."""
    old = state.get(TOKENS_KEY)
    old = old if isinstance(old, dict) else {}

    def before(name: str) -> int:
        value = old.get(name)
        return value if type(value) is int and value >= 0 else 0

    usage = report.usage
    totals = {
        "prompt": before("prompt") + (usage.prompt_tokens if usage else 0),
        "completion": before("completion") + (usage.completion_tokens if usage else 0),
        "total": before("total") + (usage.total_tokens if usage else 0),
        "calls": before("calls") + 1,
    }
    state[TOKENS_KEY] = totals
    return totals


class PlannerStep(Step[ContextPacked]):
    name = "planner"
    inputs = (topics.CONTEXT,)
    outputs = (topics.ACTIONS_PROPOSED,)
    types = (CONTEXT_PACKED,)

    def __init__(self, planner: Planner | None = None) -> None:
        self.planner: Planner = planner or RuleBasedPlanner()

    async def _plan(self, packed: ContextPacked) -> PlanOutcome:
        report: CallReport | None = None
        try:
            # What isinstance(planner, ReportingPlanner) checks, without the
            # protocol machinery's ~10 us on every task.
            reporting = getattr(self.planner, "plan_and_report", None)
            if callable(reporting):
                outcome = await reporting(packed.task, packed.history)
                calls: object = outcome.calls
                report = outcome.report if isinstance(outcome.report, CallReport) else None
            else:
                calls = await self.planner.plan(packed.task, packed.history)
        except Exception as exc:  # a planner bug must fail the plan, not the worker
            return PlanOutcome(plan_failed(f"planner raised {type(exc).__name__}"), report)
        if not isinstance(calls, list) or not calls:
            return PlanOutcome(plan_failed("planner proposed no actions"), report)
        if len(calls) > MAX_ACTIONS:
            reason = f"planner proposed {len(calls)} actions, over {MAX_ACTIONS}"
            return PlanOutcome(plan_failed(reason), report)
        if not all(isinstance(call, ToolCall) for call in calls):
            return PlanOutcome(
                plan_failed("planner returned something other than tool calls"), report
            )
        return PlanOutcome(calls, report)

    async def process(self, event: Event, ctx: Context[ContextPacked]) -> list[Output]:
        packed = ctx.data
        task = packed.task
        outcome = await self._plan(packed)
        calls = outcome.calls
        usage: TokenUsage | None = None
        if outcome.report is not None:
            # Tokens are spent whether or not the plan was usable: count them all.
            ctx.detail["model"] = outcome.report.as_detail()
            if outcome.report.usage is not None:
                totals = add_usage(ctx.state, outcome.report)
                usage = TokenUsage(
                    total_tokens=outcome.report.usage.total_tokens,
                    session_total_tokens=totals["total"],
                )
        # No usage: no key at all, so the event stays valid for older gates.
        exclude = {"usage"} if usage is None else None
        outputs = []
        for index, call in enumerate(calls):
            action = ActionProposed(
                task_id=task.task_id,
                agent=task.agent,
                action_index=index,
                action_count=len(calls),
                tool=call.tool,
                args=call.args,
                task_time=task.submitted_at,
                usage=usage,
            )
            data = action.model_dump(mode="json", exclude=exclude)
            outputs.append(ctx.output(topics.ACTIONS_PROPOSED, ACTION_PROPOSED, data))
        return outputs
