"""The Faust engine's subscription: the native StepRunner fed by an agent, without a broker.

Messages are offered as the Faust agent would offer them (the handle stands
for the Faust event); acks are recorded. The runner is the real StepRunner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from sluicegate.agents.api import Step
from sluicegate.faust_engine.subscription import FaustSubscription
from sluicegate.streams.checkpoint import CommitBatch, MemoryCheckpointStore, StaleBatchError
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import StepRunner, StoreUnavailableError
from sluicegate.streams.step import Context, Output
from sluicegate.streams.transport import (
    Message,
    OutMessage,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
)

IN0 = TopicPartition("in", 0)
IN1 = TopicPartition("in", 1)


class Ping(BaseModel):
    n: int


class Counter(Step):
    name = "counter"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {"ping": Ping}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        ctx.state["count"] = ctx.state.get("count", 0) + 1
        return [ctx.output("out", "pong", {"count": ctx.state["count"]})]


class FaustLikeTransport:
    """What the runner needs of a transport; subscribe hands out a FaustSubscription."""

    name = "kafka"
    prefix = "t"
    partitions = 2

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self.sub: FaustSubscription | None = None
        self.published: list[OutMessage] = []

    async def connect(self) -> None:
        return None

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        return None

    async def delete_topics(self, topics: Iterable[str]) -> None:
        return None

    async def log_ids(self, topics: Sequence[str]) -> dict[str, str]:
        return {t: t for t in topics}  # progress stays keyed by the plain topic here

    async def log_ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return {}  # unknown: nothing to check against

    async def publish(self, message: OutMessage) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        self.published.extend(messages)

    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        partitions: Sequence[int] | None = None,
        start: StartFrom = "earliest",
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> FaustSubscription:
        self.sub = FaustSubscription(
            topics,
            name=group or "?",
            capacity=self.capacity,
            on_assign=on_assign,
            on_revoke=on_revoke,
        )
        return self.sub

    async def close(self) -> None:
        return None


class Acks:
    """Records acked handles, and which were acked before the store committed them."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    async def __call__(self, handle: Any) -> None:
        self.handles.append(handle)


def message(tp: TopicPartition, offset: int, session: str = "s1") -> Message:
    event = Event(source="t", type="ping", tenant="acme", session=session, data={"n": offset})
    return Message(
        tp.topic,
        tp.partition,
        offset,
        event.key,
        encode(event),
        headers_for(event),
        0,
        handle=(tp.partition, offset),
    )


async def started(
    store: MemoryCheckpointStore | None = None, capacity: int = 16
) -> tuple[StepRunner, FaustSubscription, Acks, MemoryCheckpointStore]:
    transport = FaustLikeTransport(capacity)
    store = store or MemoryCheckpointStore()
    runner = StepRunner(Counter(), transport, store)
    await runner.start()
    sub = transport.sub
    assert sub is not None
    acks = Acks()
    sub.attach(acks)
    return runner, sub, acks, store


async def test_events_are_acked_only_after_postgres_committed_them() -> None:
    class Watching(MemoryCheckpointStore):
        acked_at_commit: list[int] = []

        async def commit(self, batch: CommitBatch) -> None:
            self.acked_at_commit.append(len(acks.handles))
            await super().commit(batch)

    runner, sub, acks, store = await started(Watching())
    assert await sub.assign(frozenset({IN0})) == {IN0: 0}
    for offset in range(3):
        await sub.offer(message(IN0, offset))
    assert await runner.run_once() == 3
    assert Watching.acked_at_commit == [0]
    assert acks.handles == [(0, 0), (0, 1), (0, 2)]
    assert store.offsets[("counter", IN0)] == 2
    # The runner holds the turn until its next fetch; then a rebalance learns
    # where the partition resumes: one past the commit.
    await sub.fetch(0, timeout=0)
    assert await sub.assign(frozenset({IN0})) == {IN0: 3}


async def test_assignment_loads_postgres_offsets_and_returns_where_to_resume() -> None:
    store = MemoryCheckpointStore()
    store.offsets[("counter", IN0)] = 4
    runner, sub, acks, _ = await started(store)
    assert await sub.assign(frozenset({IN0, IN1})) == {IN0: 5, IN1: 0}
    assert sub.assignment() == {IN0, IN1}
    # Faust's consumer may still deliver what Postgres covers: skipped, and acked.
    for offset in range(3, 7):
        await sub.offer(message(IN0, offset))
    await runner.run_once()
    assert runner.stats.skipped == 2
    assert runner.stats.processed == 2
    assert sorted(acks.handles) == [(0, 3), (0, 4), (0, 5), (0, 6)]
    assert store.offsets[("counter", IN0)] == 6


async def test_failed_commit_rewinds_and_every_event_is_acked_once() -> None:
    class Flaky(MemoryCheckpointStore):
        failures = 1

        async def commit(self, batch: CommitBatch) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("postgres went away")
            await super().commit(batch)

    runner, sub, acks, store = await started(Flaky())
    runner.config.commit_attempts = 1
    await sub.assign(frozenset({IN0}))
    for offset in range(3):
        await sub.offer(message(IN0, offset))
    with pytest.raises(StoreUnavailableError):
        await runner.run_once()
    assert acks.handles == []
    assert sub.stats.requeued == 3
    assert await runner.run_once() == 3
    assert acks.handles == [(0, 0), (0, 1), (0, 2)]
    processed = [r.event_id for _, r in store.audit if r.kind == "processed"]
    assert len(processed) == len(set(processed)) == 3


async def test_stale_batch_acks_what_the_other_worker_covered_and_rereads_the_rest() -> None:
    class Raced(MemoryCheckpointStore):
        async def commit(self, batch: CommitBatch) -> None:
            if not self.commits:
                # Another worker committed offsets 0..2 while we held the partition.
                self.offsets[("counter", IN0)] = 2
                self.commits += 1
                raise StaleBatchError("stored 2 >= batch start 0")
            await super().commit(batch)

    runner, sub, acks, store = await started(Raced())
    await sub.assign(frozenset({IN0}))
    for offset in range(5):
        await sub.offer(message(IN0, offset))
    await runner.run_once()
    assert runner.stats.stale_batches == 1
    assert sorted(acks.handles) == [(0, 0), (0, 1), (0, 2)]
    assert sub.stats.acked_by_seek == 3 and sub.stats.requeued == 2
    await runner.run_once()
    assert sorted(acks.handles) == [(0, o) for o in range(5)]
    assert store.offsets[("counter", IN0)] == 4
    assert len([r for _, r in store.audit if r.kind == "processed"]) == 2


async def test_a_partition_skipped_in_a_stale_batch_is_still_acked() -> None:
    class Raced(MemoryCheckpointStore):
        async def commit(self, batch: CommitBatch) -> None:
            if not self.commits:
                self.offsets[("counter", IN1)] = 1  # another worker got there first
                self.commits += 1
                raise StaleBatchError("stored 1 >= batch start 0")
            await super().commit(batch)

    store = Raced()
    store.offsets[("counter", IN0)] = 5
    runner, sub, acks, _ = await started(store)
    await sub.assign(frozenset({IN0, IN1}))
    for tp, offsets in ((IN0, (3, 4)), (IN1, (0, 1))):
        for offset in offsets:
            await sub.offer(message(tp, offset))
    await runner.run_once()
    # The reload covered IN1 only; IN0's skipped messages were neither
    # committed nor sought, and go out again with the next batch.
    assert sorted(acks.handles) == [(1, 0), (1, 1)]
    await runner.run_once()
    assert sub.stats.redelivered == 2
    assert sorted(acks.handles) == [(0, 3), (0, 4), (1, 0), (1, 1)]
    assert runner.stats.skipped == 4  # IN0's two, twice
    assert store.commits == 1  # the stale attempt only: nothing new to write


async def test_partition_callbacks_wait_for_the_batch_in_hand() -> None:
    calls: list[str] = []

    async def on_revoke(tps: frozenset[TopicPartition]) -> None:
        calls.append(f"revoke {sorted(tps)}")

    sub = FaustSubscription(["in"], name="g", capacity=8, on_revoke=on_revoke)
    sub.attach(Acks())
    await sub.assign(frozenset({IN0}))
    await sub.offer(message(IN0, 0))
    batch = await sub.fetch(10, timeout=0)  # the runner now holds a batch
    revoking = asyncio.create_task(sub.revoke(frozenset({IN0})))
    await asyncio.sleep(0.01)
    assert calls == [] and not revoking.done()
    await sub.commit(batch)
    assert await sub.fetch(10, timeout=0) == []  # the next fetch hands the turn over
    await asyncio.wait_for(revoking, 1)
    assert calls == [f"revoke {[IN0]}"]
    assert sub.assignment() == frozenset()


async def test_revoke_drops_queued_and_in_flight_messages_without_acking() -> None:
    acks = Acks()
    sub = FaustSubscription(["in"], name="g", capacity=8)
    sub.attach(acks)
    await sub.assign(frozenset({IN0, IN1}))
    for tp in (IN0, IN1):
        for offset in range(2):
            await sub.offer(message(tp, offset))
    held = await sub.fetch(1, timeout=0)
    assert [m.tp for m in held] == [IN0]
    await sub.fetch(0, timeout=0)  # ends the turn
    await sub.revoke(frozenset({IN0}))
    await sub.commit(held)  # a late commit of a revoked partition acks nothing
    rest = await sub.fetch(10, timeout=0)
    assert [(m.partition, m.offset) for m in rest] == [(1, 0), (1, 1)]
    assert acks.handles == []


async def test_a_full_queue_holds_the_agent_back() -> None:
    sub = FaustSubscription(["in"], name="g", capacity=2)
    await sub.assign(frozenset({IN0}))
    await sub.offer(message(IN0, 0))
    await sub.offer(message(IN0, 1))
    third = asyncio.create_task(sub.offer(message(IN0, 2)))
    await asyncio.sleep(0.01)
    assert not third.done()
    taken = await sub.fetch(1, timeout=0)
    assert len(taken) == 1
    await asyncio.wait_for(third, 1)
    await sub.commit(taken)
    assert [m.offset for m in await sub.fetch(10, timeout=0)] == [1, 2]


async def test_fetch_waits_for_messages_until_its_timeout() -> None:
    sub = FaustSubscription(["in"], name="g", capacity=4)
    await sub.assign(frozenset({IN0}))
    assert await sub.fetch(10, timeout=0.01) == []
    later = asyncio.get_running_loop().call_later(
        0.02, lambda: asyncio.ensure_future(sub.offer(message(IN0, 0)))
    )
    got = await sub.fetch(10, timeout=2)
    later.cancel()
    assert [m.offset for m in got] == [0]


async def test_messages_of_an_unannounced_partition_are_loaded_first() -> None:
    store = MemoryCheckpointStore()
    store.offsets[("counter", IN1)] = 0
    runner, sub, acks, _ = await started(store)
    for offset in range(2):
        await sub.offer(message(IN1, offset))
    await runner.run_once()
    assert sub.stats.late_assignments == 1
    assert IN1 in sub.assignment()
    # Offset 0 is Postgres's: the load's seek acked it, the runner processed 1.
    assert runner.stats.processed == 1
    assert sorted(acks.handles) == [(1, 0), (1, 1)]


async def test_a_failed_load_stops_the_runner_at_its_next_fetch() -> None:
    async def on_assign(tps: frozenset[TopicPartition]) -> None:
        raise ConnectionError("postgres is down")

    sub = FaustSubscription(["in"], name="g", capacity=4, on_assign=on_assign)
    # Empty: the group's offsets are left alone.
    assert await sub.assign(frozenset({IN0})) == {}
    with pytest.raises(ConnectionError):
        await sub.fetch(10, timeout=0)


async def test_seek_outside_the_assignment_is_refused() -> None:
    sub = FaustSubscription(["in"], name="g", capacity=4)
    with pytest.raises(TransportError):
        await sub.seek(IN0, 3)


async def test_close_wakes_the_agent_and_ends_fetching() -> None:
    sub = FaustSubscription(["in"], name="g", capacity=1)
    await sub.assign(frozenset({IN0}))
    await sub.offer(message(IN0, 0))
    blocked = asyncio.create_task(sub.offer(message(IN0, 1)))
    await asyncio.sleep(0.01)
    await sub.close()
    await asyncio.wait_for(blocked, 1)
    with pytest.raises(TransportError):
        await sub.fetch(10, timeout=0)


async def test_lag_comes_from_the_high_water_mark() -> None:
    sub = FaustSubscription(["in"], name="g", capacity=1)
    assert sub.lag(message(IN0, 3)) is None
    sub.attach(Acks(), highwater=lambda tp: 10 if tp == IN0 else None)
    assert sub.lag(message(IN0, 3)) == 6
    assert sub.lag(message(IN1, 3)) is None
