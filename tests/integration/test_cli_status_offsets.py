"""``sluice status`` and ``sluice offsets show|reset`` around the reference pipeline, on
real NATS / Kafka-protocol brokers and Postgres.

One story per transport: a worker runs and drains some tasks (status shows
every step and partition caught up, and the worker); a reset is refused
while the worker holds the partition and goes through with --force or once
it stopped; a stored offset pushed beyond its log's end stops the partition
in a restarted worker (which logs the command that resets it), and
``offsets reset --to-latest`` brings it back: new tasks on it complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.pipeline import build_steps
from sluicegate.streams.envelope import Event
from sluicegate.streams.partitioning import partition_for
from tests.integration.pipeline_support import (
    all_results,
    drop_schema,
    env_for,
    mixed_tasks,
    prepare_database,
    publish_events,
    running_pipeline,
    scalar_rows,
    settings_for,
    wait_for_results,
)

pytestmark = pytest.mark.integration

PARTITIONS = 3
STOPPED = 1  # the partition the story stops and brings back
STEPS = {s.name: s.inputs for s in build_steps()}


async def sluice(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI (in a thread: it runs its own event loop) and capture its output."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def status(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = await sluice(capsys, "status", "--json")
    assert code == 0, err
    doc: dict[str, Any] = orjson.loads(out)
    return doc


async def until(check: Callable[[], Awaitable[Any]], what: str, *, timeout_s: float = 90.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.3)
    pytest.fail(f"gave up waiting for {what}; last seen: {last!r}")


def partitions_of(doc: dict[str, Any], step: str) -> list[dict[str, Any]]:
    [entry] = [s for s in doc["steps"] if s["step"] == step]
    parts: list[dict[str, Any]] = entry["partitions"]
    return parts


def tasks_on(partition: int, n: int, tag: str) -> list[Event]:
    """``n`` calculator tasks whose sessions land on ``partition``."""
    events: list[Event] = []
    i = 0
    while len(events) < n:
        session = f"{tag}-{i}"
        i += 1
        if partition_for(session.encode(), PARTITIONS) != partition:
            continue
        events.append(
            Event(
                source="tests",
                type="task.submitted",
                tenant="acme",
                session=session,
                data={"prompt": f"what is {i} * 3"},
            )
        )
    return events


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_status_and_offsets_around_a_worker(
    kind: str,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=prefix,
        partitions=PARTITIONS,
    )
    for name, value in env_for(settings).items():
        monkeypatch.setenv(name, value)
    await prepare_database(settings)
    tasks = mixed_tasks(30, sessions=9)
    # Some tasks on every partition, so every watermark of intake moves.
    spread = [e for p in range(PARTITIONS) for e in tasks_on(p, 2, f"spread-{kind}")]

    # -- a running worker drains some tasks --------------------------------------
    async with running_pipeline(settings):
        await publish_events(settings, [t.event for t in tasks] + spread)
        first = len(tasks) + len(spread)
        assert await wait_for_results(settings, first, timeout_s=90) == first

        async def caught_up() -> dict[str, Any] | None:
            doc = await status(capsys)
            parts = [p for s in doc["steps"] for p in s["partitions"]]
            return doc if all(p["lag"] == 0 for p in parts) and doc["workers"] else None

        doc = await until(caught_up, "every partition at lag 0 with a live worker")
        assert doc["transport"] == kind
        assert [s["step"] for s in doc["steps"]] == list(STEPS)
        for step, inputs in STEPS.items():
            parts = partitions_of(doc, step)
            assert sorted((p["topic"], p["partition"]) for p in parts) == sorted(
                (t, p) for t in inputs for p in range(PARTITIONS)
            )
            for p in parts:
                assert p["log"].startswith(f"{kind}:"), p
                assert p["held"] is True, p
                assert p["owner"], p
                assert p["stopped"] is False
                assert p["epoch"] >= 1
        intake = partitions_of(doc, "intake")
        # Every task went through intake: its watermarks cover them all.
        assert all(p["offset"] is not None for p in intake)
        assert len(doc["workers"]) >= 1
        if kind == "nats":
            assert {p["owner_source"] for p in intake} == {"lease"}
            assert doc["workers"][0]["steps"] == sorted(STEPS)

        code, out, err = await sluice(capsys, "offsets", "show", "--step", "intake", "--json")
        assert code == 0, err
        shown = orjson.loads(out)
        assert [p["partition"] for p in shown["offsets"]] == list(range(PARTITIONS))
        assert all(p["lag"] == 0 and p["log_end"] is not None for p in shown["offsets"])
        assert shown["other_logs"] == []
        code, out, err = await sluice(capsys, "offsets", "show", "--step", "responder")
        assert code == 0, err
        assert "tool.results" in out and "actions.denied" in out

        # Refused while the worker holds the partition; --force goes through.
        reset = ["offsets", "reset", "--step", "intake", "--partition", str(STOPPED)]
        code, out, err = await sluice(capsys, *reset, "--to-latest")
        assert code == 1
        assert "refusing to reset intake tasks[1]" in err
        assert len(err.strip().splitlines()) == 1
        code, out, err = await sluice(capsys, *reset, "--to", "999999")
        assert code == 2
        assert "N may be at most" in err
        before = {p["partition"]: p for p in shown["offsets"]}[STOPPED]
        code, out, err = await sluice(capsys, *reset, "--to-latest", "--force")
        assert code == 0, err
        assert "nothing to skip" in out
        assert f"epoch {before['epoch']} -> {before['epoch'] + 1}" in out
        assert "fenced" in err

    # -- stopped: a reset needs no --force ---------------------------------------------
    code, out, err = await sluice(capsys, *reset, "--to-latest")
    assert code == 0, err
    doc = await status(capsys)
    intake = {p["partition"]: p for p in partitions_of(doc, "intake")}
    assert intake[STOPPED]["held"] is False
    assert intake[STOPPED]["owner"].startswith("reset by ")
    assert intake[STOPPED]["owner_source"] == "last_claim"

    # -- a stored offset beyond its log's end stops the partition ---------------------
    log = intake[STOPPED]["log"]
    end = intake[STOPPED]["log_end"]
    await scalar_rows(
        settings,
        f"UPDATE step_offsets SET last_offset = {end + 1000} "
        f"WHERE step = 'intake' AND partition = {STOPPED} AND topic = '{log}' RETURNING 1",
    )
    caplog.set_level(logging.ERROR, logger="sluicegate.runner")
    async with running_pipeline(settings):

        async def stop_logged() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if "sluice offsets reset --step intake --partition 1" in r.getMessage()
            ]

        [line] = await until(stop_logged, "the runner's error about the stopped partition")
        assert f"stopped tasks[{STOPPED}]" in line
        doc = await status(capsys)
        stopped = {p["partition"]: p for p in partitions_of(doc, "intake")}[STOPPED]
        assert stopped["stopped"] is True
        assert stopped["beyond_end"] == 1000
        code, out, err = await sluice(capsys, "status")
        assert code == 0, err
        assert "STOPPED" in out
        assert "sluice offsets reset --step intake --partition 1 --to-latest" in out

    # -- offsets reset --to-latest brings it back ----------------------------------------
    code, out, err = await sluice(capsys, *reset, "--to-latest")
    assert code == 0, err
    assert f"back from {end + 1000}" in out
    fresh = tasks_on(STOPPED, 6, f"back-{kind}")
    async with running_pipeline(settings):
        await publish_events(settings, fresh)
        want = first + len(fresh)
        assert await wait_for_results(settings, want, timeout_s=90) == want
    done = {r.task_id: r for r in await all_results(settings)}
    assert all(done[e.id].status == "completed" for e in fresh)
    doc = await status(capsys)
    back = {p["partition"]: p for p in partitions_of(doc, "intake")}[STOPPED]
    assert back["stopped"] is False
    assert back["lag"] == 0

    # Rows kept for other logs are listed apart, marked, and never reset.
    await scalar_rows(
        settings,
        "INSERT INTO step_offsets (step, topic, partition, last_offset) "
        f"VALUES ('intake', 'tasks', {STOPPED}, 7) RETURNING 1",
    )
    code, out, err = await sluice(
        capsys, "offsets", "show", "--step", "intake", "--partition", str(STOPPED), "--json"
    )
    assert code == 0, err
    shown = orjson.loads(out)
    assert [p["partition"] for p in shown["offsets"]] == [STOPPED]
    assert shown["other_logs"] == [
        {**shown["other_logs"][0], "log": "tasks", "offset": 7, "kind": "legacy"}
    ]
    code, out, err = await sluice(capsys, *reset, "--to-earliest")
    assert code == 0, err
    assert "-> none" in out
    rows = await scalar_rows(
        settings, "SELECT last_offset FROM step_offsets WHERE step = 'intake' AND topic = 'tasks'"
    )
    assert rows == [(7,)]
    await drop_schema(settings)
