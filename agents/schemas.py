"""Event types of the reference agent pipeline and the pydantic models of their ``data``.

The runner validates every input against these models (through each step's
``accepts``), so a step only ever sees data of the shape declared here.
Models of events we produce ourselves forbid unknown fields, so a producer
bug surfaces as a dead letter instead of silently lost data. The two models
the policy gate produces (``ActionAllowed``, ``ActionDenied``) ignore unknown
fields instead: the gate is free to add its own (decision detail, timings).

Flow: ``task.submitted`` → ``task.accepted`` → ``context.packed`` →
``action.proposed`` (one per tool call) → ``action.allowed`` /
``action.denied`` → ``tool.result`` → ``task.completed`` (one per task).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from sluicegate.streams.codec import DataRegistry

TASK_SUBMITTED: Final = "task.submitted"
TASK_ACCEPTED: Final = "task.accepted"
CONTEXT_PACKED: Final = "context.packed"
ACTION_PROPOSED: Final = "action.proposed"
ACTION_ALLOWED: Final = "action.allowed"
ACTION_DENIED: Final = "action.denied"
ACTION_HELD: Final = "action.held"
TOOL_RESULT: Final = "tool.result"
TASK_COMPLETED: Final = "task.completed"

MAX_PROMPT_CHARS: Final = 8000
# A plan fans out into at most this many actions: it bounds the responder's
# join state and the work one prompt can trigger.
MAX_ACTIONS: Final = 16
# Serialised size limits for free-form JSON fields, so one event cannot blow
# up keyed state or the audit trail. A final result carries up to
# MAX_ACTIONS outputs, which must stay well under the 1 MiB event limit.
MAX_METADATA_BYTES: Final = 4096
MAX_ARGS_BYTES: Final = 16384
MAX_OUTPUT_BYTES: Final = 16384

TaskId = Annotated[str, Field(min_length=1, max_length=128)]
AgentName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
ToolName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_.:-]*$")]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
# A token count: a JSON integer, never a float, a string or a bool.
Tokens = Annotated[StrictInt, Field(ge=0)]

Status = Literal["completed", "partial", "denied", "failed", "timeout"]
OutcomeStatus = Literal["ok", "error", "denied", "missing"]


def _json_size(value: Any) -> int:
    return len(orjson.dumps(value))


def _bounded(value: dict[str, Any], limit: int, what: str) -> dict[str, Any]:
    try:
        size = _json_size(value)
    except TypeError as exc:  # not JSON (e.g. a set smuggled in by Python code)
        raise ValueError(f"{what} must be JSON: {exc}") from None
    if size > limit:
        raise ValueError(f"{what} is {size} bytes of JSON, over the {limit}-byte limit")
    return value


class _Own(BaseModel):
    """Data we produce: unknown fields are a bug, so they are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSubmitted(_Own):
    """Upstream input on ``tasks``. Anything else a caller wants to carry goes in ``metadata``."""

    prompt: Prompt
    agent: AgentName = "assistant"
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _bounded(value, MAX_METADATA_BYTES, "metadata")


class TaskAccepted(_Own):
    """A deduplicated task; ``task_id`` is the id of the ``task.submitted`` event."""

    task_id: TaskId
    prompt: Prompt
    agent: AgentName = "assistant"
    metadata: dict[str, Any] = Field(default_factory=dict)
    # The submitted event's time: tools that need "now" use it, so a replay
    # gives the same answer as the first run.
    submitted_at: datetime | None = None


class HistoryTurn(_Own):
    """One earlier prompt of the session, with its approximate token count."""

    task_id: TaskId
    prompt: Prompt
    tokens: int = Field(ge=0)


class ContextPacked(_Own):
    """The task plus the session history that fits the token budget, oldest first."""

    task: TaskAccepted
    history: list[HistoryTurn] = Field(default_factory=list)
    history_tokens: int = Field(ge=0)
    token_budget: int = Field(ge=0)


class ToolCall(_Own):
    """One tool invocation a planner proposes."""

    tool: ToolName
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("args")
    @classmethod
    def _args_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _bounded(value, MAX_ARGS_BYTES, "args")


class _ActionFields(BaseModel):
    """What every action event says about its place in the plan."""

    task_id: TaskId
    agent: AgentName = "assistant"
    action_index: int = Field(ge=0)
    action_count: int = Field(ge=1, le=MAX_ACTIONS)
    tool: ToolName

    @model_validator(mode="after")
    def _index_in_plan(self) -> _ActionFields:
        if self.action_index >= self.action_count:
            raise ValueError(
                f"action_index {self.action_index} is outside a plan of {self.action_count}"
            )
        return self


class TokenUsage(_Own):
    """The model tokens behind a plan, as the planner step counted them.

    ``total_tokens``: what the model call that made this plan cost (as its
    endpoint reported); ``session_total_tokens``: the session's running total
    after that call (``state["tokens"]["total"]`` of the planner, see
    :mod:`agents.planner`), so at least ``total_tokens``. Keyed state is per
    (tenant, session): this is a session's total, not the tenant's.
    """

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


class ActionProposed(_ActionFields):
    """One planned tool call, on ``actions.proposed``; the policy gate decides on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    args: dict[str, Any] = Field(default_factory=dict)
    # The task's submission time (see TaskAccepted.submitted_at); optional so
    # a gate that rebuilds the event without it still produces valid data.
    task_time: datetime | None = None
    # Set by the planner when its model call reported usage, for policies
    # that budget tokens; absent for the rule-based planner. The planner
    # leaves the key out (not null) when there is none, so its events stay
    # valid for gates older than this field (which forbid unknown fields).
    # Rolling upgrade: gates before planners.
    usage: TokenUsage | None = None

    @field_validator("args")
    @classmethod
    def _args_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _bounded(value, MAX_ARGS_BYTES, "args")


class Approval(_Own):
    """Who decided a held action, why and when (``sluice approvals``, or the timeout)."""

    id: str
    by: str
    reason: str
    decided_at: datetime | None = None


class ActionAllowed(ActionProposed):
    """An action the gate let through (``args`` may be redacted), on ``actions.allowed``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    decision: str = "allow"
    policy_version: str | None = None
    # Set when the action was held and a person approved it.
    approval: Approval | None = None


class ActionDenied(ActionProposed):
    """An action the gate refused, with its reasons, on ``actions.denied``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    decision: str = "deny"
    reasons: list[str] = Field(default_factory=list)
    policy_version: str | None = None
    # Set when the action was held and then denied (or timed out).
    approval: Approval | None = None


class ActionHeld(ActionProposed):
    """An action the gate holds for a person, on ``actions.held``, until ``deadline``.

    Once decided it comes back as ``action.allowed`` or ``action.denied``
    (reason ``approval_denied`` or ``approval_timeout``).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    decision: str = "hold"
    reasons: list[str] = Field(default_factory=list)
    policy_version: str | None = None
    deadline: datetime


class ToolResult(_ActionFields):
    """The outcome of executing one allowed action, on ``tool.results``.

    ``ok`` with ``output``, or not ``ok`` with ``error``; the responder checks
    that pairing itself (fail closed) rather than the model, so an incoherent
    result fails its task instead of vanishing into the dead-letter topic.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    output: dict[str, Any] | None = None
    error: str | None = Field(default=None, max_length=2000)
    # 0 when the tool was never called (unknown tool, refused decision).
    attempts: int = Field(default=0, ge=0)
    # The approval of a held action, passed on so the final answer names it.
    approval: Approval | None = None

    @field_validator("output")
    @classmethod
    def _output_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _bounded(value, MAX_OUTPUT_BYTES, "output")


class Outcome(_Own):
    """What happened to one action of a plan, as reported in the final answer."""

    action_index: int = Field(ge=0)
    tool: str | None = None
    status: OutcomeStatus
    output: dict[str, Any] | None = None
    error: str | None = None
    reasons: list[str] = Field(default_factory=list)
    approval: Approval | None = None


class Answer(_Own):
    text: str
    outcomes: list[Outcome] = Field(default_factory=list)


class TaskCompleted(_Own):
    """The one final result of a task, on ``results``."""

    task_id: TaskId
    agent: AgentName = "assistant"
    status: Status
    action_count: int = Field(ge=0)
    answer: Answer


EVENT_MODELS: Final[dict[str, type[BaseModel]]] = {
    TASK_SUBMITTED: TaskSubmitted,
    TASK_ACCEPTED: TaskAccepted,
    CONTEXT_PACKED: ContextPacked,
    ACTION_PROPOSED: ActionProposed,
    ACTION_ALLOWED: ActionAllowed,
    ACTION_DENIED: ActionDenied,
    ACTION_HELD: ActionHeld,
    TOOL_RESULT: ToolResult,
    TASK_COMPLETED: TaskCompleted,
}


def register(registry: DataRegistry) -> DataRegistry:
    """Add every event type of the pipeline to ``registry`` (for tail, publish, demo)."""
    for event_type, model in EVENT_MODELS.items():
        registry.register(event_type, model)
    return registry
