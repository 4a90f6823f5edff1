"""``SluiceError``: the one root of sluicegate's own errors, and whether retrying can help.

Every error class of ours derives from it (beside the builtin it refines, such
as ``ValueError`` for bad input), so a caller can catch sluicegate's failures
in one clause and tell the two kinds apart by ``retriable``:

- retriable: the same operation may succeed if tried again (a broker or the
  database unreachable, a lost race for a partition, a rate-limited model);
- not retriable: it never will (an undecodable input, a bad setting, a
  policy bundle that does not compile, a step's explicit ``DeadLetter``).

The runner decides with it: a retriable failure of its loop is backed off and
retried; a step that raises a non-retriable ``SluiceError`` has its input
dead-lettered at once, without the attempts a possibly transient error gets.
Each class sets the default for its kind; an instance may say otherwise
(``TransportError("...", retriable=False)`` for a refused configuration).
"""

from __future__ import annotations

from typing import Any


class SluiceError(Exception):
    """The root of sluicegate's errors; ``retriable`` says whether trying again can help."""

    retriable: bool = False

    def __init__(self, *args: Any, retriable: bool | None = None) -> None:
        super().__init__(*args)
        if retriable is not None:
            self.retriable = retriable


def is_retriable(exc: BaseException) -> bool:
    """Whether ``exc`` is one of ours that says trying again can help."""
    return isinstance(exc, SluiceError) and exc.retriable
