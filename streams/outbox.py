"""Outputs on their way to the broker while the events that made them are still being checkpointed.

A runner used to produce all of a checkpoint's outputs at its start and wait
for their acks, then commit Postgres: the checkpoint held the publishing of
thousands of outputs (80-250 ms per checkpoint in issue 20's measurements),
and the step did nothing else meanwhile, since the inputs behind those
outputs still took up its in-flight room. The :class:`Outbox` sends each
event's outputs as soon as the event completes, by one task, in completion
order (so the outputs of one key keep their order), and the checkpoint only
waits for what it needs to be acked (:meth:`flush`) before committing
Postgres. The commit protocol is unchanged: no checkpoint lands before the
acks of its outputs; an output sent ahead of a checkpoint that then fails is
sent again, with the same id, when its input is processed again, and the
next step absorbs the copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class Outbox(Generic[T]):
    """Sends queued items in order, what gathered meanwhile in one call of ``deliver``.

    The runner keeps two: its outputs (``deliver`` is the transport's
    ``publish_batch``) and its broker acks (the subscription's ``commit``).
    """

    __slots__ = (
        "_deliver",
        "_error",
        "_progress",
        "_queue",
        "_queued",
        "_sender",
        "_sent",
        "name",
    )

    def __init__(self, deliver: Callable[[list[T]], Awaitable[None]], name: str) -> None:
        self._deliver = deliver
        self.name = name
        self._queue: list[T] = []
        self._sender: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        # Messages queued and acked since the start: a flush waits for the
        # count queued when it began, not for an empty queue, which under
        # steady load might never come.
        self._queued = 0
        self._sent = 0
        self._progress = asyncio.Event()

    def send(self, messages: Sequence[T]) -> None:
        """Queue ``messages`` behind those queued before; sending starts at once."""
        if not messages:
            return
        self._queue.extend(messages)
        self._queued += len(messages)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name=self.name)

    async def _send(self) -> None:
        try:
            while self._queue and self._error is None:
                messages, self._queue = self._queue, []
                await self._deliver(messages)
                self._sent += len(messages)
                self._progress.set()
        except Exception as exc:
            # Kept for the checkpoint, which fails with it (and the runner
            # resets, dropping the work these outputs belong to).
            self._error = exc
            self._queue.clear()
            self._progress.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is acked; raise what sending failed with."""
        target = self._queued
        while self._sent < target and self._error is None:
            self._progress.clear()
            await self._progress.wait()
        if self._error is not None:
            error, self._error = self._error, None
            self._sent = self._queued  # (what failed is done again after the reset)
            raise error

    async def discard(self) -> None:
        """Drop what is queued and stop sending (a reset: that work is done again)."""
        self._queue.clear()
        sender, self._sender = self._sender, None
        if sender is not None and not sender.done():
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        self._error = None
        self._sent = self._queued
        self._progress.set()
