"""The ``tools`` step: executes allowed actions and reports one result for each.

``action.allowed`` on ``actions.allowed`` becomes exactly one ``tool.result``
on ``tool.results``, whatever happens: an unknown tool, a refused decision,
a tool error, a timeout or exhausted retries all give ``ok=false`` with the
error, because the responder waits for one outcome per action.

Each call has a timeout; a tool that raises :class:`RetryableToolError` is
retried with exponential backoff up to ``max_attempts``; a timeout is not
retried (the call may still be running, and retrying would multiply the
worst-case latency).

The runner processes events of different (tenant, session) keys
concurrently, so many calls of this step can be in flight at once. A
semaphore shared by the step (``concurrency``) bounds how many tool calls
run at the same time; a call waiting for a slot has not started, so its
timeout starts only once it holds one. Retries keep their slot through the
backoff, so a retried call cannot be overtaken by a crowd of new ones.
To try this with the instant built-in tools, wrap them in
:class:`agents.tools.latency.SlowTool` (``sluice run`` does when
``SLUICE_TOOL_LATENCY_MS`` is set).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from sluicegate.agents import topics
from sluicegate.agents.api import Step
from sluicegate.agents.keyed import duplicate, remember
from sluicegate.agents.schemas import ACTION_ALLOWED, TOOL_RESULT, ActionAllowed, ToolResult
from sluicegate.agents.tools import RetryableToolError, Tool, ToolContext, ToolError, builtin_tools
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output

SEEN_KEY = "seen_actions"
# Decisions that mean "run it"; anything else on actions.allowed is refused
# (fail closed), should a gate ever route a deny there.
RUNNABLE_DECISIONS = frozenset({"allow", "redact"})
MAX_ERROR_CHARS = 500

Sleep = Callable[[float], Awaitable[None]]


class ToolsStep(Step[ActionAllowed]):
    name = "tools"
    inputs = (topics.ACTIONS_ALLOWED,)
    outputs = (topics.TOOL_RESULTS,)
    types = (ACTION_ALLOWED,)

    def __init__(
        self,
        tools: Mapping[str, Tool] | None = None,
        *,
        timeout: float = 5.0,
        max_attempts: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        concurrency: int = 8,
        remember_ids: int = 1024,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.tools: dict[str, Tool] = dict(builtin_tools() if tools is None else tools)
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.remember_ids = remember_ids
        self._semaphore = asyncio.Semaphore(concurrency)
        self._sleep = sleep

    async def process(self, event: Event, ctx: Context[ActionAllowed]) -> list[Output]:
        action = ctx.data
        # Tools may have side effects: an action already executed (and its
        # result produced) is never executed again.
        if remember(ctx.state, SEEN_KEY, event.id, self.remember_ids):
            return duplicate(ctx)
        call = ToolContext(
            now=action.task_time or event.time,
            tenant=event.tenant,
            session=event.session,
            task_id=action.task_id,
            agent=action.agent,
        )
        result = await self.execute(action, call)
        return [ctx.output(topics.TOOL_RESULTS, TOOL_RESULT, result.model_dump(mode="json"))]

    async def execute(self, action: ActionAllowed, call: ToolContext) -> ToolResult:
        """Run the action's tool; every failure becomes a result with ``ok=false``."""
        if action.decision not in RUNNABLE_DECISIONS:
            return self._failed(action, f"refused: decision is {action.decision!r}", 0)
        tool = self.tools.get(action.tool)
        if tool is None:
            return self._failed(action, f"unknown tool {action.tool!r}", 0)
        attempt = 0
        async with self._semaphore:
            while True:
                attempt += 1
                try:
                    output = await asyncio.wait_for(tool(action.args, call), self.timeout)
                except RetryableToolError as exc:
                    if attempt >= self.max_attempts:
                        return self._failed(
                            action, f"gave up after {attempt} attempts: {exc}", attempt
                        )
                    await self._sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
                    continue
                except ToolError as exc:
                    return self._failed(action, str(exc) or type(exc).__name__, attempt)
                except TimeoutError:
                    return self._failed(action, f"timed out after {self.timeout:g}s", attempt)
                except Exception as exc:  # a tool bug must yield a result, not stall the join
                    return self._failed(action, f"tool raised {type(exc).__name__}: {exc}", attempt)
                try:
                    return self._result(action, ok=True, output=output, attempts=attempt)
                except ValueError as exc:  # output not JSON, or too large
                    return self._failed(action, f"unusable output: {exc}", attempt)

    def _failed(self, action: ActionAllowed, error: str, attempts: int) -> ToolResult:
        return self._result(action, ok=False, error=error[:MAX_ERROR_CHARS], attempts=attempts)

    @staticmethod
    def _result(
        action: ActionAllowed,
        *,
        ok: bool,
        attempts: int,
        output: dict[str, object] | None = None,
        error: str | None = None,
    ) -> ToolResult:
        return ToolResult(
            task_id=action.task_id,
            agent=action.agent,
            action_index=action.action_index,
            action_count=action.action_count,
            tool=action.tool,
            approval=action.approval,
            ok=ok,
            output=output,
            error=error,
            attempts=attempts,
        )
