"""One trace per task, publish to final result, on real NATS / Kafka-protocol brokers and Postgres.

The reference pipeline runs in-process (as ``sluice run`` would) with spans
collected in memory; tasks go in through the library's ``Publisher``, which
starts each task's trace when tracing is on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sluicegate.pipeline import build_steps, task_registry
from sluicegate.runtime import make_transport, run_steps
from sluicegate.streams import tracing
from sluicegate.streams.envelope import Event
from sluicegate.streams.publisher import Publisher
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    prepare_database,
    scalar_rows,
    settings_for,
    wait_for_results,
)
from tests.metrics_support import metric_points

pytestmark = pytest.mark.integration

# (session, prompt, gate decisions, the steps a result's path goes through)
TASKS = [
    ("calc", "what is 6 * 7", {"allow"}, ["intake", "context", "planner", "gate", "tools"]),
    ("shell", "run shell: rm -rf /", {"deny"}, ["intake", "context", "planner", "gate"]),
    (
        "fanout",
        "what is 2 ** 10; search for dead letter queue",
        {"allow"},
        ["intake", "context", "planner", "gate", "tools"],
    ),
]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter, batch=False)
    yield exporter
    tracing.shutdown()


def trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def attr(span: ReadableSpan, name: str) -> object:
    return (span.attributes or {}).get(name)


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_one_trace_per_task_from_publish_to_result(
    kind: str,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    prefix: str,
    spans: InMemorySpanExporter,
    metric_reader: InMemoryMetricReader,
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=prefix,
    )
    await prepare_database(settings)
    tasks = {
        session: Event(
            source="tests",
            type="task.submitted",
            tenant="acme",
            session=session,
            data={"prompt": prompt},
        )
        for session, prompt, _decisions, _path in TASKS
    }
    stop = asyncio.Event()
    worker = asyncio.create_task(run_steps(build_steps(), settings, stop=stop))
    try:
        transport = make_transport(settings)
        await transport.connect()
        try:
            await transport.ensure_topics(["tasks"])
            publisher = Publisher(transport, registry=task_registry())
            assert await publisher.publish(tasks.values()) == len(tasks)
        finally:
            await transport.close()
        reached = await wait_for_results(settings, len(tasks), timeout_s=90)
        assert reached == len(tasks), f"only {reached} of {len(tasks)} results"
    finally:
        stop.set()
        runners = await asyncio.wait_for(worker, 30)
    groups = {runner.processor.name: runner.group for runner in runners}

    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished if s.context is not None}
    results = {r.session: r for r in await all_results(settings)}
    audit = await scalar_rows(settings, "SELECT session, step, trace_id FROM audit_log")
    system = "nats" if kind == "nats" else "kafka"

    for session, _prompt, decisions, path in TASKS:
        result = results[session]
        assert result.task_id == tasks[session].id
        trace_id = result.trace_id
        assert trace_id is not None
        in_trace = [s for s in finished if trace_hex(s) == trace_id]
        # ONE trace: every span of this task's session is in it, and it has one root.
        assert {s for s in finished if attr(s, "sluice.session") == session} == set(in_trace)
        roots = [s for s in in_trace if s.parent is None]
        assert [r.name for r in roots] == ["send tasks"]
        assert roots[0].kind is SpanKind.PRODUCER
        assert attr(roots[0], "messaging.message.id") == tasks[session].id
        assert all(s.parent is None or s.parent.span_id in by_id for s in in_trace)

        # The responder's hop that emitted the result, walked back to the publish.
        (final,) = [
            s
            for s in in_trace
            if attr(s, "sluice.step") == "responder" and attr(s, "sluice.outputs") == 1
        ]
        chain = [final]
        while chain[-1].parent is not None:
            chain.append(by_id[chain[-1].parent.span_id])
        assert [attr(s, "sluice.step") for s in reversed(chain[:-1])] == [*path, "responder"]
        assert chain[-1] is roots[0]
        for hop in chain[:-1]:
            assert hop.kind is SpanKind.CONSUMER
            assert attr(hop, "messaging.system") == system
            assert attr(hop, "messaging.operation.type") == "process"
            assert (
                attr(hop, "messaging.consumer.group.name") == groups[str(attr(hop, "sluice.step"))]
            )
            assert str(attr(hop, "messaging.destination.name")).startswith(f"{prefix}.")
            assert attr(hop, "messaging.destination.partition.id") is not None
            assert attr(hop, "sluice.tenant") == "acme"

        # The policy decision is on the gate's span(s).
        gates = [s for s in in_trace if attr(s, "sluice.step") == "gate"]
        assert gates and {attr(g, "sluice.policy.decision") for g in gates} == decisions
        if decisions == {"deny"}:
            assert all(attr(g, "sluice.policy.reasons") for g in gates)

        # Every audit row of the task carries the task's trace id.
        rows = [(step, tid) for sess, step, tid in audit if sess == session]
        assert {step for step, _ in rows} >= {*path, "responder"}
        assert {tid for _, tid in rows} == {trace_id}

    # Metrics came out of the same run, consumer lag included (the transport's own numbers).
    found = metric_points(metric_reader)
    gate_in = sum(
        p.value for p in found["sluice.step.events.in"] if p.attributes.get("sluice.step") == "gate"
    )
    assert gate_in == 4  # one proposed action per task, two for the fan-out
    decided = {
        p.attributes["sluice.policy.decision"]: p.value for p in found["sluice.policy.decisions"]
    }
    assert decided == {"allow": 3, "deny": 1}
    lags = found["sluice.step.consumer.lag"]
    assert lags and all(p.value >= 0 for p in lags)
    assert {p.attributes["sluice.step"] for p in lags} >= {"intake", "responder"}
    await drop_schema(settings)
