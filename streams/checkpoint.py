r"""The checkpoint store protocol: where the runner keeps progress, state and audit rows.

Postgres implements it in ``sinks``; ``MemoryCheckpointStore`` here serves unit
tests of step logic. One ``commit`` is one transaction: the batch's audit
rows, changed keyed state, final results and the last processed offset of
each input partition land together or not at all.

Fencing by ownership epoch: a runner that takes a partition ``claim``\ s it,
which raises the partition's epoch in the store and records the owner. Each
batch carries the epochs it was made under, and ``commit`` refuses
(``StaleBatchError``) a batch whose epoch for any partition is no longer the
stored one: a worker that lost the partition (a Kafka rebalance, a NATS
lease that moved) can write nothing more there. The runner then reloads and
drops what it lost. Batches without epochs (tools, old callers) are fenced
by offsets as before: a batch whose offsets are not beyond what is stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from sluicegate.streams.approvals import (
    APPROVAL_TIMEOUT,
    TIMEOUT_APPROVER,
    ApprovalError,
    ApprovalOutcome,
    ApprovalRequest,
)
from sluicegate.streams.errors import SluiceError
from sluicegate.streams.step import AuditRecord, ResultRecord, StateKey
from sluicegate.streams.transport import TopicPartition

# Audit kinds written once per input event (the runner's dedupe record).
INPUT_KINDS = ("processed", "dead_letter")


class StaleBatchError(SluiceError, RuntimeError):
    """The batch's ownership epoch is not current (or another worker committed past it)."""

    retriable = True  # the runner reloads what the store holds and goes on


class StorePermanentError(SluiceError, RuntimeError):
    """The store refused an operation for a reason waiting will not fix.

    A column or table missing after schema drift, a refused permission, a
    database or schema that does not exist. Stores raise it (with a one-line
    message naming the problem) so that the runner reports it at once
    instead of riding it out like an outage.
    """


@dataclass(frozen=True, slots=True)
class Progress:
    """What the store holds for one (step, input partition)."""

    offset: int | None  # the last processed offset (the watermark); None: nothing yet
    epoch: int  # ownership epoch: raised by every claim
    owner: str | None  # who claimed it last


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
    # Input partition -> the ownership epoch this batch was made under.
    epochs: dict[TopicPartition, int] = field(default_factory=dict)
    # Actions held for a person to decide (``approvals``), inserted once.
    approvals: list[ApprovalRequest] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.offsets or self.states or self.audit or self.results or self.approvals)


@runtime_checkable
class CheckpointStore(Protocol):
    async def load_offsets(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Last processed offset per partition; partitions never processed are absent."""
        ...

    async def claim(
        self,
        step: str,
        tps: Iterable[TopicPartition],
        owner: str,
        *,
        legacy: Mapping[TopicPartition, TopicPartition] | None = None,
    ) -> dict[TopicPartition, Progress]:
        """Take ``tps`` for ``owner``: raise each one's epoch; returns the new progress of each.

        ``legacy`` maps a partition to where progress was kept before it was
        keyed by log identity (the plain topic name); such progress is adopted
        once, by the first claim of a partition that has none of its own.
        """
        ...

    async def load_progress(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, Progress]:
        """Offset, epoch and owner of each of ``tps`` the store knows (no claim)."""
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

    async def load_dead_lettered_ids(self, step: str, partition: int, limit: int) -> set[str]:
        """Those of ``load_recent_ids`` whose latest row is a dead letter.

        A replayed dead letter (``sluice dlq replay``) of one of these is
        processed; a replay of an id processed since is absorbed.
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
        self.epochs: dict[tuple[str, TopicPartition], tuple[int, str]] = {}
        self.states: dict[tuple[str, StateKey], tuple[int, bytes]] = {}
        self.audit: list[tuple[int, AuditRecord]] = []
        self.results: dict[str, ResultRecord] = {}
        self.approvals: dict[str, ApprovalRequest] = {}
        self.decisions: dict[str, ApprovalOutcome] = {}
        self.commits = 0

    async def load_offsets(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return {tp: self.offsets[(step, tp)] for tp in tps if (step, tp) in self.offsets}

    async def claim(
        self,
        step: str,
        tps: Iterable[TopicPartition],
        owner: str,
        *,
        legacy: Mapping[TopicPartition, TopicPartition] | None = None,
    ) -> dict[TopicPartition, Progress]:
        tps = list(tps)
        for tp, old in (legacy or {}).items():
            if (step, tp) not in self.offsets and (step, old) in self.offsets:
                self.offsets[(step, tp)] = self.offsets.pop((step, old))
                if (step, old) in self.epochs:
                    self.epochs[(step, tp)] = self.epochs.pop((step, old))
        for tp in tps:
            epoch, _ = self.epochs.get((step, tp), (0, ""))
            self.epochs[(step, tp)] = (epoch + 1, owner)
        return await self.load_progress(step, tps)

    async def load_progress(
        self, step: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, Progress]:
        progress = {}
        for tp in tps:
            epoch, owner = self.epochs.get((step, tp), (0, None))
            offset = self.offsets.get((step, tp))
            if offset is not None or epoch:
                progress[tp] = Progress(offset, epoch, owner)
        return progress

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

    async def load_dead_lettered_ids(self, step: str, partition: int, limit: int) -> set[str]:
        latest: dict[str, str] = {}
        rows = [
            r for p, r in self.audit if p == partition and r.step == step and r.kind in INPUT_KINDS
        ]
        for row in rows[-limit:] if limit > 0 else []:
            latest[row.event_id] = row.kind
        return {event_id for event_id, kind in latest.items() if kind == "dead_letter"}

    async def commit(self, batch: CommitBatch) -> None:
        for tp, epoch in batch.epochs.items():
            current, owner = self.epochs.get((batch.step, tp), (0, None))
            if current != epoch:
                raise StaleBatchError(stale_epoch(batch.step, tp, epoch, current, owner))
        for tp, (first, _last) in batch.offsets.items():
            if tp in batch.epochs:
                continue
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
        for request in batch.approvals:
            self.approvals.setdefault(request.id, request)
        self.commits += 1

    def decide_approval(
        self, approval_id: str, *, approved: bool, by: str, reason: str, now: datetime
    ) -> ApprovalOutcome:
        """What ``sluice approvals approve|deny`` does in Postgres, for tests."""
        request = self.approvals.get(approval_id)
        if request is None:
            raise ApprovalError(f"no held action {approval_id}")
        if approval_id in self.decisions:
            raise ApprovalError(f"held action {approval_id} is already decided")
        if request.deadline <= now:
            approved, by, reason = False, TIMEOUT_APPROVER, APPROVAL_TIMEOUT
        outcome = ApprovalOutcome(approval_id, approved, by, reason, now)
        self.decisions[approval_id] = outcome
        return outcome

    async def settle_approvals(
        self, step: str, ids: Sequence[str], now: datetime
    ) -> list[ApprovalOutcome]:
        settled = []
        for approval_id in ids:
            request = self.approvals.get(approval_id)
            if request is None or request.step != step:
                continue
            if approval_id not in self.decisions and request.deadline <= now:
                self.decisions[approval_id] = ApprovalOutcome(
                    approval_id, False, TIMEOUT_APPROVER, APPROVAL_TIMEOUT, now
                )
            if approval_id in self.decisions:
                settled.append(self.decisions[approval_id])
        return settled

    async def close(self) -> None:
        return None


def stale_epoch(step: str, tp: TopicPartition, mine: int, current: int, owner: str | None) -> str:
    """The refusal of a batch made under an epoch that is no longer current."""
    return (
        f"{step} {tp.topic}[{tp.partition}]: ownership epoch {mine} is stale "
        f"(now {current}, owner {owner or 'unknown'})"
    )
