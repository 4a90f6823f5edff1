"""Faust workers joining and leaving under live traffic: Faust rebalances, nothing is lost.

Two ``sluice run --engine faust`` processes share one consumer group while
tasks keep arriving: the second joins mid-stream (Faust revokes everything,
the first worker's streams drain, the partitions are split), then the first
leaves with SIGTERM (the second takes all partitions back). Each rebalance
goes through the bridge: revoke → the runners drop their partitions → Faust
recovers the tables → the runners load from Postgres → the group is moved to
Postgres's offsets → Faust seeks and resumes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sluicegate.pipeline import build_steps
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.transport import OutMessage
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    env_for,
    mixed_tasks,
    prepare_database,
    results_count,
    scalar_rows,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

TASKS = 4000
RATE = 100  # tasks per second: publishing lasts 40 s, through both rebalances
# The bridge's log line after each assignment.
ASSIGNED = re.compile(r"assigned (\d+) input partitions, resuming at Postgres's offsets")
# Input topics of the reference pipeline (the responder reads three).
INPUTS = sum(len(step.inputs) for step in build_steps())


def spawn_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **env_for(settings)}
    argv = [sys.executable, "-m", "sluicegate", "run", "--engine", "faust", "--transport", "kafka"]
    with log.open("ab") as sink:
        return subprocess.Popen(argv, env=env, stdout=sink, stderr=sink)


async def assignments(log: Path, at_least: int, proc: subprocess.Popen[bytes]) -> list[int]:
    """Wait until the worker logged ``at_least`` assignments; returns their sizes."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sizes = [int(n) for n in ASSIGNED.findall(log.read_text(errors="replace"))]
        if len(sizes) >= at_least:
            return sizes
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}: {log.read_text()[-2000:]}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"{log.name}: fewer than {at_least} assignments in 120 s")


async def publish_at_rate(settings: Settings, events: list[Event]) -> None:
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        chunk = RATE // 10
        for start in range(0, len(events), chunk):
            batch = events[start : start + chunk]
            await transport.publish_batch(
                [OutMessage("tasks", encode(e), key=e.key, headers=headers_for(e)) for e in batch]
            )
            await asyncio.sleep(0.1)
    finally:
        await transport.close()


async def test_workers_join_and_leave_under_live_traffic(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    settings = settings_for(
        "kafka",
        nats_url="nats://127.0.0.1:4222",  # unused: the Faust engine runs on Kafka
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
    )
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(TASKS, sessions=400)]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    first = spawn_worker(settings, first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        await assignments(first_log, 1, first)
        publishing = asyncio.create_task(publish_at_rate(settings, events))
        await asyncio.sleep(2)
        second = spawn_worker(settings, second_log)
        await assignments(second_log, 1, second)
        # The first worker took part in that rebalance too.
        first_sizes = await assignments(first_log, 2, first)
        joined_at = await results_count(settings)
        # Let the two work side by side for a while before the first leaves.
        await wait_for_results(settings, joined_at + 300, timeout_s=60)
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 60) == 0, first_log.read_text()[-2000:]
        second_sizes = await assignments(second_log, 2, second)
        left_at = await results_count(settings)
        assert not publishing.done(), "both rebalances must happen while tasks arrive"
        await publishing
        assert await wait_for_results(settings, TASKS, timeout_s=180) == TASKS
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 60) == 0

    assert 0 < joined_at < left_at < TASKS
    results = await all_results(settings)
    assert sorted(r.task_id for r in results) == sorted(e.id for e in events)
    duplicated = await scalar_rows(
        settings, "SELECT step, event_id, kind FROM audit_log GROUP BY 1, 2, 3 HAVING count(*) > 1"
    )
    assert duplicated == []
    per_step = await scalar_rows(
        settings,
        "SELECT step, count(*) FROM audit_log WHERE kind = 'processed' GROUP BY 1 ORDER BY 1",
    )
    assert per_step == [
        (step, TASKS)
        for step in sorted(("intake", "context", "planner", "gate", "tools", "responder"))
    ]
    # The partitions were split while both ran, and whole before and after.
    everything = INPUTS * settings.partitions
    assert first_sizes[:2] == [everything, everything - second_sizes[0]]
    assert 0 < second_sizes[0] < everything and second_sizes[1] == everything
    print(
        f"rebalance test: {TASKS} tasks; second worker joined at {joined_at} results "
        f"(partitions split {first_sizes[1]}/{second_sizes[0]}), first left at {left_at}"
    )
    await drop_schema(settings)
