"""The reference agent pipeline, as a list of steps in topic order.

intake (tasks → tasks.accepted) → context (→ context) → planner
(→ actions.proposed) → gate (→ actions.allowed / actions.denied) → tools
(→ tool.results) → responder (tool.results + actions.denied → results).

Nothing here reads settings: the application decides the planner (see
``agents.planner.make_planner``) and swaps in the real policy gate through
``make_gate``; the default gate allows everything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sluicegate.agents.executor import ToolsStep
from sluicegate.agents.gate import AllowAllGate
from sluicegate.agents.history import ContextStep
from sluicegate.agents.intake import IntakeStep
from sluicegate.agents.planner import Planner, PlannerStep
from sluicegate.agents.responder import ResponderStep
from sluicegate.agents.tools import Tool
from sluicegate.streams.step import Processor

# Builds the step between ``actions.proposed`` and ``actions.allowed``/``actions.denied``.
# A ``Step`` subclass is a ``Processor`` as it is: the protocol's members are read-only.
GateFactory = Callable[[], Processor]


def reference_steps(
    *,
    planner: Planner | None = None,
    make_gate: GateFactory | None = None,
    tools: Mapping[str, Tool] | None = None,
    token_budget: int = 512,
    tool_timeout: float = 5.0,
    tool_concurrency: int = 8,
    result_deadline: float = 30.0,
) -> list[Processor]:
    """The steps of the reference pipeline, in order.

    ``planner`` defaults to the rule-based one; ``make_gate`` builds the step
    between ``actions.proposed`` and ``actions.allowed``/``actions.denied``
    (default :class:`AllowAllGate`); ``tools`` defaults to the built-ins.
    """
    gate = make_gate() if make_gate is not None else AllowAllGate()
    return [
        IntakeStep(),
        ContextStep(token_budget=token_budget),
        PlannerStep(planner),
        gate,
        ToolsStep(tools, timeout=tool_timeout, concurrency=tool_concurrency),
        ResponderStep(deadline=result_deadline),
    ]
