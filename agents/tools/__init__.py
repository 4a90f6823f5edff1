"""Built-in tools of the reference pipeline: calculator, search, clock, echo, refund.

All are deterministic and need no network. ``builtin_tools()`` maps tool
names to their callables; the tools step takes that mapping (or any other),
so an application can add its own.
"""

from __future__ import annotations

from sluicegate.agents.tools import calculator, clock, echo, refund, search
from sluicegate.agents.tools.base import JSON, RetryableToolError, Tool, ToolContext, ToolError


def builtin_tools() -> dict[str, Tool]:
    """Tool name -> callable; each module's ``run`` is the tool it is named after."""
    return {
        "calculator": calculator.run,
        "search": search.run,
        "clock": clock.run,
        "echo": echo.run,
        "refund": refund.run,
    }


__all__ = [
    "JSON",
    "RetryableToolError",
    "Tool",
    "ToolContext",
    "ToolError",
    "builtin_tools",
    "calculator",
    "clock",
    "echo",
    "refund",
    "search",
]
