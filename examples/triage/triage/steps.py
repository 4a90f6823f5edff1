"""The triage steps: ``classify`` asks a model, ``act`` runs the tool the policy gate let through.

tickets ─ classify ─▶ actions.proposed ─ gate (policy/) ─▶ actions.allowed | actions.denied
        ─ act ─▶ triaged, and one result per ticket
"""

from __future__ import annotations

from pydantic import ValidationError

from sluicegate import ChatClient, Context, DeadLetter, Event, Output, Step
from sluicegate.policy.schemas import (
    ACTION_ALLOWED,
    ACTION_DENIED,
    ACTION_PROPOSED,
    ACTIONS_ALLOWED,
    ACTIONS_DENIED,
    ACTIONS_PROPOSED,
    ProposedAction,
)
from triage.models import (
    TICKET_OPENED,
    TICKET_TRIAGED,
    TICKETS,
    TRIAGED,
    Action,
    Classification,
    Ticket,
)
from triage.tools import REPLIES, TOOLS

PROMPT = (
    "Classify this support ticket. Answer with JSON only: "
    '{"category": "billing" | "bug" | "account" | "other", "urgency": "low" | "high"}.'
)
# A customer's third open ticket is urgent, whatever the model says.
URGENT_AFTER = 3


class Classify(Step[Ticket]):
    """Ask the model for a category and urgency; propose one action for the gate."""

    name = "classify"
    inputs = (TICKETS,)
    outputs = (ACTIONS_PROPOSED,)
    types = (TICKET_OPENED,)

    def __init__(self, model: ChatClient, *, model_name: str = "gpt-4o-mini") -> None:
        self.model = model
        self.model_name = model_name

    async def process(self, event: Event, ctx: Context[Ticket]) -> list[Output]:
        ticket = ctx.data
        messages = [
            {"role": "system", "content": PROMPT},
            {"role": "user", "content": f"{ticket.subject}\n\n{ticket.body}"},
        ]
        # A failed call raises ModelCallError: the runner retries it, then dead-letters.
        reply = await self.model.chat(self.model_name, messages, temperature=0)
        try:
            label = Classification.model_validate_json(reply.content or "")
        except ValidationError:
            # The same ticket would get the same answer: no point retrying.
            raise DeadLetter("unclassifiable", f"the model answered {reply.content!r}") from None
        # Keyed state: this session's (customer's) tickets so far.
        ctx.state["opened"] = opened = ctx.state.get("opened", 0) + 1
        urgency = "high" if opened >= URGENT_AFTER else label.urgency
        tool = "auto_reply" if label.category in REPLIES else "route_ticket"
        action = ProposedAction(
            task_id=event.id,
            agent="triage",
            action_index=0,
            action_count=1,
            tool=tool,
            args={"category": label.category, "urgency": urgency},
        )
        data = action.model_dump(mode="json", exclude_none=True)
        return [ctx.output(ACTIONS_PROPOSED, ACTION_PROPOSED, data)]


class Act(Step[Action]):
    """Run the allowed tool, or hand a denied ticket to a person; store the ticket's result."""

    name = "act"
    inputs = (ACTIONS_ALLOWED, ACTIONS_DENIED)
    outputs = (TRIAGED,)
    types = (ACTION_ALLOWED, ACTION_DENIED)

    async def process(self, event: Event, ctx: Context[Action]) -> list[Output]:
        action = ctx.data
        if action.decision == "deny":
            status = "escalated"
            outcome: dict[str, object] = {"queue": "humans", "reasons": action.reasons}
        else:
            tool = TOOLS.get(action.tool)
            if tool is None:
                raise DeadLetter("unknown_tool", f"the gate allowed {action.tool!r}")
            status = "replied" if action.tool == "auto_reply" else "routed"
            outcome = tool(action.args["category"], action.args["urgency"])
        ctx.result(action.task_id, status, {"tool": action.tool, **outcome})
        data = {"ticket": action.task_id, "status": status, **outcome}
        return [ctx.output(TRIAGED, TICKET_TRIAGED, data)]
