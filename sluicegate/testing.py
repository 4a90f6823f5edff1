"""Test a pipeline without brokers: the real step runner and commit protocol, in memory.

::

    from sluicegate.testing import MemoryPipeline, make_event

    async def test_shout() -> None:
        async with MemoryPipeline(pipeline) as run:
            await run.publish("tasks", [make_event("task.submitted", {"prompt": "hi"})])
            await run.run()
            [out] = await run.events("shouted")
            assert out.data == {"text": "HI"}
            assert run.state("shout") == {"n": 1}

:class:`MemoryPipeline` runs one real :class:`~sluicegate.streams.runner.StepRunner`
per step over an in-memory transport and checkpoint store, so what a test sees
is what a worker does: validation against the step's model, dead letters
(``dead_letters()``), retries, dedupe by event id, keyed state (``state()``),
audit rows (``audit``) and results (``results``) written with the offsets,
``restart()`` as a worker restart, ``tick(now)`` with a clock the test moves.
:class:`StubChat` replaces the model client (``sluicegate.ChatClient``).
"""

from __future__ import annotations

from sluicegate.agents.testing import (
    DeadLetterMessage,
    MemoryPipeline,
    StubChat,
    context_for,
    make_event,
)

__all__ = ["DeadLetterMessage", "MemoryPipeline", "StubChat", "context_for", "make_event"]
