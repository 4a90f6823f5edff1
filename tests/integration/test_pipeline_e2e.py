"""The reference pipeline end to end on real NATS / Kafka-protocol brokers and Postgres."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from sluicegate.pipeline import build_steps
from sluicegate.runtime import make_transport, run_steps
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import H_DLQ_REASON, RunnerConfig
from sluicegate.streams.transport import Message
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    mixed_tasks,
    prepare_database,
    publish_events,
    publish_raw,
    scalar_rows,
    settings_for,
    wait_for_results,
)

pytestmark = pytest.mark.integration


async def read_topic(settings, topic: str, want: int, *, timeout_s: float = 20.0) -> list[Message]:  # type: ignore[no-untyped-def]
    transport = make_transport(settings)
    await transport.connect()
    try:
        sub = await transport.subscribe([topic], group=None, start="earliest")
        got: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(got) < want:
            got.extend(await sub.fetch(1000, timeout=0.5))
        # Whatever else is there (a duplicate would show up here).
        got.extend(await sub.fetch(1000, timeout=1.0))
        await sub.close()
        return got
    finally:
        await transport.close()


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_tasks_in_results_out_with_poison_dead_lettered(
    kind: str, nats_url: str, kafka_bootstrap: str, database_url: str, prefix: str
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=prefix,
    )
    await prepare_database(settings)
    tasks = mixed_tasks(90)
    stop = asyncio.Event()
    # NATS servers refuse bodies over max_payload (1 MiB by default, headers
    # included) at publish, so the oversized poison is tested under a smaller
    # event limit that both brokers carry.
    config = RunnerConfig(max_event_bytes=256 * 1024)
    worker = asyncio.create_task(run_steps(build_steps(), settings, stop=stop, config=config))
    try:
        unknown = Event(source="t", type="task.unheard_of", tenant="acme", session="p", data={})
        no_data = Event(source="t", type="task.submitted", tenant="acme", session="p", data={})
        bad_schema = Event(
            source="t", type="task.submitted", tenant="acme", session="p", data={"prompt": 5}
        )
        oversized = b'{"id":"' + b"x" * (300 * 1024) + b'"}'
        await publish_raw(
            settings,
            [
                b"{not json",
                orjson.dumps(unknown.model_dump(mode="json")),
                orjson.dumps(no_data.model_dump(mode="json")),
                orjson.dumps(bad_schema.model_dump(mode="json")),
                oversized,
            ],
        )
        await publish_events(settings, [t.event for t in tasks])
        reached = await wait_for_results(settings, len(tasks), timeout_s=90)
        assert reached == len(tasks), f"only {reached} of {len(tasks)} results"
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)

    results = {r.task_id: r for r in await all_results(settings)}
    assert set(results) == {t.event.id for t in tasks}
    for task in tasks:
        result = results[task.event.id]
        assert result.status == task.expect_status, result.answer
        assert task.expect_in_answer in result.answer["text"]

    completed = await read_topic(settings, "results", len(tasks))
    ids = [m.headers["ce_id"] for m in completed]
    assert len(ids) == len(set(ids)) == len(tasks)

    dead = await read_topic(settings, "dlq", 5)
    assert sorted(m.headers[H_DLQ_REASON] for m in dead) == sorted(
        ["invalid_json", "unknown_type", "missing_attribute", "invalid_data", "too_large"]
    )
    rows = await scalar_rows(settings, "SELECT count(*) FROM audit_log WHERE kind='dead_letter'")
    assert rows[0][0] == 5
    await drop_schema(settings)
