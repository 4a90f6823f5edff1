"""Many requests' events published together, with a bound that turns into 429.

Each request's handler checks and encodes its events, then awaits
:meth:`Submitter.submit`, which returns once the broker has acknowledged them
(so a 202 means the task is on the topic). Requests that arrive while a
batch is in flight are sent together in the next one: under load one publish
carries many requests, as ``sluice publish`` batches lines.

Backpressure is explicit. When more than ``max_pending`` events are waiting
for the broker, or the oldest batch in flight has waited longer than
``stall_s`` (the broker is away and the publisher is retrying), a new
submission is refused at once with :class:`BackedUp`, which the gateway
answers with 429 and ``Retry-After``: the client retries later instead of
every request piling up in memory.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress

from sluicegate.streams.errors import SluiceError
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import OutMessage

# Batches in flight at once: enough to keep a pipelined broker busy while the
# next batch gathers; events of one request always travel in one batch.
DEFAULT_FLUSHERS = 4


class BackedUp(SluiceError):
    """Publishing is backed up; ``retry_after`` is a hint in whole seconds."""

    retriable = True

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Submitter:
    def __init__(
        self,
        publisher: Publisher,
        *,
        max_pending: int,
        stall_s: float = 2.0,
        flushers: int = DEFAULT_FLUSHERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.publisher = publisher
        self.max_pending = max_pending
        self.stall_s = stall_s
        self._clock = clock
        self._queue: deque[tuple[Sequence[OutMessage], asyncio.Future[None]]] = deque()
        self._pending = 0  # events queued or in flight
        self._inflight: dict[int, float] = {}  # batch number -> when it was sent
        self._batches = 0
        self._slots = asyncio.Semaphore(flushers)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sluice-gateway-submitter")

    async def close(self) -> None:
        """Stop; submissions still waiting fail (the server is shutting down)."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._flushes):
            task.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)
        for _, future in self._queue:
            if not future.done():
                future.set_exception(BackedUp("the gateway is shutting down", 1))
        self._queue.clear()

    def check(self, count: int) -> None:
        """Raise ``BackedUp`` if ``count`` more events should not be taken now."""
        if self._inflight:
            waited = self._clock() - min(self._inflight.values())
            if waited > self.stall_s:
                raise BackedUp(
                    f"the broker has not acknowledged a publish for {waited:.0f}s "
                    "(away or restarting?)",
                    max(1, math.ceil(self.stall_s)),
                )
        if self._pending + count > self.max_pending:
            raise BackedUp(
                f"{self._pending} events are waiting for the broker "
                f"(at most {self.max_pending}: SLUICE_GATEWAY_MAX_PENDING)",
                1,
            )

    async def submit(self, messages: Sequence[OutMessage]) -> None:
        """Publish ``messages``; returns when the broker has them all."""
        self.check(len(messages))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((messages, future))
        self._pending += len(messages)
        self._wake.set()
        try:
            await asyncio.shield(future)
        finally:
            if not future.done():  # the client went away; its events still go out
                future.add_done_callback(_consume)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._slots.acquire()
                taken = self._take()
                task = asyncio.create_task(self._flush(taken))
                self._flushes.add(task)
                task.add_done_callback(self._flushes.discard)

    def _take(self) -> list[tuple[Sequence[OutMessage], asyncio.Future[None]]]:
        """Whole requests from the head of the queue, up to one publisher batch."""
        limit = self.publisher.batch_size
        taken: list[tuple[Sequence[OutMessage], asyncio.Future[None]]] = []
        count = 0
        while self._queue and (not taken or count + len(self._queue[0][0]) <= limit):
            item = self._queue.popleft()
            taken.append(item)
            count += len(item[0])
        return taken

    async def _flush(self, taken: list[tuple[Sequence[OutMessage], asyncio.Future[None]]]) -> None:
        self._batches += 1
        number = self._batches
        self._inflight[number] = self._clock()
        messages = [message for request, _ in taken for message in request]
        error: BaseException | None = None
        try:
            await self.publisher.publish_encoded(messages)
        except asyncio.CancelledError:  # close(): the requests must still be answered
            error = BackedUp("the gateway is shutting down", 1)
            raise
        except Exception as exc:  # the futures carry it to each request
            error = exc
        finally:
            del self._inflight[number]
            self._pending -= len(messages)
            self._slots.release()
            self._settle(taken, error)

    @staticmethod
    def _settle(
        taken: list[tuple[Sequence[OutMessage], asyncio.Future[None]]], error: BaseException | None
    ) -> None:
        for _, future in taken:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def _consume(future: asyncio.Future[None]) -> None:
    # Nobody awaits a departed client's future: read its outcome so asyncio
    # does not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()
