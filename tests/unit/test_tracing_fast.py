"""The unsampled fast path of streams.tracing: one regex, the same answers as the full parse.

A hop (and a send) skips an input whose valid ``traceparent`` has the
sampled flag clear. ``_unsampled`` decides that for version 00 without
taking the header apart; whatever it accepts, ``_fields`` (the W3C parse)
must accept too with an even flags byte, and every unsampled version-00
header ``_fields`` accepts it must accept, so the shortcut never changes
which inputs get a span or keep their context.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sluicegate.streams import tracing
from sluicegate.streams.envelope import Event
from sluicegate.streams.transport import Message

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def full_says_unsampled(traceparent: str) -> bool:
    fields = tracing._fields(traceparent)
    return fields is not None and not fields[2] & 1


def fast_says_unsampled(traceparent: str) -> bool:
    return tracing._unsampled(traceparent) is not None


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE}-{SPAN}-00",
        f"00-{TRACE}-{SPAN}-02",  # another flag set, sampled clear
        f"00-{TRACE}-{SPAN}-fe",
        f"  00-{TRACE}-{SPAN}-00\t",  # _fields strips whitespace
        f"\x1c00-{TRACE}-{SPAN}-00\u2028",  # str.strip's whitespace, not only ASCII
        f"00-{'0' * 31}1-{SPAN}-00",
        f"00-{TRACE}-{'0' * 15}1-00",
    ],
)
def test_unsampled_headers_take_the_fast_path(value: str) -> None:
    assert full_says_unsampled(value)
    assert fast_says_unsampled(value)


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE}-{SPAN}-01",  # sampled
        f"00-{TRACE}-{SPAN}-ff",
        f"00-{'0' * 32}-{SPAN}-00",  # all-zero trace id: invalid
        f"00-{TRACE}-{'0' * 16}-00",  # all-zero span id: invalid
        f"00-{TRACE.upper()}-{SPAN}-00",  # uppercase hex: invalid
        f"00-{TRACE}-{SPAN}-00-extra",  # version 00 has exactly four fields
        f"ff-{TRACE}-{SPAN}-00",  # version ff: invalid
        f"00-{TRACE}-{SPAN}-0A",  # uppercase flags: invalid
        f"00-{TRACE}-{SPAN}-0",
        f"00-{TRACE}0-{SPAN}-00",
        f"00-{TRACE}-{SPAN}-00 x",
        f"00-{TRACE}-{SPAN}-\u0660\u0660",  # Arabic-Indic digits are not hex
        "",
    ],
)
def test_the_fast_path_refuses_what_is_not_valid_and_unsampled_version_00(value: str) -> None:
    assert not fast_says_unsampled(value)


def test_a_later_version_is_left_to_the_full_parse() -> None:
    later = f"01-{TRACE}-{SPAN}-00-more"
    assert full_says_unsampled(later) and not fast_says_unsampled(later)


HEX = "0123456789abcdef"
_noise = st.text(alphabet=HEX + "ABF-x \t\u2028\x1c0", max_size=3)


@st.composite
def near_traceparents(draw: st.DrawFn) -> str:
    """Well-formed headers, some mutated: a character replaced, inserted or dropped."""
    version = draw(st.sampled_from(["00", "01", "ff", "0a"]))
    trace = draw(st.one_of(st.just("0" * 32), st.text(alphabet=HEX, min_size=32, max_size=32)))
    span = draw(st.one_of(st.just("0" * 16), st.text(alphabet=HEX, min_size=16, max_size=16)))
    flags = draw(st.text(alphabet=HEX + "ACE", min_size=2, max_size=2))
    value = f"{draw(_noise)}{version}-{trace}-{span}-{flags}{draw(_noise)}"
    if draw(st.booleans()):
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(_noise) + value[at + 1 :]
    return value


@given(near_traceparents())
def test_the_fast_path_agrees_with_the_full_parse(value: str) -> None:
    if fast_says_unsampled(value):
        assert full_says_unsampled(value)
    elif full_says_unsampled(value):
        # Only a later version's header may be left to the full parse.
        assert not value.strip().startswith("00-")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter, batch=False)
    yield exporter
    tracing.shutdown()


def _msg() -> Message:
    return Message(
        topic="in", partition=0, offset=0, key=b"s", value=b"", headers={}, timestamp_ms=0
    )


def _event(traceparent: str | None) -> Event:
    return Event(source="t", type="ping", tenant="t", session="s", traceparent=traceparent)


@pytest.mark.parametrize(
    "traceparent", [f"00-{TRACE}-{SPAN}-00", f" 00-{TRACE}-{SPAN}-00 ", f"01-{TRACE}-{SPAN}-00-x"]
)
def test_a_hop_on_an_unsampled_trace_is_none(spans: InMemorySpanExporter, traceparent: str) -> None:
    tracer = tracing.tracer()
    assert tracer is not None
    site = tracing.HopSite(system="memory", prefix="p", step="s", group="g")
    assert tracing.start_hop(tracer, site, _msg(), _event(traceparent)) is None
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize(
    "traceparent",
    [f"00-{TRACE}-{SPAN}-01", f"00-{'0' * 32}-{SPAN}-00", f"00-{TRACE}-{SPAN}-00-x", None],
)
def test_a_hop_on_a_sampled_or_absent_or_invalid_context_records(
    spans: InMemorySpanExporter, traceparent: str | None
) -> None:
    tracer = tracing.tracer()
    assert tracer is not None
    site = tracing.HopSite(system="memory", prefix="p", step="s", group="g")
    hop = tracing.start_hop(tracer, site, _msg(), _event(traceparent))
    assert hop is not None  # sampled, or a new root (the ratio is 1 here)
    with hop:
        pass
    (span,) = spans.get_finished_spans()
    assert span.context is not None
    assert hop.event.traceparent == tracing.format_traceparent(span.context)


def test_the_publisher_leaves_an_unsampled_context_as_it_is(spans: InMemorySpanExporter) -> None:
    hook = tracing.publish_hook()
    assert hook is not None
    for traceparent in (f"00-{TRACE}-{SPAN}-00", f"01-{TRACE}-{SPAN}-00-x"):
        event = _event(traceparent)
        assert hook(event) is event
    assert spans.get_finished_spans() == ()


@pytest.mark.parametrize("tracestate", [None, "vendor=1,other=x"])
def test_restamp_copies_as_model_copy_would(tracestate: str | None) -> None:
    event = Event(source="t", type="ping", tenant="t", session="s", subject="x", data={"n": [1, 2]})
    traceparent = f"00-{TRACE}-{SPAN}-01"
    context = tracing.parse_traceparent(traceparent, tracestate)
    assert context is not None
    stamped = tracing.restamp(event, context)
    expected = event.model_copy(update={"traceparent": traceparent, "tracestate": tracestate})
    assert stamped == expected
    assert stamped.model_fields_set == expected.model_fields_set
    assert list(stamped.__dict__) == list(expected.__dict__)  # field order: the wire order
    assert stamped.__pydantic_extra__ is None and stamped.__pydantic_private__ is None
    assert stamped.model_dump() == expected.model_dump()
    assert stamped.data is event.data  # shallow, as model_copy is
    assert event.traceparent is None and event.tracestate is None  # the input is left alone
    assert Event.model_validate(stamped.model_dump()) == stamped


def test_restamp_keeps_a_subclass_and_its_private_state() -> None:
    class Mine(Event):
        _seen: int = 0

    event = Mine(source="t", type="ping", tenant="t", session="s")
    event._seen = 3
    context = tracing.parse_traceparent(f"00-{TRACE}-{SPAN}-01")
    assert context is not None
    stamped = tracing.restamp(event, context)
    assert type(stamped) is Mine and stamped._seen == 3
    assert stamped.traceparent == f"00-{TRACE}-{SPAN}-01"
