"""NATS restarts under a running worker: no silent stall, every task exactly once.

A nats-server of the test's own (file storage, so streams and consumers
survive) is SIGTERM-restarted with 2 s down while tasks arrive at 200/s, and
SIGKILLed for 15 s under a backlog. The worker (a real ``sluice run``) is never
restarted: every task must get exactly one result afterwards, the audit
chains must verify, and SIGTERM must still end the worker within its grace.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate import localstack
from sluicegate.settings import Settings
from tests.integration.fault_support import (
    OwnNats,
    Worker,
    assert_exactly_once,
    publish_paced,
    wait_results,
)
from tests.integration.pipeline_support import (
    mixed_tasks,
    prepare_database,
    publish_events,
    results_count,
    scalar_rows,
    settings_for,
    unique_prefix,
)

pytestmark = pytest.mark.integration

TASKS = 2000
RATE = 200.0
GRACE = 20.0
# Short enough that a stalled partition is repaired well within the test.
FAULT_ENV = {
    "SLUICE_STALL_TIMEOUT": "5",
    "SLUICE_SHUTDOWN_GRACE": str(GRACE),
    "SLUICE_DRAIN_TIMEOUT": "5",
}


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnNats]:
    nats = OwnNats(localstack.free_port(), tmp_path / "own-nats")
    nats.start()
    try:
        yield nats
    finally:
        nats.stop(signal.SIGKILL)


def _settings(nats: OwnNats, database_url: str) -> Settings:
    # No Kafka here: the bootstrap is never dialled.
    return settings_for(
        "nats",
        nats_url=nats.url,
        kafka_bootstrap="127.0.0.1:1",
        database_url=database_url,
        prefix=unique_prefix(),
    )


async def _restart(nats: OwnNats, sig: signal.Signals, down_s: float) -> float:
    """Stop the server with ``sig``, keep it down ``down_s``; returns when it was back."""
    await asyncio.to_thread(nats.stop, sig)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(nats.start)
    return time.monotonic()


async def _finish(settings: Settings, worker: Worker, ids: list[str], back_at: float) -> None:
    reached = await wait_results(settings, TASKS, timeout_s=180, worker=worker)
    assert reached == TASKS, f"{reached} of {TASKS} results: stalled? {worker.tail()}"
    print(f"all {TASKS} results {time.monotonic() - back_at:.1f}s after NATS was back")
    await assert_exactly_once(settings, ids)
    code, took = await worker.terminate(GRACE + 10)
    assert code == 0, f"SIGTERM: exit {code} after {took:.1f}s: {worker.tail()}"
    print(f"SIGTERM ended the worker in {took:.1f}s")


async def test_nats_sigterm_restart_2s_down_under_paced_load(
    own_nats: OwnNats, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(own_nats, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(TASKS, sessions=200)]
    worker = Worker(settings, tmp_path / "worker.log", FAULT_ENV)
    try:
        publisher = asyncio.create_task(publish_paced(settings, events, per_second=RATE))
        await wait_results(settings, 300, timeout_s=90, worker=worker)
        back_at = await _restart(own_nats, signal.SIGTERM, 2.0)
        retried = await publisher
        print(f"NATS SIGTERM, 2 s down, paced: the publisher retried {retried} chunks;")
        await _finish(settings, worker, [e.id for e in events], back_at)
    finally:
        worker.kill()


async def test_nats_sigkill_15s_down_with_backlog(
    own_nats: OwnNats, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(own_nats, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(TASKS, sessions=200)]
    await publish_events(settings, events)  # the whole backlog waits before the worker starts
    worker = Worker(settings, tmp_path / "worker.log", FAULT_ENV)
    try:
        await wait_results(settings, 300, timeout_s=90, worker=worker)
        assert await results_count(settings) < TASKS, "the backlog was done before the fault"
        back_at = await _restart(own_nats, signal.SIGKILL, 15.0)
        print("NATS SIGKILL, 15 s down, backlog:")
        await _finish(settings, worker, [e.id for e in events], back_at)
    finally:
        worker.kill()


async def test_nats_sigkill_15s_down_under_paced_load(
    own_nats: OwnNats, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(own_nats, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(TASKS, sessions=200)]
    worker = Worker(settings, tmp_path / "worker.log", FAULT_ENV)
    try:
        publisher = asyncio.create_task(publish_paced(settings, events, per_second=RATE))
        await wait_results(settings, 300, timeout_s=90, worker=worker)
        back_at = await _restart(own_nats, signal.SIGKILL, 15.0)
        retried = await publisher
        print(f"NATS SIGKILL, 15 s down, paced: the publisher retried {retried} chunks;")
        await _finish(settings, worker, [e.id for e in events], back_at)
    finally:
        worker.kill()


async def test_nats_that_lost_its_log_takes_new_tasks(
    own_nats: OwnNats, database_url: str, tmp_path: Path
) -> None:
    """The server comes back with its storage wiped: streams, consumers and leases gone.

    What it held is lost; the worker (never restarted) must make the streams
    again, read them as new logs and do every new task exactly once.
    """
    settings = _settings(own_nats, database_url)
    await prepare_database(settings)
    before = [t.event for t in mixed_tasks(600, sessions=60)]
    worker = Worker(settings, tmp_path / "worker.log", FAULT_ENV)
    try:
        await publish_paced(settings, before, per_second=RATE)
        await wait_results(settings, 300, timeout_s=90, worker=worker)
        await asyncio.to_thread(own_nats.stop, signal.SIGKILL)
        shutil.rmtree(own_nats.home / "nats")
        await asyncio.to_thread(own_nats.start)
        back_at = time.monotonic()
        after = [
            t.event.model_copy(update={"session": f"after-{t.event.session}"})
            for t in mixed_tasks(1000, sessions=100)
        ]
        await publish_paced(settings, after, per_second=RATE)
        wanted = {e.id for e in after}
        deadline = time.monotonic() + 180
        while True:
            worker.check_alive()
            rows = await scalar_rows(settings, "SELECT task_id FROM results")
            stored = {str(r[0]) for r in rows}
            if wanted <= stored:
                break
            assert time.monotonic() < deadline, (
                f"{len(wanted & stored)} of {len(wanted)} new tasks done: {worker.tail()}"
            )
            await asyncio.sleep(0.25)
        print(f"NATS lost its log: all new tasks done {time.monotonic() - back_at:.1f}s after")
        done_before = [e.id for e in before if e.id in stored]
        await assert_exactly_once(settings, done_before + [e.id for e in after])
        code, took = await worker.terminate(GRACE + 10)
        assert code == 0, f"SIGTERM: exit {code} after {took:.1f}s: {worker.tail()}"
    finally:
        worker.kill()


async def test_sigterm_while_nats_is_down_ends_the_worker_within_its_grace(
    own_nats: OwnNats, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(own_nats, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(2000, sessions=200)]
    worker = Worker(settings, tmp_path / "worker.log", FAULT_ENV)
    try:
        publisher = asyncio.create_task(publish_paced(settings, events, per_second=RATE))
        await wait_results(settings, 300, timeout_s=90, worker=worker)
        await asyncio.to_thread(own_nats.stop, signal.SIGKILL)
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await asyncio.sleep(3)  # into the retry loops
        code, took = await worker.terminate(GRACE + 5)
        assert code is not None, f"still running {took:.0f}s after SIGTERM: {worker.tail()}"
        assert took <= GRACE + 2, f"SIGTERM took {took:.1f}s (grace {GRACE:g}s)"
        print(f"SIGTERM while NATS is down: exit {code} after {took:.1f}s")
    finally:
        worker.kill()
