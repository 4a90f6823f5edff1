"""Crash test: SIGKILL the worker twice mid-stream; nothing lost, nothing written twice.

Runs `sluice run` as a real subprocess against real brokers and Postgres, kills
it with SIGKILL while it works, restarts it, and compares the end state with
an uninterrupted run of the same input. With a slow model (the planner on a
loopback stand-in answering in about 200 ms) hundreds of events are in flight
when the kills land, and inputs done above a gap are absorbed by id.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sluicegate.bench.model_standin import ModelStandin
from sluicegate.pipeline import build_steps
from sluicegate.runtime import run_steps
from tests.integration.crash_support import assert_same_end_state, kill_twice_then_finish
from tests.integration.pipeline_support import (
    drop_schema,
    mixed_tasks,
    prepare_database,
    publish_events,
    settings_for,
    unique_prefix,
    wait_for_results,
)

pytestmark = pytest.mark.integration

TASKS = 5000


@pytest.mark.parametrize("model_ms", [None, 200], ids=["rules", "model200ms"])
@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_sigkill_twice_loses_nothing_and_duplicates_nothing(
    kind: str,
    model_ms: int | None,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if model_ms is None:
        await _crash_and_compare(kind, nats_url, kafka_bootstrap, database_url, tmp_path)
        return
    async with ModelStandin(median_ms=model_ms, sigma=0.5) as standin:
        # The workers (subprocesses) and the calm run both plan with it.
        monkeypatch.setenv("SLUICE_LLM_URL", standin.url)
        monkeypatch.setenv("SLUICE_LLM_CONCURRENCY", "1024")
        await _crash_and_compare(kind, nats_url, kafka_bootstrap, database_url, tmp_path)
        assert standin.peak_in_flight >= 100, f"only {standin.peak_in_flight} calls at once"


async def _crash_and_compare(
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
    await kill_twice_then_finish(crashed, log, TASKS, crash_after_commits=40, timeout_s=180)

    # The same input, uninterrupted, in-process.
    await publish_events(calm, events)
    stop = asyncio.Event()
    runner = asyncio.create_task(run_steps(build_steps(), calm, stop=stop))
    try:
        assert await wait_for_results(calm, TASKS, timeout_s=300) == TASKS
    finally:
        stop.set()
        await asyncio.wait_for(runner, 60)

    await assert_same_end_state(crashed, calm, events)
    for settings in (crashed, calm):
        await drop_schema(settings)
