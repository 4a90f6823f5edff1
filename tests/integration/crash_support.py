"""The crash tests' common parts: a worker process, killing it mid-stream, comparing end states.

Used by the native engine's crash test (``test_crash_recovery``) and the Faust
engine's (``test_faust_engine_crash``): both kill a real ``sluice run``
process twice, restart it, and compare with an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sluicegate.settings import Settings
from sluicegate.streams.envelope import Event
from tests.integration.crash_worker import CRASH_ENV
from tests.integration.pipeline_support import (
    all_results,
    env_for,
    results_count,
    scalar_rows,
    wait_for_results,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def spawn_worker(
    settings: Settings,
    log: Path,
    *,
    args: Sequence[str] = (),
    crash_after_commits: int | None = None,
) -> subprocess.Popen[bytes]:
    """``sluice run [args]`` as a subprocess, logging to ``log``.

    With ``crash_after_commits`` it is the crash tests' worker
    (``tests.integration.crash_worker``), which SIGKILLs itself after that
    many checkpoint commits.
    """
    env = {**os.environ, **env_for(settings)}
    entry = "sluicegate"
    if crash_after_commits is not None:
        env[CRASH_ENV] = str(crash_after_commits)
        entry = "tests.integration.crash_worker"
    argv = [sys.executable, "-m", entry, "run", *args, "--log-level", "WARNING"]
    # The log goes to a file, not a pipe: a full pipe would stall the worker.
    # The crash worker runs from the repository's root, where -m finds tests/.
    cwd = REPO_ROOT if crash_after_commits is not None else None
    with log.open("ab") as sink:
        return subprocess.Popen(argv, env=env, stdout=sink, stderr=sink, cwd=cwd)


async def wait_then_kill(
    proc: subprocess.Popen[bytes], settings: Settings, at: int, log: Path, *, timeout_s: float
) -> int:
    """SIGKILL ``proc`` once the results table holds ``at`` rows; returns the count then."""
    deadline = time.monotonic() + timeout_s
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


async def kill_twice_then_finish(
    settings: Settings,
    log: Path,
    tasks: int,
    *,
    args: Sequence[str] = (),
    crash_after_commits: int,
    timeout_s: float,
) -> tuple[int, int]:
    """Run the worker to the end through two SIGKILLs that land mid-stream.

    Returns the results counts at the two kills.
    """
    # First crash: the worker kills itself right after a Postgres checkpoint and
    # before the broker ack, the narrowest window of the commit protocol.
    worker = spawn_worker(settings, log, args=args, crash_after_commits=crash_after_commits)
    assert await asyncio.to_thread(worker.wait, timeout_s) == -signal.SIGKILL
    first_kill = await results_count(settings)
    # Second crash: SIGKILL from outside, wherever the worker happens to be.
    worker = spawn_worker(settings, log, args=args)
    at = max(first_kill + 1, tasks // 2)
    second_kill = await wait_then_kill(worker, settings, at, log, timeout_s=timeout_s)
    assert first_kill < second_kill < tasks, "the kills must land mid-stream"
    worker = spawn_worker(settings, log, args=args)
    try:
        reached = await wait_for_results(settings, tasks, timeout_s=300)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
        tail = log.read_text(errors="replace")[-3000:]
        assert code == 0, f"SIGTERM must finish the batch in hand and exit 0; log: {tail}"
    assert reached == tasks
    return first_kill, second_kill


async def state_of(settings: Settings) -> dict[tuple[str, str, str], object]:
    rows = await scalar_rows(settings, "SELECT step, tenant, session, state FROM step_state")
    return {(str(r[0]), str(r[1]), str(r[2])): r[3] for r in rows}


async def assert_same_end_state(crashed: Settings, calm: Settings, events: Sequence[Event]) -> None:
    """No lost result, none twice, no audit row twice; results, audit counts and state as calm's."""
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
    counts = "SELECT step, kind, count(*) FROM audit_log GROUP BY 1, 2 ORDER BY 1, 2"
    assert await scalar_rows(crashed, counts) == await scalar_rows(calm, counts)
    assert await state_of(crashed) == await state_of(calm)
