"""``sluice dlq list|show|replay`` on each transport: a replay is processed once, and audited."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest

from sluicegate import DeadLetter, Step
from sluicegate.cli import main
from sluicegate.runtime import run_steps
from sluicegate.settings import Settings
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output
from tests.integration.pipeline_support import (
    env_for,
    prepare_database,
    publish_events,
    scalar_rows,
    settings_for,
)

pytestmark = pytest.mark.integration


class Guard(Step):
    """Dead-letters every task while ``refuse`` is set (say, a tool that was down)."""

    name = "guard"
    inputs = ("tasks",)
    outputs = ("guarded",)
    refuse = True

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        if Guard.refuse:
            raise DeadLetter("tool_down")
        return [ctx.output("guarded", "task.guarded", {"prompt": event.data["prompt"]})]


@pytest.fixture(params=["nats", "kafka"])
def settings(
    request: pytest.FixtureRequest,
    database_url: str,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Settings]:
    kind = request.param
    settings = settings_for(
        kind,
        nats_url=request.getfixturevalue("nats_url") if kind == "nats" else "nats://unused:1",
        kafka_bootstrap=request.getfixturevalue("kafka_bootstrap") if kind == "kafka" else "x:1",
        database_url=database_url,
        prefix=prefix,
    )
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in env_for(settings).items():
        monkeypatch.setenv(name, value)
    yield settings


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[None]:
    await prepare_database(settings)
    Guard.refuse = True
    stop = asyncio.Event()
    task = asyncio.create_task(run_steps([Guard()], settings, stop=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def task(n: int) -> Event:
    # One session: one partition, processed in order, so the sentinel task
    # published last is done only after every replay before it.
    return Event(
        source="tests", type="task.submitted", tenant="acme", session="s1", data={"prompt": n}
    )


async def rows(settings: Settings, query: str) -> list[tuple[object, ...]]:
    return await scalar_rows(settings, query)


async def until(settings: Settings, query: str, want: int) -> None:
    """Poll until ``query`` (a count) reaches ``want``; bounded: a bug fails, never hangs."""
    count: object = None
    try:
        async with asyncio.timeout(60):
            while True:
                ((count,),) = await rows(settings, query)
                if count == want:
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"{query}: {count}, never {want}")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


DEAD = "SELECT count(*) FROM audit_log WHERE kind = 'dead_letter' AND step = 'guard'"
PROCESSED = "SELECT count(*) FROM audit_log WHERE kind = 'processed' AND step = 'guard'"


async def test_replay_processes_each_dead_letter_once_and_audits_it(
    settings: Settings, worker: None, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = task(1), task(2)
    await publish_events(settings, [first, second])
    await until(settings, DEAD, 2)

    code, out, _ = await asyncio.to_thread(run_cli, capsys, "dlq", "list", "--json")
    assert code == 0
    listed = [orjson.loads(line) for line in out.splitlines()]
    assert [(d["event_id"], d["reason"], d["replays"]) for d in listed] == [
        (first.id, "tool_down", 0),
        (second.id, "tool_down", 0),
    ]
    assert {d["tenant"] for d in listed} == {"acme"}
    code, out, _ = await asyncio.to_thread(run_cli, capsys, "dlq", "list", "--reason", "nope")
    assert code == 0 and out == ""

    code, out, _ = await asyncio.to_thread(
        run_cli, capsys, "dlq", "show", listed[0]["id"], "--json"
    )
    assert code == 0
    shown = orjson.loads(out)
    assert shown["body"]["id"] == first.id
    assert shown["headers"]["sluice-dlq-reason"] == "tool_down"

    # The tool is back: replay both; each is processed although its id was dead-lettered.
    Guard.refuse = False
    code, out, err = await asyncio.to_thread(run_cli, capsys, "dlq", "replay", "--step", "guard")
    assert code == 0, err
    assert err.strip() == "replayed 2, skipped 0 replayed before, 0 missing"
    await until(settings, PROCESSED, 2)

    # Once only, unless --again; and --again is absorbed by id (processed since).
    code, out, err = await asyncio.to_thread(run_cli, capsys, "dlq", "replay", "--step", "guard")
    assert err.strip() == "replayed 0, skipped 2 replayed before, 0 missing"
    code, out, err = await asyncio.to_thread(
        run_cli, capsys, "dlq", "replay", "--id", listed[0]["id"], "--again"
    )
    assert code == 0 and err.strip() == "replayed 1, skipped 0 replayed before, 0 missing"
    sentinel = task(3)
    await publish_events(settings, [sentinel])
    await until(settings, PROCESSED, 3)
    processed = await rows(
        settings,
        "SELECT event_id, count(*) FROM audit_log WHERE kind = 'processed' GROUP BY 1 ORDER BY 1",
    )
    assert sorted(processed) == sorted([(first.id, 1), (second.id, 1), (sentinel.id, 1)])
    replays = await rows(
        settings,
        "SELECT event_id, detail->>'dead_letter' FROM audit_log WHERE kind = 'dlq_replay'",
    )
    assert sorted(replays) == sorted(
        [(first.id, listed[0]["id"]), (second.id, listed[1]["id"]), (first.id, listed[0]["id"])]
    )

    # The trail across sessions: dead letters without --session.
    code, out, _ = await asyncio.to_thread(
        run_cli, capsys, "audit", "show", "--kind", "dead_letter"
    )
    assert code == 0
    assert out.splitlines()[0].split()[:5] == ["TIME", "STEP", "KIND", "EVENT", "TYPE"]
    assert first.id in out and second.id in out
    code, _, err = await asyncio.to_thread(run_cli, capsys, "dlq", "show", "guard/0/999")
    assert code == 2 and "no dead letter 'guard/0/999'" in err
