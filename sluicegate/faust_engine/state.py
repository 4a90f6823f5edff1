"""Keyed state in a Faust Table, kept equal to Postgres's ``step_state``.

Each step has a Faust Table keyed by ``(tenant, session)`` whose value is the
session's state as the runner commits it (canonical JSON bytes). The table
is changelog-backed: every change goes to ``<app id>-<step>-state-changelog``,
in the partition of the session's events, so Faust's recovery restores a
partition's sessions on the worker that owns that partition.

Postgres stays the source of truth, and the table follows it:

- ``MirroredStore.commit`` writes a batch's states to the table only after
  the Postgres transaction committed, so the table never holds state that
  Postgres lost; a worker killed between the two leaves the changelog behind;
- ``MirroredStore.load_states`` (on assignment, after Faust's recovery)
  compares the recovered table with Postgres and rewrites what differs, so
  the table and its changelog converge again (``SessionTable.stats.repaired``).

The runner reads state from its own memory, loaded from Postgres, as on the
native engine; the table is how Faust users see and query that state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sluicegate.streams.approvals import ApprovalDesk, ApprovalOutcome
from sluicegate.streams.checkpoint import CheckpointStore, CommitBatch, Progress
from sluicegate.streams.partitioning import partition_for
from sluicegate.streams.step import StateKey
from sluicegate.streams.transport import TopicPartition

TableKey = tuple[str, str]


@dataclass(slots=True)
class TableStats:
    written: int = 0
    # Sessions whose recovered value differed from Postgres (or was missing).
    repaired: int = 0
    # Sessions the changelog held but Postgres did not: deleted (tombstoned).
    removed: int = 0


class SessionTable:
    """One step's Faust Table of session states, written outside stream iteration.

    Faust's ``table[key] = value`` takes the changelog partition from the
    event being processed, and queues the changelog record in a buffer that
    Faust drains between events (warning above 100 records). The runner
    commits a batch of many sessions and partitions at once, so writes go to
    the table's store and straight to its changelog topic, with the
    session's partition (``partition_for(session)``).
    """

    def __init__(self, table: Any, partitions: int) -> None:
        self.table = table
        self.partitions = partitions
        self.stats = TableStats()

    def get(self, key: StateKey) -> bytes | None:
        value = self.table.data.get(_table_key(key))
        return value if isinstance(value, bytes) else None

    async def write(self, partition: int, key: StateKey, blob: bytes) -> bool:
        """Store ``blob`` for ``key`` and send it to the changelog, unless it is already there."""
        store, tk = self.table.data, _table_key(key)
        if store.get(tk) == blob:
            return False
        store[tk] = blob
        await self._send(partition, tk, blob)
        self.stats.written += 1
        return True

    async def reconcile(self, partitions: Iterable[int], truth: Mapping[StateKey, bytes]) -> None:
        """Make the table's sessions of ``partitions`` equal to ``truth`` (Postgres's)."""
        wanted = set(partitions)
        for key, blob in truth.items():
            if await self.write(self._partition(key), key, blob):
                self.stats.repaired += 1
        store = self.table.data
        for tk in [tk for tk in store if self._partition_of(tk) in wanted]:
            if StateKey(*tk) not in truth:
                del store[tk]
                await self._send(self._partition_of(tk), tk, None)  # a tombstone
                self.stats.removed += 1

    def forget(self, partitions: Iterable[int]) -> None:
        """Drop this worker's copy of ``partitions`` (revoked); the changelog keeps them."""
        gone = set(partitions)
        store = self.table.data
        for tk in [tk for tk in store if self._partition_of(tk) in gone]:
            del store[tk]

    async def _send(self, partition: int, tk: TableKey, value: bytes | None) -> None:
        # Queued on the producer, not awaited to the broker's ack: Postgres
        # holds the truth, and the next assignment repairs a lost record.
        # force: never attach to an event being processed (Faust's attachments).
        await self.table.changelog_topic.send(
            key=tk,
            value=value,
            partition=partition,
            key_serializer=self.table.key_serializer,
            value_serializer=self.table.value_serializer,
            force=True,
        )

    def _partition(self, key: StateKey) -> int:
        return partition_for(key.session.encode(), self.partitions)

    def _partition_of(self, tk: Any) -> int:
        # Keys recovered from the changelog come back as tuples (JSON lists).
        return partition_for(str(tk[1]).encode(), self.partitions)


def _table_key(key: StateKey) -> TableKey:
    return (key.tenant, key.session)


class MirroredStore:
    """A ``CheckpointStore`` that keeps a ``SessionTable`` equal to what it commits."""

    def __init__(self, inner: CheckpointStore, table: SessionTable) -> None:
        self.inner = inner
        self.table = table

    async def load_offsets(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return await self.inner.load_offsets(step, tps)

    async def claim(
        self,
        step: str,
        tps: Iterable[TopicPartition],
        owner: str,
        *,
        legacy: Mapping[TopicPartition, TopicPartition] | None = None,
    ) -> dict[TopicPartition, Progress]:
        return await self.inner.claim(step, tps, owner, legacy=legacy)

    async def load_progress(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, Progress]:
        return await self.inner.load_progress(step, tps)

    async def load_states(self, step: str, partitions: Iterable[int]) -> dict[StateKey, bytes]:
        wanted = list(partitions)
        states = await self.inner.load_states(step, wanted)
        await self.table.reconcile(wanted, states)
        return states

    async def load_recent_ids(self, step: str, partition: int, limit: int) -> set[str]:
        return await self.inner.load_recent_ids(step, partition, limit)

    async def load_dead_lettered_ids(self, step: str, partition: int, limit: int) -> set[str]:
        return await self.inner.load_dead_lettered_ids(step, partition, limit)

    async def settle_approvals(
        self, step: str, ids: Sequence[str], now: datetime
    ) -> list[ApprovalOutcome]:
        # Held actions live in Postgres only; the gate's tick reads them through here.
        if not isinstance(self.inner, ApprovalDesk):
            return []
        return await self.inner.settle_approvals(step, ids, now)

    async def commit(self, batch: CommitBatch) -> None:
        await self.inner.commit(batch)
        # After the transaction only: the table must never be ahead of Postgres.
        for (partition, key), blob in batch.states.items():
            await self.table.write(partition, key, blob)

    async def close(self) -> None:
        await self.inner.close()
