"""The tools the ``act`` step runs once the policy gate allowed them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Which team takes which category of ticket.
QUEUES = {"billing": "finance", "bug": "engineering", "account": "support", "other": "support"}

REPLIES = {
    "account": "To reset your password, use 'Forgot password' on the sign-in page.",
}


def route_ticket(category: str, urgency: str) -> dict[str, Any]:
    """Put the ticket in its team's queue; urgent ones go to the front."""
    queue = QUEUES.get(category, "support")
    return {"queue": queue, "position": "front" if urgency == "high" else "back"}


def auto_reply(category: str, urgency: str) -> dict[str, Any]:
    """Answer the ticket with a canned reply, when there is one for its category.

    Whether an urgent ticket may get one is the policy's call (policy/triage.rego).
    """
    text = REPLIES.get(category)
    if text is None:
        raise ValueError(f"no canned reply for {category!r}")
    return {"reply": text}


Tool = Callable[[str, str], dict[str, Any]]
TOOLS: dict[str, Tool] = {"route_ticket": route_ticket, "auto_reply": auto_reply}
