"""``sluice bench --mode transport``: publish and consume through each transport and its raw client.

One case is one :class:`~sluicegate.bench.endpoints.Endpoint`: a consumer task
starts, then the producer sends ``n`` stamped messages, and the case ends
when the consumer has all of them (or the time limit passes). Producer and
consumer share this process and its event loop, for our transports and for
the raw clients alike, so their ratio compares like with like.

Two load models:

- max throughput (default): the producer sends batches back to back, each
  stamped when it is built;
- fixed rate (``rate``): open loop, message ``i`` is due at ``t0 + i/rate``
  and is stamped with that intended time; nothing is skipped when acks are
  slow: what falls due during a slow send keeps its due time as its stamp and
  goes out next, so a stall shows as latency of everything scheduled during
  it instead of being skipped.

Figures exclude the warm-up (:func:`~sluicegate.bench.latency.warmup_count`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sluicegate.bench.endpoints import (
    Endpoint,
    RawJetStream,
    RawKafka,
    RawNatsCore,
    TransportEndpoint,
    delete_kafka_topics,
    delete_nats_streams,
)
from sluicegate.bench.latency import (
    CURVE_PERCENTILES,
    STAMP,
    LatencyRecorder,
    Percentiles,
    padding_for,
    warmup_count,
)
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings, TransportName

Progress = Callable[[int], object]

# Sessions the messages are keyed by (they pick the partition).
SESSIONS = 64
KEYS: tuple[bytes, ...] = tuple(f"session-{i}".encode() for i in range(SESSIONS))


@dataclass(frozen=True, slots=True)
class LoadModel:
    """How the producer sends: ``rate`` msgs/s open loop, or as fast as it can (None)."""

    rate: float | None = None
    batch: int = 1000

    @property
    def name(self) -> str:
        return "max_throughput" if self.rate is None else "fixed_rate"


@dataclass(slots=True)
class CaseResult:
    """What one endpoint achieved. Rates are msgs/s after the warm-up."""

    label: str
    messages: int
    size_bytes: int
    received: int = 0
    duplicates: int = 0
    warmup: int = 0
    producer_msgs_per_s: float = 0.0
    consumer_msgs_per_s: float = 0.0
    # Delivered end to end: from the send of the first measured message to the last arrival.
    throughput_msgs_per_s: float = 0.0
    latency: Percentiles = field(default_factory=Percentiles.empty)
    curve: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


@dataclass(slots=True)
class TransportRow:
    """One line of the transport table: our side (if there is one) beside its baseline."""

    key: str  # "nats", "nats_core" or "kafka"
    title: str
    size_bytes: int
    baseline: CaseResult
    measured: CaseResult | None = None

    @property
    def headline(self) -> CaseResult:
        """The figures the row stands for: ours, or the raw client where we have no transport."""
        return self.measured or self.baseline


@dataclass(slots=True)
class _Tally:
    """What the consumer saw, by message index."""

    arrived_ns: list[int]
    stamped_ns: list[int]
    arrivals: list[int] = field(default_factory=list)  # arrival times, in arrival order
    duplicates: int = 0


async def _consume(
    endpoint: Endpoint, n: int, batch: int, tally: _Tally, progress: Progress
) -> None:
    arrived, stamped, unpack = tally.arrived_ns, tally.stamped_ns, STAMP.unpack_from
    received = 0
    while received < n:
        bodies = await endpoint.receive(batch)
        now = time.monotonic_ns()
        fresh = 0
        for body in bodies:
            index, sent = unpack(body)
            if arrived[index]:
                tally.duplicates += 1  # a redelivery: counted once
                continue
            arrived[index] = now
            stamped[index] = sent
            fresh += 1
        if fresh:
            received += fresh
            tally.arrivals.extend([now] * fresh)
            progress(fresh)


async def _produce_max(
    endpoint: Endpoint, n: int, batch: int, padding: bytes
) -> list[tuple[int, int]]:
    """Send back to back; returns (first index, start ns) per batch, then (n, end ns)."""
    pack, marks = STAMP.pack, []
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        now = time.monotonic_ns()
        marks.append((start, now))
        bodies = [pack(i, now) + padding for i in range(start, stop)]
        await endpoint.send(bodies, [KEYS[i % SESSIONS] for i in range(start, stop)])
    marks.append((n, time.monotonic_ns()))
    return marks


async def _produce_at_rate(
    endpoint: Endpoint, n: int, batch: int, padding: bytes, rate: float
) -> list[tuple[int, int]]:
    """Open loop: message i is due at t0 + i/rate and carries that time as its stamp.

    One send at a time: whatever fell due while a send waited for its acks
    goes out in the next one (up to ``batch``), still stamped with the time
    it was due, so the wait counts as latency. Overlapping sends would be
    closer to independent clients, but several concurrent ``publish_batch``
    calls on one KafkaTransport fail with KafkaTimeoutError: aiokafka 0.14's
    ``add_batch`` subtracts the total elapsed time from its timeout on every
    wake-up, so contending waiters run out of time within seconds.
    """
    pack, marks = STAMP.pack, []
    interval_ns = 1e9 / rate
    t0 = time.monotonic_ns()
    sent = 0
    while sent < n:
        now = time.monotonic_ns()
        due = min(n, int((now - t0) / interval_ns) + 1, sent + batch)
        if due <= sent:
            await asyncio.sleep((t0 + sent * interval_ns - now) / 1e9)
            continue
        marks.append((sent, now))
        bodies = [pack(i, t0 + int(i * interval_ns)) + padding for i in range(sent, due)]
        await endpoint.send(bodies, [KEYS[i % SESSIONS] for i in range(sent, due)])
        sent = due
    marks.append((n, time.monotonic_ns()))
    return marks


async def run_case(
    endpoint: Endpoint,
    *,
    messages: int,
    size: int,
    load: LoadModel,
    timeout_s: float,
    progress: Progress = lambda _: None,
) -> CaseResult:
    """Open ``endpoint``, push ``messages`` through it, close it; never raises for a slow broker."""
    n = messages
    result = CaseResult(endpoint.label, n, max(size, STAMP.size), warmup=warmup_count(n))
    padding = padding_for(size)
    tally = _Tally(arrived_ns=[0] * n, stamped_ns=[0] * n)
    started = time.monotonic()
    await endpoint.open()
    try:
        consumer = asyncio.create_task(_consume(endpoint, n, load.batch, tally, progress))
        try:
            if load.rate is None:
                producing = _produce_max(endpoint, n, load.batch, padding)
            else:
                producing = _produce_at_rate(endpoint, n, load.batch, padding, load.rate)
            marks = await asyncio.wait_for(producing, timeout_s)
            left = max(0.1, timeout_s - (time.monotonic() - started))
            await asyncio.wait_for(asyncio.shield(consumer), left)
        except TimeoutError:
            result.error = f"timed out after {timeout_s:g}s"
            marks = []
        except Exception as exc:  # a failing broker is a result of this case, not the run
            result.error = f"{type(exc).__name__}: {exc}"
            marks = []
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    finally:
        result.seconds = time.monotonic() - started
        await endpoint.close()
    _summarise(result, tally, marks)
    return result


def _summarise(result: CaseResult, tally: _Tally, marks: Sequence[tuple[int, int]]) -> None:
    n, w = result.messages, result.warmup
    result.received = len(tally.arrivals)
    result.duplicates = tally.duplicates
    if result.received < n and result.error is None:
        result.error = f"{n - result.received} of {n} messages never arrived"
    measured = [i for i in range(w, n) if tally.arrived_ns[i]]
    recorder = LatencyRecorder()
    recorder.record_many_ns(tally.arrived_ns[i] - tally.stamped_ns[i] for i in measured)
    result.latency = recorder.percentiles()
    result.curve = recorder.curve_ms(CURVE_PERCENTILES)
    # Producer: from the first batch that holds no warm-up message to the last ack.
    if marks:
        after = [(i, t) for i, t in marks[:-1] if i >= w] or [marks[0]]
        first_index, first_ns = after[0]
        result.producer_msgs_per_s = _rate(n - first_index, marks[-1][1] - first_ns)
    arrivals = tally.arrivals
    if len(arrivals) > w + 1:
        result.consumer_msgs_per_s = _rate(len(arrivals) - 1 - w, arrivals[-1] - arrivals[w])
    if measured:
        first_sent = min(tally.stamped_ns[i] for i in measured)
        last_arrival = max(tally.arrived_ns[i] for i in measured)
        result.throughput_msgs_per_s = _rate(len(measured), last_arrival - first_sent)


def _rate(count: int, elapsed_ns: int) -> float:
    return count / (elapsed_ns / 1e9) if elapsed_ns > 0 and count > 0 else 0.0


# -- the cases of each transport --------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowPlan:
    """How to build one row's endpoints (fresh ones per size)."""

    key: str
    title: str
    baseline: Callable[[str], Endpoint]
    measured: Callable[[str], Endpoint] | None = None


def plans_for(kind: TransportName, settings: Settings) -> list[RowPlan]:
    """The rows ``--transport kind`` stands for (NATS: core and JetStream)."""
    if kind == "nats":
        url = settings.resolved_nats_url()

        def ours(prefix: str) -> Endpoint:
            transport = make_transport(settings.model_copy(update={"topic_prefix": prefix}), kind)
            return TransportEndpoint(
                transport,
                label="NatsTransport",
                cleanup=lambda: _delete_streams(url, prefix),
            )

        return [
            RowPlan("nats_core", "NATS core", lambda p: RawNatsCore(url, prefix=p)),
            RowPlan("nats", "NATS JetStream", lambda p: RawJetStream(url, prefix=p), ours),
        ]
    bootstrap = settings.resolved_kafka_bootstrap()
    partitions = settings.partitions

    def raw(prefix: str) -> Endpoint:
        return RawKafka(
            bootstrap, topic=f"{prefix}.raw", partitions=partitions, group=f"{prefix}.raw"
        )

    def ours_kafka(prefix: str) -> Endpoint:
        transport = make_transport(settings.model_copy(update={"topic_prefix": prefix}), kind)
        return TransportEndpoint(
            transport,
            label="KafkaTransport",
            cleanup=lambda: delete_kafka_topics(bootstrap, [f"{prefix}.bench"]),
        )

    return [RowPlan("kafka", "Kafka", raw, ours_kafka)]


async def _delete_streams(url: str, prefix: str) -> None:
    await delete_nats_streams(url, prefix)


def run_prefix(settings: Settings) -> str:
    """A topic prefix unique to this run (it also names NATS streams and Kafka groups)."""
    return f"{settings.topic_prefix}-bench-{uuid.uuid4().hex[:8]}"


async def run_transport_mode(
    settings: Settings,
    kinds: Sequence[TransportName],
    *,
    messages: int,
    sizes: Sequence[int],
    load: LoadModel,
    timeout_s: float,
    progress: Progress = lambda _: None,
) -> list[TransportRow]:
    """Every row of every selected transport, for each size: baseline first, then ours."""
    prefix = run_prefix(settings)
    rows: list[TransportRow] = []
    for size in sizes:
        for kind in kinds:
            for plan in plans_for(kind, settings):
                case = f"{prefix}-{size}-{plan.key.replace('_', '-')}"
                baseline = await run_case(
                    plan.baseline(f"{case}-raw"),
                    messages=messages,
                    size=size,
                    load=load,
                    timeout_s=timeout_s,
                    progress=progress,
                )
                row = TransportRow(plan.key, plan.title, max(size, STAMP.size), baseline)
                if plan.measured is not None:
                    row.measured = await run_case(
                        plan.measured(case),
                        messages=messages,
                        size=size,
                        load=load,
                        timeout_s=timeout_s,
                        progress=progress,
                    )
                rows.append(row)
    return rows


def cases_per_size(kinds: Sequence[TransportName]) -> int:
    """How many cases (endpoints) one size runs, for the progress bar's total."""
    return sum(3 if kind == "nats" else 2 for kind in kinds)
