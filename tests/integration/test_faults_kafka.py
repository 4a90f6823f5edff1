"""A Kafka broker restarted under a running worker: it comes back empty (Tansu keeps
its log in memory), and the worker must not hang or loop on it.

What the broker lost is lost (its log held tasks not yet done); what the
worker had done stays done. The worker, never restarted, must take new tasks
on the new log: no endless retry on the old one's offsets, topics made again,
every new task exactly one result, no audit row twice, chains intact, and
SIGTERM ends it within its grace period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate import localstack
from sluicegate.localstack._process import stop_pid
from sluicegate.settings import Settings
from tests.integration.fault_support import (
    Worker,
    assert_exactly_once,
    pg_proxy,
    publish_paced,
    readyz_until,
    through,
)
from tests.integration.pipeline_support import (
    mixed_tasks,
    prepare_database,
    results_count,
    scalar_rows,
    settings_for,
    unique_prefix,
)

pytestmark = pytest.mark.integration

GRACE = 20.0
FAULT_ENV = {
    "SLUICE_STALL_TIMEOUT": "5",
    "SLUICE_SHUTDOWN_GRACE": str(GRACE),
    "SLUICE_DRAIN_TIMEOUT": "5",
}


class OwnTansu:
    def __init__(self, port: int, home: Path) -> None:
        self.port, self.home = port, home
        self.service: localstack.RunningService | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.service = localstack.start_kafka(port=self.port, home=self.home)

    def stop(self) -> None:
        service, self.service = self.service, None
        if service is not None and service.pid is not None:
            stop_pid(service.pid, localstack._process.KAFKA.stop_signal, name="kafka")
            if service.pidfile is not None:
                service.pidfile.unlink(missing_ok=True)


@pytest.fixture
def own_tansu(tmp_path: Path) -> Iterator[OwnTansu]:
    broker = OwnTansu(localstack.free_port(), tmp_path / "own-tansu")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _settings(broker: OwnTansu, database_url: str) -> Settings:
    return settings_for(
        "kafka",
        nats_url="nats://127.0.0.1:1",
        kafka_bootstrap=broker.bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
    )


async def _wait_for(settings: Settings, ids: list[str], worker: Worker, timeout_s: float) -> int:
    """Poll until every task of ``ids`` has a result; how many have one at the end."""
    deadline = time.monotonic() + timeout_s
    wanted = set(ids)
    done = 0
    while time.monotonic() < deadline:
        worker.check_alive()
        rows = await scalar_rows(settings, "SELECT task_id FROM results")
        done = len(wanted & {str(r[0]) for r in rows})
        if done == len(wanted):
            break
        await asyncio.sleep(0.25)
    return done


async def test_tansu_restarted_empty_new_tasks_are_processed(
    own_tansu: OwnTansu, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(own_tansu, database_url)
    await prepare_database(settings)
    before = [t.event for t in mixed_tasks(1000, sessions=100)]
    worker = Worker(settings, tmp_path / "worker.log", FAULT_ENV)
    try:
        publisher = asyncio.create_task(publish_paced(settings, before, per_second=200))
        deadline = time.monotonic() + 120
        while await results_count(settings) < 300:
            worker.check_alive()
            assert time.monotonic() < deadline, f"no progress before the fault: {worker.tail()}"
            await asyncio.sleep(0.2)
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await asyncio.to_thread(own_tansu.stop)
        await asyncio.to_thread(own_tansu.start)
        back_at = time.monotonic()
        # New sessions: the new tasks owe nothing to state of lost ones.
        after = [
            t.event.model_copy(update={"session": f"after-{t.event.session}"})
            for t in mixed_tasks(1000, sessions=100)
        ]
        await publish_paced(settings, after, per_second=200)
        done = await _wait_for(settings, [e.id for e in after], worker, timeout_s=180)
        assert done == len(after), f"{done} of {len(after)} new tasks done: {worker.tail()}"
        print(f"Tansu restarted empty: all new tasks done {time.monotonic() - back_at:.1f}s after")
        rows = await scalar_rows(settings, "SELECT task_id FROM results")
        stored = [str(r[0]) for r in rows]
        done_before = [e.id for e in before if e.id in set(stored)]
        print(f"{len(done_before)} of {len(before)} tasks from before the restart have a result")
        await assert_exactly_once(settings, done_before + [e.id for e in after])
        code, took = await worker.terminate(GRACE + 10)
        assert code == 0, f"SIGTERM: exit {code} after {took:.1f}s: {worker.tail()}"
        print(f"SIGTERM ended the worker in {took:.1f}s")
    finally:
        worker.kill()


async def test_a_rebalance_during_a_postgres_outage_is_loaded_once_postgres_is_back(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    """Worker A's new assignment cannot be loaded (Postgres away for it); it must not stall.

    Worker B joins while A's Postgres is down: the rebalance hands A partitions
    whose load fails. Once Postgres is back, A loads them by itself (no further
    rebalance: B keeps running), and every task gets exactly one result.
    """
    settings = settings_for(
        "kafka",
        nats_url="nats://127.0.0.1:1",
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
    )
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(1000, sessions=100)]
    async with pg_proxy(database_url) as proxy:
        a = Worker(through(settings, proxy), tmp_path / "a.log", FAULT_ENV)
        b: Worker | None = None
        try:
            publisher = asyncio.create_task(publish_paced(settings, events, per_second=100))
            deadline = time.monotonic() + 120
            while await results_count(settings) < 150:
                a.check_alive()
                assert time.monotonic() < deadline, f"no progress: {a.tail()}"
                await asyncio.sleep(0.2)
            await proxy.down()
            b = Worker(settings, tmp_path / "b.log", FAULT_ENV)
            await asyncio.sleep(12)  # B joins; A's share cannot be loaded meanwhile
            await proxy.back_up()
            await publisher
            done = await _wait_for(settings, [e.id for e in events], a, timeout_s=180)
            b.check_alive()
            assert done == len(events), f"{done} of {len(events)}: A {a.tail()}\nB {b.tail()}"
            await assert_exactly_once(settings, [e.id for e in events])
            for worker in (b, a):
                code, took = await worker.terminate(GRACE + 10)
                assert code == 0, f"SIGTERM: exit {code} after {took:.1f}s: {worker.tail()}"
            told = a.log.read_text(errors="replace")
            assert "after a failed assignment" in told or "recovered after" in told, a.tail()
        finally:
            a.kill()
            if b is not None:
                b.kill()


async def test_sigterm_while_kafka_is_down_ends_the_worker_within_its_grace(
    own_tansu: OwnTansu, database_url: str, tmp_path: Path
) -> None:
    settings = _settings(own_tansu, database_url)
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(1000, sessions=100)]
    port = localstack.free_port()
    env = {**FAULT_ENV, "SLUICE_METRICS_PORT": str(port)}
    worker = Worker(settings, tmp_path / "worker.log", env)
    try:
        publisher = asyncio.create_task(publish_paced(settings, events, per_second=200))
        deadline = time.monotonic() + 120
        while await results_count(settings) < 200:
            worker.check_alive()
            assert time.monotonic() < deadline, f"no progress before the fault: {worker.tail()}"
            await asyncio.sleep(0.2)
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await asyncio.to_thread(own_tansu.stop)
        # Not ready while the broker is away, even where nothing else fails.
        status, why = await readyz_until(port, lambda code, body: code == 503, timeout_s=30)
        print(f"/readyz with Kafka down: {status} {why[:200]}")
        code, took = await worker.terminate(GRACE + 5)
        assert code is not None, f"still running {took:.0f}s after SIGTERM: {worker.tail()}"
        assert took <= GRACE + 2, f"SIGTERM took {took:.1f}s (grace {GRACE:g}s)"
        print(f"SIGTERM while Kafka is down: exit {code} after {took:.1f}s")
    finally:
        worker.kill()
