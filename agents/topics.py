"""Logical topic names of the reference agent pipeline.

The transports map each logical name onto their own objects under the
settings prefix; steps only ever name topics through these constants.
"""

from __future__ import annotations

from typing import Final

TASKS: Final = "tasks"
TASKS_ACCEPTED: Final = "tasks.accepted"
CONTEXT: Final = "context"
ACTIONS_PROPOSED: Final = "actions.proposed"
ACTIONS_ALLOWED: Final = "actions.allowed"
ACTIONS_DENIED: Final = "actions.denied"
# Held by the policy gate for a person to approve; the responder waits for them.
ACTIONS_HELD: Final = "actions.held"
TOOL_RESULTS: Final = "tool.results"
RESULTS: Final = "results"
DLQ: Final = "dlq"

# In pipeline order, so topic creation and listings read naturally.
ALL: Final[tuple[str, ...]] = (
    TASKS,
    TASKS_ACCEPTED,
    CONTEXT,
    ACTIONS_PROPOSED,
    ACTIONS_ALLOWED,
    ACTIONS_DENIED,
    ACTIONS_HELD,
    TOOL_RESULTS,
    RESULTS,
    DLQ,
)
