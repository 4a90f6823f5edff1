"""A Postgres the test really stops, for 90 s, under a running worker.

``test_faults_postgres`` takes the database away through a proxy (the shared
Postgres is never stopped). This one starts a Postgres of its own from the
local stack's wheel and shuts it down as an operator would (fast shutdown:
its sessions end with SQLSTATE 57P01, new connections are refused), keeps it
down for 90 s (well past the 34 s after which workers used to give up), and
starts it again on the same data. The worker, a real ``sluice run`` that is
never restarted, rides it out: every task has exactly one result, the chains
verify, and SIGTERM afterwards ends it within its grace period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate import localstack
from sluicegate.localstack._process import RunningService
from sluicegate.localstack.postgres_server import start_postgres
from tests.integration.fault_support import (
    Worker,
    assert_exactly_once,
    publish_paced,
    readyz_until,
    wait_results,
)
from tests.integration.pipeline_support import (
    mixed_tasks,
    prepare_database,
    settings_for,
    unique_prefix,
)

pytestmark = pytest.mark.integration

TASKS = 2000
RATE = 200.0
DOWN_S = 90.0
GRACE = 15.0


class OwnPostgres:
    """A Postgres on a fixed port and data directory that can be stopped and started again."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = localstack.free_port()
        self.service: RunningService | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self.service = start_postgres(port=self.port, home=self.home)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[OwnPostgres]:
    server = OwnPostgres(tmp_path / "pg")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_postgres_stopped_for_90s_is_ridden_out(
    own_postgres: OwnPostgres, nats_url: str, tmp_path: Path
) -> None:
    settings = settings_for(
        "nats",
        nats_url=nats_url,
        kafka_bootstrap="127.0.0.1:1",
        database_url=own_postgres.url,
        prefix=unique_prefix(),
    )
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(TASKS, sessions=200)]
    port = localstack.free_port()
    env = {
        "SLUICE_SHUTDOWN_GRACE": str(GRACE),
        "SLUICE_DRAIN_TIMEOUT": "5",
        "SLUICE_DB_CONNECT_TIMEOUT": "3",
        "SLUICE_DB_STATEMENT_TIMEOUT": "5",
        "SLUICE_METRICS_PORT": str(port),
    }
    worker = Worker(settings, tmp_path / "worker.log", env)
    try:
        publisher = asyncio.create_task(publish_paced(settings, events, per_second=RATE))
        await wait_results(settings, 300, timeout_s=90, worker=worker)
        await asyncio.to_thread(own_postgres.stop)
        stopped_at = time.monotonic()
        status, why = await readyz_until(port, lambda code, body: code == 503 and "failing" in body)
        print(f"\n/readyz with Postgres stopped: {status} {why}")
        await asyncio.sleep(max(0.0, DOWN_S - (time.monotonic() - stopped_at)))
        worker.check_alive()
        await asyncio.to_thread(own_postgres.start)
        back_at = time.monotonic()
        await readyz_until(port, lambda code, body: code == 200, timeout_s=60)
        await publisher
        reached = await wait_results(settings, TASKS, timeout_s=180, worker=worker)
        assert reached == TASKS, f"{reached} of {TASKS} results: {worker.tail()}"
        print(f"Postgres stopped {DOWN_S:g}s: all results {time.monotonic() - back_at:.1f}s after")
        await assert_exactly_once(settings, [e.id for e in events])
        code, took = await worker.terminate(GRACE + 10)
        assert code == 0, f"SIGTERM: exit {code} after {took:.1f}s: {worker.tail()}"
    finally:
        worker.kill()
