"""Workers share partitions safely: three workers, one SIGKILLed mid-stream, one started later.

Real `sluice run` processes against real brokers and Postgres, started the
obvious way (no --instance): on Kafka they share each step's partitions
through consumer groups, on NATS through leases in NATS KV. Every task must
end with exactly one result, no audit row may be written twice, and every
chain must verify. The failover time (from the SIGKILL until every partition
the dead worker had claimed is claimed by another) is printed.
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

import orjson
import pytest

from sluicegate.settings import Settings
from sluicegate.sinks import queries
from sluicegate.sinks.db import connect
from tests.integration.crash_support import spawn_worker
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


async def wait_until_results(settings: Settings, at: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await results_count(settings) < at:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {at} results after {timeout_s:g}s")
        await asyncio.sleep(0.1)


def status_owners(settings: Settings) -> set[str]:
    """The owners ``sluice status --json`` shows across every step's partitions."""
    proc = subprocess.run(
        [sys.executable, "-m", "sluicegate", "status", "--json"],
        env={**os.environ, **env_for(settings)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    doc = orjson.loads(proc.stdout)
    return {p["owner"] for step in doc["steps"] for p in step["partitions"] if p["owner"]}


def is_worker(owner: str, pid: int) -> bool:
    """Whether ``owner`` names the worker process ``pid``.

    Kafka workers claim as ``<host>-<pid>``; NATS workers under their lease
    holder id, ``<host>-<pid>-<random>``.
    """
    return re.search(rf"-{pid}(-[0-9a-f]+)?$", owner) is not None


async def owned_by(settings: Settings, pid: int) -> list[tuple[object, ...]]:
    rows = await scalar_rows(settings, "SELECT step, topic, partition, owner FROM step_offsets")
    return [row[:3] for row in rows if is_worker(str(row[3]), pid)]


async def until_owned(settings: Settings, pid: int, what: str) -> float:
    """Seconds until worker ``pid`` holds a partition (fails after 60 s)."""
    started = time.monotonic()
    while not await owned_by(settings, pid):
        assert time.monotonic() - started < 60, what
        await asyncio.sleep(0.2)
    return time.monotonic() - started


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_three_workers_one_killed_one_joining_lose_and_repeat_nothing(
    kind: str,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
        partitions=6,
    )
    await prepare_database(settings)
    events = [t.event for t in mixed_tasks(TASKS, sessions=500)]
    # In two waves, so that work is left for the late worker whatever the
    # speed: it joins while the second is being published and processed.
    first, second = events[: TASKS * 3 // 5], events[TASKS * 3 // 5 :]
    await publish_events(settings, first)
    logs = [tmp_path / f"worker{i}.log" for i in range(4)]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers = [spawn_worker(settings, logs[i]) for i in range(3)]
        await wait_until_results(settings, TASKS // 5, timeout_s=180)
        victim = workers[0]
        held = await owned_by(settings, victim.pid)
        assert held, "the first worker had claimed no partition"
        assert any(is_worker(o, victim.pid) for o in status_owners(settings))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        while await owned_by(settings, victim.pid):
            assert time.monotonic() - killed_at < 60, "the dead worker's partitions never moved"
            await asyncio.sleep(0.2)
        failover_s = time.monotonic() - killed_at
        assert not any(is_worker(o, victim.pid) for o in status_owners(settings))
        print(f"\n{kind}: {len(held)} partitions of the killed worker moved in {failover_s:.1f}s")

        workers.append(spawn_worker(settings, logs[3]))
        late = workers[3].pid
        await publish_events(settings, second)
        joined_s = await until_owned(settings, late, "the late worker took no share")
        print(f"{kind}: the late worker held partitions {joined_s:.1f}s after it started")
        assert any(is_worker(o, late) for o in status_owners(settings))
        assert await wait_for_results(settings, TASKS, timeout_s=300) == TASKS
    finally:
        for proc in workers[1:]:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in workers[1:]]
    tails = "\n".join(log.read_text(errors="replace")[-1500:] for log in logs[1:])
    assert codes == [0, 0, 0], f"SIGTERM must end each worker cleanly: {codes}\n{tails}"

    results = await all_results(settings)
    assert sorted(r.task_id for r in results) == sorted(e.id for e in events)
    duplicated = await scalar_rows(
        settings,
        "SELECT step, event_id, kind, count(*) FROM audit_log "
        "GROUP BY step, event_id, kind HAVING count(*) > 1 LIMIT 5",
    )
    assert duplicated == [], f"audit rows written twice: {duplicated}\n{tails}"
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        verified = await queries.verify_chains(conn)
    finally:
        await conn.close()
    assert verified.ok, verified
    await drop_schema(settings)
