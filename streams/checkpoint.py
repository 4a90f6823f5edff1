"""The checkpoint store protocol: where the runner keeps progress, state and audit rows.

Postgres implements it in ``sinks``; ``MemoryCheckpointStore`` here serves unit
tests of step logic. One ``commit`` is one transaction: the batch's audit
rows, changed keyed state, final results and the last processed offset of
each input partition land together or not at all.

Fencing: ``commit`` refuses (``StaleBatchError``) a batch whose offsets are
not beyond what is stored, which is what a zombie worker that lost its
partitions would try; the runner then reloads from the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from streams.step import AuditRecord, ResultRecord, StateKey
from streams.transport import TopicPartition

# Audit kinds written once per input event (the runner's dedupe record).
INPUT_KINDS = ("processed", "dead_letter")


class StaleBatchError(RuntimeError):
    """Another worker already committed past this batch's offsets."""


@dataclass(slots=True)
class CommitBatch:
    step: str
    # Input partition -> (first, last) offset processed in this batch.
    offsets: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)
    # (partition, key) -> the session's new state, as canonical JSON bytes.
    states: dict[tuple[int, StateKey], bytes] = field(default_factory=dict)
    # (partition, record): audit rows chain per (step, partition).
    audit: list[tuple[int, AuditRecord]] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.offsets or self.states or self.audit or self.results)


@runtime_checkable
class CheckpointStore(Protocol):
    async def load_offsets(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Last processed offset per partition; partitions never processed are absent."""
        ...

    async def load_states(self, step: str, partitions: Iterable[int]) -> dict[StateKey, bytes]:
        """Every stored session state of ``step`` in ``partitions``."""
        ...

    async def load_recent_ids(self, step: str, partition: int, limit: int) -> set[str]:
        """Ids of the last ``limit`` input events ``step`` processed in ``partition``.

        Read from the audit log, which has one row per processed input and is
        written in the same transaction as the offsets: it is the record the
        runner dedupes re-produced events against after a restart.
        """
        ...

    async def commit(self, batch: CommitBatch) -> None:
        """Write the batch in one transaction, or raise ``StaleBatchError``."""
        ...

    async def close(self) -> None: ...


class MemoryCheckpointStore:
    """In-process store with the same semantics, for unit tests."""

    def __init__(self) -> None:
        self.offsets: dict[tuple[str, TopicPartition], int] = {}
        self.states: dict[tuple[str, StateKey], tuple[int, bytes]] = {}
        self.audit: list[tuple[int, AuditRecord]] = []
        self.results: dict[str, ResultRecord] = {}
        self.commits = 0

    async def load_offsets(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return {tp: self.offsets[(step, tp)] for tp in tps if (step, tp) in self.offsets}

    async def load_states(self, step: str, partitions: Iterable[int]) -> dict[StateKey, bytes]:
        wanted = set(partitions)
        return {
            key: blob for (s, key), (p, blob) in self.states.items() if s == step and p in wanted
        }

    async def load_recent_ids(self, step: str, partition: int, limit: int) -> set[str]:
        ids = [
            r.event_id
            for p, r in self.audit
            if p == partition and r.step == step and r.kind in INPUT_KINDS
        ]
        return set(ids[-limit:]) if limit > 0 else set()

    async def commit(self, batch: CommitBatch) -> None:
        for tp, (first, _last) in batch.offsets.items():
            stored = self.offsets.get((batch.step, tp))
            if stored is not None and stored >= first:
                raise StaleBatchError(f"{batch.step} {tp}: stored {stored} >= batch start {first}")
        for tp, (_first, last) in batch.offsets.items():
            self.offsets[(batch.step, tp)] = last
        for (partition, key), blob in batch.states.items():
            self.states[(batch.step, key)] = (partition, blob)
        self.audit.extend(batch.audit)
        for result in batch.results:
            self.results.setdefault(result.task_id, result)
        self.commits += 1

    async def close(self) -> None:
        return None
