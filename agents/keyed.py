"""Small helpers for keyed state and validated input data, shared by the reference steps.

Keyed state is a plain dict of JSON values that the runner stores as
canonical JSON with sorted keys, so anything whose order matters (recency)
is kept as a list, and every collection is bounded.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, TypeVar

from pydantic import BaseModel

from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output

M = TypeVar("M", bound=BaseModel)


def remember(state: MutableMapping[str, Any], key: str, value: str, limit: int) -> bool:
    """Add ``value`` to the bounded recency list ``state[key]``; True if it was already there.

    The oldest entries fall off once the list holds ``limit`` values. A list
    (not a dict) because the stored JSON has sorted keys, which would lose
    the insertion order we evict by.
    """
    seen = state.get(key)
    if not isinstance(seen, list):
        seen = []
    if value in seen:
        return True
    seen.append(value)
    del seen[: max(0, len(seen) - limit)]
    state[key] = seen
    return False


def data_as(ctx: Context, event: Event, model: type[M]) -> M:
    """The input's data as ``model``: the runner's validated copy, else validated here.

    The runner hands over ``ctx.data`` already validated; validating again
    when it is absent keeps steps safe under a driver that does not.
    """
    if isinstance(ctx.data, model):
        return ctx.data
    return model.model_validate(event.data)


def duplicate(ctx: Context) -> list[Output]:
    """Drop a duplicate input: no outputs, and its ``processed`` audit row says why."""
    ctx.detail["duplicate"] = True
    return []
