"""``sluice demo``: the whole pipeline on the local stack, with a summary.

Brings up what is not configured (``sluicegate.localstack``), migrates a
schema of its own, runs every step in this process, publishes the sample
tasks (some denied or redacted by policy, one refund held for approval) and
one malformed line, approves the held refund itself (as an operator would
with ``sluice approvals approve``), waits until every accepted task has its
final result, and prints what happened. It
removes its topics and stops the services it started, so nothing is left
running. The exit code says whether everything held.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from sluicegate import localstack
from sluicegate.pipeline import TOPICS, build_steps, task_registry
from sluicegate.runtime import make_transport, run_steps
from sluicegate.samples import DEMO, DEMO_HELD, MALFORMED
from sluicegate.settings import Settings, TransportName
from sluicegate.sinks import approvals
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.queries import StoredResult, fetch_results, verify_chains
from sluicegate.streams.envelope import Event
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import OutMessage

Say = Callable[[str], None]

# Who the demo approves held actions as, in the approvals table and the audit trail.
DEMO_APPROVER = "sluice-demo"


@dataclass
class DemoOutcome:
    transport: str
    published: list[Event]
    results: dict[str, StoredResult]
    decisions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    dead_letters: list[tuple[str, str]] = field(default_factory=list)
    # Held actions the demo approved: (tool, task id).
    approved: list[tuple[str, str]] = field(default_factory=list)
    chains: int = 0
    audit_rows: int = 0
    chains_ok: bool = False
    chain_problem: str | None = None
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return set(self.results) == {e.id for e in self.published}

    @property
    def ok(self) -> bool:
        return self.complete and self.chains_ok and len(self.dead_letters) == 1


async def run_demo(
    settings: Settings, *, transport: TransportName, timeout_s: float = 90.0, say: Say = print
) -> DemoOutcome:
    services = await asyncio.to_thread(localstack.up, settings)
    started = [s for s in services if s.origin == "started"]
    for service in services:
        say(f"  {service.name:<9} {service.origin:<10} {service.url}")
    try:
        return await _run(_demo_settings(settings, transport), timeout_s=timeout_s, say=say)
    finally:
        for service in reversed(started):
            await asyncio.to_thread(service.stop)


def _demo_settings(settings: Settings, transport: TransportName) -> Settings:
    """A topic prefix of its own per run, and a schema of its own, reset each run."""
    run = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            "transport": transport,
            "topic_prefix": f"{settings.topic_prefix}-demo-{run}",
            "db_schema": f"{settings.db_schema}_demo",
        }
    )


async def _run(settings: Settings, *, timeout_s: float, say: Say) -> DemoOutcome:
    started = time.monotonic()
    await _reset_schema(settings)
    await migrate(settings.resolved_database_url(), schema=settings.db_schema)
    say(f"  schema {settings.db_schema} migrated; topics prefixed {settings.topic_prefix}")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_steps(build_steps(), settings, stop=stop))
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(TOPICS)
        publisher = Publisher(transport, registry=task_registry(), source="sluicegate/demo")
        events = [publisher.prepare(sample.as_json()) for sample in (*DEMO, *DEMO_HELD)]
        await publisher.publish(events)
        await transport.publish(OutMessage("tasks", MALFORMED, key=b"malformed"))
        say(f"  published {len(events)} tasks and 1 malformed line on {settings.transport}")
        approved: list[tuple[str, str]] = []
        results = await _wait_for(
            settings, [e.id for e in events], timeout_s, worker, approved=approved, say=say
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(worker), 30)
        await transport.delete_topics(TOPICS)
        await transport.close()
    outcome = DemoOutcome(settings.transport, events, results, approved=approved)
    await _collect_audit(settings, outcome)
    outcome.elapsed_s = time.monotonic() - started
    return outcome


async def _reset_schema(settings: Settings) -> None:
    conn = await connect(settings.resolved_database_url(), schema="public")
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()


async def _wait_for(
    settings: Settings,
    task_ids: Sequence[str],
    timeout_s: float,
    worker: asyncio.Task[Any],
    *,
    approved: list[tuple[str, str]] | None = None,
    say: Say = print,
) -> dict[str, StoredResult]:
    """Poll for the results; with ``approved``, approve whatever the gate holds meanwhile."""
    wanted = set(task_ids)
    deadline = time.monotonic() + timeout_s
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        while True:
            if worker.done():
                worker.result()  # a worker that died raises here, with its error
            held_now = [] if approved is None else await approvals.list_approvals(conn)
            for held in held_now:
                await approvals.decide(
                    conn,
                    held.id,
                    approved=True,
                    by=DEMO_APPROVER,
                    reason="approved by the demo",
                    now=datetime.now(UTC),
                )
                assert approved is not None  # (held_now is empty otherwise)
                approved.append((held.tool, held.task_id))
                say(f"  approved held {held.tool} {orjson.dumps(held.args).decode()} ({held.id})")
            found = {r.task_id: r for r in await fetch_results(conn) if r.task_id in wanted}
            if len(found) == len(wanted) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def _collect_audit(settings: Settings, outcome: DemoOutcome) -> None:
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        cur = await conn.execute(
            "SELECT decision, reasons FROM audit_log WHERE kind = 'decision' AND step = 'gate'"
        )
        for decision, reasons in await cur.fetchall():
            outcome.decisions[str(decision)] += 1
            for reason in reasons or []:
                outcome.reasons[str(reason)] += 1
        cur = await conn.execute(
            "SELECT step, reasons FROM audit_log WHERE kind = 'dead_letter' ORDER BY time"
        )
        outcome.dead_letters = [(str(s), ", ".join(r or [])) for s, r in await cur.fetchall()]
        report = await verify_chains(conn)
        outcome.chains, outcome.audit_rows = report.chains, report.rows
        outcome.chains_ok = report.ok
        outcome.chain_problem = None if report.ok else str(report.first_break)
    finally:
        await conn.close()
