"""The runner keeps many events in flight: keys concurrently, each key in order.

On the in-memory transport and store, with the real runner and commit
protocol. Steps here wait on asyncio events the test controls, so nothing
depends on timing: a test waits for a condition, never for a duration.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import ClassVar

import pytest
from pydantic import BaseModel

from sluicegate.agents.api import Step
from sluicegate.streams.checkpoint import CommitBatch, MemoryCheckpointStore
from sluicegate.streams.codec import decode, encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import RunnerConfig, StepRunner
from sluicegate.streams.step import Context, Output, StateKey
from sluicegate.streams.transport import OutMessage, TopicPartition
from sluicegate.streams.transports.memory import MemoryTransport


class Item(BaseModel):
    n: int


class Gated(Step):
    """Records each call's start and end; sessions in ``hold`` wait until released."""

    name = "gated"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {"item": Item}

    def __init__(self) -> None:
        self.hold: dict[str, asyncio.Event] = {}
        self.running: dict[str, int] = defaultdict(int)
        self.overlap = False  # two events of one session in process() at once
        self.concurrent = 0
        self.peak = 0
        self.order: dict[str, list[int]] = defaultdict(list)
        self.seen_state: dict[tuple[str, int], int] = {}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        assert isinstance(ctx.data, Item)
        session = event.session
        self.running[session] += 1
        self.overlap = self.overlap or self.running[session] > 1
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)
        try:
            self.seen_state[(session, ctx.data.n)] = ctx.state.get("count", 0)
            gate = self.hold.get(session)
            # Every call yields once, so the runner can start the others.
            await (gate.wait() if gate is not None else asyncio.sleep(0))
            ctx.state["count"] = ctx.state.get("count", 0) + 1
            self.order[session].append(ctx.data.n)
            return [ctx.output("out", "done", {"n": ctx.data.n, "count": ctx.state["count"]})]
        finally:
            self.running[session] -= 1
            self.concurrent -= 1


def item(n: int, session: str) -> Event:
    return Event(source="test", type="item", tenant="t", session=session, data={"n": n})


async def publish(t: MemoryTransport, events: list[Event]) -> None:
    await t.publish_batch(
        [OutMessage("in", encode(e), key=e.key, headers=headers_for(e)) for e in events]
    )


async def until(condition: Callable[[], bool], what: str, *, turns: int = 20_000) -> None:
    """Yield to the loop until ``condition`` holds (a bounded number of turns, not a time)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


async def outputs(t: MemoryTransport) -> list[Event]:
    sub = await t.subscribe(["out"], group=None)
    return [decode(m.value) for m in await sub.fetch(100_000, timeout=0)]


Started = tuple[MemoryTransport, MemoryCheckpointStore, Gated, StepRunner]


async def started(
    *, partitions: int = 1, store: MemoryCheckpointStore | None = None, **config: object
) -> Started:
    t = MemoryTransport(partitions=partitions)
    await t.ensure_topics(["in", "out"])
    step = Gated()
    cfg = RunnerConfig(fetch_timeout_s=0.01, commit_interval_s=0.0, **config)  # type: ignore[arg-type]
    runner = StepRunner(step, t, store or MemoryCheckpointStore(), config=cfg)
    await runner.start()
    return t, runner.store, step, runner  # type: ignore[return-value]


async def running(runner: StepRunner, body: Callable[[], Awaitable[None]]) -> None:
    """Run ``runner`` in the background while ``body`` runs, then stop it gracefully."""
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        await body()
    finally:
        stop.set()
        await task


async def test_keys_run_concurrently_and_each_key_in_order() -> None:
    t, store, step, runner = await started()
    sessions = [f"s{i}" for i in range(80)]
    # Interleaved: every session's events are spread over the one partition.
    await publish(t, [item(n, s) for n in range(5) for s in sessions])

    async def body() -> None:
        await until(lambda: runner.stats.processed == 400, "all done")

    await running(runner, body)
    assert step.peak >= 64, f"at most {step.peak} events were processed at once"
    assert not step.overlap, "two events of one session were processed at once"
    for s in sessions:
        assert step.order[s] == [0, 1, 2, 3, 4]
        # Each event saw exactly the state its predecessors of the session left.
        assert [step.seen_state[(s, n)] for n in range(5)] == [0, 1, 2, 3, 4]
    assert store.offsets[("gated", next(iter(store.offsets))[1])] == 399
    counts = {e.session: e.data["count"] for e in await outputs(t) if e.data["n"] == 4}
    assert counts == dict.fromkeys(sessions, 5)


async def test_a_slow_key_holds_back_only_itself_and_its_partitions_watermark() -> None:
    t, store, step, runner = await started()
    step.hold["slow"] = asyncio.Event()
    await publish(t, [item(0, "slow"), *(item(n, f"fast{n}") for n in range(50))])

    async def body() -> None:
        # The other keys of the same partition finish and are checkpointed...
        await until(lambda: len(store.audit) >= 50, "the fast keys are checkpointed")
        assert step.order["slow"] == []
        # ... but the watermark stays below the slow one (offset 0): nothing stored.
        assert store.offsets == {}
        step.hold["slow"].set()
        await until(lambda: bool(store.offsets), "the watermark moves")

    await running(runner, body)
    (offset,) = store.offsets.values()
    assert offset == 50
    assert len(await outputs(t)) == 51


async def test_work_done_above_a_gap_is_absorbed_by_id_after_a_crash() -> None:
    store = MemoryCheckpointStore()
    t, _, step, runner = await started(store=store)
    step.hold["slow"] = asyncio.Event()
    await publish(t, [item(0, "slow"), *(item(n, f"fast{n}") for n in range(10))])
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: len(store.audit) >= 10, "the fast keys are checkpointed")
    # A crash: the runner vanishes with the slow event unfinished.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert store.offsets == {}

    again = StepRunner(Gated(), t, store, config=runner.config)
    await again.start()
    await running(again, lambda: until(lambda: bool(store.offsets), "the restart catches up"))
    assert again.stats.processed == 1  # the slow one
    assert again.stats.duplicates == 10  # the rest, absorbed by id
    processed = [r.event_id for _, r in store.audit if r.kind == "processed"]
    assert len(processed) == len(set(processed)) == 11


async def test_in_flight_is_bounded_and_the_bound_is_backpressure() -> None:
    t, _store, step, runner = await started(max_in_flight=7, batch_size=100)
    for i in range(30):
        step.hold[f"s{i}"] = asyncio.Event()
    await publish(t, [item(0, f"s{i}") for i in range(30)])

    async def body() -> None:
        await until(lambda: step.peak == 7, "the bound is reached")
        for _ in range(50):  # let the loop turn: nothing more may be fetched
            await asyncio.sleep(0)
        assert runner.in_flight == 7 and step.concurrent == 7
        for gate in step.hold.values():
            gate.set()
        await until(lambda: runner.stats.processed == 30, "all done")

    await running(runner, body)
    assert runner.stats.peak_in_flight == 7
    assert step.peak == 7


async def test_checkpoints_are_coalesced() -> None:
    t, store, _step, runner = await started()
    await publish(t, [item(0, f"s{i}") for i in range(300)])
    await running(runner, lambda: until(lambda: runner.stats.processed == 300, "all done"))
    assert store.commits < 300 / 5, f"{store.commits} commits for 300 events"


async def test_graceful_stop_finishes_what_is_in_flight() -> None:
    t, store, step, runner = await started(drain_timeout_s=60.0)
    step.hold["s"] = asyncio.Event()
    await publish(t, [item(0, "s"), item(1, "s")])
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: step.running["s"] == 1, "the first event is in process()")
    stop.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done(), "the runner stopped without waiting for its event in flight"
    step.hold["s"].set()
    await task
    assert step.order["s"] == [0, 1]
    assert store.offsets and max(store.offsets.values()) == 1


async def test_stop_past_the_drain_timeout_checkpoints_only_what_finished() -> None:
    t, store, step, runner = await started(drain_timeout_s=0.0)
    step.hold["stuck"] = asyncio.Event()
    first, stuck, second = item(0, "ok"), item(0, "stuck"), item(1, "ok")
    await publish(t, [first, stuck, second])
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await until(lambda: len(step.order["ok"]) == 2, "the free key finished")
    stop.set()
    await task
    # Offsets 0 and 2 are done; 1 is not: the watermark stays at 0 and the
    # next owner fetches 1 (and 2, absorbed by id) again.
    assert list(store.offsets.values()) == [0]
    assert sorted(r.event_id for _, r in store.audit) == sorted([first.id, second.id])


async def test_a_failed_checkpoint_resets_to_the_store_and_loses_nothing() -> None:
    class Flaky(MemoryCheckpointStore):
        failures = 1

        async def commit(self, batch: CommitBatch) -> None:
            if self.failures and batch.audit:
                self.failures -= 1
                raise RuntimeError("postgres went away")
            await super().commit(batch)

    store = Flaky()
    t, _, _step, runner = await started(store=store, commit_attempts=1, retry_backoff_s=0.0)
    await publish(t, [item(n, f"s{n % 7}") for n in range(70)])
    await running(runner, lambda: until(lambda: _done(store, 70), "70 processed"))
    assert runner.stats.resets >= 1
    processed = [r.event_id for _, r in store.audit if r.kind == "processed"]
    assert len(processed) == len(set(processed)) == 70
    states = {key.session: blob for (_, key), (_, blob) in store.states.items()}
    assert states == {f"s{i}": b'{"count":10}' for i in range(7)}


def _done(store: MemoryCheckpointStore, n: int) -> bool:
    return sum(1 for _, r in store.audit if r.kind == "processed") >= n


@pytest.mark.parametrize("partitions", [1, 3])
async def test_run_once_handles_a_batch_to_the_end_with_keys_concurrent(partitions: int) -> None:
    t, store, step, runner = await started(partitions=partitions)
    await publish(t, [item(n, f"s{i}") for n in range(3) for i in range(20)])
    while await runner.run_once():
        pass
    assert runner.in_flight == 0
    assert step.peak > 1 and not step.overlap
    assert all(step.order[f"s{i}"] == [0, 1, 2] for i in range(20))
    assert store.states[("gated", StateKey("t", "s0"))][1] == b'{"count":3}'


# -- progress identity: offsets belong to one log ---------------------------------------


async def test_a_recreated_topic_is_a_new_log_processed_from_its_start() -> None:
    t, store, _step, runner = await started()
    await publish(t, [item(n, "s") for n in range(3)])
    while await runner.run_once():
        pass
    assert list(store.offsets.values()) == [2]
    await runner.close()
    # The topic is lost and made again (a broker that lost its log): offsets restart at 0.
    await t.delete_topics(["in"])
    await t.ensure_topics(["in"])
    await publish(t, [item(n, "s") for n in range(3, 5)])
    again = StepRunner(Gated(), t, store, config=runner.config)
    await again.start()
    while await again.run_once():
        pass
    assert again.stats.processed == 2 and again.stats.skipped == 0
    assert sorted(store.offsets.values()) == [1, 2]  # one row per log


async def test_a_stored_offset_beyond_the_end_of_its_log_stops_that_partition(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t, store, _step, runner = await started(partitions=2)
    sessions = ["a", "b", "c", "d"]
    await publish(t, [item(0, s) for s in sessions])
    while await runner.run_once():
        pass
    await runner.close()
    (log_tp, _) = next((tp, o) for (_, tp), o in store.offsets.items() if tp.partition == 0)
    store.offsets[("gated", log_tp)] = 99  # ahead of anything partition 0 ever had
    await publish(t, [item(1, s) for s in sessions])
    again = StepRunner(Gated(), t, store, config=runner.config)
    await again.start()
    while await again.run_once():
        pass
    [stopped] = again.stopped
    assert stopped.partition == 0
    assert store.offsets[("gated", log_tp)] == 99  # untouched, nothing processed there
    assert again.stats.processed == sum(1 for s in sessions if partition_of(s, 2) == 1)
    assert again.stats.skipped == sum(1 for s in sessions if partition_of(s, 2) == 0)
    [line] = [r.getMessage() for r in caplog.records if "beyond the end" in r.getMessage()]
    assert "in[0]" in line and "sluice offsets reset --step gated --partition 0" in line


async def test_progress_kept_under_the_plain_topic_name_is_adopted_once() -> None:
    t = MemoryTransport(partitions=1)
    await t.ensure_topics(["in", "out"])
    store = MemoryCheckpointStore()
    # As an older sluicegate stored it: keyed by the logical topic.
    store.offsets[("gated", TopicPartition("in", 0))] = 1
    await publish(t, [item(n, "s") for n in range(4)])
    runner = StepRunner(Gated(), t, store, config=RunnerConfig(fetch_timeout_s=0.01))
    await runner.start()
    while await runner.run_once():
        pass
    assert runner.stats.processed == 2  # offsets 2 and 3: it resumed after the adopted 1
    assert list(store.offsets) == [("gated", runner._log_tp(TopicPartition("in", 0)))]


def partition_of(session: str, partitions: int) -> int:
    from sluicegate.streams.partitioning import partition_for

    return partition_for(session.encode(), partitions)
