"""Step metrics: OpenTelemetry instruments that the runner feeds once per committed batch.

This module owns the process-wide meter switch (off until :func:`configure`;
then the runner's per-batch call returns at once and the SDK is never
imported), the instruments and their names, and the consumer-lag probes.

Every instrument has the attribute ``sluice.step``:

- ``sluice.step.events.in`` (counter): inputs consumed in committed batches,
  processed or dead-lettered;
- ``sluice.step.events.out`` (counter): outputs produced (dead letters not
  included);
- ``sluice.step.dead_letters`` (counter);
- ``sluice.step.duplicates`` (counter): re-delivered or re-produced inputs
  absorbed by id;
- ``sluice.policy.decisions`` (counter, plus ``sluice.policy.decision``):
  decisions the step recorded, by kind (allow, deny, redact);
- ``sluice.step.batch.duration`` (histogram, seconds): fetch-to-commit time of
  a batch;
- ``sluice.step.consumer.lag`` (gauge, plus ``messaging.destination.name`` and
  ``messaging.destination.partition.id``): messages behind the end of the
  partition after the batch, where the transport tells it cheaply (see
  :func:`lag_probe`);
- ``sluice.step.in_flight`` (gauge): inputs fetched and not yet checkpointed;
- ``sluice.step.key_queue.depth`` (gauge): inputs queued on the busiest key
  (tenant, session), the one in process included: what a slow session holds.

Counts come from the committed batch itself (its audit rows and produced
messages), so a batch that is rewound and fetched again is counted once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader

    from sluicegate.streams.step import AuditRecord
    from sluicegate.streams.transport import Message

STEP = "sluice.step"
DECISION = "sluice.policy.decision"
DESTINATION = "messaging.destination.name"
PARTITION = "messaging.destination.partition.id"

# Seconds; the OpenTelemetry default boundaries are meant for milliseconds.
BATCH_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Reads how far a consumer is behind, as of the given (last handled) message.
LagProbe = Callable[["Message"], "int | None"]


class _Instruments:
    __slots__ = (
        "batch_seconds",
        "dead_letters",
        "decisions",
        "duplicates",
        "events_in",
        "events_out",
    )

    def __init__(self, meter: Meter) -> None:
        self.events_in: Counter = meter.create_counter(
            "sluice.step.events.in",
            unit="{event}",
            description="Inputs consumed in committed batches (processed or dead-lettered)",
        )
        self.events_out: Counter = meter.create_counter(
            "sluice.step.events.out", unit="{event}", description="Outputs produced"
        )
        self.dead_letters: Counter = meter.create_counter(
            "sluice.step.dead_letters", unit="{event}", description="Inputs sent to the dlq"
        )
        self.duplicates: Counter = meter.create_counter(
            "sluice.step.duplicates",
            unit="{event}",
            description="Re-delivered or re-produced inputs absorbed by id",
        )
        self.decisions: Counter = meter.create_counter(
            "sluice.policy.decisions", unit="{decision}", description="Policy decisions by kind"
        )
        self.batch_seconds: Histogram = meter.create_histogram(
            "sluice.step.batch.duration",
            unit="s",
            description="Time from fetch to checkpoint commit of one batch",
            explicit_bucket_boundaries_advisory=BATCH_SECONDS_BUCKETS,
        )
        # Observable: the API's synchronous gauge is still experimental, and
        # reading the latest values only at collection costs nothing per batch.
        meter.create_observable_gauge(
            "sluice.step.consumer.lag",
            callbacks=[_observe_lag],
            unit="{message}",
            description="Messages behind the end of the partition after the last batch",
        )
        meter.create_observable_counter(
            "sluice.step.skipped",
            callbacks=[_observe_skipped],
            unit="{event}",
            description="Inputs skipped: at or below the stored offset, or on a stopped partition",
        )
        meter.create_observable_gauge(
            "sluice.step.in_flight",
            callbacks=[_observe_load(0)],
            unit="{event}",
            description="Inputs fetched and not yet checkpointed",
        )
        meter.create_observable_gauge(
            "sluice.step.partitions.stalled",
            callbacks=[_observe_stalled],
            unit="{partition}",
            description="Owned partitions with lag and no progress for SLUICE_STALL_TIMEOUT",
        )
        meter.create_observable_gauge(
            "sluice.step.key_queue.depth",
            callbacks=[_observe_load(1)],
            unit="{event}",
            description="Inputs queued on the busiest key (tenant, session), current one included",
        )


def _observe_lag(options: CallbackOptions) -> Iterator[Observation]:
    from opentelemetry.metrics import Observation

    for (step, destination, partition), lag in list(_state.lags.items()):
        yield Observation(lag, {STEP: step, DESTINATION: destination, PARTITION: partition})


def _observe_skipped(options: CallbackOptions) -> Iterator[Observation]:
    from opentelemetry.metrics import Observation

    totals: dict[str, int] = {}
    for step, read in list(_state.skipped.items()):
        totals[step[0]] = totals.get(step[0], 0) + read()
    for step_name, total in totals.items():
        yield Observation(total, {STEP: step_name})


def watch_skipped(step: str, read: Callable[[], int]) -> Callable[[], None]:
    """Report ``read()`` (a runner's running total of skipped inputs) as ``step``'s.

    Read at collection only, so counting a skip costs the runner nothing;
    returns the function that stops watching (when the runner is done).
    """
    key = (step, id(read))
    _state.skipped[key] = read

    def stop() -> None:
        _state.skipped.pop(key, None)

    return stop


def _observe_load(index: int) -> Callable[[CallbackOptions], Iterator[Observation]]:
    def observe(options: CallbackOptions) -> Iterator[Observation]:
        from opentelemetry.metrics import Observation

        for step, load in list(_state.load.items()):
            yield Observation(load[index], {STEP: step})

    return observe


def _observe_stalled(options: CallbackOptions) -> Iterator[Observation]:
    from opentelemetry.metrics import Observation

    for step, count in list(_state.stalled.items()):
        yield Observation(count, {STEP: step})


class _State:
    __slots__ = ("instruments", "lags", "load", "owned", "provider", "skipped", "stalled")

    def __init__(self) -> None:
        self.instruments: _Instruments | None = None
        self.provider: Any = None
        self.owned = False
        # The latest lag per (step, destination, partition), read at collection.
        self.lags: dict[tuple[str, str, str], int] = {}
        # The latest (in flight, deepest key queue) per step, read at collection.
        self.load: dict[str, tuple[int, int]] = {}
        # Per (step, watcher id): how to read a runner's skipped total.
        self.skipped: dict[tuple[str, int], Callable[[], int]] = {}
        # Stalled partitions per step, as of the runner's last check.
        self.stalled: dict[str, int] = {}


_state = _State()


def enabled() -> bool:
    return _state.instruments is not None


def configure(
    *,
    readers: Sequence[MetricReader] = (),
    endpoint: str | None = None,
    export_interval_s: float = 15.0,
    service_name: str = "sluicegate",
    set_global: bool = False,
    resource_attributes: Mapping[str, str] | None = None,
) -> MeterProvider:
    """Turn metrics on: collected by ``readers`` and/or exported over OTLP/HTTP to ``endpoint``.

    ``set_global`` makes this the global meter provider too (once per
    process), so metrics that steps record with the OpenTelemetry API go the
    same way. A previous configuration is shut down first.
    """
    if not readers and endpoint is None:
        raise ValueError("configure metrics with readers= and/or endpoint=")
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    all_readers = list(readers)
    if endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from sluicegate.streams.tracing import otlp_url

        all_readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=otlp_url(endpoint, "metrics")),
                export_interval_millis=export_interval_s * 1000,
            )
        )
    shutdown()
    attributes = {"service.name": service_name, **(resource_attributes or {})}
    provider = MeterProvider(metric_readers=all_readers, resource=Resource.create(attributes))
    use_provider(provider)
    _state.owned = True
    if set_global:
        otel_metrics.set_meter_provider(provider)
    return provider


def use_provider(provider: Any) -> None:
    """Turn metrics on with a meter provider the host application set up itself."""
    shutdown()
    _state.provider = provider
    _state.owned = False
    _state.instruments = _Instruments(provider.get_meter("sluicegate"))


def shutdown() -> None:
    """Turn metrics off; a provider that :func:`configure` made is flushed and shut down."""
    provider, owned = _state.provider, _state.owned
    _state.instruments, _state.provider, _state.owned = None, None, False
    _state.lags.clear()
    _state.load.clear()
    _state.stalled.clear()
    if provider is not None and owned:
        provider.shutdown()


class StepMetrics:
    """One runner's view of the instruments; :meth:`batch_done` is all the runner calls."""

    __slots__ = ("_attrs", "_duplicates", "_probe", "prefix", "step")

    def __init__(self, step: str, *, prefix: str) -> None:
        self.step = step
        self.prefix = prefix
        self._attrs = {STEP: step}
        self._duplicates = 0  # the runner's duplicate count at the last batch
        self._probe: tuple[object, LagProbe | None] | None = None

    def batch_done(
        self,
        audit: Sequence[tuple[int, AuditRecord]],
        produced: int,
        duplicates: int,
        seconds: float,
        messages: Sequence[Message],
        subscription: object,
    ) -> None:
        """Record one committed batch (``duplicates`` is the runner's running total)."""
        instruments = _state.instruments
        if instruments is None:
            return
        processed = dead = 0
        decisions: dict[str, int] = {}
        for _partition, row in audit:
            kind = row.kind
            if kind == "processed":
                processed += 1
            elif kind == "dead_letter":
                dead += 1
            elif kind == "decision":
                name = row.decision or "unknown"
                decisions[name] = decisions.get(name, 0) + 1
        attrs = self._attrs
        instruments.events_in.add(processed + dead, attrs)
        # Each dead letter is one produced message on the dlq.
        instruments.events_out.add(max(0, produced - dead), attrs)
        if dead:
            instruments.dead_letters.add(dead, attrs)
        new_duplicates, self._duplicates = duplicates - self._duplicates, duplicates
        if new_duplicates > 0:
            instruments.duplicates.add(new_duplicates, attrs)
        for decision, count in decisions.items():
            instruments.decisions.add(count, {STEP: self.step, DECISION: decision})
        instruments.batch_seconds.record(seconds, attrs)
        self._record_lag(messages, subscription)

    def load(self, in_flight: int, deepest_key_queue: int) -> None:
        """Record how many inputs are in flight and how many wait behind the busiest key."""
        if _state.instruments is not None:
            _state.load[self.step] = (in_flight, deepest_key_queue)

    def stalled(self, partitions: int) -> None:
        """Record how many owned partitions are stalled (lag, no progress)."""
        if _state.instruments is not None:
            _state.stalled[self.step] = partitions

    def _record_lag(self, messages: Sequence[Message], subscription: object) -> None:
        if not messages or subscription is None:
            return
        if self._probe is None or self._probe[0] is not subscription:
            self._probe = (subscription, lag_probe(subscription))
        probe = self._probe[1]
        if probe is None:
            return
        last: dict[tuple[str, int], Message] = {}
        for message in messages:  # a partition's messages come in offset order
            last[(message.topic, message.partition)] = message
        lags = _state.lags
        for (topic, partition), message in last.items():
            lag = probe(message)
            if lag is not None:
                lags[(self.step, f"{self.prefix}.{topic}", str(partition))] = lag


# --- consumer lag -------------------------------------------------------------------------


def lag_probe(subscription: object) -> LagProbe | None:
    """How to read consumer lag from ``subscription``, or None where it is not cheap.

    A subscription with a ``lag(message) -> int | None`` method is asked
    directly. For our Kafka and NATS subscriptions, which have no such method
    yet, the probes below read what each client already holds, so a probe
    costs no broker round trip:

    - Kafka: the partition's high-water mark from the last fetch response
      (aiokafka's ``highwater``) minus the next offset;
    - NATS: the pending count the server writes into every delivered
      message's ack subject (messages of the consumer not yet delivered).

    They reach into the subscriptions' attributes; that belongs in the
    transports as a ``lag`` method, and these probes go once it is there.
    """
    own = getattr(subscription, "lag", None)
    if callable(own):
        probe: LagProbe = own
        return probe
    kafka = sys.modules.get("sluicegate.streams.transports.kafka")
    if kafka is not None and isinstance(subscription, kafka.KafkaSubscription):
        return _kafka_probe(subscription)
    nats = sys.modules.get("sluicegate.streams.transports.nats")
    if nats is not None and isinstance(subscription, nats.NatsSubscription):
        return nats_pending
    return None


def _kafka_probe(subscription: object) -> LagProbe | None:
    highwater = getattr(getattr(subscription, "_consumer", None), "highwater", None)
    kafka_name = getattr(getattr(subscription, "_names", None), "kafka", None)
    if not callable(highwater) or not callable(kafka_name):
        return None
    from aiokafka.structs import TopicPartition as KafkaTopicPartition

    def probe(message: Message) -> int | None:
        high = highwater(KafkaTopicPartition(kafka_name(message.topic), message.partition))
        return None if high is None else max(0, int(high) - message.offset - 1)

    return probe


# Ack subjects (see streams.transports.nats): the v1 form
#   $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>   (9 tokens)
# and the v2 form, with <domain>.<account hash> after ACK and tokens appended
# at the end (12 or more), put the pending count at index 8 or 10.
_NATS_V1_TOKENS = 9
_NATS_V2_MIN_TOKENS = 11


def nats_pending(message: Message) -> int | None:
    """The pending count in a NATS message's ack subject (the transport's handle)."""
    handle = message.handle
    if not isinstance(handle, tuple) or len(handle) != 2 or not isinstance(handle[1], str):
        return None
    tokens = handle[1].split(".")
    if len(tokens) == _NATS_V1_TOKENS:
        index = 8
    elif len(tokens) >= _NATS_V2_MIN_TOKENS:
        index = 10
    else:
        return None
    try:
        return int(tokens[index])
    except ValueError:
        return None
