"""A NATS subscription: :class:`NatsSubscription`.

It owns what the runner sees of consuming: batches fetched round-robin
from the owned partitions' readers (see reader.py), with the next batch
prefetched, commits as an AckAll of the last message per partition, seek
and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from streams.transport import Message, PartitionsCallback, TopicPartition, TransportError
from streams.transports.nats.names import NatsTuning
from streams.transports.nats.reader import _PartitionReader

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("streams.transports.nats")


class NatsSubscription:
    """Batches from the owned partitions, each pulled through its own consumer."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        tuning: NatsTuning,
        group: str | None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.tuning = tuning
        self.group = group
        self.on_revoke: PartitionsCallback | None = None
        self._readers: dict[TopicPartition, _PartitionReader] = {}
        self._order: list[_PartitionReader] = []
        self._next = 0  # round-robin start, so no partition starves
        self._closed = False
        # Set by readers whenever a message or the end of a pull request arrives.
        self.wake = asyncio.Event()

    def add(self, reader: _PartitionReader) -> None:
        self._readers[reader.tp] = reader
        self._order.append(reader)

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._readers)

    # -- fetch --------------------------------------------------------------

    def _buffered(self) -> int:
        return sum(len(r.buffer) for r in self._order)

    def _more_coming(self) -> bool:
        return any(r.more_coming() for r in self._order)

    async def _pull(self, max_messages: int) -> None:
        """Give every partition without a live pull request one, sized to what fetch lacks."""
        now = asyncio.get_running_loop().time()
        for reader in self._order:
            room = max_messages - len(reader.buffer)
            if room > 0 and not reader.pulling(now):
                await reader.pull(room, now)

    def _take(self, max_messages: int) -> list[Message]:
        batch: list[Message] = []
        n = len(self._order)
        for i in range(n):
            buffer = self._order[(self._next + i) % n].buffer
            while buffer and len(batch) < max_messages:
                batch.append(buffer.popleft())
        self._next = (self._next + 1) % max(n, 1)
        return batch

    async def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        if self._closed:
            raise TransportError("fetch on a closed NATS subscription")
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fill_deadline: float | None = None
        try:
            await self._pull(max_messages)
            while True:
                buffered = self._buffered()
                if buffered >= max_messages or (buffered and not self._more_coming()):
                    break
                now = loop.time()
                if buffered and fill_deadline is None:
                    fill_deadline = min(deadline, now + self.tuning.fill_wait)
                wait = (fill_deadline or deadline) - now
                if wait <= 0:
                    break
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
                # Requests that ended empty-handed (timeout, no messages) are renewed.
                await self._pull(max_messages)
        except NatsError as exc:
            raise TransportError(f"fetch from {sorted(self._readers)} failed: {exc!r}") from exc
        batch = self._take(max_messages)
        try:
            # Prefetch: the next batch streams in while the caller works on this one.
            await self._pull(max_messages)
        except NatsError:
            # The batch is already taken; the next fetch reports the failure.
            log.debug("prefetch on %s failed", sorted(self._readers), exc_info=True)
        return batch

    # -- commit, seek, close -----------------------------------------------

    async def commit(self, messages: Sequence[Message]) -> None:
        if self.group is None or not messages:
            return
        last: dict[tuple[str, int], Message] = {}
        for m in messages:
            key = (m.topic, m.partition)  # not m.tp: that builds an object per message
            seen = last.get(key)
            if seen is None or m.offset > seen.offset:
                last[key] = m
        await asyncio.gather(*(self._ack(m) for m in last.values()))

    async def _ack(self, message: Message) -> None:
        reader = self._readers.get(message.tp)
        handle = message.handle
        if reader is None or not isinstance(handle, tuple):
            raise TransportError(f"{message.tp} offset {message.offset} was not fetched here")
        generation, reply = handle
        if generation != reader.generation:
            return  # fetched before a seek; that consumer no longer exists
        try:
            # AckAll on the last message; a request, so the server has applied
            # it before we return and a resubscription sees the new ack floor.
            await self.nc.request(reply, b"+ACK", timeout=self.tuning.api_timeout)
        except (NatsError, TimeoutError) as exc:
            raise TransportError(
                f"commit of {message.tp} at offset {message.offset} failed: {exc!r}"
            ) from exc

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        reader = self._readers.get(tp)
        if reader is None:
            raise TransportError(f"{tp} is not assigned to this subscription")
        await reader.restart_at(max(1, offset))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(r.close() for r in self._order), return_exceptions=True)
        if self.on_revoke is not None:
            await self.on_revoke(self.assignment())
