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
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from agents import topics
from sluicegate.faust_engine import run_faust_steps
from sluicegate.pipeline import build_steps
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    env_for,
    mixed_tasks,
    prepare_database,
    publish_events,
    results_count,
    scalar_rows,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

TASKS = 1000
STEPS = ("intake", "context", "planner", "gate", "tools", "responder")


def spawn_worker(
    settings: Settings, log: Path, *, crash_after_commits: int | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **env_for(settings)}
    if crash_after_commits is not None:
        env["SLUICE_TEST_CRASH_AFTER_COMMITS"] = str(crash_after_commits)
    argv = [sys.executable, "-m", "sluicegate", "run", "--engine", "faust"]
    # The log goes to a file, not a pipe: a full pipe would stall the worker.
    with log.open("ab") as sink:
        return subprocess.Popen(
            [*argv, "--transport", "kafka", "--log-level", "WARNING"],
            env=env,
            stdout=sink,
            stderr=sink,
        )


async def wait_then_kill(
    proc: subprocess.Popen[bytes], settings: Settings, at: int, log: Path
) -> int:
    """SIGKILL ``proc`` once the results table holds ``at`` rows; returns the count then."""
    deadline = time.monotonic() + 240
    count = 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"worker exited early with {proc.returncode}: {tail}")
        count = await results_count(settings)
        if count >= at:
            break
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return count


async def state_of(settings: Settings) -> dict[tuple[str, str, str], object]:
    rows = await scalar_rows(settings, "SELECT step, tenant, session, state FROM step_state")
    return {(str(r[0]), str(r[1]), str(r[2])): r[3] for r in rows}


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
    # First crash: the worker kills itself right after a Postgres checkpoint and
    # before it acks to Faust, the narrowest window of the commit protocol.
    worker = spawn_worker(crashed, log, crash_after_commits=60)
    assert await asyncio.to_thread(worker.wait, 240) == -signal.SIGKILL
    first_kill = await results_count(crashed)
    # Second crash: SIGKILL from outside, wherever the worker happens to be.
    worker = spawn_worker(crashed, log)
    second_kill = await wait_then_kill(worker, crashed, max(first_kill + 1, TASKS // 2), log)
    assert first_kill < second_kill < TASKS, "the kills must land mid-stream"
    worker = spawn_worker(crashed, log)
    try:
        reached = await wait_for_results(crashed, TASKS, timeout_s=300)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
        tail = log.read_text(errors="replace")[-3000:]
        assert code == 0, f"SIGTERM must finish the batch in hand and exit 0; log: {tail}"
    assert reached == TASKS

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
    results = await all_results(crashed)
    assert sorted(r.task_id for r in results) == sorted(e.id for e in events)
    calm_results = {r.task_id: (r.status, r.answer) for r in await all_results(calm)}
    assert {r.task_id: (r.status, r.answer) for r in results} == calm_results

    duplicated = await scalar_rows(
        crashed,
        "SELECT step, event_id, kind, count(*) FROM audit_log "
        "GROUP BY step, event_id, kind HAVING count(*) > 1 LIMIT 5",
    )
    assert duplicated == [], f"audit rows written twice: {duplicated}"
    audit_counts = await scalar_rows(
        crashed, "SELECT step, kind, count(*) FROM audit_log GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert audit_counts == await scalar_rows(
        calm, "SELECT step, kind, count(*) FROM audit_log GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert await state_of(crashed) == await state_of(calm)
    await changelog_matches_postgres(crashed)

    # At-least-once on the wire: outputs re-produced by a replay after a kill.
    crashed_copies = await copies_on_topics(crashed)
    calm_copies = await copies_on_topics(calm)
    assert sum(calm_copies.values()) == 0, calm_copies
    print(
        f"faust crash test: {TASKS} tasks, kills at {first_kill} and {second_kill} results; "
        f"results {len(results)}, audit rows written twice 0; "
        f"re-produced copies on topics {crashed_copies}"
    )
    for settings in (crashed, calm):
        await drop_schema(settings)
