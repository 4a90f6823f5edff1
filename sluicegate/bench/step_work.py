"""The step the step benchmark runs: per-session counters and a policy-gate-like decision.

The same work runs on every engine: :class:`BenchGateStep` on our
``StepRunner`` and the Faust agent in ``benchmarks/faust_step.py`` both call
:func:`decide` and :func:`output_event`, so they differ only in how the
engine around them consumes, keeps state, produces and checkpoints.

Like the policy gate it checks a per-tenant tool allowlist and a per-session
spend budget against keyed state, charges the budget when it allows, and
emits one decision event; on our runtime it also records one ``decision``
audit row, as the real gate does.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from sluicegate.agents.api import Step
from sluicegate.streams.envelope import Event
from sluicegate.streams.ids import derived_id
from sluicegate.streams.step import Context, Output

STEP_NAME = "bench_gate"
INPUT_TOPIC = "input"
OUTPUT_TOPIC = "output"
INPUT_TYPE = "action.proposed"
OUTPUT_TYPE = "action.decided"

ALLOWLIST: Mapping[str, frozenset[str]] = {
    "acme": frozenset({"search", "echo", "calculator", "http_post"}),
    "globex": frozenset({"search", "echo"}),
}
TOOLS = ("search", "echo", "calculator", "http_post", "shell")
TENANTS = ("acme", "globex")
SESSION_BUDGET = 400.0


class ProposedAction(BaseModel):
    """``data`` of an input event."""

    tool: str
    cost: float = Field(ge=0)
    args: dict[str, Any] = Field(default_factory=dict)


def decide(state: MutableMapping[str, Any], tenant: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """Update the session's counters in ``state`` and return the decision (output data)."""
    calls = int(state.get("calls", 0)) + 1
    state["calls"] = calls
    tool = str(data.get("tool", ""))
    cost = float(data.get("cost", 0.0))
    spent = float(state.get("spend", 0.0))
    reasons = []
    if tool not in ALLOWLIST.get(tenant, frozenset()):
        reasons.append("tool_not_allowed")
    if spent + cost > SESSION_BUDGET:
        reasons.append("over_budget")
    decision = "deny" if reasons else "allow"
    if decision == "allow":
        state["spend"] = round(spent + cost, 2)
    counter = "allowed" if decision == "allow" else "denied"
    state[counter] = int(state.get(counter, 0)) + 1
    return {"decision": decision, "reasons": reasons, "tool": tool, "calls": calls}


def output_event(event: Mapping[str, Any], decision: Mapping[str, Any]) -> dict[str, Any]:
    """The decision as a CloudEvent dict derived from ``event``, as ``Event.derive`` builds it.

    For engines without our envelope model (Faust); ours goes through ``ctx.output``.
    """
    out = {
        "specversion": "1.0",
        "id": derived_id(str(event["id"]), STEP_NAME, 0),
        "source": f"sluicegate/{STEP_NAME}",
        "type": OUTPUT_TYPE,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "tenant": event["tenant"],
        "session": event["session"],
        "causationid": event["id"],
        "data": dict(decision),
    }
    if event.get("traceparent"):
        out["traceparent"] = event["traceparent"]
    return out


class BenchGateStep(Step):
    """:func:`decide` as a step of our runtime."""

    name: ClassVar[str] = STEP_NAME
    inputs: ClassVar[tuple[str, ...]] = (INPUT_TOPIC,)
    outputs: ClassVar[tuple[str, ...]] = (OUTPUT_TOPIC,)
    accepts: ClassVar[Mapping[str, type[BaseModel]]] = {INPUT_TYPE: ProposedAction}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        decision = decide(ctx.state, event.tenant, event.data)
        ctx.record("decision", decision=decision["decision"], reasons=decision["reasons"])
        return [ctx.output(OUTPUT_TOPIC, OUTPUT_TYPE, decision)]


def input_events(n: int, *, sessions: int = 200) -> list[Event]:
    """``n`` proposed actions over ``sessions`` sessions, a deterministic mix of tools and costs."""
    return [
        Event(
            source="sluice-bench",
            type=INPUT_TYPE,
            tenant=TENANTS[i % sessions % len(TENANTS)],
            session=f"session-{i % sessions}",
            data={
                "tool": TOOLS[(i * 7) % len(TOOLS)],
                "cost": float((i * 13) % 10),
                "args": {"q": f"query number {i}"},
            },
        )
        for i in range(n)
    ]
