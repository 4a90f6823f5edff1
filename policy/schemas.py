"""The gate's own view of the events it reads and writes.

``policy`` may not import ``agents`` (DESIGN.md, "Layout"), so the gate
declares the ``action.proposed`` data it accepts here, with the same fields
and limits as ``agents.schemas.ActionProposed``; what it emits
(``action.allowed`` / ``action.denied``) is that data plus the decision
fields, which ``agents.schemas.ActionAllowed`` / ``ActionDenied`` accept.
The topic and type names are the contract between the two packages.

``usage`` (the model tokens behind the plan, :class:`TokenUsage`) is optional
and passed into the policy input as it is, so a policy can budget tokens
(``limits.rego``). Rolling upgrades must upgrade gates before planners: a
gate older than this field forbids it and dead-letters every action of a
planner that sends it. The planner omits the key when it has no usage, so
its actions from the rule-based planner stay valid for old gates.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

ACTIONS_PROPOSED: Final = "actions.proposed"
ACTIONS_ALLOWED: Final = "actions.allowed"
ACTIONS_DENIED: Final = "actions.denied"
# Held for a person to approve (a ``hold`` decision): read by the responder.
ACTIONS_HELD: Final = "actions.held"
ACTION_PROPOSED: Final = "action.proposed"
ACTION_ALLOWED: Final = "action.allowed"
ACTION_DENIED: Final = "action.denied"
ACTION_HELD: Final = "action.held"

MAX_ACTIONS: Final = 16
MAX_ARGS_BYTES: Final = 16384

AgentName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_.:-]*$")]
Tokens = Annotated[StrictInt, Field(ge=0)]


class TokenUsage(BaseModel):
    """``action.proposed`` ``usage``: the plan's model call, and the session's total after it.

    The session's total is the planner's keyed state, which is per (tenant,
    session): a per-session figure, never a tenant-wide one. Declared again
    here, like :class:`ProposedAction`, because ``policy`` may not import
    ``agents``; tests/unit/test_schema_contract.py holds the two together.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_tokens: Tokens
    session_total_tokens: Tokens

    @model_validator(mode="after")
    def _session_holds_the_call(self) -> TokenUsage:
        if self.session_total_tokens < self.total_tokens:
            raise ValueError(
                f"session_total_tokens {self.session_total_tokens} is less than the "
                f"call's total_tokens {self.total_tokens}"
            )
        return self


class ProposedAction(BaseModel):
    """``action.proposed`` data: one planned tool call, for the gate to decide on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str = Field(min_length=1, max_length=128)
    agent: AgentName = "assistant"
    action_index: int = Field(ge=0)
    action_count: int = Field(ge=1, le=MAX_ACTIONS)
    tool: ToolName
    args: dict[str, Any] = Field(default_factory=dict)
    task_time: datetime | None = None
    usage: TokenUsage | None = None

    @field_validator("args")
    @classmethod
    def _args_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(orjson.dumps(value))
        except TypeError as exc:
            raise ValueError(f"args must be JSON: {exc}") from None
        if size > MAX_ARGS_BYTES:
            raise ValueError(f"args is {size} bytes of JSON, over the {MAX_ARGS_BYTES}-byte limit")
        return value

    @model_validator(mode="after")
    def _index_in_plan(self) -> ProposedAction:
        if self.action_index >= self.action_count:
            raise ValueError(
                f"action_index {self.action_index} is outside a plan of {self.action_count}"
            )
        return self
