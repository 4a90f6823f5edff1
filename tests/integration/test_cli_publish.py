"""``sluice publish`` against real brokers: files, stdin, rejections, --strict, --generate, --rate.

The CLI runs in-process through ``sluicegate.cli.main`` with the test's
SLUICE_* variables, except where a real stdin is needed (a subprocess). Each
test has its own topic prefix, so what a test reads back is exactly what it
published.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.runtime import make_transport
from sluicegate.settings import Settings
from sluicegate.streams.transport import Message, Subscription
from tests.integration.pipeline_support import env_for, settings_for

pytestmark = pytest.mark.integration

KINDS = ["nats", "kafka"]
# Publish and tail never touch Postgres; settings still carry a URL.
NO_DATABASE = "postgresql://postgres@127.0.0.1:1/unused"


# --- helpers shared with test_cli_tail ----------------------------------------------


@pytest.fixture
def cli_settings(
    request: pytest.FixtureRequest, kind: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings for one test, also exported as SLUICE_* for in-process ``main()`` calls."""
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=request.getfixturevalue("nats_url") if kind == "nats" else "nats://unused:1",
        kafka_bootstrap=request.getfixturevalue("kafka_bootstrap") if kind == "kafka" else "x:1",
        database_url=NO_DATABASE,
        prefix=prefix,
        partitions=3,
    )
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in env_for(settings).items():
        monkeypatch.setenv(name, value)
    yield settings


def subprocess_env(settings: Settings) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return {**base, **env_for(settings)}


async def drain(sub: Subscription, want: int, *, timeout_s: float = 30.0) -> list[Message]:
    """Fetch until ``want`` messages arrived, then once more: a surplus would show up."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(await sub.fetch(1000, 0.5))
    got.extend(await sub.fetch(1000, 1.0))
    return got


async def read_topic_async(settings: Settings, topic: str, want: int) -> list[dict[str, object]]:
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics([topic])
        sub = await transport.subscribe([topic], group=None, start="earliest")
        try:
            return [orjson.loads(m.value) for m in await drain(sub, want)]
        finally:
            await sub.close()
    finally:
        await transport.close()


def read_topic(settings: Settings, topic: str, want: int) -> list[dict[str, object]]:
    """Everything on ``topic`` (waiting for ``want`` messages), as parsed JSON."""
    return asyncio.run(read_topic_async(settings, topic, want))


def task_line(session: str, prompt: str = "what is 6 * 7", tenant: str = "acme") -> str:
    return orjson.dumps({"tenant": tenant, "session": session, "data": {"prompt": prompt}}).decode()


# --- tests --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_publish_a_valid_file(
    cli_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tasks.jsonl"
    lines = [task_line(f"s-{i}", f"what is {i} * 7") for i in range(7)]
    path.write_text("\n".join(lines[:3]) + "\n\n   \n" + "\n".join(lines[3:]) + "\n")

    assert main(["publish", str(path)]) == 0

    err = capsys.readouterr().err
    assert "published 7, rejected 0" in err and "events/s" in err
    events = read_topic(cli_settings, "tasks", 7)
    assert len(events) == 7
    assert sorted(str(e["session"]) for e in events) == sorted(f"s-{i}" for i in range(7))
    for e in events:
        assert e["type"] == "task.submitted"
        assert e["source"] == "sluicegate/publish"
        assert e["id"] and e["time"] and e["specversion"] == "1.0"
    assert len({e["id"] for e in events}) == 7


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_lines_are_reported_by_number_and_the_valid_ones_published(
    cli_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "\n".join(
            [
                task_line("ok-1"),
                '{"tenant": "acme", "session": "x", "data": {"prompt": ',
                task_line("ok-2"),
                '"just a string"',
                task_line("bad", prompt=""),
                '{"tenant": "acme", "session": "x", "type": "task.nope", "data": {"prompt": "p"}}',
                task_line("ok-3"),
            ]
        )
    )

    assert main(["publish", str(path)]) == 1

    err = capsys.readouterr().err
    assert "line 2: invalid_json: " in err
    assert "line 4: not_an_object: " in err
    assert "line 5: invalid_data: data.prompt" in err
    assert "line 6: unknown_type: " in err
    assert "line 1:" not in err and "line 3:" not in err and "line 7:" not in err
    assert "published 3, rejected 4" in err
    events = read_topic(cli_settings, "tasks", 3)
    assert sorted(str(e["session"]) for e in events) == ["ok-1", "ok-2", "ok-3"]


@pytest.mark.parametrize("kind", KINDS)
def test_strict_stops_at_the_first_invalid_line(
    cli_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "strict.jsonl"
    path.write_text(
        "\n".join([task_line("a"), task_line("b"), "{broken", task_line("c"), "[]"]) + "\n"
    )

    assert main(["publish", "--strict", str(path)]) == 1

    err = capsys.readouterr().err
    assert "line 3: invalid_json" in err
    assert "line 5" not in err  # nothing after the stop is even looked at
    assert "stopped at line 3 (--strict): the 2 valid line(s) before it were published" in err
    events = read_topic(cli_settings, "tasks", 2)
    assert sorted(str(e["session"]) for e in events) == ["a", "b"]


@pytest.mark.parametrize("kind", KINDS)
def test_strict_on_the_first_line_publishes_nothing(
    cli_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "strict.jsonl"
    path.write_text("nope\n" + task_line("a") + "\n")
    assert main(["publish", "--strict", str(path)]) == 1
    assert "stopped at line 1 (--strict): nothing was published" in capsys.readouterr().err
    assert read_topic(cli_settings, "tasks", 0) == []


@pytest.mark.parametrize("kind", KINDS)
def test_stdin_with_dash(cli_settings: Settings) -> None:
    lines = [task_line(f"in-{i}") for i in range(20)] + ["not json"]
    result = subprocess.run(
        [sys.executable, "-m", "sluicegate", "publish", "-"],
        input="\n".join(lines) + "\n",
        env=subprocess_env(cli_settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "line 21: invalid_json" in result.stderr
    assert "published 20, rejected 1" in result.stderr
    assert "Traceback" not in result.stderr
    events = read_topic(cli_settings, "tasks", 20)
    assert sorted(str(e["session"]) for e in events) == sorted(f"in-{i}" for i in range(20))


@pytest.mark.parametrize("kind", KINDS)
def test_generate(cli_settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "--generate", "50"]) == 0
    assert "published 50, rejected 0" in capsys.readouterr().err
    events = read_topic(cli_settings, "tasks", 50)
    assert len(events) == 50
    assert {e["type"] for e in events} == {"task.submitted"}
    assert len({e["session"] for e in events}) > 10


@pytest.mark.parametrize("kind", KINDS)
def test_generate_onto_another_topic(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", "--topic", "context", "--generate", "5"]) == 0
    assert len(read_topic(cli_settings, "context", 5)) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_rate_paces_the_publishing(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # A sanity bound on pacing (40 events at 20/s is about 2 s), not a performance assertion.
    started = time.monotonic()
    assert main(["publish", "--generate", "40", "--rate", "20"]) == 0
    elapsed = time.monotonic() - started
    assert 1.2 <= elapsed <= 6.0, elapsed
    assert "published 40" in capsys.readouterr().err
    assert len(read_topic(cli_settings, "tasks", 40)) == 40


@pytest.mark.parametrize("kind", ["nats"])
def test_with_tracing_on_each_published_event_starts_its_trace(cli_settings: Settings) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sluicegate.streams import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        assert main(["publish", "--generate", "3"]) == 0
    finally:
        tracing.shutdown()
    events = read_topic(cli_settings, "tasks", 3)
    spans = exporter.get_finished_spans()
    assert {span.name for span in spans} == {"send tasks"}
    span_traces = {f"{span.context.trace_id:032x}" for span in spans}
    event_traces = {str(e["traceparent"]).split("-")[1] for e in events}
    assert len(event_traces) == 3
    assert event_traces == span_traces
