"""``sluice publish`` without a broker: line reading, validation, batching, pacing, flags."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from pathlib import Path

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.publishing import (
    Item,
    LineReader,
    Pacer,
    PublishStats,
    Rejection,
    generated_chunks,
    make_publisher,
    paced_batch_size,
    publish_stream,
    reader_chunks,
)
from sluicegate.samples import generate
from sluicegate.streams.codec import decode
from sluicegate.streams.transports.memory import MemoryTransport

TASK = b'{"tenant": "acme", "session": "s-1", "data": {"prompt": "what is 2+2"}}'


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)


# --- reading lines ------------------------------------------------------------------


async def read_all(path: Path, *, line_limit: int = 1000, chunk: int = 7) -> list[Item]:
    reader = LineReader(str(path), line_limit=line_limit, chunk=chunk)
    items: list[Item] = []
    async for lines in reader_chunks(reader):
        if lines is not None:
            items.extend(lines)
    return items


async def test_lines_are_numbered_as_in_an_editor_across_chunk_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 22222222}\r\n   \n{"c": 3}')  # no final newline
    items = await read_all(path, chunk=5)  # chunks split lines in the middle
    assert items == [
        (1, b'{"a": 1}'),
        (2, b""),
        (3, b'{"b": 22222222}\r'),
        (4, b"   "),
        (5, b'{"c": 3}'),
    ]


async def test_overlong_lines_are_dropped_while_reading_not_buffered(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"short\n" + b"x" * 100 + b"\nok\n" + b"y" * 100)
    items = await read_all(path, line_limit=20, chunk=8)
    assert items == [(1, b"short"), (2, None), (3, b"ok"), (4, None)]


async def test_an_unreadable_file_raises_from_the_reader(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        await read_all(tmp_path / "missing.jsonl")


# --- pacing -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_pacer_schedules_sends_so_overshoot_does_not_accumulate() -> None:
    clock = FakeClock()
    pacer = Pacer(20, clock=clock, sleep=clock.sleep)
    sent_at = []
    for _ in range(40):
        await pacer.take(1)
        sent_at.append(clock.now)
        clock.now += 0.01  # each send takes a while: absorbed by the schedule
    assert sent_at[0] == 100.0
    assert sent_at[-1] == pytest.approx(100.0 + 39 / 20)


async def test_pacer_moves_the_schedule_up_instead_of_bursting_after_a_stall() -> None:
    clock = FakeClock()
    pacer = Pacer(10, max_lag_s=1.0, clock=clock, sleep=clock.sleep)
    await pacer.take(1)
    clock.now += 30  # the broker stalled for 30 s
    start = clock.now
    for _ in range(30):
        await pacer.take(1)
    # At most 1 s of catch-up burst (10 events), then 10/s again.
    assert clock.now - start == pytest.approx(30 / 10 - 1.0 - 0.1, abs=0.11)


def test_paced_batches_are_about_a_twentieth_of_a_second() -> None:
    assert paced_batch_size(None) == 500
    assert paced_batch_size(20) == 1
    assert paced_batch_size(1000) == 50
    assert paced_batch_size(1e9) == 500
    assert paced_batch_size(0.5) == 1


# --- validation and batching --------------------------------------------------------


async def items_of(*lines: bytes) -> AsyncGenerator[list[Item] | None, None]:
    yield [(i, line) for i, line in enumerate(lines, start=1)]


async def run(
    *lines: bytes, topic: str = "tasks", strict: bool = False, rate: float | None = None
) -> tuple[MemoryTransport, PublishStats, list[Rejection]]:
    transport = MemoryTransport(prefix="t", partitions=2)
    await transport.ensure_topics([topic])
    rejections: list[Rejection] = []
    stats = await publish_stream(
        make_publisher(transport, topic=topic),  # type: ignore[arg-type]
        items_of(*lines),
        PublishStats(),
        strict=strict,
        rate=rate,
        on_reject=rejections.append,
    )
    return transport, stats, rejections


async def published(transport: MemoryTransport, topic: str = "tasks") -> list[dict[str, object]]:
    sub = await transport.subscribe([topic], group=None)
    return [orjson.loads(m.value) for m in await sub.fetch(10_000, 0)]


async def test_valid_lines_are_completed_and_published_invalid_ones_reported() -> None:
    transport, stats, rejections = await run(
        TASK,
        b"",
        b'{"tenant": "acme", "session": "s-1", "data": {"prompt": "x"}',
        b"[1, 2]",
        b'{"tenant": "acme", "session": "s-1", "data": {"prompt": ""}}',
        b'{"tenant": "acme", "data": {"prompt": "no session"}}',
        b'{"tenant": "acme", "session": "s", "type": "task.other", "data": {"prompt": "x"}}',
        b'{"tenant": "acme", "session": "s", "data": {"prompt": "x", "surprise": 1}}',
        b"\xff\xfe",
        b'{"id": "mine", "source": "crm", "tenant": "acme", "session": "s-2",'
        b' "data": {"prompt": "keep my id"}}',
    )
    assert [(r.line, r.reason) for r in rejections] == [
        (3, "invalid_json"),
        (4, "not_an_object"),
        (5, "invalid_data"),
        (6, "missing_attribute"),
        (7, "unknown_type"),
        (8, "invalid_data"),
        (9, "invalid_utf8"),
    ]
    assert str(rejections[0]).startswith("line 3: invalid_json: ")
    assert "line 1 column" not in str(rejections[0])  # orjson's own line count is misleading
    assert "session" in rejections[3].detail
    assert (stats.published, stats.rejected, stats.stopped_at) == (2, 7, None)
    events = sorted(await published(transport), key=lambda e: str(e["session"]))
    assert events[0]["type"] == "task.submitted"
    assert events[0]["source"] == "sluicegate/publish"
    assert events[0]["id"] and events[0]["time"]
    assert (events[1]["id"], events[1]["source"]) == ("mine", "crm")


async def test_strict_stops_at_the_first_invalid_line_after_sending_the_earlier_ones() -> None:
    transport, stats, rejections = await run(TASK, TASK, b"{oops", TASK, b"[]", strict=True)
    assert [r.line for r in rejections] == [3]
    assert (stats.published, stats.rejected, stats.stopped_at) == (2, 1, 3)
    assert len(await published(transport)) == 2


async def test_strict_stop_ends_the_reader_thread_at_once(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"oops\n" + (TASK + b"\n") * 50_000)
    transport = MemoryTransport(prefix="t", partitions=1)
    await transport.ensure_topics(["tasks"])
    reader = LineReader(str(path), line_limit=10_000, chunk=1024)
    stats = await publish_stream(
        make_publisher(transport, topic="tasks"),  # type: ignore[arg-type]
        reader_chunks(reader),
        PublishStats(),
        strict=True,
    )
    assert (stats.published, stats.stopped_at) == (0, 1)
    assert reader._thread is not None
    reader._thread.join(timeout=5)
    assert not reader._thread.is_alive()


async def test_other_topics_check_the_envelope_only_and_need_a_type() -> None:
    completed = (
        b'{"type": "task.completed", "tenant": "acme", "session": "s", "data": {"anything": true}}'
    )
    untyped = b'{"tenant": "acme", "session": "s", "data": {}}'
    _, stats, rejections = await run(completed, untyped, topic="results")
    assert stats.published == 1
    assert [(r.line, r.reason) for r in rejections] == [(2, "missing_attribute")]
    assert "type" in rejections[0].detail


async def test_an_event_over_the_size_limit_is_rejected_not_sent() -> None:
    huge = orjson.dumps(
        {"type": "x.y", "tenant": "a", "session": "s", "data": {"blob": "v" * 1_100_000}}
    )
    small = b'{"type": "x.y", "tenant": "a", "session": "s", "data": {}}'
    _, stats, rejections = await run(huge, small, topic="results")
    assert stats.published == 1
    assert [(r.line, r.reason) for r in rejections] == [(1, "too_large")]


async def test_generated_tasks_are_valid_and_spread_over_sessions() -> None:
    transport = MemoryTransport(prefix="t", partitions=4)
    await transport.ensure_topics(["tasks"])
    registry_publisher = make_publisher(transport, topic="tasks")  # type: ignore[arg-type]
    stats = await publish_stream(
        registry_publisher, generated_chunks(generate(120), chunk=50), PublishStats()
    )
    assert (stats.published, stats.rejected) == (120, 0)
    sub = await transport.subscribe(["tasks"], group=None)
    messages = await sub.fetch(1000, 0)
    assert len(messages) == 120
    assert {m.partition for m in messages} == {0, 1, 2, 3}
    assert all(decode(m.value).type == "task.submitted" for m in messages)


async def test_rate_paces_real_time_loosely() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, stats, _ = await run(*([TASK] * 11), rate=50)
    assert stats.published == 11
    assert 0.15 <= loop.time() - started <= 2.0  # 10 gaps of 20 ms


# --- flags (no broker is reached: these fail before connecting) -----------------------


def test_missing_file_argument_is_exit_2_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # At a terminal: nothing to read. (Piped input is read without "-".)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert main(["publish"]) == 2
    err = capsys.readouterr().err
    assert "FILE" in err and len(err.strip().splitlines()) == 1


def test_nonexistent_file_is_exit_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere.jsonl"
    assert main(["publish", str(missing)]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err


def test_file_and_generate_together_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(TASK)
    assert main(["publish", "--generate", "5", str(path)]) == 2
    assert "--generate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--topic", "nope", "--generate", "1"], "nope"),
        (["--rate", "0", "--generate", "1"], "--rate"),
        (["--generate", "0"], "--generate"),
        (["--transport", "pigeon", "--generate", "1"], "--transport"),
    ],
)
def test_bad_flags_are_exit_2_naming_them(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", *args]) == 2
    assert named in capsys.readouterr().err


def test_unknown_topic_lists_the_pipeline_topics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["publish", "--topic", "nope", "--generate", "1"]) == 2
    err = capsys.readouterr().err
    assert "'tasks'" in err and "'dlq'" in err


def test_an_unreachable_broker_is_exit_1_saying_nothing_was_published(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLUICE_NATS_URL", "nats://127.0.0.1:9")  # discard port: refused
    assert main(["publish", "--generate", "3"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to NATS" in err
    assert "0 events were published" in err


def test_generated_sessions_are_fresh_per_run_and_counted() -> None:
    first = {t["session"] for t in generate(20, sessions=4, run="a1")}
    second = {t["session"] for t in generate(20, sessions=4, run="b2")}
    assert len(first) == len(second) == 4
    assert not first & second
