"""A worker's startup, progress and shutdown lines, and its /healthz and /readyz."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from sluicegate import health
from sluicegate.agents.api import Step
from sluicegate.settings import Settings
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import StepRunner
from sluicegate.streams.step import Context, Output
from sluicegate.streams.transport import OutMessage
from sluicegate.streams.transports.memory import MemoryTransport
from sluicegate.worker_log import progress_lines, shutdown_line, startup_line


class Ping(BaseModel):
    n: int


class Echo(Step):
    name = "echo"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {"ping": Ping}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        return [ctx.output("out", "pong", dict(event.data))]


async def _runner() -> tuple[MemoryTransport, StepRunner]:
    transport = MemoryTransport(partitions=2)
    await transport.ensure_topics(["in", "out"])
    return transport, StepRunner(Echo(), transport, MemoryCheckpointStore())


def _call(path: str) -> tuple[str, str]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"] = status

    body = b"".join(
        health.health_app(lambda e, s: [b"metrics"])({"PATH_INFO": path}, start_response)
    )
    return seen.get("status", "200 OK"), body.decode().strip()


async def test_lines_say_what_the_worker_is_and_did() -> None:
    transport, runner = await _runner()
    settings = Settings(topic_prefix="pfx", db_schema="sch", partitions=2)
    line = startup_line(settings, transport, [runner.processor], pipeline="mine", partitions=None)
    assert line == (
        "worker starting: pipeline mine, transport memory (native), steps echo, partitions 2 "
        "(this worker: shared with the group), prefix pfx, schema sch, policy bundle none"
    )
    await runner.start()
    events = [
        Event(source="t", type="ping", tenant="t", session=f"s{i}", data={"n": i}) for i in range(3)
    ]
    await transport.publish_batch(
        [OutMessage("in", encode(e), key=e.key, headers=headers_for(e)) for e in events]
    )
    seen: dict[str, Any] = {}
    while await runner.run_once():
        pass
    assert await progress_lines([runner], transport, seen) == [
        "progress echo: in 3, out 3, dead letters 0, skipped 0, in flight 0, lag 0, partitions 2"
    ]
    # Nothing new: one line for the idle steps, so a quiet worker still shows it is alive.
    assert await progress_lines([runner], transport, seen) == [
        "progress idle (nothing new, no lag): echo"
    ]
    assert shutdown_line([runner], 0.0).endswith(": echo in 3 out 3 dead letters 0 skipped 0")


async def test_ready_once_partitions_are_offered() -> None:
    _transport, runner = await _runner()
    assert _call("/healthz") == ("200 OK", "ok")
    assert _call("/readyz")[0].startswith("503")
    health.track([runner])
    try:
        assert _call("/readyz") == ("503 Service Unavailable", "waiting for partitions: echo")
        await runner.start()
        assert _call("/readyz") == ("200 OK", "1 step runner(s) ready")
    finally:
        health.untrack([runner])
    assert _call("/metrics") == ("200 OK", "metrics")
