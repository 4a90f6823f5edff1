"""What Postgres and the broker say about each step's input partitions, in one view.

``sluice status`` and ``sluice offsets show|reset`` read the same things:

- the *current log* of each input topic (``Transport.log_ids``) and where
  each of its partitions ends (``Transport.log_ends``);
- the stored progress of each (step, log, partition) in ``step_offsets``
  (``sinks.progress``): watermark, ownership epoch, last claimer;
- who holds each partition now. NATS: the lease holders and live workers of
  the ownership bucket (``NatsTransport.ownership()``; a transport without it
  leaves ownership unknown). Kafka: the members of the step's consumer group
  ``<prefix>.<step>`` (``sluicegate.kafka_groups``), and which of them is
  assigned the partition when the broker says (Tansu does not: then the
  group's being live is all that is known).

A step reading several topics (the responder reads ``tool.results`` and
``actions.denied``) has one entry per (topic, partition): each topic is its
own log with its own watermark, so they are never summed into one offset.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sluicegate.kafka_groups import GroupView, describe_groups
from sluicegate.runtime import make_transport
from sluicegate.service_security import kafka_security_options
from sluicegate.settings import Settings
from sluicegate.sinks.db import connect
from sluicegate.sinks.progress import LogKind, StoredOffset, classify, step_offsets
from sluicegate.streams.transport import TopicPartition, Transport

log = logging.getLogger("sluicegate.status")

# Where a partition's owner comes from: the NATS lease holder, the Kafka
# group member assigned it, or the last worker that claimed it in Postgres.
OwnerSource = Literal["lease", "assignment", "last_claim"]
# How liveness is known: NATS leases, Kafka groups, or not at all (a NATS
# transport without the ownership view).
OwnershipKind = Literal["leases", "groups", "unknown"]

# The end a transport reports for an empty partition (Transport.log_ends).
_EMPTY_END = {"kafka": -1, "nats": 0}
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def group_token(step: str) -> str:
    """The step's group as it appears in NATS ownership keys (``key_token``)."""
    try:
        from sluicegate.streams.transports.nats.names import key_token
    except ImportError:  # a NATS transport from before ownership by leases
        return _TOKEN_UNSAFE.sub("_", step) or "_"
    return key_token(step)


def kafka_group(prefix: str, step: str) -> str:
    """The consumer group of a step's workers (streams/transports/kafka/names.py)."""
    return f"{prefix}.{step}"


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What these commands need of a step: its name and the topics it reads."""

    name: str
    inputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Holder:
    """A live worker holding a partition.

    ``exact`` is False when only the Kafka group's being live is known (the
    broker does not report assignments); ``worker`` then names its members.
    """

    worker: str
    source: Literal["lease", "assignment", "group"]
    exact: bool = True
    group: str | None = None  # the Kafka consumer group


@dataclass(frozen=True, slots=True)
class Worker:
    """A live worker: its id, the steps it serves, and what its transport tells about it."""

    worker: str
    steps: tuple[str, ...]
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"worker": self.worker, "steps": list(self.steps), **self.detail}


@dataclass(frozen=True, slots=True)
class PartitionState:
    """One input partition of one step, on its current log."""

    step: str
    topic: str  # the logical topic
    partition: int
    log: str | None  # the current log's identity; None when the topic has no log yet
    stored: StoredOffset | None
    log_end: int | None  # the last offset in the partition; None when not known
    empty_end: int  # what log_end is for an empty partition on this transport
    holder: Holder | None
    # Whether the transport tells who holds partitions (False: a NATS
    # transport without the ownership view).
    liveness_known: bool = True

    @property
    def held(self) -> bool | None:
        """A live worker holds the partition (None: cannot tell)."""
        if self.holder is not None:
            return True
        return False if self.liveness_known else None

    @property
    def offset(self) -> int | None:
        """The watermark: the last processed offset (None: nothing processed)."""
        return None if self.stored is None else self.stored.last_offset

    @property
    def epoch(self) -> int:
        return 0 if self.stored is None else self.stored.epoch

    @property
    def stopped(self) -> bool:
        """The stored offset is beyond the end of the log: workers leave the partition alone."""
        return self.offset is not None and self.log_end is not None and self.offset > self.log_end

    @property
    def lag(self) -> int | None:
        """Log end minus watermark (0 for a stopped partition); None when there is no log."""
        if self.log is None or self.log_end is None:
            return None
        done = self.offset if self.offset is not None else self.empty_end
        return max(0, self.log_end - done)

    @property
    def owner(self) -> str | None:
        if self.holder is not None and self.holder.exact:
            return self.holder.worker
        return None if self.stored is None else self.stored.owner

    @property
    def owner_source(self) -> OwnerSource | None:
        if self.holder is not None and self.holder.exact:
            return "lease" if self.holder.source == "lease" else "assignment"
        return None if self.owner is None else "last_claim"

    @property
    def label(self) -> str:
        return f"{self.topic}[{self.partition}]"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "partition": self.partition,
            "topic": self.topic,
            "owner": self.owner,
            "owner_source": self.owner_source,
            "held": self.held,
            "offset": self.offset,
            "lag": self.lag,
            "log": self.log,
            "log_end": self.log_end,
            "epoch": self.epoch,
            "stopped": self.stopped,
            "updated_at": None if self.stored is None else self.stored.updated_at.isoformat(),
        }
        if self.holder is not None and not self.holder.exact:
            doc["group_members"] = self.holder.worker
        if self.stopped:
            assert self.offset is not None and self.log_end is not None
            doc["beyond_end"] = self.offset - self.log_end
        return doc


@dataclass(slots=True)
class ProgressView:
    """Everything ``status`` and ``offsets`` print, gathered once."""

    transport: str
    prefix: str
    ownership: OwnershipKind
    workers: list[Worker]
    partitions: list[PartitionState]
    # Rows of the steps kept for other logs (older incarnations, the other
    # transport, legacy rows), with how they relate to the current logs.
    other: list[tuple[StoredOffset, LogKind]]

    def of_step(self, step: str) -> list[PartitionState]:
        return [p for p in self.partitions if p.step == step]


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the clients' own error logs off a one-shot command's stderr.

    Failures reach the user once, as the command's one-line error.
    """
    names = ("aiokafka", "nats", "kafka", "sluicegate.streams.transports")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


async def gather(
    settings: Settings,
    steps: Sequence[StepInputs],
    *,
    partitions: Sequence[int] | None = None,
    topics: Sequence[str] | None = None,
) -> ProgressView:
    """Read logs, ends, owners and stored progress of ``steps`` (optionally some partitions).

    Raises ``TransportError`` (a broker) or ``psycopg.Error`` (Postgres).
    """
    wanted = list(range(settings.partitions)) if partitions is None else list(partitions)
    transport = make_transport(settings)
    await transport.connect()
    try:
        inputs = list(dict.fromkeys(t for s in steps for t in s.inputs))
        logs = await transport.log_ids(inputs)
        tps = [TopicPartition(t, p) for t in inputs if t in logs for p in wanted]
        ends = await transport.log_ends(tps) if tps else {}
        ownership, workers, holders = await _owners(transport, settings, steps)
    finally:
        await transport.close()
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    async with conn:
        rows = await step_offsets(
            conn,
            steps=[s.name for s in steps],
            partition=partitions[0] if partitions is not None and len(partitions) == 1 else None,
        )
    stored = {(r.step, r.topic, r.partition): r for r in rows}
    empty_end = _EMPTY_END.get(transport.name, -1)
    states: list[PartitionState] = []
    current: dict[str, list[str]] = {}
    for step in steps:
        current[step.name] = [logs[t] for t in step.inputs if t in logs]
        for topic in step.inputs:
            if topics is not None and topic not in topics:
                continue
            log_id = logs.get(topic)
            for p in wanted:
                tp = TopicPartition(topic, p)
                states.append(
                    PartitionState(
                        step=step.name,
                        topic=topic,
                        partition=p,
                        log=log_id,
                        stored=None if log_id is None else stored.get((step.name, log_id, p)),
                        log_end=ends.get(tp),
                        empty_end=empty_end,
                        holder=holders.get((step.name, _holder_key(transport, tp))),
                        liveness_known=ownership != "unknown",
                    )
                )
    other: list[tuple[StoredOffset, LogKind]] = []
    for r in rows:
        kind = classify(r.topic, current.get(r.step, []))
        if r.partition in wanted and kind != "current":
            other.append((r, kind))
    return ProgressView(
        transport=transport.name,
        prefix=settings.topic_prefix,
        ownership=ownership,
        workers=workers,
        partitions=states,
        other=other,
    )


def _holder_key(transport: Transport, tp: TopicPartition) -> tuple[str, int]:
    """How ``_owners`` keys a partition: a NATS lease covers one partition of every
    topic its group reads; Kafka assigns (Kafka topic name, partition)."""
    if transport.name == "nats":
        return ("*", tp.partition)
    return (kafka_topic(transport.prefix, tp.topic), tp.partition)


async def _owners(
    transport: Transport, settings: Settings, steps: Sequence[StepInputs]
) -> tuple[OwnershipKind, list[Worker], dict[tuple[str, tuple[str, int]], Holder]]:
    if transport.name == "nats":
        return await _nats_owners(transport, steps)
    return await _kafka_owners(settings, steps)


async def _nats_owners(
    transport: Transport, steps: Sequence[StepInputs]
) -> tuple[OwnershipKind, list[Worker], dict[tuple[str, tuple[str, int]], Holder]]:
    ownership = getattr(transport, "ownership", None)
    if not callable(ownership):
        return "unknown", [], {}
    view: Any = await ownership()
    try:
        return "leases", *_read_nats_view(view, steps)
    except (AttributeError, TypeError, ValueError) as exc:
        # An ownership view of another shape than this module knows.
        log.warning("cannot read the NATS ownership view: %r", exc)
        return "unknown", [], {}


def _read_nats_view(
    view: Any, steps: Sequence[StepInputs]
) -> tuple[list[Worker], dict[tuple[str, tuple[str, int]], Holder]]:
    by_token = {group_token(s.name): s.name for s in steps}
    workers = [
        Worker(
            worker=str(w.worker),
            steps=tuple(by_token.get(g, g) for g in w.groups),
            detail={
                "last_heartbeat": w.last_heartbeat.isoformat()
                if isinstance(w.last_heartbeat, datetime)
                else str(w.last_heartbeat),
                "static": bool(w.static),
            },
        )
        for w in view.workers
    ]
    holders: dict[tuple[str, tuple[str, int]], Holder] = {}
    for (group, partition), worker in dict(view.leases).items():
        step = by_token.get(group)
        if step is not None:
            holders[(step, ("*", int(partition)))] = Holder(str(worker), "lease")
    return workers, holders


async def _kafka_owners(
    settings: Settings, steps: Sequence[StepInputs]
) -> tuple[OwnershipKind, list[Worker], dict[tuple[str, tuple[str, int]], Holder]]:
    prefix = settings.topic_prefix
    serves = kafka_groups_of(prefix, steps)
    faust = f"{prefix}.faust."
    groups = await describe_groups(
        settings.resolved_kafka_bootstrap(),
        list(serves),
        listed_prefix=faust,
        security=kafka_security_options(settings),
    )
    by_name = {s.name: s for s in steps}
    for group_id in groups:
        if group_id.startswith(faust) and group_id not in serves:
            names = group_id[len(faust) :].split(".")
            serves[group_id] = [by_name[n] for n in names if n in by_name]
    workers: list[Worker] = []
    holders: dict[tuple[str, tuple[str, int]], Holder] = {}
    for group_id, served in serves.items():
        group = groups.get(group_id, GroupView(group_id, ""))
        if not group.live or not served:
            continue
        inputs = {
            kafka_topic(prefix, t): [s for s in served if t in s.inputs]
            for t in dict.fromkeys(t for s in served for t in s.inputs)
        }
        for member in group.members:
            held = None if member.assignment is None else sorted(member.assignment)
            workers.append(
                Worker(
                    worker=member.name,
                    steps=tuple(s.name for s in served),
                    detail={
                        "group": group_id,
                        "engine": "faust" if group_id.startswith(prefix + ".faust") else "native",
                        "member_id": member.member_id,
                        "host": member.host.lstrip("/") or None,
                        "partitions": None if held is None else [f"{t}[{p}]" for t, p in held],
                    },
                )
            )
            for topic, partition in member.assignment or ():
                for step in inputs.get(topic, ()):
                    holders[(step.name, (topic, partition))] = Holder(
                        member.name, "assignment", group=group_id
                    )
        if not group.assignments_known:
            # A live group assigns every partition of the topics it reads.
            everyone = ", ".join(m.name for m in group.members)
            for topic, readers in inputs.items():
                for step in readers:
                    for p in range(settings.partitions):
                        holders.setdefault(
                            (step.name, (topic, p)),
                            Holder(everyone, "group", exact=False, group=group_id),
                        )
    return "groups", workers, holders


def kafka_groups_of(prefix: str, steps: Sequence[StepInputs]) -> dict[str, list[StepInputs]]:
    """Consumer groups that may hold the steps' partitions, and the steps each serves.

    Native workers: one group per step, ``<prefix>.<step>``. Faust engine
    workers (sluicegate/faust_engine/app.py ``app_id``): ``<prefix>.faust`` for
    all steps, ``<prefix>.faust.<step>.<step>...`` (sorted) for a subset; the
    single-step ones are looked up here, others only where the broker lists
    groups (Kafka does, Tansu does not).
    """
    groups: dict[str, list[StepInputs]] = {kafka_group(prefix, s.name): [s] for s in steps}
    groups[f"{prefix}.faust"] = list(steps)
    for s in steps:
        groups.setdefault(f"{prefix}.faust.{s.name}", [s])
    return groups


def kafka_topic(prefix: str, topic: str) -> str:
    return f"{prefix}.{topic}"
