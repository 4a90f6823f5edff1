"""Progress belongs to one log: switching transport or losing a broker's log loses no task.

What operators do, against real NATS, Kafka and Postgres:
- one database, the pipeline on NATS, then on Kafka, then on NATS again:
  each transport's tasks all complete (before progress identity, Kafka read
  NATS's stream sequences as its offsets and skipped every task);
- a broker that lost its log (every stream or topic deleted and created
  again, as a restarted in-memory Tansu does): new tasks complete, though
  Postgres holds offsets far ahead of the new logs.
"""

from __future__ import annotations

import pytest

from sluicegate.pipeline import TOPICS
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.streams.envelope import Event
from tests.integration.pipeline_support import (
    calculator_task,
    drop_schema,
    prepare_database,
    publish_events,
    running_pipeline,
    scalar_rows,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

TASKS = 60


def batch(start: int) -> list[Event]:
    # 10 sessions, 6 tasks each: within the reference policy's per-session limits.
    return [calculator_task(start + i, 10).event for i in range(TASKS)]


async def run_tasks(settings: Settings, start: int, expect: int) -> None:
    async with running_pipeline(settings):
        await publish_events(settings, batch(start))
        assert await wait_for_results(settings, expect, timeout_s=120) == expect


async def test_one_database_nats_then_kafka_then_nats(
    nats_url: str, kafka_bootstrap: str, database_url: str
) -> None:
    prefix = unique_prefix()
    on = {
        kind: settings_for(
            kind,  # type: ignore[arg-type]
            nats_url=nats_url,
            kafka_bootstrap=kafka_bootstrap,
            database_url=database_url,
            prefix=prefix,
        )
        for kind in ("nats", "kafka")
    }
    await prepare_database(on["nats"])
    try:
        await run_tasks(on["nats"], 0, TASKS)
        await run_tasks(on["kafka"], 1000, 2 * TASKS)
        await run_tasks(on["nats"], 2000, 3 * TASKS)
        logs = await scalar_rows(
            on["nats"], "SELECT DISTINCT split_part(topic, ':', 1) FROM step_offsets ORDER BY 1"
        )
        assert logs == [("kafka",), ("nats",)]
    finally:
        for settings in on.values():
            transport = make_transport(settings)
            await transport.connect()
            await transport.delete_topics(TOPICS)
            await transport.close()
        await drop_schema(on["nats"])


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_a_broker_that_lost_its_log_takes_new_tasks(
    kind: str, nats_url: str, kafka_bootstrap: str, database_url: str
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
    )
    await prepare_database(settings)
    transport = make_transport(settings)
    await transport.connect()
    try:
        await run_tasks(settings, 0, TASKS)
        # The broker loses everything: every stream or topic is gone, and the
        # next worker creates them empty.
        await transport.delete_topics(TOPICS)
        await run_tasks(settings, 1000, 2 * TASKS)
        # Each step kept its old logs' progress apart from the new logs'.
        logs = await scalar_rows(
            settings, "SELECT count(DISTINCT topic) FROM step_offsets WHERE step = 'intake'"
        )
        assert logs == [(2,)]
    finally:
        await transport.delete_topics(TOPICS)
        await transport.close()
        await drop_schema(settings)
