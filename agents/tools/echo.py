"""The ``echo`` tool: hands its text back (and, when given, who it was addressed to).

It stands in for "say something to someone": the default for prompts no
other tool fits, and what a failed plan reports through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sluicegate.agents.tools.base import JSON, ToolContext, string_arg

MAX_TEXT_CHARS = 8000


async def run(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
    text = string_arg(args, "text", max_chars=MAX_TEXT_CHARS)
    out: JSON = {"text": text, "summary": text}
    to = string_arg(args, "to", max_chars=320, required=False)
    if to:
        out["to"] = to
        out["summary"] = f"to {to}: {text}"
    return out
