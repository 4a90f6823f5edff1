"""A NATS subscription: :class:`NatsSubscription`.

It owns what the runner sees of consuming: batches fetched round-robin
from the owned partitions' readers (see reader.py), with the next batch
prefetched, commits as an AckAll of the last message per partition, seek
and close; and the assignment, which changes while fetching goes on when
a group's partitions are shared through leases (ownership.py):

- ``assign`` opens the partitions' readers (seek and commit work on them
  from then on), awaits ``on_assign``, and only then lets fetch read them;
- ``revoke`` takes the partitions out of the fetch rotation first (dropping
  what they buffered and filtering them out of a fetch in progress), then
  awaits ``on_revoke`` (commits still work), then closes their readers. So
  no fetch returns a message of a partition after its ``on_revoke`` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from sluicegate.streams.transport import (
    Message,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
)
from sluicegate.streams.transports.nats.names import NatsTuning
from sluicegate.streams.transports.nats.reader import _PartitionReader

if TYPE_CHECKING:  # only for annotations: ownership.py imports this module's users
    from sluicegate.streams.transports.nats.ownership import Ownership

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("sluicegate.streams.transports.nats")

ReaderFactory = Callable[["NatsSubscription", TopicPartition], _PartitionReader]


class NatsSubscription:
    """Batches from the owned partitions, each pulled through its own consumer."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        tuning: NatsTuning,
        group: str | None,
        *,
        topics: Sequence[str] = (),
        start: StartFrom = "earliest",
        new_reader: ReaderFactory | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.tuning = tuning
        self.group = group
        self.topics = list(topics)
        self.start: StartFrom = start
        self._new_reader = new_reader
        self.on_assign: PartitionsCallback | None = None
        self.on_revoke: PartitionsCallback | None = None
        # Set when the group's partitions are shared or claimed through leases.
        self.ownership: Ownership | None = None
        # Registered readers (commit and seek find them here) ...
        self._readers: dict[TopicPartition, _PartitionReader] = {}
        # ... and those fetch reads from: registered and past on_assign.
        self._order: list[_PartitionReader] = []
        self._next = 0  # round-robin start, so no partition starves
        # Bumped whenever a partition leaves the rotation: a fetch in progress
        # then filters its batch.
        self._revocations = 0
        self._released: set[TopicPartition] = set()
        self._closed = False
        # Set by readers whenever a message or the end of a pull request arrives.
        self.wake = asyncio.Event()

    @property
    def worker_id(self) -> str | None:
        """This worker's id in the ownership bucket (None for observers)."""
        return self.ownership.worker if self.ownership is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    def add(self, reader: _PartitionReader) -> None:
        """Register an opened reader and let fetch read it."""
        self._readers[reader.tp] = reader
        self._order.append(reader)
        self._released.discard(reader.tp)
        self.wake.set()

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._readers)

    def assigned_partitions(self) -> set[int]:
        return {tp.partition for tp in self._readers}

    # -- assignment changes ---------------------------------------------------

    async def assign(self, partitions: Iterable[int]) -> None:
        """Open readers for ``partitions`` of every topic, await ``on_assign``, then fetch them."""
        if self._new_reader is None:
            raise TransportError("this subscription cannot open partitions")
        tps = sorted(
            TopicPartition(t, p)
            for t in self.topics
            for p in partitions
            if TopicPartition(t, p) not in self._readers
        )
        if not tps:
            return
        readers = [self._new_reader(self, tp) for tp in tps]
        opened = (r.open(self.start) for r in readers)
        results = await asyncio.gather(*opened, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(r.close() for r in readers), return_exceptions=True)
            raise failed[0]
        for reader in readers:
            self._readers[reader.tp] = reader  # seek and commit work during on_assign
        try:
            if self.on_assign is not None:
                await self.on_assign(frozenset(tps))
        except BaseException:
            # Undone, and the runner told: it may have counted them as owned.
            await self._revoke(frozenset(tps))
            raise
        for reader in readers:
            self.add(reader)

    async def revoke(self, partitions: Iterable[int]) -> None:
        """Stop fetching ``partitions``, await ``on_revoke``, then close their readers."""
        wanted = set(partitions)
        await self._revoke(frozenset(tp for tp in self._readers if tp.partition in wanted))

    async def _revoke(self, tps: frozenset[TopicPartition]) -> None:
        if not tps:
            return
        self._order = [r for r in self._order if r.tp not in tps]
        self._revocations += 1
        for tp in tps:
            self._readers[tp].buffer.clear()  # unacked: the next owner reads them
        try:
            if self.on_revoke is not None:
                await self.on_revoke(tps)
        finally:
            readers = [self._readers.pop(tp) for tp in tps]
            self._released.update(tps)
            await asyncio.gather(*(r.close() for r in readers), return_exceptions=True)

    # -- fetch --------------------------------------------------------------

    def _buffered(self) -> int:
        return sum(len(r.buffer) for r in self._order)

    def _more_coming(self) -> bool:
        return any(r.more_coming() for r in self._order)

    async def _pull(self, max_messages: int) -> None:
        """Give every partition without a live pull request one, sized to what fetch lacks."""
        now = asyncio.get_running_loop().time()
        # A copy: a revoke may change the rotation while a pull is sent.
        for reader in list(self._order):
            room = max_messages - len(reader.buffer)
            if room > 0 and not reader.pulling(now) and reader.tp in self._readers:
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
        failure = self.ownership.failure() if self.ownership is not None else None
        if failure is not None:
            raise TransportError(f"partition ownership of {self.group!r} failed: {failure!r}")
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
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow
                # a cancel of the caller that meets the event being set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.wake.wait()
                # Requests that ended empty-handed (timeout, no messages) are renewed.
                await self._pull(max_messages)
        except NatsError as exc:
            raise TransportError(f"fetch from {sorted(self._readers)} failed: {exc!r}") from exc
        revocations = self._revocations
        batch = self._take(max_messages)
        try:
            # Prefetch: the next batch streams in while the caller works on this one.
            await self._pull(max_messages)
        except NatsError:
            # The batch is already taken; the next fetch reports the failure.
            log.debug("prefetch on %s failed", sorted(self._readers), exc_info=True)
        if revocations != self._revocations:
            # Partitions were revoked while prefetching: none of theirs may
            # reach the caller (no await between here and the return).
            live = {(r.tp.topic, r.tp.partition) for r in self._order}
            batch = [m for m in batch if (m.topic, m.partition) in live]
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
        if reader is None and message.tp in self._released:
            return  # revoked meanwhile: its next owner reads it again
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
        """Revoke everything (awaiting ``on_revoke``) and give up leases and heartbeat."""
        if self._closed:
            return
        self._closed = True
        if self.ownership is not None:
            await self.ownership.close()
        await self._revoke(self.assignment())

    async def abandon(self) -> None:
        """Stop heartbeats and lease refreshes without revoking or releasing anything.

        What a crashed worker leaves behind: its leases expire after the TTL
        and other workers take its partitions. For tests, and for a worker
        that must stop at once.
        """
        self._closed = True
        if self.ownership is not None:
            await self.ownership.abandon()
        self._order.clear()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(r.close() for r in self._readers.values()))
        self._readers.clear()
