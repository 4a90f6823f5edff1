"""``FaustSubscription``: the runner's ``Subscription``, fed by a Faust agent.

The native ``StepRunner`` pulls batches with ``fetch`` and reports what its
Postgres transaction covered with ``commit``; a Faust agent pushes the events
Faust's consumer delivers with ``offer``. In between sit a bounded queue (when
it is full the agent waits, Faust's stream buffer fills and Faust pauses
fetching) and the messages handed out but not yet committed ("in flight").

Acks: Faust commits a partition's offset up to what its streams acked, on its
own timer. An event is acked only when the runner commits it, that is after
the Postgres transaction that covers it, so Faust's committed offsets trail
Postgres. They are a hint only: at every assignment the rebalance bridge
commits Postgres's offsets to the group before Faust seeks to them.

Partition callbacks come from Faust's rebalance, on Faust's tasks. They take
"the turn", which the runner holds from the return of ``fetch`` (a batch in
hand) to its next ``fetch``: a callback never runs in the middle of a batch or
a tick, and a rebalance waits for at most one batch.

Nothing here imports Faust: messages arrive as ``Message`` objects whose
``handle`` is the Faust event, and acking goes through the callable given to
``attach``, so the queueing logic is unit-tested without a broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sluicegate.streams.transport import Message, PartitionsCallback, TopicPartition, TransportError

log = logging.getLogger("sluicegate.faust")

Ack = Callable[[Any], Awaitable[None]]
Highwater = Callable[[TopicPartition], int | None]


@dataclass(slots=True)
class SubscriptionStats:
    offered: int = 0
    acked: int = 0
    # Handed back by a seek below them (a rewound or stale batch): fetched again.
    requeued: int = 0
    # Acked by a seek above them: Postgres already covers them.
    acked_by_seek: int = 0
    # Messages of a partition the rebalance had not announced (see fetch).
    late_assignments: int = 0
    # Neither committed nor sought by the runner: delivered again (see fetch).
    redelivered: int = 0


class FaustSubscription:
    """Batches of the events a Faust agent receives, for one step's runner."""

    def __init__(
        self,
        topics: Sequence[str],
        *,
        name: str,
        capacity: int,
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.topics = frozenset(topics)
        self.name = name
        self.stats = SubscriptionStats()
        self._capacity = capacity
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._queue: deque[Message] = deque()
        self._inflight: dict[TopicPartition, dict[int, Message]] = {}
        self._owned: set[TopicPartition] = set()
        # Where each owned partition resumes: one past the last committed
        # offset, or the target of the last seek.
        self._resume: dict[TopicPartition, int] = {}
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._turn = asyncio.Lock()
        self._holding = False
        self._ack: Ack | None = None
        self._highwater: Highwater | None = None
        self._error: BaseException | None = None
        self._closed = False

    def attach(self, ack: Ack, highwater: Highwater | None = None) -> None:
        """Called by the agent (again if Faust restarts it) with how to ack its events."""
        self._ack = ack
        self._highwater = highwater

    # -- the agent's side ----------------------------------------------------------

    async def offer(self, message: Message) -> None:
        """Queue one delivered message, waiting while the queue is full."""
        while len(self._queue) >= self._capacity and not self._closed:
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return  # never acked: the next worker reads it again from Postgres's offset
        self._queue.append(message)
        self.stats.offered += 1
        self._arrived.set()

    # -- the rebalance's side --------------------------------------------------------

    async def revoke(self, tps: frozenset[TopicPartition]) -> None:
        """Faust took ``tps`` away (after its streams drained): forget them, tell the runner."""
        async with self._turn:
            gone = frozenset(tp for tp in tps if tp in self._owned)
            self._owned.difference_update(tps)
            for tp in tps:
                self._resume.pop(tp, None)
                # Not acked: Faust has forgotten these partitions, their new
                # owner starts from Postgres's offsets.
                self._inflight.pop(tp, None)
            self._drop_queued(lambda m: m.tp in tps)
            if gone and self._on_revoke is not None and not self._closed:
                await self._guarded(self._on_revoke(gone))

    async def assign(self, tps: frozenset[TopicPartition]) -> dict[TopicPartition, int]:
        """Faust gave us ``tps``: let the runner load them; returns where each must resume.

        Called before Faust seeks its consumer; a partition without a stored
        offset resumes at 0, the beginning of the log (Postgres says nothing
        of it was processed). Empty when the runner failed to load, so that
        the group's offsets stay as they are and the runner stops on its
        next fetch.
        """
        async with self._turn:
            new = frozenset(tps - self._owned)
            self._owned.update(new)
            if new and self._on_assign is not None and not self._closed:
                await self._guarded(self._on_assign(new))
            if self._error is not None:
                return {}
            return {tp: self._resume.get(tp, 0) for tp in tps if tp in self._owned}

    async def _guarded(self, callback: Awaitable[None]) -> None:
        # As in the Kafka transport: a failed load must stop the runner before
        # it processes those partitions, not crash Faust's rebalance task.
        try:
            await callback
        except Exception as exc:
            log.exception("%s: partition callback failed", self.name)
            self._error = self._error or exc

    # -- the runner's side: the Subscription protocol -----------------------------

    async def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        self._end_turn()
        self._check_open()
        self._raise_error()
        self._redeliver_leftovers()
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._queue and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        await self._turn.acquire()
        self._holding = True
        try:
            self._check_open()
            self._raise_error()
            await self._announce_late(max_messages)
            return self._take(max_messages)
        except BaseException:
            self._end_turn()
            raise

    async def _announce_late(self, max_messages: int) -> None:
        """Load partitions whose messages came before the rebalance bridge announced them.

        Faust keeps stream partitions paused until after the bridge ran, so
        this only happens if a rebalance signal was missed; the runner then
        still loads offsets and state before it sees those messages.
        """
        late = {m.tp for _, m in zip(range(max_messages), self._queue, strict=False)}
        late -= self._owned
        if not late:
            return
        self.stats.late_assignments += len(late)
        log.warning("%s: messages of unannounced partitions %s", self.name, sorted(late))
        self._owned.update(late)
        if self._on_assign is not None:
            await self._on_assign(frozenset(late))

    def _redeliver_leftovers(self) -> None:
        """Hand out again what the last batch neither committed nor sought past.

        The runner commits a batch, or seeks its partitions (a rewind, or a
        reload after a stale batch). After a stale batch it reloads only the
        partitions the batch advanced, so messages of a partition it skipped
        entirely stay in flight; unacked, they would hold Faust's next
        rebalance forever (it waits for every delivered event to be acked).
        Delivered again, they are skipped again and acked with that batch.
        """
        if not self._inflight:
            return
        leftovers = sorted(
            (m for held in self._inflight.values() for m in held.values()),
            key=lambda m: (m.topic, m.partition, m.offset),
        )
        self._inflight.clear()
        # In front: a partition's leftovers precede its queued messages.
        self._queue.extendleft(reversed(leftovers))
        self.stats.redelivered += len(leftovers)

    def _take(self, max_messages: int) -> list[Message]:
        batch: list[Message] = []
        while self._queue and len(batch) < max_messages:
            msg = self._queue.popleft()
            self._inflight.setdefault(msg.tp, {})[msg.offset] = msg
            batch.append(msg)
        if len(self._queue) < self._capacity:
            self._room.set()
        return batch

    async def commit(self, messages: Sequence[Message]) -> None:
        """Ack the messages Postgres now covers (Faust commits them on its timer)."""
        for msg in messages:
            held = self._inflight.get(msg.tp)
            if held is None or held.pop(msg.offset, None) is None:
                continue  # revoked or handled by a seek meanwhile
            await self._acked(msg)
            if msg.offset >= self._resume.get(msg.tp, 0):
                self._resume[msg.tp] = msg.offset + 1

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        """Resume ``tp`` at ``offset`` as far as held messages go.

        In flight and queued messages below ``offset`` are acked (Postgres
        covers them); in-flight ones at or above it go back to the front of
        the queue, so the runner's rewind after a failed commit and its reload
        after a stale batch re-read them as on Kafka. Messages not delivered
        yet arrive from wherever Faust's consumer is, and the runner skips
        those at or below its stored offset.
        """
        self._check_open()
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if tp not in self._owned:
            raise TransportError(f"{tp} is not assigned to {self.name}")
        self._resume[tp] = offset
        held = self._inflight.pop(tp, {})
        again = sorted((m for m in held.values() if m.offset >= offset), key=lambda m: m.offset)
        done = [m for m in held.values() if m.offset < offset]
        done += self._drop_queued(lambda m: m.tp == tp and m.offset < offset)
        self._queue.extendleft(reversed(again))
        self.stats.requeued += len(again)
        if again:
            self._arrived.set()
        for msg in done:
            await self._acked(msg)
        self.stats.acked_by_seek += len(done)

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._owned)

    def lag(self, message: Message) -> int | None:
        """Messages of ``message``'s partition after it, from the consumer's high-water mark."""
        if self._highwater is None:
            return None
        high = self._highwater(message.tp)
        return None if high is None else max(0, high - message.offset - 1)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._end_turn()
        # Wake the agent (blocked on a full queue) and a waiting fetch.
        self._room.set()
        self._arrived.set()

    # -- helpers -------------------------------------------------------------------

    def _drop_queued(self, doomed: Callable[[Message], bool]) -> list[Message]:
        kept: deque[Message] = deque()
        dropped: list[Message] = []
        for msg in self._queue:
            (dropped if doomed(msg) else kept).append(msg)
        if dropped:
            self._queue = kept
            self._room.set()
        return dropped

    async def _acked(self, msg: Message) -> None:
        if self._ack is not None:
            await self._ack(msg.handle)
        self.stats.acked += 1

    def _end_turn(self) -> None:
        if self._holding:
            self._holding = False
            self._turn.release()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"subscription {self.name} is closed")
