from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from sluicegate.agents.executor import ToolsStep
from sluicegate.agents.schemas import ACTION_ALLOWED, TOOL_RESULT, ActionAllowed, ToolResult
from sluicegate.agents.testing import MemoryPipeline, context_for, make_event
from sluicegate.agents.tools import JSON, RetryableToolError, Tool, ToolContext, ToolError
from sluicegate.agents.topics import ACTIONS_ALLOWED, TOOL_RESULTS
from sluicegate.streams.runner import RunnerConfig

SUBMITTED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def allowed(tool: str, args: Mapping[str, Any] | None = None, **extra: Any) -> ActionAllowed:
    fields: dict[str, Any] = {
        "task_id": "task-1",
        "action_index": 0,
        "action_count": 1,
        "tool": tool,
        "args": dict(args or {}),
        "task_time": SUBMITTED,
        "decision": "allow",
        "policy_version": "v1",
    }
    return ActionAllowed.model_validate({**fields, **extra})


CALL = ToolContext(now=SUBMITTED, tenant="acme", session="s1", task_id="task-1", agent="a")


class Flaky:
    """Fails with a retryable error ``failures`` times, then answers."""

    def __init__(self, failures: int, error: type[Exception] = RetryableToolError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self, args: Mapping[str, Any], ctx: ToolContext) -> JSON:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"busy ({self.calls})")
        return {"summary": "ok", "calls": self.calls}


def step_with(tools: Mapping[str, Tool], **options: Any) -> tuple[ToolsStep, list[float]]:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    return ToolsStep(tools, sleep=sleep, **options), delays


async def test_process_runs_builtin_tool_and_emits_one_result() -> None:
    step = ToolsStep()
    action = allowed("calculator", {"expression": "6*7"}, action_index=1, action_count=2)
    event = make_event(ACTION_ALLOWED, action.model_dump(mode="json"))
    state: dict[str, Any] = {}
    [out] = await step.process(event, context_for(step, event, state))
    assert out.topic == TOOL_RESULTS and out.event.type == TOOL_RESULT
    result = ToolResult.model_validate(out.event.data)
    assert (result.ok, result.attempts, result.error) == (True, 1, None)
    assert result.output is not None and result.output["value"] == 42
    assert (result.task_id, result.action_index, result.action_count) == ("task-1", 1, 2)
    # The same action again (a re-produced event) is not executed twice.
    ctx = context_for(step, event, state)
    assert await step.process(event, ctx) == []
    assert (ctx.audit, ctx.detail) == ([], {"duplicate": True})


async def test_clock_reports_the_task_time_not_the_wall_clock() -> None:
    step = ToolsStep()
    event = make_event(ACTION_ALLOWED, allowed("clock").model_dump(mode="json"))
    [out] = await step.process(event, context_for(step, event))
    assert out.event.data["output"]["now"] == "2024-05-06T07:08:09+00:00"
    assert out.event.data["output"]["weekday"] == "Monday"
    # Without a task time, the action event's own time is used.
    bare = allowed("clock").model_dump(mode="json")
    bare.pop("task_time")
    event = make_event(ACTION_ALLOWED, bare, time=datetime(2023, 1, 2, 3, 4, 5, tzinfo=UTC))
    [out] = await step.process(event, context_for(step, event))
    assert out.event.data["output"]["date"] == "2023-01-02"


async def test_retryable_errors_are_retried_with_exponential_backoff() -> None:
    flaky = Flaky(failures=2)
    step, delays = step_with({"flaky": flaky}, max_attempts=3, backoff=0.1)
    result = await step.execute(allowed("flaky"), CALL)
    assert (result.ok, result.attempts, flaky.calls) == (True, 3, 3)
    assert delays == [0.1, 0.2]


async def test_retries_are_bounded() -> None:
    flaky = Flaky(failures=10)
    step, delays = step_with({"flaky": flaky}, max_attempts=4, backoff=1.0, max_backoff=3.0)
    result = await step.execute(allowed("flaky"), CALL)
    assert (result.ok, result.attempts, flaky.calls) == (False, 4, 4)
    assert result.error is not None and "gave up after 4 attempts" in result.error
    assert delays == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("error", "message"),
    [(ToolError, "busy (1)"), (ZeroDivisionError, "tool raised ZeroDivisionError")],
)
async def test_other_errors_are_not_retried(error: type[Exception], message: str) -> None:
    flaky = Flaky(failures=1, error=error)
    step, delays = step_with({"flaky": flaky})
    result = await step.execute(allowed("flaky"), CALL)
    assert (result.ok, result.attempts, delays) == (False, 1, [])
    assert result.error is not None and message in result.error


async def test_timeout_yields_a_failed_result() -> None:
    async def slow(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
        await asyncio.sleep(5)
        return {}

    step, _ = step_with({"slow": slow}, timeout=0.05)
    result = await step.execute(allowed("slow"), CALL)
    assert (result.ok, result.error, result.attempts) == (False, "timed out after 0.05s", 1)


async def test_unknown_tool_and_refused_decision_are_not_run() -> None:
    step = ToolsStep()
    result = await step.execute(allowed("shell", {"command": "rm -rf /"}), CALL)
    assert (result.ok, result.error, result.attempts) == (False, "unknown tool 'shell'", 0)
    refused = await step.execute(allowed("calculator", {"expression": "1"}, decision="deny"), CALL)
    assert refused.ok is False and refused.error == "refused: decision is 'deny'"
    redacted = await step.execute(allowed("echo", {"text": "[email]"}, decision="redact"), CALL)
    assert redacted.ok is True


async def test_unusable_output_yields_a_failed_result() -> None:
    async def bad(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
        return {"value": {1, 2}}

    step, _ = step_with({"bad": bad})
    result = await step.execute(allowed("bad"), CALL)
    assert result.ok is False and result.error is not None and "unusable output" in result.error


async def test_tool_errors_become_results() -> None:
    step = ToolsStep()
    result = await step.execute(allowed("calculator", {"expression": "__import__('os')"}), CALL)
    assert result.ok is False and result.error == "Call is not allowed in an expression"


async def test_concurrency_is_bounded_by_the_semaphore() -> None:
    running = 0
    peak = 0

    async def busy(args: Mapping[str, Any], ctx: ToolContext) -> JSON:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return {"summary": "done"}

    step, _ = step_with({"busy": busy}, concurrency=3)
    results = await asyncio.gather(*(step.execute(allowed("busy"), CALL) for _ in range(10)))
    assert all(r.ok for r in results)
    assert peak == 3


@pytest.mark.parametrize("runner_window", [50_000, 0])
async def test_a_redelivered_action_runs_its_tool_once(runner_window: int) -> None:
    """On the runner: absorbed by its recent ids, or beyond them by the step's own."""
    flaky = Flaky(failures=0)
    config = RunnerConfig(dedupe_window=runner_window)
    pipeline = MemoryPipeline([ToolsStep({"flaky": flaky})], config=config)
    event = make_event(ACTION_ALLOWED, allowed("flaky").model_dump(mode="json"))
    for _ in range(2):
        await pipeline.publish(ACTIONS_ALLOWED, [event])
        await pipeline.run()
    assert flaky.calls == 1
    [result] = await pipeline.events(TOOL_RESULTS)
    assert result.causationid == event.id and result.data["ok"] is True
    rows = pipeline.audit_of("processed", step="tools")
    if runner_window:
        assert pipeline.runners["tools"].stats.duplicates == 1
        assert [r.detail for r in rows] == [{"outputs": 1}]
    else:
        assert [r.detail for r in rows] == [{"outputs": 1}, {"duplicate": True, "outputs": 0}]
    assert pipeline.state("tools")["seen_actions"] == [event.id]
