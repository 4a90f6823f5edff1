"""Failure paths without services: the stall watch, permanent vs transient store errors,
outage patience, and readiness (issue 21). The same paths against real
brokers and Postgres are in tests/integration/test_faults_*.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import ClassVar

import psycopg
import psycopg.errors
import pytest

from sluicegate.agents.api import Step
from sluicegate.sinks.faults import permanent
from sluicegate.streams import health
from sluicegate.streams.checkpoint import CommitBatch, MemoryCheckpointStore, StorePermanentError
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import OutageError, RunnerConfig, StepRunner
from sluicegate.streams.stalls import PartitionView, StallWatch
from sluicegate.streams.step import Context, Output
from sluicegate.streams.transport import Message, OutMessage, Subscription, TopicPartition
from sluicegate.streams.transports.memory import MemoryTransport

TP = TopicPartition("in", 0)


# -- the stall watch -------------------------------------------------------------


def view(committed: int | None, end: int | None, admitted: int = 0, busy: bool = False) -> dict:  # type: ignore[type-arg]
    return {TP: PartitionView(committed, end, admitted, busy)}


def test_lag_without_progress_for_the_timeout_is_a_stall() -> None:
    watch = StallWatch(10)
    assert watch.check(0, view(5, 9)) == set()
    assert watch.check(9, view(5, 9)) == set()
    assert watch.check(10, view(5, 9)) == {TP}
    assert watch.stalled == {TP}


def test_progress_no_lag_or_work_in_flight_is_not_a_stall() -> None:
    watch = StallWatch(10)
    watch.check(0, view(5, 9))
    assert watch.check(20, view(6, 9)) == set(), "the committed offset moved"
    assert watch.check(40, view(6, 9, admitted=1)) == set(), "inputs were admitted"
    assert watch.check(60, view(6, 9, admitted=1, busy=True)) == set(), "a slow key is not a stall"
    assert watch.check(80, view(9, 9)) == set(), "no lag"
    # Nothing committed yet: lag from the log's second message on (0 is ambiguous).
    assert StallWatch(1).check(5, view(None, 0)) == set()


def test_a_repaired_partition_gets_a_full_timeout_and_backpressure_pauses_all() -> None:
    watch = StallWatch(10)
    watch.check(0, view(5, 9))
    assert watch.check(10, view(5, 9)) == {TP}
    watch.repaired(10, [TP])
    assert watch.check(19, view(5, 9)) == set()
    assert watch.check(20, view(5, 9)) == {TP}
    watch.pause(25)
    assert watch.stalled == frozenset()
    assert watch.check(34, view(5, 9)) == set()


def test_partitions_no_longer_judged_are_forgotten() -> None:
    watch = StallWatch(10)
    watch.check(0, view(5, 9))
    watch.check(5, {})
    assert watch.check(12, view(5, 9)) == set(), "its clock started over"


# -- permanent store errors ------------------------------------------------------------


def test_schema_drift_and_refused_permissions_are_permanent_in_one_line() -> None:
    drift = psycopg.errors.UndefinedColumn('column "trace_id" does not exist\nLINE 1: ...')
    refused = permanent(drift, "a checkpoint of step 'planner'")
    assert isinstance(refused, StorePermanentError)
    assert str(refused) == (
        "Postgres refused a checkpoint of step 'planner': column \"trace_id\" does not exist "
        "(SQLSTATE 42703)"
    )
    denied = permanent(psycopg.errors.InsufficientPrivilege("permission denied"), "x")
    assert denied is not None and "42501" in str(denied)


def test_outages_are_not_permanent() -> None:
    assert permanent(psycopg.OperationalError("connection refused"), "x") is None
    assert permanent(psycopg.errors.AdminShutdown("terminating connection"), "x") is None
    assert permanent(psycopg.errors.QueryCanceled("statement timeout"), "x") is None
    assert permanent(TimeoutError(), "x") is None


# -- outage patience in the runner -------------------------------------------------------


class Echo(Step):
    name = "echo"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        return [ctx.output("out", "echoed", {})]


class FlakyStore(MemoryCheckpointStore):
    """Commits fail with ``error`` while ``failing`` is set."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error
        self.failing = False
        self.attempts = 0

    async def commit(self, batch: CommitBatch) -> None:
        if self.failing:
            self.attempts += 1
            raise self.error
        await super().commit(batch)


def events(n: int) -> list[Event]:
    return [
        Event(source="t", type="ping", tenant="t", session=f"s{i % 5}", data={"i": i})
        for i in range(n)
    ]


async def started(
    store: MemoryCheckpointStore, **config: object
) -> tuple[MemoryTransport, StepRunner]:
    transport = MemoryTransport(partitions=2)
    await transport.ensure_topics(["in", "out"])
    cfg = RunnerConfig(retry_backoff_s=0.001, commit_attempts=1, **config)  # type: ignore[arg-type]
    runner = StepRunner(Echo(), transport, store, config=cfg)
    await runner.start()
    return transport, runner


async def until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Wait (bounded, failing with a message) until ``condition`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"still not so after {timeout_s:g}s"
        await asyncio.sleep(0.01)


async def publish(transport: MemoryTransport, batch: Sequence[Event]) -> None:
    await transport.publish_batch(
        [OutMessage("in", encode(e), key=e.key, headers=headers_for(e)) for e in batch]
    )


async def test_an_outage_longer_than_the_patience_ends_run_in_one_line() -> None:
    store = FlakyStore(psycopg.OperationalError("connection refused"))
    store.failing = True
    transport, runner = await started(store, outage_patience_s=0.3)
    await publish(transport, events(10))
    with pytest.raises(OutageError) as gave_up:
        async with asyncio.timeout(10):
            await runner.run(asyncio.Event())
    message = str(gave_up.value)
    assert "\n" not in message
    assert "step 'echo' gave up after" in message and "SLUICE_OUTAGE_PATIENCE" in message
    assert "connection refused" in message
    assert store.attempts > 1, "it retried before giving up"


async def test_a_permanent_error_ends_run_at_the_first_attempt() -> None:
    store = FlakyStore(StorePermanentError('Postgres refused x: column "y" does not exist'))
    store.failing = True
    transport, runner = await started(store, outage_patience_s=300)
    await publish(transport, events(10))
    with pytest.raises(StorePermanentError):
        async with asyncio.timeout(10):
            await runner.run(asyncio.Event())
    assert store.attempts == 1


async def test_an_outage_within_the_patience_is_ridden_out_and_reported_meanwhile() -> None:
    store = FlakyStore(psycopg.OperationalError("connection refused"))
    store.failing = True
    transport, runner = await started(store, outage_patience_s=300)
    await publish(transport, events(20))
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))
    await until(lambda: any("echo: failing for" in line for line in health.not_ready()))
    store.failing = False
    await until(lambda: runner.stats.processed >= 20 and not health.not_ready())
    stop.set()
    await running
    assert (
        len(await store.load_recent_ids("echo", 0, 100))
        + len(await store.load_recent_ids("echo", 1, 100))
        == 20
    )


# -- a reader that stops delivering is repaired ------------------------------------------------


class DeafReader:
    """A subscription that silently loses partition 0's deliveries until it is sought."""

    def __init__(self, inner: Subscription) -> None:
        self.inner = inner
        self.deaf = True
        self.seeks = 0

    async def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        batch = await self.inner.fetch(max_messages, timeout)
        if self.deaf:
            return [m for m in batch if m.partition != 0]
        return batch

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        if tp.partition == 0:
            self.seeks += 1
            self.deaf = False
        await self.inner.seek(tp, offset)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_a_partition_whose_reader_went_deaf_is_reported_and_repaired() -> None:
    store = MemoryCheckpointStore()
    transport, runner = await started(store, stall_timeout_s=0.3)
    assert runner._sub is not None
    deaf = DeafReader(runner._sub)
    runner._sub = deaf  # type: ignore[assignment]
    batch = events(40)
    await publish(transport, batch)
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))
    await until(lambda: runner.stats.processed >= len(batch))
    stop.set()
    await running
    assert deaf.seeks >= 1, "the stalled partition was sought again"
    assert runner.stats.processed == len(batch), "its inputs were processed after the repair"
