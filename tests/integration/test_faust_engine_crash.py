"""Crash test of the Faust engine: SIGKILL the worker twice mid-stream, restart, compare.

As tests/integration/test_crash_recovery.py does for the native engine: a real
``sluice run --engine faust`` subprocess against the Kafka-protocol broker and
Postgres is killed twice (once by itself right after a checkpoint commit and
before the acks, once from outside wherever it is), restarted, and its end
state is compared with an uninterrupted Faust run of the same input.

1000 tasks rather than the native test's 5000: every start of a Faust worker
joins the group and recovers its tables (about 6 s on Tansu, more after a
SIGKILL, while the dead member's session runs out), and Faust moves fewer
events per second.

What must hold: every task has exactly one result, equal to the calm run's;
no audit row is written twice; audit counts and keyed state equal the calm
run's; and the state tables' changelogs end equal to Postgres. What may not:
output topics can carry an event twice (an output produced before a kill and
produced again by the replay), with the same id; the test counts them, and
the next step's dedupe absorbed them (no duplicate audit row, no second
result).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pytest

from sluicegate.agents import topics
from sluicegate.faust_engine import run_faust_steps
from sluicegate.pipeline import build_steps
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from tests.integration.crash_support import (
    assert_same_end_state,
    kill_twice_then_finish,
)
from tests.integration.pipeline_support import (
    drop_schema,
    mixed_tasks,
    prepare_database,
    publish_events,
    scalar_rows,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

TASKS = 1000
STEPS = ("intake", "context", "planner", "gate", "tools", "responder")


async def copies_on_topics(settings: Settings) -> dict[str, int]:
    """Per pipeline topic: messages beyond the first with the same event id."""
    transport = make_transport(settings)
    await transport.connect()
    extra: dict[str, int] = {}
    try:
        for topic in topics.ALL:
            if topic == topics.DLQ:
                continue
            sub = await transport.subscribe([topic], group=None, start="earliest")
            ids: Counter[str] = Counter()
            while batch := await sub.fetch(5000, timeout=1.0):
                ids.update(m.headers["ce_id"] for m in batch)
            await sub.close()
            extra[topic] = sum(n - 1 for n in ids.values())
    finally:
        await transport.close()
    return extra


async def changelog_matches_postgres(settings: Settings) -> None:
    """The latest value per session in each step's changelog equals ``step_state``."""
    transport = make_transport(settings)
    await transport.connect()
    try:
        for step in STEPS:
            rows = await scalar_rows(
                settings, f"SELECT tenant, session, state FROM step_state WHERE step = '{step}'"
            )
            truth = {
                (str(t), str(s)): orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for t, s, v in rows
            }
            sub = await transport.subscribe(
                [f"faust-{step}-state-changelog"], group=None, start="earliest"
            )
            latest: dict[tuple[str, str], bytes | None] = {}
            while batch := await sub.fetch(5000, timeout=1.0):
                for m in batch:
                    assert m.key is not None
                    tenant, session = orjson.loads(m.key)
                    latest[(tenant, session)] = m.value or None
            await sub.close()
            live = {k: v for k, v in latest.items() if v is not None}
            assert live == truth, f"{step}: changelog and Postgres differ"
    finally:
        await transport.close()


async def test_faust_worker_sigkilled_twice_loses_nothing_and_writes_nothing_twice(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    urls = {
        "nats_url": "nats://127.0.0.1:4222",  # unused: the Faust engine runs on Kafka
        "kafka_bootstrap": kafka_bootstrap,
        "database_url": database_url,
    }
    crashed = settings_for("kafka", prefix=unique_prefix(), **urls)
    calm = settings_for("kafka", prefix=unique_prefix(), **urls)
    # 10 tasks a session: within the reference policy's per-session budget and rate limit.
    tasks = mixed_tasks(TASKS, sessions=100)
    events = [t.event for t in tasks]
    for settings in (crashed, calm):
        await prepare_database(settings)

    await publish_events(crashed, events)
    first_kill, second_kill = await kill_twice_then_finish(
        crashed,
        log,
        TASKS,
        args=["--engine", "faust", "--transport", "kafka"],
        crash_after_commits=60,
        timeout_s=240,
    )

    # The same input, uninterrupted, on the Faust engine in this process.
    await publish_events(calm, events)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_faust_steps(build_steps(), calm, stop=stop))
    try:
        assert await wait_for_results(calm, TASKS, timeout_s=300) == TASKS
    finally:
        stop.set()
        await asyncio.wait_for(runner, 60)

    # No lost result, none twice, each equal to the calm run's.
    await assert_same_end_state(crashed, calm, events)
    await changelog_matches_postgres(crashed)

    # At-least-once on the wire: outputs re-produced by a replay after a kill.
    crashed_copies = await copies_on_topics(crashed)
    calm_copies = await copies_on_topics(calm)
    assert sum(calm_copies.values()) == 0, calm_copies
    print(
        f"faust crash test: {TASKS} tasks, kills at {first_kill} and {second_kill} results; "
        f"results {TASKS}, audit rows written twice 0; "
        f"re-produced copies on topics {crashed_copies}"
    )
    for settings in (crashed, calm):
        await drop_schema(settings)
