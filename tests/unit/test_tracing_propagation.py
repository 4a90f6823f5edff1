"""Trace-context helpers and sampler configuration (streams.tracing), without brokers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, ParentBased
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState

from sluicegate.streams import tracing
from sluicegate.streams.codec import headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.step import trace_id_of
from sluicegate.streams.transports.memory import MemoryTransport

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{SPAN}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter, batch=False)
    yield exporter
    tracing.shutdown()


def task(**kw: object) -> Event:
    return Event(source="t", type="task.submitted", tenant="acme", session="s1", **kw)  # type: ignore[arg-type]


# --- traceparent --------------------------------------------------------------------


def test_parse_a_valid_traceparent_with_tracestate() -> None:
    ctx = tracing.parse_traceparent(SAMPLED, "vendor=abc,other=1")
    assert ctx is not None
    assert ctx.trace_id == int(TRACE, 16) and ctx.span_id == int(SPAN, 16)
    assert ctx.is_remote and ctx.trace_flags.sampled
    assert ctx.trace_state == TraceState([("vendor", "abc"), ("other", "1")])


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"00-{TRACE}-{SPAN}",  # too few fields
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"00-{TRACE.upper()}-{SPAN}-01",  # uppercase hex
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
        f"00-{TRACE}-{SPAN}-1",  # short flags
        f"00-{TRACE}-{SPAN[:-1]}g-01",  # not hex
    ],
)
def test_invalid_traceparents_are_ignored(value: str | None) -> None:
    assert tracing.parse_traceparent(value) is None


def test_a_later_version_may_append_fields() -> None:
    ctx = tracing.parse_traceparent(f"01-{TRACE}-{SPAN}-00-whatever")
    assert ctx is not None and not ctx.trace_flags.sampled


def test_format_round_trips() -> None:
    ctx = tracing.parse_traceparent(SAMPLED)
    assert ctx is not None
    assert tracing.format_traceparent(ctx) == SAMPLED
    unsampled = SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(0))
    assert tracing.format_traceparent(unsampled) == f"00-{1:032x}-{2:016x}-00"


def test_restamp_changes_only_trace_context() -> None:
    event = task(traceparent=SAMPLED, data={"prompt": "x"})
    ctx = SpanContext(7, 9, is_remote=False, trace_flags=TraceFlags(1))
    stamped = tracing.restamp(event, ctx)
    assert stamped.traceparent == f"00-{7:032x}-{9:016x}-01"
    assert stamped.tracestate is None
    assert stamped.model_dump(exclude={"traceparent"}) == event.model_dump(exclude={"traceparent"})
    # Already carrying that context: the same object comes back.
    assert tracing.restamp(stamped, ctx) is stamped


def test_trace_id_in_audit_rows_reads_what_we_format() -> None:
    ctx = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(1))
    assert trace_id_of(tracing.format_traceparent(ctx)) == f"{0xABC:032x}"


def test_otlp_urls() -> None:
    assert tracing.otlp_url("http://c:4318", "traces") == "http://c:4318/v1/traces"
    assert tracing.otlp_url("http://c:4318/", "metrics") == "http://c:4318/v1/metrics"
    assert tracing.otlp_url("http://c:4318/v1/traces", "metrics") == "http://c:4318/v1/metrics"


# --- sampler ------------------------------------------------------------------------


def _decide(ratio: float, trace_id: int, parent: SpanContext | None = None) -> Decision:
    from opentelemetry import trace

    context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
    sampler = tracing.sampler_for(ratio)
    return sampler.should_sample(context, trace_id, "x", SpanKind.CONSUMER).decision


def test_sampler_is_parent_based_for_every_ratio() -> None:
    for ratio in (0.0, 0.01, 0.5, 1.0):
        assert isinstance(tracing.sampler_for(ratio), ParentBased)


def test_roots_follow_the_ratio() -> None:
    low, high = 1, (1 << 64) - 1  # the ratio sampler reads the low 64 bits
    assert _decide(1.0, high) is Decision.RECORD_AND_SAMPLE
    assert _decide(0.0, low) is Decision.DROP
    assert _decide(0.5, low) is Decision.RECORD_AND_SAMPLE
    assert _decide(0.5, high) is Decision.DROP


def test_children_follow_the_parent_whatever_the_ratio() -> None:
    sampled = SpanContext(5, 6, is_remote=True, trace_flags=TraceFlags(1))
    dropped = SpanContext(5, 6, is_remote=True, trace_flags=TraceFlags(0))
    assert _decide(0.0, 5, sampled) is Decision.RECORD_AND_SAMPLE
    assert _decide(1.0, 5, dropped) is Decision.DROP


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_out_of_range_is_refused(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"within 0\.\.1"):
        tracing.sampler_for(ratio)


def test_configure_needs_exactly_one_destination() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        tracing.configure()
    with pytest.raises(ValueError, match="exactly one"):
        tracing.configure(exporter=InMemorySpanExporter(), endpoint="http://x:4318")
    assert not tracing.enabled()


# --- the switch and the publish hook ------------------------------------------------------


def test_off_by_default_no_hook_and_no_stamp() -> None:
    assert tracing.tracer() is None
    assert tracing.publish_hook() is None
    publisher = Publisher(MemoryTransport())
    message = publisher.encode(task(data={"prompt": "x"}))
    assert "traceparent" not in message.headers  # type: ignore[operator]


def test_publish_starts_a_trace_per_task(spans: InMemorySpanExporter) -> None:
    transport = MemoryTransport(prefix="p")
    publisher = Publisher(transport)
    first, second = task(data={"prompt": "a"}), task(data={"prompt": "b"})
    m1, m2 = publisher.encode(first), publisher.encode(second)
    sent = spans.get_finished_spans()
    assert [s.name for s in sent] == ["send tasks", "send tasks"]
    one = sent[0]
    assert one.kind is SpanKind.PRODUCER and one.parent is None
    assert one.attributes is not None
    assert one.attributes["messaging.system"] == "memory"
    assert one.attributes["messaging.operation.type"] == "send"
    assert one.attributes["messaging.destination.name"] == "p.tasks"
    assert one.attributes["messaging.message.id"] == first.id
    assert one.attributes["sluice.tenant"] == "acme"
    # The header and the body carry the span's context; each task its own trace.
    assert m1.headers is not None and m2.headers is not None
    assert m1.headers["traceparent"] == tracing.format_traceparent(one.context)
    assert b'"traceparent":"' + m1.headers["traceparent"].encode() in m1.value
    assert trace_id_of(m1.headers["traceparent"]) != trace_id_of(m2.headers["traceparent"])


def test_the_trace_id_of_a_task_derives_from_the_task(spans: InMemorySpanExporter) -> None:
    hook = tracing.publish_hook()
    assert hook is not None
    event = task(data={})
    first = hook(event).traceparent
    retry = hook(event).traceparent
    assert trace_id_of(first) == trace_id_of(retry)  # an upstream retry joins the same trace
    assert first != retry  # but each send is its own span
    other = hook(task(data={})).traceparent
    assert trace_id_of(other) != trace_id_of(first)


def test_publish_continues_an_upstream_trace(spans: InMemorySpanExporter) -> None:
    hook = tracing.publish_hook()
    assert hook is not None
    stamped = hook(task(traceparent=SAMPLED, tracestate="vendor=abc", data={}))
    (sent,) = spans.get_finished_spans()
    assert sent.parent is not None and sent.parent.span_id == int(SPAN, 16)
    assert trace_id_of(stamped.traceparent) == TRACE
    assert stamped.tracestate == "vendor=abc"


def test_publish_leaves_an_unsampled_upstream_trace_alone(spans: InMemorySpanExporter) -> None:
    hook = tracing.publish_hook()
    assert hook is not None
    event = task(traceparent=f"00-{TRACE}-{SPAN}-00", data={})
    assert hook(event) is event
    assert spans.get_finished_spans() == ()


def test_unsampled_roots_still_carry_context() -> None:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter, batch=False, sample_ratio=0.0)
    try:
        hook = tracing.publish_hook()
        assert hook is not None
        stamped = hook(task(data={}))
        assert stamped.traceparent is not None and stamped.traceparent.endswith("-00")
        assert exporter.get_finished_spans() == ()
    finally:
        tracing.shutdown()


def test_an_explicit_hook_wins_over_the_tracing_default(spans: InMemorySpanExporter) -> None:
    seen: list[str] = []

    def mine(event: Event) -> Event:
        seen.append(event.id)
        return event

    publisher = Publisher(MemoryTransport(), before_send=mine)
    message = publisher.encode(task(data={}))
    assert seen and spans.get_finished_spans() == ()
    assert message.headers == headers_for(task(id=seen[0], data={}))
