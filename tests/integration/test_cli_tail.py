"""``sluice tail`` against real brokers: filters, --count, --json, dlq, new-only, Ctrl-C,
and that an observer never disturbs the pipeline's consumer groups.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import H_DLQ_REASON, H_DLQ_SOURCE, H_DLQ_STEP
from sluicegate.streams.transport import OutMessage, TopicPartition
from tests.integration import test_cli_publish
from tests.integration.test_cli_publish import KINDS, drain, subprocess_env

pytestmark = pytest.mark.integration

# The same per-test settings (and SLUICE_* variables) as the publish tests.
cli_settings = test_cli_publish.cli_settings

READY = "following "  # the line tail writes on stderr once it is subscribed


def completed(tenant: str, session: str, status: str = "completed", line: str = "42") -> Event:
    return Event(
        source="tests",
        type="task.completed",
        tenant=tenant,
        session=session,
        data={
            "task_id": "t",
            "status": status,
            "action_count": 1,
            "answer": {"text": f"All 1 action(s) succeeded.\n1. calculator: {line}"},
        },
    )


def submitted(session: str, prompt: str = "what is 6 * 7") -> Event:
    return Event(
        source="tests",
        type="task.submitted",
        tenant="acme",
        session=session,
        data={"prompt": prompt},
    )


async def put(settings: Settings, topic: str, messages: Sequence[Event | OutMessage]) -> None:
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics([topic])
        await transport.publish_batch(
            [
                m
                if isinstance(m, OutMessage)
                else OutMessage(topic, encode(m), key=m.key, headers=headers_for(m))
                for m in messages
            ]
        )
    finally:
        await transport.close()


def tail_subprocess(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sluicegate", "tail", *args],
        env=subprocess_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> None:
    """Block until tail says it is subscribed (its first stderr line)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith(READY):
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"tail never got ready: {proc.communicate()}")


@pytest.mark.parametrize("kind", KINDS)
def test_filters_and_count(cli_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        completed("acme", "alice", line="6 * 7 = 42"),
        completed("globex", "alice"),
        completed("acme", "bob"),
        completed("acme", "alice", status="partial", line="2 ** 10 = 1024"),
        completed("acme", "alice", line="never shown: --count stops before it"),
    ]
    asyncio.run(put(cli_settings, "results", events))

    args = ["tail", "--from-beginning", "--tenant", "acme", "--session", "alice", "--count", "2"]
    assert main(args) == 0

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert all("task.completed" in line and "acme/alice" in line for line in lines)
    # One session lands on one partition, so its events come in publish order.
    assert "completed: 1. calculator: 6 * 7 = 42" in lines[0]
    assert "partial: 1. calculator: 2 ** 10 = 1024" in lines[1]
    assert events[0].id[-8:] in lines[0]


@pytest.mark.parametrize("kind", KINDS)
def test_json_is_the_cloudevent_as_on_the_wire_and_type_filters(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [submitted("s1"), completed("acme", "s1"), submitted("s2"), submitted("s3")]
    asyncio.run(put(cli_settings, "tasks", events))

    args = ["tail", "tasks", "--from-beginning", "--json", "--type", "task.submitted", "--count"]
    assert main([*args, "3"]) == 0

    printed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    wanted = {e.id: orjson.loads(encode(e)) for e in events if e.type == "task.submitted"}
    # As on the wire, plus where each sits.
    places = [(p.pop("partition"), p.pop("offset")) for p in printed]
    assert all(isinstance(part, int) and isinstance(off, int) for part, off in places)
    assert {p["id"]: p for p in printed} == wanted


@pytest.mark.parametrize("kind", KINDS)
def test_partition_and_offset_choose_where_to_start(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # One session: one partition, in publish order.
    events = [submitted("s1", prompt=f"task {i}") for i in range(3)]
    asyncio.run(put(cli_settings, "tasks", events))
    assert main(["tail", "tasks", "--from-beginning", "--json", "--count", "3"]) == 0
    placed = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    partition, second = placed[1]["partition"], placed[1]["offset"]

    args = ["tail", "tasks", "--partition", str(partition), "--offset", str(second)]
    assert main([*args, "--count", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [f" {partition}:" in line for line in lines] == [True, True]
    assert "task 1" in lines[0] and "task 2" in lines[1]

    # --since reads from the beginning and keeps what the broker took in since.
    assert main(["tail", "tasks", "--since", "1h", "--count", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_dead_letters_show_their_headers_and_poison_bodies_safely(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = {H_DLQ_REASON: "invalid_json", H_DLQ_STEP: "intake", H_DLQ_SOURCE: "tasks/0/3"}
    poison = b'\xff{"type": "task.submitted", \x1b[31m'
    asyncio.run(put(cli_settings, "dlq", [OutMessage("dlq", poison, key=b"k", headers=headers)]))

    assert main(["tail", "dlq", "--from-beginning", "--count", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert "dlq:invalid_json" in line and "step=intake" in line and "tasks/0/3" in line
    assert "\x1b" not in line

    assert main(["tail", "dlq", "--from-beginning", "--count", "1", "--json"]) == 0
    printed = orjson.loads(capsys.readouterr().out)
    assert printed["dlq"]["reason"] == "invalid_json"
    assert printed["dlq"]["source"] == "tasks/0/3"
    assert "body_base64" in printed


@pytest.mark.parametrize("kind", KINDS)
def test_new_events_only_and_ctrl_c_exits_130_without_a_traceback(
    cli_settings: Settings,
) -> None:
    old = [submitted("old-1"), submitted("old-2")]
    asyncio.run(put(cli_settings, "tasks", old))
    proc = tail_subprocess(cli_settings, "tasks", "--json")
    try:
        wait_ready(proc)
        new = [submitted("new-1"), submitted("new-2")]
        asyncio.run(put(cli_settings, "tasks", new))
        assert proc.stdout is not None
        seen = [orjson.loads(proc.stdout.readline()) for _ in new]  # blocks until printed
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "stopped after 2 event(s)" in err
    assert out == ""  # nothing after the two new events
    assert sorted(e["session"] for e in seen) == ["new-1", "new-2"]


@pytest.mark.parametrize("kind", KINDS)
async def test_tail_does_not_disturb_a_consumer_group(cli_settings: Settings) -> None:
    """A live group member keeps its partitions and gets everything; its committed
    position is where it left it, so a restarted member resumes there."""
    settings = cli_settings
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        group = await transport.subscribe(["tasks"], group="intake", start="earliest")
        owned = group.assignment()
        assert owned == frozenset(TopicPartition("tasks", p) for p in range(settings.partitions))

        first = [submitted(f"first-{i}") for i in range(6)]
        await put(settings, "tasks", first)
        got = await drain(group, 6)
        assert sorted(m.headers["ce_id"] for m in got) == sorted(e.id for e in first)
        await group.commit(got)

        # The group member stays subscribed (and, on Kafka, heartbeating: the
        # loop stays free) while tail reads everything from the beginning.
        tail = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sluicegate",
            "tail",
            "tasks",
            "--from-beginning",
            "--json",
            "--count",
            "10",
            env=subprocess_env(settings),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert tail.stderr is not None
        ready = await asyncio.wait_for(tail.stderr.readline(), 60)
        assert ready.decode().startswith(READY), ready
        second = [submitted(f"second-{i}") for i in range(4)]
        await put(settings, "tasks", second)
        out, err = await asyncio.wait_for(tail.communicate(), 60)
        assert tail.returncode == 0, err
        tailed = {orjson.loads(line)["id"] for line in out.splitlines()}
        assert tailed == {e.id for e in first + second}

        # The live member still owns every partition and gets exactly the new events.
        got = await drain(group, 4)
        assert sorted(m.headers["ce_id"] for m in got) == sorted(e.id for e in second)
        assert group.assignment() == owned
        await group.close()  # without committing the second batch

        # The committed position is still after the first batch.
        again = await transport.subscribe(["tasks"], group="intake", start="earliest")
        redelivered = await drain(again, 4)
        assert sorted(m.headers["ce_id"] for m in redelivered) == sorted(e.id for e in second)
        await again.close()
    finally:
        await transport.close()
