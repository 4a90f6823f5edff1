"""Shared pieces for tests that run the reference pipeline on real brokers and Postgres."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sluicegate.pipeline import build_steps
from sluicegate.runtime import make_transport, run_steps
from sluicegate.settings import Settings, TransportName
from sluicegate.sinks.db import connect
from sluicegate.sinks.migrate import migrate
from sluicegate.sinks.queries import StoredResult, count_results, fetch_results
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.transport import OutMessage
from tests.services import new_prefix


def settings_for(
    kind: TransportName,
    *,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    prefix: str,
    partitions: int = 4,
) -> Settings:
    """Settings for one test: its own topic prefix and its own Postgres schema."""
    return Settings(
        transport=kind,
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        topic_prefix=prefix,
        db_schema=f"s_{prefix}",
        partitions=partitions,
    )


def env_for(settings: Settings) -> dict[str, str]:
    """The SLUICE_* variables that reproduce ``settings`` in a subprocess."""
    return {
        "SLUICE_TRANSPORT": settings.transport,
        "SLUICE_NATS_URL": settings.resolved_nats_url(),
        "SLUICE_KAFKA_BOOTSTRAP": settings.resolved_kafka_bootstrap(),
        "SLUICE_DATABASE_URL": settings.resolved_database_url(),
        "SLUICE_TOPIC_PREFIX": settings.topic_prefix,
        "SLUICE_DB_SCHEMA": settings.db_schema,
        "SLUICE_PARTITIONS": str(settings.partitions),
    }


async def prepare_database(settings: Settings) -> None:
    await migrate(settings.resolved_database_url(), schema=settings.db_schema)


async def drop_schema(settings: Settings) -> None:
    conn = await connect(settings.resolved_database_url(), schema="public")
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.db_schema}" CASCADE')
    finally:
        await conn.close()


@dataclass(frozen=True)
class Task:
    event: Event
    expect_status: str
    expect_in_answer: str


def calculator_task(i: int, sessions: int, tenant: str = "acme") -> Task:
    a, b = 17 + i % 50, 3 + i % 7
    event = Event(
        source="tests",
        type="task.submitted",
        tenant=tenant,
        session=f"sess-{i % sessions}",
        data={"prompt": f"what is {a} * {b}"},
    )
    return Task(event, "completed", f"{a} * {b} = {a * b}")


SEARCHES = [
    ("search for hash chained audit log", "Hash-chained audit log"),
    ("search for dead letter queue", "Dead-letter queue"),
    ("search for murmur2 partitioning", "Partitioning with murmur2"),
]


def search_task(i: int, sessions: int, tenant: str = "acme") -> Task:
    prompt, title = SEARCHES[i % len(SEARCHES)]
    event = Event(
        source="tests",
        type="task.submitted",
        tenant=tenant,
        session=f"sess-{i % sessions}",
        data={"prompt": prompt},
    )
    return Task(event, "completed", title)


def mixed_tasks(n: int, *, sessions: int = 20) -> list[Task]:
    return [calculator_task(i, sessions) if i % 3 else search_task(i, sessions) for i in range(n)]


async def publish_events(settings: Settings, events: Sequence[Event], *, chunk: int = 1000) -> None:
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        for start in range(0, len(events), chunk):
            await transport.publish_batch(
                [
                    OutMessage("tasks", encode(e), key=e.key, headers=headers_for(e))
                    for e in events[start : start + chunk]
                ]
            )
    finally:
        await transport.close()


async def publish_raw(settings: Settings, bodies: Sequence[bytes], key: bytes = b"poison") -> None:
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        await transport.publish_batch([OutMessage("tasks", b, key=key) for b in bodies])
    finally:
        await transport.close()


async def results_count(settings: Settings) -> int:
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        return await count_results(conn)
    finally:
        await conn.close()


async def wait_for_results(settings: Settings, n: int, *, timeout_s: float) -> int:
    """Poll the results table until it holds ``n`` rows; returns the count reached."""
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        count = await results_count(settings)
        if count >= n:
            return count
        await asyncio.sleep(0.25)
    return count


async def all_results(settings: Settings) -> list[StoredResult]:
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        return await fetch_results(conn)
    finally:
        await conn.close()


async def scalar_rows(settings: Settings, query: str) -> list[tuple[object, ...]]:
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        cur = await conn.execute(query)
        return list(await cur.fetchall())
    finally:
        await conn.close()


def unique_prefix() -> str:
    return new_prefix()


@asynccontextmanager
async def running_pipeline(settings: Settings, run: Any = run_steps) -> AsyncIterator[None]:
    """The reference pipeline in this process, stopped (drained) on exit.

    ``run`` is the engine's runner: ``run_steps`` (native) or ``run_faust_steps``.
    """
    stop = asyncio.Event()
    task = asyncio.create_task(run(build_steps(), settings, stop=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        del task
        # The policy gate's engine must be freed on this thread, not in a
        # garbage collection that happens to run in a CLI thread later.
        gc.collect()
