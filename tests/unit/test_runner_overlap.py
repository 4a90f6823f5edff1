"""Overlapped checkpoints: batch k+1 is processed while batch k's commit is in flight."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streams.checkpoint import CommitBatch, MemoryCheckpointStore, StaleBatchError
from streams.partitioning import partition_for
from streams.runner import RunnerConfig, StepRunner, StoreUnavailableError
from streams.step import StateKey
from streams.transport import TopicPartition
from streams.transports.memory import MemoryTransport
from tests.unit.test_runner import Counter, ping, publish, read


class GatedStore(MemoryCheckpointStore):
    """Commits wait for ``gate``; ``fail`` lists what the next commits raise."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: list[BaseException] = []
        self.waiting = 0

    async def commit(self, batch: CommitBatch) -> None:
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        if self.fail:
            raise self.fail.pop(0)
        await super().commit(batch)


async def started(
    batch_size: int = 2, partitions: int = 1
) -> tuple[MemoryTransport, GatedStore, Counter, StepRunner]:
    t = MemoryTransport(partitions=partitions)
    await t.ensure_topics(["in"])
    store, step = GatedStore(), Counter()
    config = RunnerConfig(batch_size=batch_size, commit_attempts=1, retry_backoff_s=0.0)
    runner = StepRunner(step, t, store, config=config)
    await runner.start()
    return t, store, step, runner


async def pump_all(runner: StepRunner) -> None:
    while await runner.pump():
        pass
    await runner.drain()


async def until(condition: object, what: str) -> None:
    for _ in range(500):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting for {what}")


def count_of(store: MemoryCheckpointStore, session: str) -> int:
    _partition, blob = store.states[("counter", StateKey("t", session))]
    return int(orjson.loads(blob)["count"])


async def out_counts(t: MemoryTransport) -> list[int]:
    return [orjson.loads(m.value)["data"]["count"] for m in await read(t, "out")]


async def test_the_next_batch_is_processed_during_the_commit_and_sees_its_state() -> None:
    t, store, step, runner = await started()
    await publish(t, *(ping(i) for i in range(4)))
    store.gate.clear()
    assert await runner.pump() == 2  # batch 1: its commit waits at the gate
    second = asyncio.create_task(runner.pump())
    await until(lambda: step.calls == 4, "batch 2 to be processed")
    assert store.commits == 0 and store.waiting == 1  # batch 1 is still in flight
    store.gate.set()
    assert await second == 2
    await runner.drain()
    assert store.commits == 2
    assert await out_counts(t) == [1, 2, 3, 4]
    assert count_of(store, "s1") == 4
    assert store.offsets[("counter", TopicPartition("in", 0))] == 3
    assert [r.kind for _, r in store.audit] == ["processed"] * 4


def session_in(partition: int, partitions: int, skip: int = 0) -> str:
    found = [
        f"s{i}" for i in range(100) if partition_for(f"s{i}".encode(), partitions) == partition
    ]
    return found[skip]


@pytest.mark.parametrize("partitions", [1, 2])
async def test_a_failed_commit_rewinds_both_batches_in_hand(partitions: int) -> None:
    t, store, step, runner = await started(partitions=partitions)
    # Two sessions; with two partitions, batch 1 is all partition 0 and
    # batch 2 all partition 1 (the memory transport drains partitions in order).
    sessions = [session_in(0, partitions), session_in(partitions - 1, partitions, skip=1)]
    await publish(t, *(ping(i, session=sessions[i // 2 % 2]) for i in range(8)))
    store.fail = [RuntimeError("postgres is down")]
    await runner.pump()
    with pytest.raises(StoreUnavailableError):
        await runner.pump()  # batch 2 processed; batch 1's commit failed
    assert runner._states == {}  # memory still equals the (empty) store
    await pump_all(runner)
    assert step.calls == 12  # batches 1 and 2 twice, then batches 3 and 4
    assert sorted(r.event_id for _, r in store.audit) == sorted(
        {m.headers["ce_id"] for m in await read(t, "in")}
    )
    assert count_of(store, sessions[0]) == count_of(store, sessions[1]) == 4
    # Batch 1 went out before its failed commit and again after: same events.
    assert sorted(set(await out_counts(t))) == [1, 2, 3, 4]
    assert len({m.headers["ce_id"] for m in await read(t, "out")}) == 8


async def test_a_batch_computed_on_a_stale_batch_is_dropped_and_read_again() -> None:
    t, store, _step, runner = await started()
    await publish(t, *(ping(i) for i in range(4)))
    tp = TopicPartition("in", 0)
    other_worker = CommitBatch(step="counter")
    other_worker.offsets[tp] = (0, 1)
    other_worker.states[(0, StateKey("t", "s1"))] = orjson.dumps({"count": 10})

    class Raced(GatedStore):
        async def commit(self, batch: CommitBatch) -> None:
            if not self.commits:
                # Another worker took the partition and committed batch 1 first.
                await MemoryCheckpointStore.commit(self, other_worker)
                raise StaleBatchError("stored 1 >= batch start 0")
            await MemoryCheckpointStore.commit(self, batch)

    store = Raced()
    runner = StepRunner(runner.processor, t, store, config=runner.config)
    await runner.start()
    await pump_all(runner)
    assert runner.stats.stale_batches == 1
    assert count_of(store, "s1") == 12  # batch 2 recomputed on the other worker's 10
    assert [r.event_id for _, r in store.audit] == [
        m.headers["ce_id"] for m in (await read(t, "in"))[2:]
    ]
    assert (await out_counts(t))[-2:] == [11, 12]


async def test_a_copy_of_an_event_in_flight_is_absorbed() -> None:
    t, store, step, runner = await started(batch_size=1)
    event = ping(1)
    await publish(t, event)
    await publish(t, event)  # the same event again, at the next offset
    store.gate.clear()
    await runner.pump()
    second = asyncio.create_task(runner.pump())
    await until(lambda: runner.stats.duplicates == 1, "the copy to be seen")
    store.gate.set()
    await second
    await runner.drain()
    assert step.calls == 1
    assert len(store.audit) == 1
    assert store.offsets[("counter", TopicPartition("in", 0))] == 1


async def test_stop_waits_for_the_commit_in_flight() -> None:
    t, store, _step, runner = await started()
    await publish(t, *(ping(i) for i in range(3)))
    store.gate.clear()
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: store.waiting == 1, "a commit in flight")
    stop.set()
    await asyncio.sleep(0.05)
    assert not task.done()  # the batch in hand is finished first
    store.gate.set()
    await asyncio.wait_for(task, 5)
    assert store.commits >= 1
    assert len(store.audit) == store.offsets[("counter", TopicPartition("in", 0))] + 1
