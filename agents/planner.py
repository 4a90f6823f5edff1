"""The ``planner`` step, the ``Planner`` protocol, and the choice of planner.

``context.packed`` becomes one ``action.proposed`` per tool call of the
plan, on ``actions.proposed``, each saying its index and the plan's size so
the responder knows when it has every outcome. A plan always has at least
one action (an accepted task must end in exactly one result), and a planner
that raises or returns nothing usable fails closed into a single echo
saying so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from agents import topics
from agents.api import Step
from agents.keyed import data_as
from agents.openai_planner import DEFAULT_MODEL, DEFAULT_TIMEOUT_S, OpenAIPlanner, plan_failed
from agents.rule_planner import RuleBasedPlanner
from agents.schemas import (
    ACTION_PROPOSED,
    CONTEXT_PACKED,
    MAX_ACTIONS,
    ActionProposed,
    ContextPacked,
    HistoryTurn,
    TaskAccepted,
    ToolCall,
)
from streams.envelope import Event
from streams.step import Context, Output


@runtime_checkable
class Planner(Protocol):
    async def plan(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> list[ToolCall]:
        """The tool calls for ``task``, in order; ``history`` is the session's earlier prompts."""
        ...


def make_planner(env: Mapping[str, str] | None = None) -> Planner:
    """``OpenAIPlanner`` when ``SLUICE_LLM_URL`` is set, else the rule-based planner.

    Also read: ``SLUICE_LLM_MODEL``, ``SLUICE_LLM_API_KEY``, ``SLUICE_LLM_TIMEOUT`` (seconds).
    """
    env = os.environ if env is None else env
    url = env.get("SLUICE_LLM_URL", "").strip()
    if not url:
        return RuleBasedPlanner()
    try:
        timeout = float(env.get("SLUICE_LLM_TIMEOUT") or DEFAULT_TIMEOUT_S)
    except ValueError:
        timeout = DEFAULT_TIMEOUT_S
    return OpenAIPlanner(
        url,
        model=env.get("SLUICE_LLM_MODEL") or DEFAULT_MODEL,
        api_key=env.get("SLUICE_LLM_API_KEY") or None,
        timeout=timeout,
    )


class PlannerStep(Step):
    name = "planner"
    inputs = (topics.CONTEXT,)
    outputs = (topics.ACTIONS_PROPOSED,)
    accepts = {CONTEXT_PACKED: ContextPacked}

    def __init__(self, planner: Planner | None = None) -> None:
        self.planner: Planner = planner or RuleBasedPlanner()

    async def _plan(self, packed: ContextPacked) -> list[ToolCall]:
        try:
            calls = await self.planner.plan(packed.task, packed.history)
        except Exception as exc:  # a planner bug must fail the plan, not the worker
            return plan_failed(f"planner raised {type(exc).__name__}")
        if not isinstance(calls, list) or not calls:
            return plan_failed("planner proposed no actions")
        if len(calls) > MAX_ACTIONS:
            return plan_failed(f"planner proposed {len(calls)} actions, over {MAX_ACTIONS}")
        if not all(isinstance(call, ToolCall) for call in calls):
            return plan_failed("planner returned something other than tool calls")
        return calls

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        packed = data_as(ctx, event, ContextPacked)
        task = packed.task
        calls = await self._plan(packed)
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
            )
            outputs.append(
                ctx.output(topics.ACTIONS_PROPOSED, ACTION_PROPOSED, action.model_dump(mode="json"))
            )
        return outputs
