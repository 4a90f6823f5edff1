"""``sluice tail`` without a broker: inspecting, filtering and rendering messages, the loop."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

from sluicegate.cli import main
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import H_DLQ_MESSAGE, H_DLQ_REASON, H_DLQ_SOURCE, H_DLQ_STEP
from sluicegate.streams.transport import Message, OutMessage
from sluicegate.streams.transports.memory import MemoryTransport
from sluicegate.tailing import (
    Filter,
    Seen,
    follow,
    inspect,
    render_json,
    render_line,
    renderer,
    summarize,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)


def event(type_: str = "task.completed", **data: object) -> Event:
    return Event(
        id="01a20862-8658-71ca-893e-53d589bf3b89",
        source="tests",
        type=type_,
        tenant="acme",
        session="alice",
        data=dict(data),
    )


def message(
    value: bytes, *, topic: str = "results", key: bytes | None = b"alice", **headers: str
) -> Message:
    return Message(topic, 1, 7, key, value, headers, timestamp_ms=1_700_000_000_000)


def of(e: Event, topic: str = "results") -> Message:
    return message(encode(e), topic=topic, key=e.key, **headers_for(e))


COMPLETED = event(
    status="completed",
    task_id="t",
    action_count=2,
    answer={"text": "All 2 action(s) succeeded.\n1. calculator: 6 * 7 = 42\n2. search: found"},
)


def test_completed_result_line_has_time_type_who_id_status_and_answer() -> None:
    line = render_line(inspect(of(COMPLETED)))
    assert line.startswith(COMPLETED.time.strftime("%Y-%m-%dT%H:%M:%S."))
    assert "task.completed" in line
    assert "acme/alice" in line
    assert "89bf3b89" in line  # the end of the id
    assert "completed: 1. calculator: 6 * 7 = 42 (+1 more)" in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("type_", "data", "expected"),
    [
        ("task.submitted", {"prompt": "what is 2+2"}, "what is 2+2"),
        ("task.completed", {"status": "denied", "answer": {"text": "denied"}}, "denied: denied"),
        (
            "action.denied",
            {"tool": "shell", "action_index": 0, "action_count": 1, "reasons": ["dangerous"]},
            "#1/1 shell denied: dangerous",
        ),
        (
            "tool.result",
            {"tool": "calc", "action_index": 1, "action_count": 2, "ok": True,
             "output": {"summary": "42"}},
            "#2/2 calc ok: 42",
        ),
        ("context.packed", {"task": {"prompt": "p"}, "history": [1, 2]}, "p (history 2)"),
        ("something.else", {"k": 1}, '{"k":1}'),
        ("task.completed", "not a mapping", "?: "),
    ],
)  # fmt: skip
def test_summaries_per_type(type_: str, data: object, expected: str) -> None:
    assert summarize(type_, data) == expected


def test_control_characters_never_reach_the_terminal() -> None:
    nasty = event("task.submitted", prompt="hi \x1b[2J\x07 there\nnext")
    line = render_line(inspect(of(nasty, topic="tasks")))
    assert "\x1b" not in line and "\x07" not in line and "\n" not in line
    assert "\\x1b[2J" in line


def test_long_summaries_are_truncated() -> None:
    line = render_line(inspect(of(event("task.submitted", prompt="x" * 5000), topic="tasks")))
    assert len(line) < 250 and line.endswith("…")


DLQ_HEADERS = {
    H_DLQ_REASON: "invalid_json",
    H_DLQ_STEP: "intake",
    H_DLQ_SOURCE: "tasks/1/7",
    H_DLQ_MESSAGE: "unexpected end of data",
}


def test_poison_dead_letter_is_shown_safely() -> None:
    poison = b'\xff\x00{"type": "task.submitted", "tenant": \x1b[2J' + b"z" * 200
    seen = inspect(message(poison, topic="dlq", key=b"poison", **DLQ_HEADERS))
    assert seen.body is None and seen.problem
    assert seen.session == "poison"  # from the key: filters still work
    line = render_line(seen)
    assert "dlq:invalid_json" in line and "step=intake" in line and "tasks/1/7" in line
    assert "\x1b" not in line and "\x00" not in line
    assert f"({len(poison)} bytes)" in line

    as_json = orjson.loads(render_json(seen))
    assert as_json["dlq"]["reason"] == "invalid_json"
    assert as_json["dlq"]["step"] == "intake"
    assert "event" not in as_json
    import base64

    assert base64.b64decode(as_json["body_base64"]) == poison


def test_dead_letter_with_a_valid_envelope_keeps_the_event_in_json() -> None:
    bad = event("task.submitted", prompt="")
    seen = inspect(message(encode(bad), topic="dlq", key=bad.key, **DLQ_HEADERS))
    as_json = orjson.loads(render_json(seen))
    assert as_json["event"]["id"] == bad.id
    assert as_json["dlq"]["source"] == "tasks/1/7"
    assert "task.submitted" in render_line(seen)


def test_non_json_text_body_on_a_dead_letter_is_given_as_text() -> None:
    seen = inspect(message(b"plain text", topic="dlq", **DLQ_HEADERS))
    assert orjson.loads(render_json(seen))["body"] == "plain text"


def test_json_of_an_event_is_the_cloudevent_as_on_the_wire_and_where_it_sits() -> None:
    wire = encode(COMPLETED)
    shown = orjson.loads(render_json(inspect(of(COMPLETED))))
    assert shown == {**orjson.loads(wire), "partition": 1, "offset": 7}


def test_a_non_json_body_on_another_topic_does_not_crash() -> None:
    seen = inspect(message(b"\x00\x01garbage", topic="results", ce_type="x"))
    assert "undecodable" in render_line(seen)
    assert orjson.loads(render_json(seen))["problem"]
    assert seen.type == "x"  # from the header


def test_an_absurd_time_falls_back_instead_of_failing() -> None:
    body = orjson.dumps(
        {"type": "x", "tenant": "a", "session": "s", "time": "9999-12-31T23:59:59-14:00"}
    )
    assert "9999-12-31" in render_line(inspect(message(body)))


@pytest.mark.parametrize("as_json", [False, True])
def test_the_renderer_never_raises(monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    import sluicegate.tailing as tailing

    def boom(seen: Seen) -> str:
        raise RuntimeError("unexpected shape")

    monkeypatch.setattr(tailing, "render_json" if as_json else "render_line", boom)
    out = renderer(as_json)(inspect(message(b"\x00 odd")))
    if as_json:
        assert "cannot render" in orjson.loads(out)["problem"]
    else:
        assert "cannot render (RuntimeError)" in out and "results/1/7" in out


def test_filters_match_exactly_and_none_means_any() -> None:
    seen = inspect(of(COMPLETED))
    assert Filter()(seen)
    assert Filter(tenant="acme", session="alice", type="task.completed")(seen)
    assert not Filter(tenant="globex")(seen)
    assert not Filter(session="bob")(seen)
    assert not Filter(type="task.submitted")(seen)


async def test_follow_stops_after_count_matching_and_never_commits() -> None:
    transport = MemoryTransport(prefix="t", partitions=2)
    await transport.ensure_topics(["results"])
    events = [
        Event(source="t", type="task.completed", tenant=t, session=f"s{i}", data={"status": "x"})
        for i, t in enumerate(["acme", "globex", "acme", "acme", "globex", "acme"])
    ]
    await transport.publish_batch(
        [OutMessage("results", encode(e), key=e.key, headers=headers_for(e)) for e in events]
    )
    sub = await transport.subscribe(["results"], group=None, start="earliest")
    shown: list[Seen] = []
    flushes: list[int] = []
    n = await follow(
        sub,
        match=Filter(tenant="acme"),
        emit=shown.append,
        flush=lambda: flushes.append(len(shown)),
        stop=asyncio.Event(),
        count=3,
    )
    assert n == 3 and len(shown) == 3 and flushes
    assert {s.tenant for s in shown} == {"acme"}
    assert transport._committed == {}


async def test_follow_returns_when_stopped() -> None:
    transport = MemoryTransport(prefix="t", partitions=1)
    await transport.ensure_topics(["results"])
    sub = await transport.subscribe(["results"], group=None, start="latest")
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, stop.set)
    n = await asyncio.wait_for(
        follow(
            sub, match=Filter(), emit=lambda s: None, flush=lambda: None, stop=stop, poll_s=0.05
        ),
        timeout=2,
    )
    assert n == 0


def test_unknown_topic_is_one_line_listing_the_pipeline_topics(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tail", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "nope" in err
    for topic in ("tasks", "results", "dlq", "actions.denied"):
        assert f"'{topic}'" in err


def test_bad_count_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", "--count", "0"]) == 2
    assert "--count" in capsys.readouterr().err


def test_a_type_no_step_emits_is_warned_about() -> None:
    from sluicegate.cli_tail import type_warning

    assert type_warning("tasks", "task.submitted") is None
    assert type_warning("results", "anything") is None  # no step reads results
    warning = type_warning("tasks", "task.submited")
    assert warning is not None and "task.submitted" in warning
