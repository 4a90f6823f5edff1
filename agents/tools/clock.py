"""The ``clock`` tool: the task's time, never the wall clock.

It reports the time carried by the call's context (when the task was
submitted), so the same task gives the same answer on every replay. All
times are UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

from sluicegate.agents.tools.base import JSON, ToolContext


async def run(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
    now = ctx.now.astimezone(UTC)
    return {
        "now": now.isoformat(),
        "date": now.date().isoformat(),
        "time": now.strftime("%H:%M:%S"),
        "weekday": now.strftime("%A"),
        "timezone": "UTC",
        "summary": f"It is {now.strftime('%H:%M:%S')} UTC on {now.strftime('%A, %Y-%m-%d')}.",
    }
