"""In-memory transport, for unit tests of step logic only.

It keeps the semantics the runner relies on: partitions by the shared
partitioner, per-partition offsets from 0, committed positions per group,
redelivery of uncommitted messages to a new subscription of the same group.
It has no rebalancing: a group subscription owns all partitions it asks for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence

from sluicegate.streams.partitioning import partition_for
from sluicegate.streams.transport import (
    Message,
    OutMessage,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
)


class MemoryTransport:
    name = "memory"

    def __init__(self, *, prefix: str = "sluice", partitions: int = 4) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self._logs: dict[TopicPartition, list[Message]] = {}
        self._committed: dict[tuple[str, TopicPartition], int] = {}
        self._changed = asyncio.Event()
        # Incarnation of each topic: a deleted and recreated topic is a new log.
        self._incarnations: dict[str, int] = {}
        self._created = 0

    async def connect(self) -> None:
        return None

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        for topic in topics:
            if topic not in self._incarnations:
                self._created += 1
                self._incarnations[topic] = self._created
            for p in range(self.partitions):
                self._logs.setdefault(TopicPartition(topic, p), [])

    async def delete_topics(self, topics: Iterable[str]) -> None:
        doomed = set(topics)
        for tp in [tp for tp in self._logs if tp.topic in doomed]:
            del self._logs[tp]
        for topic in doomed:
            self._incarnations.pop(topic, None)

    async def log_ids(self, topics: Sequence[str]) -> dict[str, str]:
        return {
            t: f"memory:{self.prefix}.{t}@{self._incarnations[t]}"
            for t in topics
            if t in self._incarnations
        }

    async def log_ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self._logs[tp]) - 1 for tp in tps if tp in self._logs}

    def _append(self, out: OutMessage) -> None:
        p = out.partition if out.partition is not None else partition_for(out.key, self.partitions)
        tp = TopicPartition(out.topic, p)
        log = self._logs.get(tp)
        if log is None:
            raise TransportError(f"topic {out.topic!r} partition {p} does not exist")
        log.append(
            Message(
                topic=out.topic,
                partition=p,
                offset=len(log),
                key=out.key,
                value=out.value,
                headers=dict(out.headers or {}),
                timestamp_ms=time.time_ns() // 1_000_000,
            )
        )

    async def publish(self, message: OutMessage) -> None:
        self._append(message)
        self._changed.set()

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        for m in messages:
            self._append(m)
        self._changed.set()

    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        partitions: Sequence[int] | None = None,
        start: StartFrom = "earliest",
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> MemorySubscription:
        owned = list(partitions) if partitions is not None else list(range(self.partitions))
        tps = [TopicPartition(t, p) for t in topics for p in owned]
        for tp in tps:
            if tp not in self._logs:
                raise TransportError(f"topic {tp.topic!r} partition {tp.partition} does not exist")
        sub = MemorySubscription(self, group, tps, start)
        if on_assign is not None:
            await on_assign(frozenset(tps))
        return sub

    async def close(self) -> None:
        return None


class MemorySubscription:
    def __init__(
        self, transport: MemoryTransport, group: str | None, tps: list[TopicPartition], start: str
    ) -> None:
        self._t = transport
        self._group = group
        self._tps = tps
        self._pos: dict[TopicPartition, int] = {}
        for tp in tps:
            committed = transport._committed.get((group, tp)) if group else None
            if committed is not None:
                self._pos[tp] = committed
            else:
                self._pos[tp] = 0 if start == "earliest" else len(transport._logs[tp])

    def _take(self, max_messages: int) -> list[Message]:
        batch: list[Message] = []
        for tp in self._tps:
            log = self._t._logs[tp]
            pos = self._pos[tp]
            room = max_messages - len(batch)
            if room <= 0:
                break
            chunk = log[pos : pos + room]
            self._pos[tp] = pos + len(chunk)
            batch.extend(chunk)
        return batch

    async def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        batch = self._take(max_messages)
        if batch or timeout <= 0:
            return batch
        self._t._changed.clear()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
            # a cancellation that lands as the wait ends, and the cancelled
            # runner would go on running.
            async with asyncio.timeout(timeout):
                await self._t._changed.wait()
        except TimeoutError:
            return []
        return self._take(max_messages)

    async def commit(self, messages: Sequence[Message]) -> None:
        if self._group is None:
            return
        for m in messages:
            key = (self._group, m.tp)
            self._t._committed[key] = max(self._t._committed.get(key, 0), m.offset + 1)

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp not in self._pos:
            raise TransportError(f"{tp} is not assigned to this subscription")
        self._pos[tp] = offset

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._tps)

    async def close(self) -> None:
        return None
