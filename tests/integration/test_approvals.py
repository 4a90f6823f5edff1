"""Held actions on real brokers and Postgres: the ``hold`` decision end to end.

On both transports: a small refund passes; a large one is held and, with
nobody deciding, denied with ``approval_timeout`` once SLUICE_APPROVAL_TIMEOUT
passed; a worker (a real ``sluice run``) SIGKILLed while actions are held
loses none of them: one is approved while no worker runs, the others after
the restart, through ``sluice approvals``, and every decision is in the
audit timeline with who made it and why.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from sluicegate.cli_approvals import approvals
from sluicegate.cli_audit import audit
from sluicegate.faust_engine import run_faust_steps
from sluicegate.runtime import run_steps
from sluicegate.settings import Settings
from sluicegate.streams.envelope import Event
from tests.integration.crash_support import spawn_worker
from tests.integration.pipeline_support import (
    all_results,
    env_for,
    prepare_database,
    publish_events,
    running_pipeline,
    scalar_rows,
    settings_for,
    wait_for_results,
)

pytestmark = pytest.mark.integration


def task(session: str, prompt: str) -> Event:
    data = {"prompt": prompt}
    return Event(source="tests", type="task.submitted", tenant="acme", session=session, data=data)


@asynccontextmanager
async def worker(settings: Settings, engine: str) -> AsyncIterator[None]:
    """The reference pipeline in this process, on the native or the Faust engine."""
    async with running_pipeline(settings, run_steps if engine == "native" else run_faust_steps):
        yield


def sluice_approvals(settings: Settings, *args: str) -> Any:
    """``sluice approvals ARGS`` on the test's schema (run in a thread: it has its own loop)."""
    return CliRunner().invoke(approvals, list(args), env=env_for(settings))


async def cli(settings: Settings, *args: str) -> str:
    result = await asyncio.to_thread(sluice_approvals, settings, *args)
    assert result.exit_code == 0, result.output
    return str(result.output)


async def pending(settings: Settings, n: int, *, timeout_s: float = 60) -> list[dict[str, Any]]:
    """The pending held actions, once there are ``n`` of them (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        out = await cli(settings, "list", "--json")
        rows = [orjson.loads(line) for line in out.splitlines() if line.strip()]
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.2)
    raise AssertionError(f"{len(rows)} held actions after {timeout_s} s, expected {n}: {rows}")


@pytest.mark.parametrize(
    ("kind", "engine"), [("nats", "native"), ("kafka", "native"), ("kafka", "faust")]
)
async def test_small_refund_passes_large_one_times_out(
    kind: str,
    engine: str,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=prefix,
    )
    await prepare_database(settings)
    monkeypatch.setenv("SLUICE_APPROVAL_TIMEOUT", "2")
    small, large = task("small", "refund 80 for order A-1"), task("large", "refund 250 order A-2")
    async with worker(settings, engine):
        await publish_events(settings, [small, large])
        assert await wait_for_results(settings, 2, timeout_s=60) == 2, "no results in 60 s"
    results = {r.task_id: r for r in await all_results(settings)}
    assert results[small.id].status == "completed"
    assert "refunded 80 on order A-1" in str(results[small.id].answer)
    assert results[large.id].status == "denied"
    assert "approval_timeout" in str(results[large.id].answer)
    rows = await scalar_rows(
        settings,
        "SELECT kind, decision, reasons, detail->>'by' FROM audit_log "
        "WHERE session = 'large' AND step = 'gate' AND kind IN ('decision', 'approval') "
        "ORDER BY kind DESC",
    )
    assert rows == [
        ("decision", "hold", ["refund_over_threshold"], None),
        ("approval", "deny", ["approval_timeout"], "sluicegate"),
    ]
    listed = await cli(settings, "list", "--all", "--json")
    [row] = [orjson.loads(line) for line in listed.splitlines()]
    assert (row["status"], row["decided_by"], row["decided_reason"]) == (
        "denied",
        "sluicegate",
        "approval_timeout",
    )


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_held_actions_survive_sigkill_and_are_decided_after(
    kind: str,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=prefix,
    )
    await prepare_database(settings)
    monkeypatch.setenv("SLUICE_APPROVAL_TIMEOUT", "600")
    first = task("s1", "refund 300 for order B-1")
    later = task("s1", "echo the session goes on")  # behind a held action, same session
    second = task("s2", "refund 400 for order B-2")
    third = task("s3", "refund 500 for order B-3")
    log = tmp_path / "worker.log"
    worker = spawn_worker(settings, log)
    try:
        await publish_events(settings, [first, later, second, third])
        held = await pending(settings, 3)
        # The held action blocks neither its session nor its partition.
        assert await wait_for_results(settings, 1, timeout_s=60) == 1
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        by_task = {row["task_id"]: row for row in held}
        assert set(by_task) == {first.id, second.id, third.id}
        assert by_task[first.id]["args"] == {"amount": 300, "order": "B-1"}
        assert by_task[first.id]["reasons"] == ["refund_over_threshold"]

        # Decided while no worker runs: the decision waits in Postgres.
        await cli(settings, "approve", by_task[first.id]["id"], "--reason", "customer is right")
        worker = spawn_worker(settings, log)
        await cli(settings, "approve", by_task[second.id]["id"], "--reason", "ok", "--as", "bob")
        await cli(settings, "deny", by_task[third.id]["id"], "--reason", "fraud", "--as", "alice")
        again = await asyncio.to_thread(
            sluice_approvals, settings, "deny", by_task[first.id]["id"], "--reason", "late"
        )
        assert again.exit_code == 1 and "already approved" in again.output, again.output
        assert await wait_for_results(settings, 4, timeout_s=60) == 4, log.read_text()[-3000:]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)

    results = {r.task_id: r for r in await all_results(settings)}
    assert results[later.id].status == "completed"
    assert results[first.id].status == results[second.id].status == "completed"
    assert "refunded 400 on order B-2 [bob: ok]" in str(results[second.id].answer)
    assert results[third.id].status == "denied"
    assert "denied (approval_denied) [alice: fraud]" in str(results[third.id].answer)
    rows = await scalar_rows(
        settings,
        "SELECT session, decision, reasons, detail->>'by', detail->>'reason' FROM audit_log "
        "WHERE kind = 'approval' ORDER BY session",
    )
    assert rows[0][:2] == ("s1", "allow") and rows[0][4] == "customer is right"
    assert rows[1:] == [
        ("s2", "allow", ["approval_granted"], "bob", "ok"),
        ("s3", "deny", ["approval_denied"], "alice", "fraud"),
    ]
    # The operator's view of the timeline names who decided and why.
    shown = await asyncio.to_thread(
        CliRunner().invoke, audit, ["show", "--session", "s3"], env=env_for(settings)
    )
    assert shown.exit_code == 0, shown.output
    assert "approval_denied (by alice: fraud)" in shown.output
    # Each approval resumed exactly once.
    counts = await scalar_rows(
        settings, "SELECT count(*) FROM audit_log WHERE kind = 'processed' AND step = 'tools'"
    )
    assert counts == [(3,)]
