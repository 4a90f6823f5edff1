"""Slow tools against the tools step: the per-call timeout fires, the concurrency cap holds."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sluicegate.agents.executor import ToolsStep
from sluicegate.agents.schemas import ActionAllowed
from sluicegate.agents.tools import JSON, ToolContext, echo
from sluicegate.agents.tools.latency import Latency, SlowTool
from tests.model_endpoint import RecordingSleep, settle, until

SUBMITTED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
CALL = ToolContext(now=SUBMITTED, tenant="acme", session="s1", task_id="task-1", agent="a")


def action(tool: str, index: int = 0) -> ActionAllowed:
    return ActionAllowed(
        task_id=f"task-{index}",
        action_index=0,
        action_count=1,
        tool=tool,
        args={"text": f"hello {index}"},
        decision="allow",
    )


class Gauge:
    """A tool that counts the calls inside it, held until released."""

    def __init__(self) -> None:
        self.inside = 0
        self.peak = 0
        self.release = asyncio.Event()

    async def __call__(self, args: Mapping[str, Any], ctx: ToolContext) -> JSON:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            await self.release.wait()
            return {"summary": "done"}
        finally:
            self.inside -= 1


async def test_slow_tool_waits_a_drawn_latency_then_calls_the_tool() -> None:
    sleep = RecordingSleep()
    tool = SlowTool(echo.run, Latency(0.1, 0.3), sleep=sleep, rng=lambda: 0.5)
    out = await tool({"text": "hi"}, CALL)
    assert out["text"] == "hi"
    assert sleep.delays == [0.2]


async def test_the_per_call_timeout_fires_on_a_slow_tool() -> None:
    # The tool would take 30 s; the step gives it 50 ms, then reports the failure.
    step = ToolsStep({"slow": SlowTool(echo.run, Latency(30, 30))}, timeout=0.05)
    result = await step.execute(action("slow"), CALL)
    assert (result.ok, result.attempts, result.output) == (False, 1, None)
    assert result.error == "timed out after 0.05s"


async def test_the_concurrency_cap_bounds_calls_in_flight() -> None:
    gauge = Gauge()
    step = ToolsStep({"held": gauge}, concurrency=3)
    calls = [asyncio.create_task(step.execute(action("held", i), CALL)) for i in range(10)]
    await until(lambda: gauge.inside >= 3, "three calls inside the tool")
    await settle()
    assert gauge.inside == 3  # the other seven wait for a slot
    gauge.release.set()
    results = await asyncio.gather(*calls)
    assert all(r.ok for r in results) and len(results) == 10
    assert gauge.peak == 3


class Counting:
    """Wraps a tool and counts the calls in it at once, its latency included."""

    def __init__(self, tool: SlowTool) -> None:
        self.tool = tool
        self.inside = 0
        self.peak = 0

    async def __call__(self, args: Mapping[str, Any], ctx: ToolContext) -> JSON:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        try:
            return await self.tool(args, ctx)
        finally:
            self.inside -= 1


async def test_slow_tools_run_concurrently_up_to_the_cap() -> None:
    counting = Counting(SlowTool(echo.run, Latency(0.01, 0.02)))
    step = ToolsStep({"slow": counting}, concurrency=4)
    results = await asyncio.gather(*(step.execute(action("slow", i), CALL) for i in range(12)))
    assert all(r.ok for r in results)
    # Twelve calls at once, four slots: the first four take them and sleep in
    # the tool, so exactly four are ever inside, however long each sleeps.
    assert counting.peak == 4
