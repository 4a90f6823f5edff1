"""What flows through the triage pipeline: the data models of its events."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TICKETS = "tickets"
TICKET_OPENED = "ticket.opened"
TRIAGED = "triaged"
TICKET_TRIAGED = "ticket.triaged"

Category = Literal["billing", "bug", "account", "other"]
Urgency = Literal["low", "high"]


class Ticket(BaseModel):
    """``ticket.opened``: what the help desk publishes on ``tickets``."""

    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(default="", max_length=4000)


class Classification(BaseModel):
    """What the model must answer, as JSON."""

    category: Category
    urgency: Urgency


class Action(BaseModel):
    """``action.allowed`` / ``action.denied`` as the gate emits them (the fields read here)."""

    model_config = ConfigDict(extra="ignore")

    task_id: str
    tool: str
    args: dict[str, Any]
    decision: str
    reasons: list[str] = []
