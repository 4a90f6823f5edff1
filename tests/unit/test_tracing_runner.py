"""Hop spans in the step runner (streams.tracing + streams.runner), on the in-memory transport."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from sluicegate.agents.api import Step
from sluicegate.streams import tracing
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.codec import decode, encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.runner import StepRunner
from sluicegate.streams.step import Context, Output, trace_id_of
from sluicegate.streams.transport import Message, OutMessage
from sluicegate.streams.transports.memory import MemoryTransport


class Ping(BaseModel):
    n: int


class Judge(Step):
    """in → mid: counts per session, and decides like a gate (deny odd numbers)."""

    name = "judge"
    inputs = ("in",)
    outputs = ("mid",)
    accepts: ClassVar = {"ping": Ping}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        assert isinstance(ctx.data, Ping)
        if ctx.data.n < 0:
            raise RuntimeError("negative pings are a bug")
        ctx.state["count"] = ctx.state.get("count", 0) + 1
        allowed = ctx.data.n % 2 == 0
        ctx.record(
            "decision",
            decision="allow" if allowed else "deny",
            reasons=() if allowed else ("odd",),
            policy_version="v1",
        )
        return [ctx.output("mid", "judged", {"n": ctx.data.n, "allowed": allowed})]


class Finish(Step):
    """mid → out, and records a result (as the responder does)."""

    name = "finish"
    inputs = ("mid",)
    outputs = ("out",)

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        ctx.result(event.causationid or event.id, "completed", {"n": event.data["n"]})
        return [ctx.output("out", "done", dict(event.data))]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter, batch=False)
    yield exporter
    tracing.shutdown()


def ping(n: int, session: str = "s1", **kw: object) -> Event:
    return Event(source="test", type="ping", tenant="t", session=session, data={"n": n}, **kw)  # type: ignore[arg-type]


async def pipeline() -> tuple[MemoryTransport, MemoryCheckpointStore, list[StepRunner]]:
    t = MemoryTransport(prefix="p", partitions=2)
    await t.ensure_topics(["in", "mid", "out"])
    store = MemoryCheckpointStore()
    runners = [StepRunner(Judge(), t, store), StepRunner(Finish(), t, store)]
    for runner in runners:
        await runner.start()
    return t, store, runners


async def drain(runners: list[StepRunner]) -> None:
    for runner in runners:
        while await runner.run_once():
            pass


async def read(t: MemoryTransport, topic: str) -> list[Message]:
    sub = await t.subscribe([topic], group=None)
    return await sub.fetch(10_000, timeout=0)


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_one_trace_per_event_from_publish_through_every_hop(
    spans: InMemorySpanExporter,
) -> None:
    t, store, runners = await pipeline()
    events = [ping(0, "s1"), ping(1, "s2")]
    await Publisher(t, topic="in", default_type=None).publish(events)
    await drain(runners)

    finished = spans.get_finished_spans()
    outputs = await read(t, "out")
    assert len(outputs) == 2 and len(finished) == 6
    for out in outputs:
        final = decode(out.value)
        trace_id = trace_id_of(final.traceparent)
        chain = [
            s
            for s in finished
            if s.context is not None and f"{s.context.trace_id:032x}" == trace_id
        ]
        send, judge, finish = (
            by_name(tuple(chain), n)[0] for n in ("send in", "process in", "process mid")
        )
        assert len(chain) == 3
        # publish → judge → finish, each the parent of the next.
        assert send.parent is None and send.kind is SpanKind.PRODUCER
        assert judge.parent is not None and send.context is not None
        assert judge.parent.span_id == send.context.span_id
        assert finish.parent is not None and judge.context is not None
        assert finish.parent.span_id == judge.context.span_id
        assert judge.kind is SpanKind.CONSUMER
        # The final output carries the last hop's context, header and body alike.
        assert finish.context is not None
        assert out.headers["traceparent"] == final.traceparent
        assert final.traceparent == tracing.format_traceparent(finish.context)
        # Every audit row and result of this task carries the task's trace id.
        rows = [r for _, r in store.audit if r.session == final.session]
        assert {r.step for r in rows} == {"judge", "finish"}
        assert {r.trace_id for r in rows} == {trace_id}
        (result,) = [r for r in store.results.values() if r.session == final.session]
        assert result.trace_id == trace_id

    judged = by_name(finished, "process in")
    attrs = {s.attributes["messaging.message.id"]: s.attributes for s in judged if s.attributes}
    allow, deny = attrs[events[0].id], attrs[events[1].id]
    assert allow["sluice.policy.decision"] == "allow" and allow["sluice.policy.reasons"] == ()
    assert deny["sluice.policy.decision"] == "deny" and deny["sluice.policy.reasons"] == ("odd",)
    assert deny["sluice.policy.version"] == "v1"
    assert deny["messaging.system"] == "memory"
    assert deny["messaging.operation.type"] == "process"
    assert deny["messaging.destination.name"] == "p.in"
    assert deny["messaging.consumer.group.name"] == runners[0].group
    assert deny["sluice.step"] == "judge" and deny["sluice.session"] == "s2"
    assert deny["sluice.tenant"] == "t" and deny["sluice.outputs"] == 1
    assert deny["messaging.destination.partition.id"] in ("0", "1")


async def test_tracing_off_changes_nothing() -> None:
    assert not tracing.enabled()
    t, store, runners = await pipeline()
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    e = ping(2, traceparent=given)
    await t.publish(OutMessage("in", encode(e), key=e.key, headers=headers_for(e)))
    await drain(runners)
    (out,) = await read(t, "out")
    # Derived events copy the input's context as they always did.
    assert decode(out.value).traceparent == given
    assert {r.trace_id for _, r in store.audit} == {"4bf92f3577b34da6a3ce929d0e0e4736"}


async def test_an_unsampled_trace_passes_without_spans(spans: InMemorySpanExporter) -> None:
    t, _store, runners = await pipeline()
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    e = ping(2, traceparent=given)
    await t.publish(OutMessage("in", encode(e), key=e.key, headers=headers_for(e)))
    await drain(runners)
    (out,) = await read(t, "out")
    assert decode(out.value).traceparent == given
    assert spans.get_finished_spans() == ()


async def test_an_event_without_context_starts_its_trace_at_the_first_hop(
    spans: InMemorySpanExporter,
) -> None:
    t, store, runners = await pipeline()
    e = ping(4)
    await t.publish(OutMessage("in", encode(e), key=e.key, headers=headers_for(e)))
    await drain(runners)
    first = by_name(spans.get_finished_spans(), "process in")[0]
    second = by_name(spans.get_finished_spans(), "process mid")[0]
    assert first.parent is None and second.parent is not None
    assert first.context is not None
    trace_id = f"{first.context.trace_id:032x}"
    assert {r.trace_id for _, r in store.audit} == {trace_id}
    # The same id as the publisher would have given this task's trace.
    hook = tracing.publish_hook()
    assert hook is not None
    assert trace_id_of(hook(e).traceparent) == trace_id


async def test_a_replayed_input_yields_byte_identical_outputs(spans: InMemorySpanExporter) -> None:
    e = ping(6, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    bodies = []
    for _ in range(2):  # as if the first run crashed before its checkpoint
        t, _store, runners = await pipeline()
        await t.publish(OutMessage("in", encode(e), key=e.key, headers=headers_for(e)))
        await drain(runners)
        bodies.append([m.value for m in await read(t, "mid")])
    assert bodies[0] == bodies[1]


async def test_a_dead_lettered_event_marks_its_span(spans: InMemorySpanExporter) -> None:
    t, store, runners = await pipeline()
    e = ping(-1, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    runners[0].config.retry_backoff_s = 0
    await t.publish(OutMessage("in", encode(e), key=e.key, headers=headers_for(e)))
    await drain(runners)
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["sluice.dead_letter.reason"] == "step_error"
    assert span.attributes["error.type"] == "RuntimeError"
    assert any(ev.name == "exception" for ev in span.events)
    (dead,) = await read(t, "dlq")
    assert trace_id_of(dead.headers["traceparent"]) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert [r.trace_id for _, r in store.audit if r.kind == "dead_letter"] == [
        "4bf92f3577b34da6a3ce929d0e0e4736"
    ]


async def test_spans_a_step_starts_nest_under_its_hop(spans: InMemorySpanExporter) -> None:
    provider = tracing._state.provider
    inner = provider.get_tracer("user-step")

    class Nested(Step):
        name = "nested"
        inputs = ("in",)
        outputs = ("mid",)

        async def process(self, event: Event, ctx: Context) -> list[Output]:
            with inner.start_as_current_span("llm call"):
                return [ctx.output("mid", "x", {})]

    t = MemoryTransport(partitions=1)
    await t.ensure_topics(["in", "mid"])
    runner = StepRunner(Nested(), t, MemoryCheckpointStore())
    await runner.start()
    e = ping(1, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    await t.publish(OutMessage("in", encode(e), key=e.key, headers=headers_for(e)))
    await drain([runner])
    call, hop = spans.get_finished_spans()
    assert call.name == "llm call" and hop.name == "process in"
    assert call.parent is not None and hop.context is not None
    assert call.parent.span_id == hop.context.span_id
