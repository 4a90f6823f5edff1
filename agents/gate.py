"""The ``allow_all`` gate: lets every proposed action through.

It stands in for the policy gate (package ``policy``) until that lands, and
stays useful for tests and benchmarks that want the pipeline without policy.
It uses the same step API and event types as the real gate:
``action.proposed`` on ``actions.proposed`` becomes ``action.allowed`` on
``actions.allowed`` with decision ``allow``, and each decision is audited.
"""

from __future__ import annotations

from sluicegate.agents import topics
from sluicegate.agents.api import Step
from sluicegate.agents.schemas import ACTION_ALLOWED, ACTION_PROPOSED, ActionAllowed, ActionProposed
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output

POLICY_VERSION = "allow-all"


class AllowAllGate(Step[ActionProposed]):
    name = "allow_all"
    inputs = (topics.ACTIONS_PROPOSED,)
    # Never denies or holds, but declares those topics like the real gate,
    # so swapping gates changes no topic layout.
    outputs = (topics.ACTIONS_ALLOWED, topics.ACTIONS_DENIED, topics.ACTIONS_HELD)
    types = (ACTION_PROPOSED,)

    async def process(self, event: Event, ctx: Context[ActionProposed]) -> list[Output]:
        proposed = ctx.data
        allowed = ActionAllowed(
            **proposed.model_dump(), decision="allow", policy_version=POLICY_VERSION
        )
        ctx.record("decision", decision="allow", policy_version=POLICY_VERSION)
        return [ctx.output(topics.ACTIONS_ALLOWED, ACTION_ALLOWED, allowed.model_dump(mode="json"))]
