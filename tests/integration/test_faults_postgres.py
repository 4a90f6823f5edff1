"""Postgres faults under a running worker, through a proxy the test controls.

The shared Postgres is never stopped (others use it): the worker reaches it
through :class:`PgProxy`, which the test takes down (connections dropped,
new ones refused), brings back, or silences (connections accepted, never
answered). The worker is a real ``sluice run`` on the shared NATS, never
restarted: after an outage within its patience every task has exactly one
result and the chains verify; an outage beyond it, a permanent error and a
Postgres that never answers each end it with one line and a non-zero exit;
SIGTERM ends it within its grace period whatever it is waiting for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sluicegate import localstack
from sluicegate.settings import Settings
from tests.integration.fault_support import (
    PgProxy,
    Worker,
    assert_exactly_once,
    execute_sql,
    pg_proxy,
    publish_paced,
    readyz_until,
    through,
    wait_results,
)
from tests.integration.pipeline_support import (
    mixed_tasks,
    prepare_database,
    results_count,
    settings_for,
    unique_prefix,
)

pytestmark = pytest.mark.integration

TASKS = 2000
RATE = 200.0
GRACE = 15.0
FAULT_ENV = {
    "SLUICE_SHUTDOWN_GRACE": str(GRACE),
    "SLUICE_DRAIN_TIMEOUT": "5",
    "SLUICE_DB_CONNECT_TIMEOUT": "3",
    "SLUICE_DB_STATEMENT_TIMEOUT": "5",
}


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[PgProxy]:
    async with pg_proxy(database_url) as started:
        yield started


def _settings(nats_url: str, database_url: str) -> Settings:
    return settings_for(
        "nats",
        nats_url=nats_url,
        kafka_bootstrap="127.0.0.1:1",
        database_url=database_url,
        prefix=unique_prefix(),
    )


def _last_line(worker: Worker) -> str:
    lines = [line for line in worker.tail().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("down_s", [5.0, 40.0], ids=["5s", "40s"])
async def test_postgres_outage_is_ridden_out(
    down_s: float, proxy: PgProxy, nats_url: str, database_url: str, tmp_path: Path
) -> None:
    # 40 s is past the 34 s after which workers used to give up.
    settings = _settings(nats_url, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(TASKS, sessions=200)]
    port = localstack.free_port()
    env = {**FAULT_ENV, "SLUICE_METRICS_PORT": str(port)}
    worker = Worker(through(settings, proxy), tmp_path / "worker.log", env)
    try:
        publisher = asyncio.create_task(publish_paced(settings, events, per_second=RATE))
        await wait_results(settings, 300, timeout_s=90, worker=worker)
        await proxy.down()
        went_down = time.monotonic()
        # Not ready meanwhile, saying why.
        status, why = await readyz_until(port, lambda code, body: code == 503 and "failing" in body)
        print(f"/readyz during the outage: {status} {why}")
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - went_down)))
        worker.check_alive()
        await proxy.back_up()
        back_at = time.monotonic()
        await readyz_until(port, lambda code, body: code == 200, timeout_s=60)
        await publisher
        reached = await wait_results(settings, TASKS, timeout_s=120, worker=worker)
        assert reached == TASKS, f"{reached} of {TASKS} results: {worker.tail()}"
        print(f"Postgres {down_s:g}s down: all results {time.monotonic() - back_at:.1f}s after")
        await assert_exactly_once(settings, [e.id for e in events])
        code, took = await worker.terminate(GRACE + 10)
        assert code == 0, f"SIGTERM: exit {code} after {took:.1f}s: {worker.tail()}"
    finally:
        worker.kill()


async def test_outage_beyond_patience_ends_the_worker_in_one_line(
    proxy: PgProxy, nats_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(nats_url, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(400, sessions=40)]
    env = {**FAULT_ENV, "SLUICE_OUTAGE_PATIENCE": "8"}
    worker = Worker(through(settings, proxy), tmp_path / "worker.log", env)
    try:
        await publish_paced(settings, events[:200], per_second=RATE)
        await wait_results(settings, 100, timeout_s=90, worker=worker)
        await proxy.down()
        # Work keeps arriving: an idle worker has no reason to touch Postgres.
        await publish_paced(settings, events[200:], per_second=RATE)
        # Patience, plus a connect and a statement timeout, plus the backoff.
        code = await worker.wait_exit(8 + 3 + 5 + 5 + 10)
        assert code == 1, f"exit {code}: {worker.tail()}"
        line = _last_line(worker)
        assert line.startswith("sluice: error:"), worker.tail()
        assert "gave up after" in line and "SLUICE_OUTAGE_PATIENCE" in line, line
        print(f"gave up: {line}")
    finally:
        worker.kill()


async def test_sigterm_during_an_outage_ends_the_worker_within_its_grace(
    proxy: PgProxy, nats_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(nats_url, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(2000, sessions=200)]
    worker = Worker(through(settings, proxy), tmp_path / "worker.log", FAULT_ENV)
    try:
        publisher = asyncio.create_task(publish_paced(settings, events, per_second=RATE))
        await wait_results(settings, 200, timeout_s=90, worker=worker)
        await proxy.down()
        await asyncio.sleep(3)  # into the retry loops and a commit that cannot land
        code, took = await worker.terminate(GRACE + 5)
        assert code is not None, f"still running {took:.0f}s after SIGTERM: {worker.tail()}"
        assert took <= GRACE + 2, f"SIGTERM took {took:.1f}s (grace {GRACE:g}s)"
        print(f"SIGTERM during a Postgres outage: exit {code} after {took:.1f}s")
        publisher.cancel()
        # Nothing committed is lost: a new worker finishes every task exactly once.
        await proxy.back_up()
        done = await results_count(settings)
        worker = Worker(settings, tmp_path / "worker2.log", FAULT_ENV)
        rest = asyncio.create_task(publish_paced(settings, events, per_second=2000))
        await rest
        reached = await wait_results(settings, len(events), timeout_s=120, worker=worker)
        assert reached == len(events), f"{reached} results (had {done}): {worker.tail()}"
        await assert_exactly_once(settings, [e.id for e in events])
    finally:
        worker.kill()


async def test_a_postgres_that_never_answers_does_not_hang_start_up(
    proxy: PgProxy, nats_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(nats_url, database_url)
    proxy.silent()
    worker = Worker(through(settings, proxy), tmp_path / "worker.log", FAULT_ENV)
    try:
        code = await worker.wait_exit(3 + 5 + 15)
        assert code == 1, f"exit {code}: {worker.tail()}"
        line = _last_line(worker)
        assert line.startswith("sluice: error:") and "Traceback" not in worker.tail(), line
        print(f"never answers: {line}")
        # SIGTERM in the middle of such a start-up ends it at once.
        worker = Worker(through(settings, proxy), tmp_path / "worker2.log", FAULT_ENV)
        await asyncio.sleep(1.5)
        code, took = await worker.terminate(GRACE)
        assert code is not None and took < 3, f"exit {code} after {took:.1f}s: {worker.tail()}"
        print(f"SIGTERM in start-up against a silent Postgres: exit {code} after {took:.1f}s")
    finally:
        worker.kill()


async def test_a_permanent_error_is_reported_at_once(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(nats_url, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(400, sessions=40)]
    worker = Worker(settings, tmp_path / "worker.log", FAULT_ENV)
    try:
        await publish_paced(settings, events[:200], per_second=RATE)
        await wait_results(settings, 50, timeout_s=90, worker=worker)
        # Schema drift: a column the checkpoint writes is gone.
        await execute_sql(settings, "ALTER TABLE results DROP COLUMN trace_id")
        started = time.monotonic()
        await publish_paced(settings, events[200:], per_second=RATE)
        code = await worker.wait_exit(90)  # bounded; at once when the machine is quiet
        took = time.monotonic() - started
        assert code == 1, f"exit {code}: {worker.tail()}"
        line = _last_line(worker)
        assert "trace_id" in line and "does not exist" in line, line
        print(f"permanent error after {took:.1f}s: {line}")
    finally:
        worker.kill()
