"""The Faust engine against the native Kafka runtime: same input, same trail, same outputs.

The reference pipeline (``sluicegate.pipeline.build_steps``) runs once on each
engine, against the Kafka-protocol broker and Postgres, over the very same
events (same ids): the demo's samples and generated tasks that exercise every
policy rule (allow, deny, redact, budgets, rate limits), plus poison messages.
Then the two schemas and topic sets are compared:

- the results table, row for row;
- the audit trail as a multiset of rows, ignoring what differs by nature:
  times, sequence numbers and chain hashes, and the gate's performance fields
  (``eval_us``, and ``cached``, which depends on how batches interleave
  partitions in the evaluation cache);
- the ``results`` and ``dlq`` topics, message for message (partition, body,
  headers);
- the keyed state of every step; the responder's list of finished tasks is
  compared as a set, since it records the order in which outcomes arrived
  from two topics, which neither engine fixes;
- and the Faust engine's state tables (in memory and as their changelog
  topics) against Postgres's ``step_state``.

A second test hands a stream from the native engine to the Faust engine:
Faust's consumer group has no offsets of its own, so only Postgres can tell
it where to resume.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import pytest

from sluicegate import samples
from sluicegate.agents.responder import DONE_KEY
from sluicegate.faust_engine import run_faust_steps
from sluicegate.faust_engine.state import MirroredStore
from sluicegate.pipeline import build_steps
from sluicegate.runtime import make_transport, run_steps
from sluicegate.settings import Settings
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import H_DLQ_SOURCE, StepRunner
from sluicegate.streams.transport import Message
from sluicegate.streams.transports.kafka import KafkaTransport
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    prepare_database,
    publish_events,
    publish_raw,
    scalar_rows,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

GENERATED = 600
POISON = [b"{not json", samples.MALFORMED, b"[1, 2, 3]"]
# Fields of an audit row that may differ between two correct runs.
AUDIT_COLUMNS = (
    "chain_step, chain_partition, tenant, session, event_id, causation_id, step, "
    "event_type, kind, decision, reasons, policy_version, trace_id, detail"
)
PERFORMANCE_DETAIL = ("eval_us", "cached")

Engine = Callable[[Settings, asyncio.Event], Awaitable[list[StepRunner]]]


def native(settings: Settings, stop: asyncio.Event) -> Awaitable[list[StepRunner]]:
    return run_steps(build_steps(), settings, stop=stop)


def faust(settings: Settings, stop: asyncio.Event) -> Awaitable[list[StepRunner]]:
    return run_faust_steps(build_steps(), settings, stop=stop)


def task_events() -> list[Event]:
    """The demo's samples and generated tasks, as events with fixed ids."""
    raw = [s.as_json() for s in samples.DEMO]
    raw += list(samples.generate(GENERATED, sessions=60))
    return [
        Event(
            source="tests", type=r["type"], tenant=r["tenant"], session=r["session"], data=r["data"]
        )
        for r in raw
    ]


def kafka(bootstrap: str, database_url: str) -> Settings:
    return settings_for(
        "kafka",
        nats_url="nats://127.0.0.1:4222",  # unused: both engines run on Kafka here
        kafka_bootstrap=bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
    )


async def run_until(engine: Engine, settings: Settings, results: int) -> list[StepRunner]:
    stop = asyncio.Event()
    worker = asyncio.create_task(engine(settings, stop))
    try:
        reached = await wait_for_results(settings, results, timeout_s=180)
        assert reached == results, f"only {reached} of {results} results"
    finally:
        stop.set()
        runners = await asyncio.wait_for(worker, 60)
    # Collect the finished run's cycles here, on the main thread: the policy
    # gate's compiled Rego VM (regorus) must be dropped on the thread that
    # made it, and a later Faust run's consumer thread could otherwise be the
    # one that triggers the collection (harmless, but it warns).
    gc.collect()
    return runners


async def read_topic(settings: Settings, topic: str, want: int) -> list[Message]:
    """Everything on ``topic`` (as an observer), waiting for at least ``want`` messages."""
    transport = make_transport(settings)
    await transport.connect()
    try:
        sub = await transport.subscribe([topic], group=None, start="earliest")
        got: list[Message] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(got) < want:
            got.extend(await sub.fetch(5000, timeout=0.5))
        got.extend(await sub.fetch(5000, timeout=1.0))
        await sub.close()
        return got
    finally:
        await transport.close()


async def audit_trail(settings: Settings) -> Counter[tuple[Any, ...]]:
    rows = await scalar_rows(settings, f"SELECT {AUDIT_COLUMNS} FROM audit_log")
    trail: Counter[tuple[Any, ...]] = Counter()
    for *columns, detail in rows:
        kept = {k: v for k, v in dict(detail).items() if k not in PERFORMANCE_DETAIL}
        # jsonb values (reasons, detail) as canonical text, so that rows hash.
        columns[10] = orjson.dumps(columns[10])
        trail[(*columns, orjson.dumps(kept, option=orjson.OPT_SORT_KEYS))] += 1
    return trail


async def states(settings: Settings) -> dict[tuple[str, str, str], Any]:
    rows = await scalar_rows(settings, "SELECT step, tenant, session, state FROM step_state")
    found: dict[tuple[str, str, str], Any] = {}
    for step, tenant, session, state in rows:
        if step == "responder" and isinstance(state.get(DONE_KEY), list):
            # Finished tasks in arrival order: a set is what both engines agree on.
            state = {**state, DONE_KEY: sorted(state[DONE_KEY])}
        found[(str(step), str(tenant), str(session))] = state
    return found


def wire(messages: Sequence[Message]) -> dict[str, tuple[int, bytes, dict[str, str]]]:
    """Messages by event id (dead letters without one: by their source position)."""
    out: dict[str, tuple[int, bytes, dict[str, str]]] = {}
    for m in messages:
        ident = m.headers.get("ce_id") or m.headers[H_DLQ_SOURCE]
        assert ident not in out, f"{ident} twice on {m.topic}"
        out[ident] = (m.partition, m.value, dict(m.headers))
    return out


async def changelog(settings: Settings, step: str) -> dict[tuple[str, str], bytes | None]:
    """The latest value per key of a Faust state table's changelog topic."""
    topic = f"faust-{step}-state-changelog"  # <prefix>.faust-<step>-state-changelog
    observer = KafkaTransport(
        settings.resolved_kafka_bootstrap(),
        prefix=settings.topic_prefix,
        partitions=settings.partitions,
    )
    await observer.connect()
    latest: dict[tuple[str, str], bytes | None] = {}
    try:
        sub = await observer.subscribe([topic], group=None, start="earliest")
        while batch := await sub.fetch(5000, timeout=1.0):
            for m in batch:
                assert m.key is not None
                tenant, session = orjson.loads(m.key)
                latest[(tenant, session)] = m.value or None
        await sub.close()
    finally:
        await observer.close()
    return latest


async def test_faust_and_native_engines_leave_the_same_trail(
    kafka_bootstrap: str, database_url: str
) -> None:
    events = task_events()
    by_engine = {"native": kafka(kafka_bootstrap, database_url)}
    by_engine["faust"] = kafka(kafka_bootstrap, database_url)
    for settings in by_engine.values():
        await prepare_database(settings)
        await publish_raw(settings, POISON)
        await publish_events(settings, events)

    await run_until(native, by_engine["native"], len(events))
    runners = await run_until(faust, by_engine["faust"], len(events))
    n, f = by_engine["native"], by_engine["faust"]

    native_results = {r.task_id: r for r in await all_results(n)}
    faust_results = {r.task_id: r for r in await all_results(f)}
    assert set(faust_results) == set(native_results) == {e.id for e in events}
    for task_id, ours in faust_results.items():
        theirs = native_results[task_id]
        assert (ours.tenant, ours.session, ours.status, ours.answer, ours.trace_id, ours.step) == (
            theirs.tenant,
            theirs.session,
            theirs.status,
            theirs.answer,
            theirs.trace_id,
            theirs.step,
        ), task_id
    statuses = Counter(r.status for r in faust_results.values())
    assert {"completed", "denied", "partial"} <= set(statuses), statuses

    native_trail, faust_trail = await audit_trail(n), await audit_trail(f)
    assert faust_trail == native_trail, (
        f"only native: {list((native_trail - faust_trail).items())[:3]}; "
        f"only faust: {list((faust_trail - native_trail).items())[:3]}"
    )
    decisions = Counter(row[9] for row in faust_trail.elements() if row[8] == "decision")
    assert {"allow", "deny", "redact"} <= set(decisions), decisions
    dead = sum(c for row, c in faust_trail.items() if row[8] == "dead_letter")
    assert dead == len(POISON)

    for topic, want in (("results", len(events)), ("dlq", len(POISON))):
        ours = wire(await read_topic(f, topic, want))
        theirs = wire(await read_topic(n, topic, want))
        assert len(ours) == want
        assert ours == theirs, topic

    assert await states(f) == await states(n)

    # The Faust engine's tables mirror Postgres, in memory and in their changelogs.
    stored = await scalar_rows(f, "SELECT step, tenant, session, state FROM step_state")
    truth = {
        (str(s), str(t), str(k)): orjson.dumps(v, option=orjson.OPT_SORT_KEYS)
        for s, t, k, v in stored
    }
    for runner in runners:
        store = runner.store
        assert isinstance(store, MirroredStore)
        step = runner.processor.name
        mine = {(t, k): blob for (s, t, k), blob in truth.items() if s == step}
        assert {k: store.table.table.data.get(k) for k in mine} == mine, step
        logged = await changelog(f, step)
        assert {k: logged.get(k) for k in mine} == mine, f"{step} changelog"
        assert store.table.stats.written >= len(mine)

    print(
        f"parity: {len(events)} tasks, results {dict(statuses)}, decisions {dict(decisions)}, "
        f"{sum(faust_trail.values())} audit rows, {dead} dead letters, {len(truth)} states"
    )
    for settings in by_engine.values():
        await drop_schema(settings)


async def test_a_stream_begun_on_native_is_continued_by_faust_from_postgres_offsets(
    kafka_bootstrap: str, database_url: str
) -> None:
    settings = kafka(kafka_bootstrap, database_url)
    await prepare_database(settings)
    events = task_events()[:300]
    first, second = events[:100], events[100:]
    await publish_events(settings, first)
    await run_until(native, settings, len(first))
    await publish_events(settings, second)

    runners = await run_until(faust, settings, len(events))
    assert {r.task_id for r in await all_results(settings)} == {e.id for e in events}
    duplicated = await scalar_rows(
        settings,
        "SELECT step, event_id, kind FROM audit_log GROUP BY 1, 2, 3 HAVING count(*) > 1",
    )
    assert duplicated == []
    # Faust's group had no offsets, and would have started at the beginning;
    # the bridge committed Postgres's before Faust's first seek, so no input
    # the native engine had done came back, on any step.
    for runner in runners:
        assert runner.stats.skipped == 0, runner.processor.name
        assert runner.stats.duplicates == 0, runner.processor.name
    intake = next(r for r in runners if r.processor.name == "intake")
    assert intake.stats.processed == len(second)
    print(f"handover: native did {len(first)} tasks, Faust the next {len(second)}")
    await drop_schema(settings)


async def test_faust_and_native_steps_feed_each_other_in_one_pipeline(
    kafka_bootstrap: str, database_url: str
) -> None:
    """Intake, context and planner on Faust; gate, tools and responder native; and back."""
    settings = kafka(kafka_bootstrap, database_url)
    await prepare_database(settings)
    events = task_events()[:200]
    await publish_events(settings, events)
    steps = build_steps()
    names = [s.name for s in steps]
    on_faust = {"intake", "context", "planner"}
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(
            run_faust_steps(
                [s for s in steps if s.name in on_faust], settings, stop=stop, all_steps=names
            )
        ),
        asyncio.create_task(
            run_steps([s for s in steps if s.name not in on_faust], settings, stop=stop)
        ),
    ]
    try:
        assert await wait_for_results(settings, len(events), timeout_s=180) == len(events)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 60)
    gc.collect()  # as in run_until
    assert {r.task_id for r in await all_results(settings)} == {e.id for e in events}
    rows = await scalar_rows(
        settings,
        "SELECT step, count(*), count(DISTINCT event_id), sum((detail->>'outputs')::int) "
        "FROM audit_log WHERE kind = 'processed' GROUP BY 1",
    )
    processed = {str(step): int(n) for step, n, _, _ in rows}  # type: ignore[call-overload]
    outputs = {str(step): int(out) for step, _, _, out in rows}  # type: ignore[call-overload]
    assert all(n == distinct for _, n, distinct, _ in rows), rows
    assert processed["intake"] == processed["context"] == processed["planner"] == len(events)
    # Each step read every event the one before it wrote, across the engine boundary.
    decisions = dict(
        await scalar_rows(
            settings,
            "SELECT decision, count(*) FROM audit_log WHERE kind = 'decision' GROUP BY 1",
        )
    )
    assert processed["gate"] == outputs["planner"] == sum(decisions.values())
    assert processed["tools"] == decisions.get("allow", 0) + decisions.get("redact", 0)
    assert processed["responder"] == outputs["tools"] + decisions.get("deny", 0)
    await drop_schema(settings)


async def scalar_count(settings: Settings, query: str) -> int:
    rows = await scalar_rows(settings, query)
    return int(rows[0][0])  # type: ignore[call-overload]
