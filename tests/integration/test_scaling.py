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
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sinks import queries
from sinks.db import connect
from sluicegate.settings import Settings
from tests.integration.crash_support import spawn_worker
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
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


async def owned_by(settings: Settings, owner: str) -> list[tuple[object, ...]]:
    return await scalar_rows(
        settings, f"SELECT step, topic, partition FROM step_offsets WHERE owner = '{owner}'"
    )


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_three_workers_one_killed_one_joining_lose_and_repeat_nothing(
    kind: str, nats_url: str, kafka_bootstrap: str, database_url: str, tmp_path: Path
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
    await publish_events(settings, events)
    logs = [tmp_path / f"worker{i}.log" for i in range(4)]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        workers = [spawn_worker(settings, logs[i]) for i in range(3)]
        await wait_until_results(settings, TASKS // 5, timeout_s=180)
        victim = workers[0]
        victim_owner = f"{socket.gethostname()}-{victim.pid}"
        held = await owned_by(settings, victim_owner)
        assert held, "the first worker had claimed no partition"
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        while await owned_by(settings, victim_owner):
            assert time.monotonic() - killed_at < 60, "the dead worker's partitions never moved"
            await asyncio.sleep(0.2)
        failover_s = time.monotonic() - killed_at
        print(f"\n{kind}: {len(held)} partitions of the killed worker moved in {failover_s:.1f}s")

        await wait_until_results(settings, TASKS // 2, timeout_s=180)
        workers.append(spawn_worker(settings, logs[3]))
        assert await wait_for_results(settings, TASKS, timeout_s=300) == TASKS
        # It joins as the others work; its share may come after the last task.
        late = f"{socket.gethostname()}-{workers[3].pid}"
        joined_at = time.monotonic()
        while not await owned_by(settings, late):
            assert time.monotonic() - joined_at < 60, "the late worker took no share"
            await asyncio.sleep(0.2)
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
    if duplicated:
        detail = await scalar_rows(
            settings,
            "SELECT a.step, a.chain_partition, a.seq, a.time, a.event_id FROM audit_log a "
            "JOIN (SELECT step, event_id FROM audit_log WHERE kind = 'processed' "
            "GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 3) d USING (step, event_id) "
            "WHERE a.kind = 'processed' ORDER BY a.event_id, a.seq",
        )
        offsets = await scalar_rows(
            settings, "SELECT step, partition, last_offset, epoch, owner FROM step_offsets"
        )
        raise AssertionError(f"audit rows written twice: {detail}\noffsets: {offsets}")
    conn = await connect(settings.resolved_database_url(), schema=settings.db_schema)
    try:
        verified = await queries.verify_chains(conn)
    finally:
        await conn.close()
    assert verified.ok, verified
    await drop_schema(settings)
