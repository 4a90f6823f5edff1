"""Crash test: SIGKILL the worker twice mid-stream; nothing lost, nothing written twice.

Runs `sluice run` as a real subprocess against real brokers and Postgres, kills
it with SIGKILL while it works, restarts it, and compares the end state with
an uninterrupted run of the same input.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sluicegate.pipeline import build_steps
from sluicegate.runtime import run_steps
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

TASKS = 5000


def spawn_worker(
    settings: Settings, log: Path, *, crash_after_commits: int | None = None
) -> subprocess.Popen[bytes]:
    env = {**os.environ, **env_for(settings)}
    if crash_after_commits is not None:
        env["SLUICE_TEST_CRASH_AFTER_COMMITS"] = str(crash_after_commits)
    # The log goes to a file, not a pipe: a full pipe would stall the worker.
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "sluicegate", "run", "--log-level", "WARNING"],
            env=env,
            stdout=sink,
            stderr=sink,
        )


async def wait_then_kill(
    proc: subprocess.Popen[bytes], settings: Settings, at: int, log: Path
) -> int:
    """SIGKILL ``proc`` once the results table holds ``at`` rows; returns the count then."""
    deadline = time.monotonic() + 180
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


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_sigkill_twice_loses_nothing_and_duplicates_nothing(
    kind: str, nats_url: str, kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    urls = {"nats_url": nats_url, "kafka_bootstrap": kafka_bootstrap, "database_url": database_url}
    crashed = settings_for(kind, prefix=unique_prefix(), **urls)  # type: ignore[arg-type]
    calm = settings_for(kind, prefix=unique_prefix(), **urls)  # type: ignore[arg-type]
    # 10 tasks a session: within the reference policy's per-session budget and rate limit.
    tasks = mixed_tasks(TASKS, sessions=500)
    events = [t.event for t in tasks]
    for settings in (crashed, calm):
        await prepare_database(settings)

    # The interrupted run: a real process, SIGKILLed twice mid-stream.
    await publish_events(crashed, events)
    # First crash: the worker kills itself right after a Postgres checkpoint and
    # before the broker ack, the narrowest window of the commit protocol.
    worker = spawn_worker(crashed, log, crash_after_commits=40)
    assert await asyncio.to_thread(worker.wait, 180) == -signal.SIGKILL
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

    # The same input, uninterrupted, in-process.
    await publish_events(calm, events)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_steps(build_steps(), calm, stop=stop))
    try:
        assert await wait_for_results(calm, TASKS, timeout_s=300) == TASKS
    finally:
        stop.set()
        await asyncio.wait_for(runner, 60)

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
    for settings in (crashed, calm):
        await drop_schema(settings)
