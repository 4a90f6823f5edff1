"""Step metrics (streams.metrics) fed by the runner, and the consumer-lag probes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import BaseModel

from sluicegate.agents.api import Step
from sluicegate.streams import metrics
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import StepRunner
from sluicegate.streams.step import Context, Output
from sluicegate.streams.transport import Message, OutMessage
from sluicegate.streams.transports.memory import MemoryTransport
from tests.metrics_support import metric_points


class Ping(BaseModel):
    n: int


class Gate(Step):
    name = "gate"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {"ping": Ping}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        assert isinstance(ctx.data, Ping)
        decision = "allow" if ctx.data.n % 3 else "deny"
        ctx.record("decision", decision=decision)
        return [ctx.output("out", "pong", {}), ctx.output("out", "pong", {})]


def total(found: dict[str, list[Any]], name: str, **attrs: str) -> float:
    wanted = {key.replace("_", "."): value for key, value in attrs.items()}
    return float(
        sum(
            p.value
            for p in found.get(name, [])
            if all(p.attributes.get(k) == v for k, v in wanted.items())
        )
    )


def msg(e: Event | bytes) -> OutMessage:
    if isinstance(e, bytes):
        return OutMessage("in", e, key=b"s1")
    return OutMessage("in", encode(e), key=e.key, headers=headers_for(e))


async def test_counts_per_step_from_committed_batches(metric_reader: InMemoryMetricReader) -> None:
    t = MemoryTransport(partitions=1)
    await t.ensure_topics(["in"])
    runner = StepRunner(Gate(), t, MemoryCheckpointStore())
    await runner.start()
    events = [
        Event(source="t", type="ping", tenant="a", session="s1", data={"n": n}) for n in range(6)
    ]
    await t.publish_batch([msg(e) for e in events] + [msg(events[0]), msg(b"{broken")])
    while await runner.run_once():
        pass

    found = metric_points(metric_reader)
    assert total(found, "sluice.step.events.in", sluice_step="gate") == 7  # 6 + 1 dead letter
    assert total(found, "sluice.step.events.out", sluice_step="gate") == 12
    assert total(found, "sluice.step.dead_letters", sluice_step="gate") == 1
    assert total(found, "sluice.step.duplicates", sluice_step="gate") == 1
    decisions = {
        p.attributes["sluice.policy.decision"]: p.value for p in found["sluice.policy.decisions"]
    }
    assert decisions == {"allow": 4, "deny": 2}
    (histogram,) = found["sluice.step.batch.duration"]
    assert histogram.count == runner.stats.batches and histogram.sum > 0
    # The memory transport reports no lag: nothing is made up.
    assert "sluice.step.consumer.lag" not in found


async def test_metrics_off_records_nothing_and_costs_one_check() -> None:
    assert not metrics.enabled()
    recorder = metrics.StepMetrics("x", prefix="p")
    recorder.batch_done([], 3, 0, 0.1, [], None)  # returns at once


def test_a_subscription_that_reports_lag_itself_is_asked() -> None:
    class Sub:
        def lag(self, message: Message) -> int | None:
            return 100 - message.offset

    probe = metrics.lag_probe(Sub())
    assert probe is not None
    assert probe(Message("in", 0, 40, None, b"", {}, 0)) == 60
    assert metrics.lag_probe(object()) is None


def test_nats_pending_from_the_ack_subject() -> None:
    def at(reply: str) -> Message:
        return Message("in", 0, 5, None, b"", {}, 0, handle=(1, reply))

    assert metrics.nats_pending(at("$JS.ACK.S.C.1.5.5.1700000000000000000.42")) == 42
    assert metrics.nats_pending(at("$JS.ACK.dom.hash.S.C.1.5.5.1700000000000000000.7.tok")) == 7
    assert metrics.nats_pending(at("$JS.ACK.too.short")) is None
    assert metrics.nats_pending(Message("in", 0, 5, None, b"", {}, 0)) is None


def test_kafka_lag_from_the_high_water_mark() -> None:
    consumer = SimpleNamespace(
        highwater=lambda tp: {("p.in", 1): 120}.get((tp.topic, tp.partition))
    )
    names = SimpleNamespace(kafka=lambda logical: f"p.{logical}")
    probe = metrics._kafka_probe(SimpleNamespace(_consumer=consumer, _names=names))
    assert probe is not None
    assert probe(Message("in", 1, 99, None, b"", {}, 0)) == 20  # offsets 100..119 remain
    assert probe(Message("in", 2, 99, None, b"", {}, 0)) is None  # no fetch response yet
    assert metrics._kafka_probe(SimpleNamespace()) is None


async def test_lag_is_recorded_per_partition(metric_reader: InMemoryMetricReader) -> None:
    class Sub:
        def lag(self, message: Message) -> int | None:
            return 10 - message.offset

    recorder = metrics.StepMetrics("gate", prefix="p")
    batch = [Message("in", p, o, None, b"", {}, 0) for p in (0, 1) for o in range(p + 2)]
    recorder.batch_done([], 0, 0, 0.01, batch, Sub())
    lags = {
        p.attributes["messaging.destination.partition.id"]: p.value
        for p in metric_points(metric_reader)["sluice.step.consumer.lag"]
    }
    assert lags == {"0": 9, "1": 8}


async def test_in_flight_and_the_busiest_key_queue_are_gauged(
    metric_reader: InMemoryMetricReader,
) -> None:
    import asyncio

    class Held(Gate):
        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def process(self, event: Event, ctx: Context) -> list[Output]:
            if event.session == "slow":
                await self.release.wait()
            return await super().process(event, ctx)

    t = MemoryTransport(partitions=1)
    await t.ensure_topics(["in"])
    step = Held()
    runner = StepRunner(step, t, MemoryCheckpointStore())
    await runner.start()
    slow = [
        Event(source="t", type="ping", tenant="a", session="slow", data={"n": n}) for n in (1, 2, 4)
    ]
    fast = [Event(source="t", type="ping", tenant="a", session="fast", data={"n": 1})]
    await t.publish_batch([msg(e) for e in slow + fast])
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    for _ in range(5000):  # until the fast event is checkpointed (a bounded number of turns)
        if runner.stats.batches:
            break
        await asyncio.sleep(0.001)
    found = metric_points(metric_reader)
    # The fast one is checkpointed but not acked: the slow ones hold the watermark
    # below it, so all four are in flight; three are queued on the slow key.
    assert total(found, "sluice.step.in_flight", sluice_step="gate") == 4
    assert total(found, "sluice.step.key_queue.depth", sluice_step="gate") == 3
    step.release.set()
    stop.set()
    await task
