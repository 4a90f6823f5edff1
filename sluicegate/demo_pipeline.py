"""``sluice demo --pipeline MODULE:ATTR``: a user's pipeline on the local stack, with its samples.

What ``sluice demo`` does for the reference pipeline (``sluicegate.demo``),
for any :class:`~sluicegate.Pipeline` that carries ``samples``: bring up what
is not configured, migrate a schema of its own, run every step in this
process, publish the samples to their topics (validated against the
pipeline's upstream schemas), wait until each sample has its result row
(``ctx.result`` with the sample's event id as task id) and verify the audit
chains. Topics are removed and started services stopped at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from sluicegate import localstack
from sluicegate.agents.graph import Pipeline
from sluicegate.demo import Say, _demo_settings, _reset_schema, _wait_for
from sluicegate.runtime import make_transport, run_steps
from sluicegate.settings import Settings, TransportName
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.queries import StoredResult, verify_chains
from sluicegate.streams.codec import DecodeError
from sluicegate.streams.dead_letters import DLQ_TOPIC
from sluicegate.streams.envelope import Event
from sluicegate.streams.errors import SluiceError
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import Transport


class SampleError(SluiceError, ValueError):
    """A pipeline's sample does not fit its topic's schema (or there are none)."""


@dataclass
class PipelineDemoOutcome:
    published: list[tuple[str, Event]]
    results: dict[str, StoredResult]
    dead_letters: Counter[str] = field(default_factory=Counter)
    chains_ok: bool = False
    chain_problem: str | None = None
    audit_rows: int = 0
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return len(self.results) == len(self.published) and self.chains_ok


def prepare_samples(pipeline: Pipeline, transport: Transport) -> list[tuple[str, Event]]:
    """Each sample as the event ``sluice publish`` would make of it, with its topic."""
    if not any(pipeline.samples.values()):
        raise SampleError(
            f"pipeline {pipeline.name!r} has no samples to publish: give it "
            "Pipeline(..., samples={topic: [event, ...]})"
        )
    events: list[tuple[str, Event]] = []
    for topic, samples in pipeline.samples.items():
        publisher = _publisher(pipeline, topic, transport)
        for index, sample in enumerate(samples):
            try:
                events.append((topic, publisher.prepare(sample)))
            except DecodeError as exc:
                raise SampleError(f"sample {index} of {topic}: {exc}") from None
    return events


def _publisher(pipeline: Pipeline, topic: str, transport: Transport) -> Publisher:
    return Publisher(
        transport,
        topic=topic,
        source=f"sluicegate/demo/{pipeline.name}",
        default_type=pipeline.default_type(topic),
        registry=pipeline.registry(topic),
    )


async def run_pipeline_demo(
    settings: Settings,
    pipeline: Pipeline,
    *,
    transport: TransportName,
    timeout_s: float = 90.0,
    say: Say = print,
) -> PipelineDemoOutcome:
    # Before anything starts: a sample that does not fit its schema is a usage error.
    prepare_samples(pipeline, make_transport(settings, transport))
    services = await asyncio.to_thread(localstack.up, settings)
    started = [s for s in services if s.origin == "started"]
    for service in services:
        say(f"  {service.name:<9} {service.origin:<10} {service.url}")
    try:
        return await _run(
            _demo_settings(settings, transport), pipeline, timeout_s=timeout_s, say=say
        )
    finally:
        for service in reversed(started):
            await asyncio.to_thread(service.stop)


async def _run(
    settings: Settings,
    pipeline: Pipeline,
    *,
    timeout_s: float,
    say: Say,
) -> PipelineDemoOutcome:
    began = time.monotonic()
    await _reset_schema(settings)
    await migrate(settings.resolved_database_url(), schema=settings.db_schema)
    say(f"  schema {settings.db_schema} migrated; topics prefixed {settings.topic_prefix}")
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_steps(pipeline.steps, settings, stop=stop, pipeline=pipeline.name)
    )
    transport = make_transport(settings)
    events = prepare_samples(pipeline, transport)
    await transport.connect()
    topics = [*pipeline.topics, DLQ_TOPIC]
    try:
        await transport.ensure_topics(topics)
        for topic in dict.fromkeys(t for t, _ in events):
            await _publisher(pipeline, topic, transport).publish(
                [e for t, e in events if t == topic]
            )
        say(f"  published {len(events)} samples of {pipeline.name} on {settings.transport}")
        results = await _wait_for(settings, [e.id for _, e in events], timeout_s, worker)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(worker), 30)
        await transport.delete_topics(topics)
        await transport.close()
    outcome = PipelineDemoOutcome(events, results)
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        cur = await conn.execute(
            "SELECT step, reasons FROM audit_log WHERE kind = 'dead_letter' ORDER BY time"
        )
        for step, reasons in await cur.fetchall():
            outcome.dead_letters[f"{step}: {', '.join(reasons or [])}"] += 1
        report = await verify_chains(conn)
        outcome.audit_rows, outcome.chains_ok = report.rows, report.ok
        outcome.chain_problem = None if report.ok else str(report.first_break)
    finally:
        await conn.close()
    outcome.elapsed_s = time.monotonic() - began
    return outcome
