"""The input lines of ``sluice policy test``: exactly one of three documented shapes.

A line that is read as the wrong shape gets a decision nobody asked about
(a plain action read as a policy input lacks the tenant, spend and PII
findings, and is denied with reasons that have nothing to do with it), so
each line must match one shape completely, and the output says which:

``action``
    ``{"tool": ..., "args": {...}, "agent": ...}``: a proposed tool call, the
    data of an ``action.proposed`` event (its ``task_id``, ``action_index``,
    ``action_count`` and ``task_time`` may be present too). The tenant, the
    session's spend and its calls in the rate window come from flags; the
    gate builds the policy input from it (PII found by the bundle's
    patterns, ``args_kib``, ``url_host``) and may rewrite the arguments.
``event``
    A whole ``action.proposed`` event (``"type": "action.proposed"``, its
    ``tenant``, and ``data`` of the action shape).
``input``
    The policy input document itself, as the gate builds it: every one of
    ``tenant, agent, tool, args, args_kib, url_host, pii, spend,
    calls_in_window``, with ``pii`` a list of
    ``{"kind", "path", "match"[, "digits", "luhn"]}``; ``usage`` (``{"total_tokens",
    "session_total_tokens"}`` or null) may be there too, else it is null.
    Evaluated as given.

An action (or an event's data) may carry ``usage`` as the planner sends it;
it goes into the policy input like the gate's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sluicegate.policy.schemas import ACTION_PROPOSED, AgentName, TokenUsage, ToolName
from sluicegate.streams.errors import SluiceError

Shape = Literal["action", "event", "input"]
M = TypeVar("M", bound=BaseModel)

# Fields only a policy input document has (an action has none of them).
_INPUT_ONLY = frozenset({"tenant", "args_kib", "url_host", "pii", "spend", "calls_in_window"})
_EVENT_ONLY = frozenset({"type", "data", "specversion", "source", "session"})

SHAPES_HELP = (
    "an action {tool, args[, agent]}, a whole action.proposed event, or a policy input "
    "with all of tenant, agent, tool, args, args_kib, url_host, pii, spend, calls_in_window"
)


class LineError(SluiceError, ValueError):
    """A line that is not exactly one of the shapes; the message says what is wrong."""


class Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent: AgentName = "assistant"
    tool: ToolName
    args: dict[str, Any] = Field(default_factory=dict)
    # Present when the line is an action.proposed event's data; not decided on.
    task_id: str | None = None
    action_index: int | None = None
    action_count: int | None = None
    task_time: str | None = None
    # The model tokens behind the plan: decided on, like the gate does.
    usage: TokenUsage | None = None


class PiiFinding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    path: list[str | int]
    match: str
    digits: str | None = None
    luhn: bool | None = None


class PolicyInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(min_length=1)
    agent: str
    tool: str
    args: dict[str, Any]
    args_kib: int = Field(ge=0)
    url_host: str | None
    pii: list[PiiFinding]
    spend: int | float = Field(ge=0)
    calls_in_window: int = Field(ge=0)
    usage: TokenUsage | None = None


@dataclass(frozen=True, slots=True)
class Line:
    """One parsed line: its shape, and what to decide on."""

    shape: Shape
    action: Action | None = None  # action and event
    tenant: str | None = None  # event: its own tenant
    document: dict[str, Any] | None = None  # input


def parse_line(raw: object) -> Line:
    """The one shape ``raw`` has; :class:`LineError` when it has none, or lacks fields."""
    if not isinstance(raw, dict):
        raise LineError(f"a line must be a JSON object: {SHAPES_HELP}")
    keys = set(raw)
    if keys & _EVENT_ONLY:
        return _event(raw)
    if keys & _INPUT_ONLY:
        document = _validated(PolicyInput, raw, "policy input")
        return Line("input", document=document.model_dump(mode="json"))
    if "tool" in keys:
        return Line("action", action=_validated(Action, raw, "action"))
    raise LineError(f"matches no shape (keys {sorted(keys)}): give {SHAPES_HELP}")


def _event(raw: dict[str, Any]) -> Line:
    if raw.get("type") != ACTION_PROPOSED:
        raise LineError(f"an event line must be of type {ACTION_PROPOSED}, not {raw.get('type')!r}")
    data, tenant = raw.get("data"), raw.get("tenant")
    if not isinstance(data, dict):
        raise LineError("an action.proposed event needs data: an object with tool and args")
    if not isinstance(tenant, str) or not tenant:
        raise LineError("an action.proposed event needs its tenant")
    return Line("event", action=_validated(Action, data, "action.proposed data"), tenant=tenant)


def _validated(model: type[M], raw: dict[str, Any], what: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise LineError(f"{what}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    missing = [_loc(e["loc"]) for e in exc.errors() if e["type"] == "missing"]
    extra = [_loc(e["loc"]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    other = [
        f"{_loc(e['loc'])}: {e['msg']}"
        for e in exc.errors()
        if e["type"] not in ("missing", "extra_forbidden")
    ]
    parts = []
    if missing:
        parts.append(f"lacks {', '.join(missing)}")
    if extra:
        parts.append(f"has unknown {', '.join(extra)}")
    parts.extend(other[:3])
    return "; ".join(parts)


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)
