"""Distributed tracing: one OpenTelemetry trace per task, from publish to final result.

This module owns:

- the process-wide switch. Tracing is off until :func:`configure` (or
  :func:`use_provider`) is called: then there is no provider, the SDK is not
  even imported, and the runner, which reads :func:`tracer` once per batch,
  skips all span work;
- the sampler: parent-based, with a ratio for traces that start here
  (:func:`sampler_for`);
- W3C trace-context propagation to and from the event's ``traceparent`` and
  ``tracestate`` (:func:`parse_traceparent`, :func:`format_traceparent`,
  :func:`span_context_of`, :func:`restamp`). The codec copies both into
  message headers (``streams.codec.headers_for``);
- the publisher's hook (:func:`publish_hook`): a PRODUCER span ``send <topic>``
  per event, whose context is stamped into the event;
- the runner's hop spans (:func:`start_hop`): a CONSUMER span
  ``process <topic>`` per input event, a child of the event's context; the
  step sees the event re-stamped with the hop's context, so the outputs it
  derives (``Event.derive`` copies ``traceparent``) and its audit rows carry
  the hop on. A task thus gives one chain: send tasks → process tasks
  (intake) → process tasks.accepted (context) → … → process tool.results
  (responder).

Ids are deterministic where that keeps replays byte-identical: a trace that
starts here gets its trace id from the task's (tenant, session, id), and a
hop's span id comes from (input id, step). A replayed input therefore yields
outputs with the same ``traceparent`` as the first time (the hop's span is
then recorded twice under one id, which trace backends merge or flag), and
an upstream retry of a task lands in the same trace. Span ids of ``send``
spans stay random: two sends are two spans.

Attribute names follow the OpenTelemetry messaging semantic conventions
(``messaging.*``); ours are ``sluice.*``. The names are spelled out here
rather than imported from ``opentelemetry.semconv._incubating``, whose module
layout is not stable.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

# The API is light (about 10 ms to import); the SDK and exporters (about
# 100-400 ms) are imported only by configure(), so tracing that is off costs
# nothing at start-up either.
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace import Tracer as Tracer  # re-exported: the runner's type

from sluicegate.streams.codec import DecodeError
from sluicegate.streams.envelope import Event

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

    from sluicegate.streams.step import AuditRecord
    from sluicegate.streams.transport import Message

# --- attribute names ------------------------------------------------------------------

MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_PARTITION = "messaging.destination.partition.id"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"
ERROR_TYPE = "error.type"

SLUICE_TENANT = "sluice.tenant"
SLUICE_SESSION = "sluice.session"
SLUICE_STEP = "sluice.step"
SLUICE_OUTPUTS = "sluice.outputs"
SLUICE_DEAD_LETTER = "sluice.dead_letter.reason"
SLUICE_DECISION = "sluice.policy.decision"
SLUICE_REASONS = "sluice.policy.reasons"
SLUICE_POLICY_VERSION = "sluice.policy.version"
SLUICE_SHADOW_DIVERGENCE = "sluice.policy.shadow_divergence"

INSTRUMENTATION_NAME = "sluicegate"

EventHook = Callable[[Event], Event]


# --- the switch -----------------------------------------------------------------------


class _Seeds(threading.local):
    """What the next ids derive from; set around one ``start_span`` call.

    Thread-local, so a publisher in another thread never picks up a seed.
    """

    trace: str | None = None
    span: str | None = None


class _DerivedIds:
    """The provider's id generator: ids hashed from the seeds when set, random otherwise.

    Duck-typed to the SDK's ``IdGenerator`` so that defining it does not
    import the SDK.
    """

    def __init__(self, seeds: _Seeds) -> None:
        self.seeds = seeds

    def generate_trace_id(self) -> int:
        seed = self.seeds.trace
        return _hashed(seed, 16) if seed is not None else _random_id(128)

    def generate_span_id(self) -> int:
        seed = self.seeds.span
        return _hashed(seed, 8) if seed is not None else _random_id(64)

    def is_trace_id_random(self) -> bool:
        # W3C level 2's "random" flag promises random bits; a hash of an id is
        # not what that flag means, so it is never set.
        return False


def _hashed(seed: str, size: int) -> int:
    value = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=size).digest(), "big")
    return value or 1  # all-zero ids are invalid


def _random_id(bits: int) -> int:
    value = 0
    while value == 0:
        value = random.getrandbits(bits)
    return value


class _State:
    __slots__ = ("owned", "provider", "seeds", "tracer")

    def __init__(self) -> None:
        self.tracer: Tracer | None = None
        self.provider: Any = None
        self.owned = False  # configure() made the provider, so shutdown() ends it
        self.seeds = _Seeds()


_state = _State()


def tracer() -> Tracer | None:
    """The tracer when tracing is on, else None. The runner calls this once per batch."""
    return _state.tracer


def enabled() -> bool:
    return _state.tracer is not None


def sampler_for(ratio: float) -> Sampler:
    """Parent-based sampling: follow the parent's decision; sample ``ratio`` of new traces.

    Only the root (``sluice publish``, or the first hop of an event that
    arrived without trace context) decides; every later hop inherits it, so a
    trace is kept or dropped whole.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"trace sample ratio must be within 0..1, got {ratio}")
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased,
        TraceIdRatioBased,
    )

    if ratio >= 1.0:
        return ParentBased(ALWAYS_ON)
    if ratio <= 0.0:
        return ParentBased(ALWAYS_OFF)
    return ParentBased(TraceIdRatioBased(ratio))


def otlp_url(endpoint: str, signal: str) -> str:
    """``http://host:4318`` → ``http://host:4318/v1/<signal>`` (a full signal URL is kept)."""
    base = endpoint.rstrip("/")
    for known in ("traces", "metrics", "logs"):
        suffix = f"/v1/{known}"
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return f"{base}/v1/{signal}"


def configure(
    *,
    exporter: SpanExporter | None = None,
    endpoint: str | None = None,
    sample_ratio: float = 1.0,
    service_name: str = "sluicegate",
    batch: bool = True,
    set_global: bool = False,
    resource_attributes: Mapping[str, str] | None = None,
) -> TracerProvider:
    """Turn tracing on: spans go to ``exporter``, or over OTLP/HTTP to ``endpoint``.

    ``batch`` exports from a background thread (``BatchSpanProcessor``), as
    production should; tests pass ``batch=False`` to see spans at once.
    ``set_global`` also makes this the process's global provider, so spans
    that steps start with the plain OpenTelemetry API nest under the hop;
    the global provider can be set only once per process, so tests leave it.
    A previous configuration is shut down (flushed) first.
    """
    if (exporter is None) == (endpoint is None):
        raise ValueError("configure tracing with exactly one of exporter= or endpoint=")
    sampler = sampler_for(sample_ratio)
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.id_generator import IdGenerator

    if exporter is None:
        assert endpoint is not None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_url(endpoint, "traces"))
    shutdown()
    attributes = {"service.name": service_name, **(resource_attributes or {})}
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource.create(attributes),
        id_generator=cast(IdGenerator, _DerivedIds(_state.seeds)),
        # The SDK's own per-span metrics would cost on every hop; ours are per batch.
        meter_provider=NoOpMeterProvider(),
    )
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _install(provider, owned=True)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def use_provider(provider: trace.TracerProvider) -> None:
    """Turn tracing on with a provider the host application set up itself.

    Its sampler should be parent-based: the runner lets events of unsampled
    traces pass without a span, which is what a parent-based sampler would
    decide. Ids are then the provider's (random), not derived.
    """
    shutdown()
    _install(provider, owned=False)


def _install(provider: Any, *, owned: bool) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("sluicegate")
    except PackageNotFoundError:  # running from a source tree
        ours = "0"
    _state.provider = provider
    _state.owned = owned
    _state.tracer = provider.get_tracer(INSTRUMENTATION_NAME, ours)


def shutdown() -> None:
    """Turn tracing off; a provider that :func:`configure` made is flushed and shut down."""
    provider, owned = _state.provider, _state.owned
    _state.tracer, _state.provider, _state.owned = None, None, False
    if provider is not None and owned:
        provider.shutdown()


def force_flush(timeout_millis: int = 30_000) -> bool:
    """Export what is queued now (tests, and before a short-lived process exits)."""
    provider = _state.provider
    flush = getattr(provider, "force_flush", None)
    return bool(flush(timeout_millis)) if callable(flush) else True


# --- propagation ------------------------------------------------------------------------

# W3C Trace Context: version 00 has exactly four fields; later versions may
# append fields after a dash. Lowercase hex only.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")


# The same test narrowed to what a hop skips: a valid version-00 traceparent
# whose sampled flag (bit 0 of the flags) is clear. One ``fullmatch``, with no
# groups to take apart or ids to convert, answers for almost every input at a
# 1 % ratio (about 0.3 us, against 1 us for _fields). ``\s`` is what ``str.strip``
# strips, and the lookaheads refuse all-zero ids, so whatever it accepts
# _fields accepts too, with an even flags byte (tests/unit/test_tracing_fast.py).
_UNSAMPLED = re.compile(r"\s*00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f][02468ace]\s*")
_unsampled = _UNSAMPLED.fullmatch


def _fields(traceparent: str | None) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a valid ``traceparent``, else None."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(flags_hex, 16)


def parse_traceparent(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """A remote :class:`SpanContext` from W3C ``traceparent``/``tracestate``; None if invalid.

    Follows the W3C Trace Context rules: lowercase hex, version ``ff`` is
    invalid, all-zero trace or span ids are invalid, version ``00`` has
    exactly four fields and later versions may append fields.
    """
    fields = _fields(traceparent)
    return None if fields is None else _remote(fields, tracestate)


def _remote(fields: tuple[int, int, int], tracestate: str | None) -> SpanContext:
    trace_id, span_id, flags = fields
    return SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState.from_header([tracestate]) if tracestate else TraceState(),
    )


def format_traceparent(span_context: SpanContext) -> str:
    return (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-"
        f"{span_context.trace_flags & 0xFF:02x}"
    )


def span_context_of(event: Event) -> SpanContext | None:
    """The trace context an event carries (remote), or None."""
    return parse_traceparent(event.traceparent, event.tracestate)


def restamp(event: Event, span_context: SpanContext) -> Event:
    """``event`` carrying ``span_context`` as its ``traceparent``/``tracestate``.

    Neither is part of the event id, so ids stay deterministic.
    """
    traceparent = format_traceparent(span_context)
    state = span_context.trace_state
    tracestate = (state.to_header() or None) if state else None
    if traceparent == event.traceparent and tracestate == event.tracestate:
        return event
    return _with_context(event, traceparent, tracestate)


_CONTEXT_FIELDS = frozenset({"traceparent", "tracestate"})
_new = object.__new__
_set = object.__setattr__


def _with_context(event: Event, traceparent: str, tracestate: str | None) -> Event:
    """``event.model_copy(update={"traceparent": ..., "tracestate": ...})``, in a third of the time.

    What ``model_copy`` does, less its generic paths: a shallow copy of the
    fields with the two replaced, and both marked as set. ``Event`` ignores
    extra fields and has no private attributes, so those slots are empty; a
    subclass, which might have either, takes ``model_copy``.
    tests/unit/test_tracing_fast.py holds it to ``model_copy``'s result.
    """
    if type(event) is not Event:
        return event.model_copy(update={"traceparent": traceparent, "tracestate": tracestate})
    values = event.__dict__.copy()
    values["traceparent"] = traceparent
    values["tracestate"] = tracestate
    copied: Event = _new(Event)
    _set(copied, "__dict__", values)
    _set(copied, "__pydantic_fields_set__", event.__pydantic_fields_set__ | _CONTEXT_FIELDS)
    _set(copied, "__pydantic_extra__", None)
    _set(copied, "__pydantic_private__", None)
    return copied


def trace_seed(event: Event) -> str:
    """What the trace id of a trace started for ``event`` derives from.

    Tenant and session are part of it because upstream may choose its own
    ids, and the runner dedupes ids per session only.
    """
    return f"{event.tenant}\x1f{event.session}\x1f{event.id}"


def _parent(span_context: SpanContext) -> otel_context.Context:
    return trace.set_span_in_context(NonRecordingSpan(span_context))


# An empty context: a hop's parent is the event's context, never whatever
# span happens to be current in the worker.
_NO_PARENT = otel_context.Context()


# --- the publisher ------------------------------------------------------------------------


def publish_hook(
    topic: str = "tasks", *, system: str | None = None, destination: str | None = None
) -> EventHook | None:
    """A ``Publisher.before_send`` hook that starts the task's trace, or None when off.

    Each event gets a PRODUCER span ``send <topic>`` (ended at once: the
    publisher batches, so the hook marks the hand-off, not the broker's ack)
    and carries its context. An event that already has trace context
    continues that trace; otherwise the span's parent is the caller's current
    span, if any, else it starts a new trace. ``system`` is the transport's
    name and ``destination`` the broker-side topic name.
    """
    if _state.tracer is None:
        return None
    name = f"send {topic}"
    base: dict[str, Any] = {
        MESSAGING_OPERATION_TYPE: "send",
        MESSAGING_OPERATION_NAME: "send",
        MESSAGING_DESTINATION: destination or topic,
    }
    if system:
        base[MESSAGING_SYSTEM] = system

    def hook(event: Event) -> Event:
        return _send_span(event, name, base)

    return hook


def _send_span(event: Event, name: str, base: Mapping[str, Any]) -> Event:
    tracer_ = _state.tracer
    if tracer_ is None:  # turned off since the hook was made
        return event
    traceparent = event.traceparent
    if traceparent is not None and _unsampled(traceparent) is not None:
        return event  # a dropped trace stays dropped, with its context as it is
    parent = span_context_of(event)
    if parent is not None and not parent.trace_flags.sampled:
        return event
    context = _parent(parent) if parent is not None else None
    attributes = {
        **base,
        MESSAGING_MESSAGE_ID: event.id,
        SLUICE_TENANT: event.tenant,
        SLUICE_SESSION: event.session,
    }
    seeds = _state.seeds
    seeds.trace = trace_seed(event)
    try:
        span = tracer_.start_span(name, context, kind=SpanKind.PRODUCER, attributes=attributes)
    finally:
        seeds.trace = None
    span.end()
    return restamp(event, span.get_span_context())


# --- the runner ---------------------------------------------------------------------------


class HopSite:
    """What every hop span of one runner shares; built once per runner, cheap."""

    __slots__ = ("_topics", "group", "prefix", "step", "system")

    def __init__(self, *, system: str, prefix: str, step: str, group: str) -> None:
        self.system = system
        self.prefix = prefix
        self.step = step
        self.group = group
        self._topics: dict[str, tuple[str, dict[str, Any]]] = {}

    def for_topic(self, topic: str) -> tuple[str, dict[str, Any]]:
        """The span name and the constant attributes of hops on ``topic``."""
        known = self._topics.get(topic)
        if known is None:
            known = self._topics[topic] = (
                f"process {topic}",
                {
                    MESSAGING_SYSTEM: self.system,
                    MESSAGING_OPERATION_TYPE: "process",
                    MESSAGING_OPERATION_NAME: "process",
                    MESSAGING_DESTINATION: f"{self.prefix}.{topic}",
                    MESSAGING_CONSUMER_GROUP: self.group,
                    SLUICE_STEP: self.step,
                },
            )
        return known


class Hop:
    """One input event's ``process`` span; a context manager that makes it current.

    ``event`` is the input re-stamped with the span's context: hand it to the
    step, so its outputs and audit rows continue the trace from this hop.
    """

    __slots__ = ("_token", "event", "span")

    def __init__(self, span: Span, event: Event) -> None:
        self.span = span
        self.event = event
        self._token: Token[otel_context.Context] | None = None

    def __enter__(self) -> Hop:
        # Current, so spans a step starts with the OpenTelemetry API nest here.
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        if isinstance(exc, Exception):
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        self.span.end()

    def annotate(self, audit: Sequence[AuditRecord], outputs: int) -> None:
        """Put what the step did on the span: its output count and policy decisions."""
        span = self.span
        if not span.is_recording():
            return
        span.set_attribute(SLUICE_OUTPUTS, outputs)
        for record in audit:
            if record.kind == "decision" and record.decision is not None:
                span.set_attribute(SLUICE_DECISION, record.decision)
                span.set_attribute(SLUICE_REASONS, list(record.reasons))
                if record.policy_version:
                    span.set_attribute(SLUICE_POLICY_VERSION, record.policy_version)
            elif record.kind == "shadow_divergence":
                span.set_attribute(SLUICE_SHADOW_DIVERGENCE, True)

    def dead_letter(self, reason: str, error: BaseException) -> None:
        span = self.span
        if not span.is_recording():
            return
        span.set_attribute(SLUICE_DEAD_LETTER, reason)
        span.set_attribute(ERROR_TYPE, type(error).__name__)
        if not isinstance(error, DecodeError):
            span.record_exception(error)  # a step's bug: the stack trace helps
        span.set_status(Status(StatusCode.ERROR, reason))


def start_hop(tracer_: Tracer, site: HopSite, msg: Message, event: Event) -> Hop | None:
    """The ``process`` span for one input, or None when its trace is not sampled.

    An input of an unsampled trace passes with its context unchanged: a
    parent-based sampler would drop this hop's span anyway, and skipping it
    keeps the cost of a 1 % sample near that of no tracing. An input without
    trace context starts a trace here (subject to the ratio).
    """
    traceparent = event.traceparent
    if traceparent is not None and _unsampled(traceparent) is not None:
        return None  # the 1 % path's hot spot: decided by one regex match, nothing built
    fields = _fields(traceparent)
    if fields is not None and not fields[2] & TraceFlags.SAMPLED:
        return None  # unsampled, in a form the fast test leaves to this one
    parent = _remote(fields, event.tracestate) if fields is not None else None
    name, base = site.for_topic(msg.topic)
    # Only what the conventions require and what finds the event: the SDK
    # validates every attribute, about 1.5 us each here.
    attributes = {
        **base,
        MESSAGING_MESSAGE_ID: event.id,
        MESSAGING_PARTITION: str(msg.partition),
        SLUICE_TENANT: event.tenant,
        SLUICE_SESSION: event.session,
    }
    seeds = _state.seeds
    seeds.trace = trace_seed(event) if parent is None else None
    seeds.span = f"{event.id}\x1f{site.step}"
    try:
        span = tracer_.start_span(
            name,
            _parent(parent) if parent is not None else _NO_PARENT,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
    finally:
        seeds.trace = seeds.span = None
    return Hop(span, restamp(event, span.get_span_context()))
