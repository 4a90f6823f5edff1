"""What a runner holds between fetching an input and checkpointing it.

Three small pieces, each owned by the runner (``streams.runner``):

- :class:`Slot`: one fetched input, from admission until its partition's
  watermark passes it;
- :class:`Watermarks`: per input partition, the fetched inputs in offset
  order. The watermark of a partition is the highest offset below which every
  fetched input is done; only it is stored in Postgres and acked to the
  broker. Inputs done above a gap are checkpointed too (their audit rows,
  state and results) and, after a crash, fetched again and absorbed by id;
- :class:`Pending`: the work completed since the last checkpoint, gathered
  into one ``CommitBatch`` and one list of outputs, so any number of events
  in flight cost one Postgres transaction per commit.

See docs/architecture.md, "The commit protocol".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sluicegate.streams.checkpoint import CommitBatch
from sluicegate.streams.transport import Message, OutMessage, TopicPartition


class Slot:
    """One fetched input. ``done`` once its outcome is in a :class:`Pending`."""

    __slots__ = ("done", "dropped", "msg")

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self.done = False
        # Set when the runner gave the input up (partition revoked, runner
        # reset): whatever its step still returns is discarded.
        self.dropped = False


class Watermarks:
    """The fetched, not yet acked inputs of every partition, in offset order."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[TopicPartition, deque[Slot]] = {}

    def add(self, tp: TopicPartition, slot: Slot) -> None:
        """Track ``slot``; a partition's inputs must be added in offset order."""
        queue = self._slots.get(tp)
        if queue is None:
            queue = self._slots[tp] = deque()
        queue.append(slot)

    def passable(self) -> dict[TopicPartition, list[Message]]:
        """Per partition, the done inputs at its front: how far its watermark can move.

        They stay tracked until :meth:`release` (after the checkpoint that
        stores the move), so a failed checkpoint still rewinds to them.
        """
        moved: dict[TopicPartition, list[Message]] = {}
        for tp, queue in self._slots.items():
            if not queue or not queue[0].done:
                continue
            passed: list[Message] = []
            for slot in queue:
                if not slot.done:
                    break
                passed.append(slot.msg)
            moved[tp] = passed
        return moved

    def release(self, moved: dict[TopicPartition, list[Message]]) -> None:
        """Stop tracking what :meth:`passable` returned, now checkpointed."""
        for tp, passed in moved.items():
            queue = self._slots.get(tp)
            for msg in passed:
                if not queue or queue[0].msg is not msg:
                    break  # the partition was dropped meanwhile
                queue.popleft()

    def undone(self, tps: frozenset[TopicPartition]) -> int:
        """Inputs of ``tps`` whose step has not finished yet."""
        return sum(1 for tp in tps for slot in self._slots.get(tp, ()) if not slot.done)

    def first_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the offset of its first input not yet passed by the watermark."""
        return {tp: queue[0].msg.offset for tp, queue in self._slots.items() if queue}

    def drop(self, tps: frozenset[TopicPartition] | None = None) -> int:
        """Forget ``tps`` (all partitions when None), marking their slots dropped.

        Returns how many inputs were forgotten.
        """
        dropped = 0
        for tp in list(self._slots) if tps is None else tps:
            for slot in self._slots.pop(tp, ()):
                slot.dropped = True
                dropped += 1
        return dropped


@dataclass(slots=True)
class Pending:
    """Completed work waiting for the next checkpoint."""

    batch: CommitBatch
    # Dead letters and tick outputs, produced by the checkpoint itself.
    produce: list[OutMessage] = field(default_factory=list)
    # Outputs of this batch's events, sent ahead by the runner's Outbox.
    sent: int = 0
    # Inputs completed into this batch (their broker ack waits for the watermark).
    inputs: int = 0

    def is_empty(self) -> bool:
        return self.inputs == 0 and not self.produce and self.batch.is_empty()
