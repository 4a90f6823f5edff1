"""What a tool is: an async callable from JSON arguments to a JSON result.

Tools raise :class:`ToolError` for a call that cannot succeed (bad
arguments, a rejected expression) and :class:`RetryableToolError` for a
transient failure worth retrying; the tools step turns either, and anything
else a tool raises, into a failed ``tool.result``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sluicegate.streams.errors import SluiceError

JSON = dict[str, Any]


class ToolError(SluiceError):
    """The call failed and retrying will not help."""


class RetryableToolError(ToolError):
    retriable = True

    """The call failed for a reason that may pass (a busy backend, a dropped connection)."""


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool may know about the call besides its arguments."""

    # The task's submission time (or the action event's time): tools use it
    # instead of the wall clock, so a replay gives the same result.
    now: datetime
    tenant: str
    session: str
    task_id: str
    agent: str


Tool = Callable[[Mapping[str, Any], ToolContext], Awaitable[JSON]]


def string_arg(args: Mapping[str, Any], name: str, *, max_chars: int, required: bool = True) -> str:
    """``args[name]`` as a non-empty string of at most ``max_chars``, or ToolError."""
    value = args.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ToolError(f"argument {name!r} must be a non-empty string")
    if len(value) > max_chars:
        raise ToolError(f"argument {name!r} is longer than {max_chars} characters")
    return value
