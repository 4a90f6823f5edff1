"""The policy gate and the agent steps agree on the events between them.

``policy`` may not import ``agents`` (imports point one way), so each side
declares the ``action.*`` data it reads; this test holds them together.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sluicegate.agents.planner import PlannerStep
from sluicegate.agents.schemas import (
    ActionAllowed,
    ActionDenied,
    ActionProposed,
    ContextPacked,
    TaskAccepted,
)
from sluicegate.agents.schemas import TokenUsage as AgentsTokenUsage
from sluicegate.agents.testing import context_for, make_event
from sluicegate.policy.gate import PolicyGate
from sluicegate.policy.schemas import ProposedAction
from sluicegate.policy.schemas import TokenUsage as GateTokenUsage


def test_the_gate_reads_every_field_the_planner_writes() -> None:
    assert set(ActionProposed.model_fields) == set(ProposedAction.model_fields)
    for name, field in ActionProposed.model_fields.items():
        assert field.is_required() == ProposedAction.model_fields[name].is_required(), name
    # And inside usage (the token budget's input).
    assert set(AgentsTokenUsage.model_fields) == set(GateTokenUsage.model_fields)
    for name, field in AgentsTokenUsage.model_fields.items():
        assert field.is_required() == GateTokenUsage.model_fields[name].is_required(), name


@pytest.mark.parametrize(
    "prompt",
    [
        "what is 6 * 7; search for keyed state",
        "email alice@example.com the summary",
        "run shell: rm -rf /",
        "post the report to https://evil.example.com/x",
    ],
)
async def test_planner_output_through_the_gate_is_what_tools_and_responder_read(
    prompt: str,
) -> None:
    task = TaskAccepted(task_id="task-1", prompt=prompt, submitted_at=datetime.now(UTC))
    packed = ContextPacked(task=task, history=[], history_tokens=0, token_budget=512)
    event = make_event("context.packed", packed.model_dump(mode="json"), tenant="acme")
    planner = PlannerStep()
    proposed = await planner.process(event, context_for(planner, event))
    assert proposed
    gate = PolicyGate()
    for out in proposed:
        ActionProposed.model_validate(out.event.data)
        ctx = context_for(gate, out.event)
        [decided] = await gate.process(out.event, ctx)
        model = ActionAllowed if decided.topic == "actions.allowed" else ActionDenied
        assert decided.topic in ("actions.allowed", "actions.denied")
        model.model_validate(decided.event.data)
