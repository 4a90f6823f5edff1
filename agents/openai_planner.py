"""A planner that asks an OpenAI-compatible chat completions endpoint for tool calls.

The model is asked for a JSON array of ``{"tool": ..., "args": {...}}``
objects. Its reply is untrusted input: it is parsed and validated, and any
failure (HTTP error, timeout, unparseable or invalid reply, too many calls)
yields a single ``echo`` call saying the plan failed, never an exception, so
a misbehaving model fails closed instead of stalling the pipeline. Whatever it
proposes still passes the policy gate.

Calls go through :class:`agents.model_client.ModelClient`: the process's
pooled HTTP session, retries with backoff on 429, 5xx, dropped connections
and timeouts, and the endpoint's concurrency and rate limits. The plan fails
closed only once the retries are exhausted (or on a failure retrying cannot
fix). :meth:`OpenAIPlanner.plan_and_report` also returns the call's
:class:`~agents.model_client.CallReport` (tokens, attempts, latency), which
the planner step records.

Unlike the rule-based planner this one is not deterministic: a replayed task
may get a different plan, but its action events keep their ids, and the
steps downstream drop re-produced ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from sluicegate.agents.model_client import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    MAX_REPLY_BYTES,
    CallReport,
    ModelCallError,
    ModelClient,
    endpoint,
)
from sluicegate.agents.schemas import MAX_ACTIONS, HistoryTurn, TaskAccepted, ToolCall
from sluicegate.streams.errors import SluiceError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT_S",
    "MAX_REPLY_BYTES",
    "OpenAIPlanner",
    "PlanError",
    "PlanOutcome",
    "content_of",
    "endpoint",
    "parse_plan",
    "plan_failed",
]

DEFAULT_MODEL = "gpt-4o-mini"
# How many earlier prompts go to the model as context.
HISTORY_TURNS = 8

SYSTEM_PROMPT = (
    "You plan tool calls for an agent. Available tools:\n"
    '- calculator {"expression": "<arithmetic: + - * / // % ** and parentheses>"}\n'
    '- search {"query": "<keywords>"}: searches documentation about stream processing\n'
    "- clock {}: the current date and time\n"
    '- echo {"text": "<text>", "to": "<optional recipient>"}: answer with text\n'
    '- refund {"amount": <number>, "order": "<order number>"}: refund an order\n'
    f"Reply with only a JSON array of at most {MAX_ACTIONS} objects of the form\n"
    '{"tool": "<name>", "args": {...}}, one per step, in order. No prose.'
)

_FENCE = re.compile(r"^```(?:json)?\s*(?P<body>.*?)\s*```$", re.S)


class PlanError(SluiceError, ValueError):
    """The model's reply is not a usable plan."""


def plan_failed(reason: str) -> list[ToolCall]:
    """The fail-closed plan: one echo saying why planning failed."""
    return [ToolCall(tool="echo", args={"text": f"plan failed: {reason}"[:500]})]


def parse_plan(content: str) -> list[ToolCall]:
    """Tool calls from the model's message content, or :class:`PlanError`."""
    text = content.strip()
    if fenced := _FENCE.match(text):
        text = fenced["body"]
    try:
        value: Any = json.loads(text)
    except ValueError:
        raise PlanError("reply is not JSON") from None
    if isinstance(value, dict):
        # Models asked for an array sometimes wrap it in an object anyway.
        for key in ("tool_calls", "actions", "calls", "plan"):
            if isinstance(value.get(key), list):
                value = value[key]
                break
    if not isinstance(value, list):
        raise PlanError("reply is not a list of tool calls")
    if not 1 <= len(value) <= MAX_ACTIONS:
        raise PlanError(f"reply has {len(value)} tool calls, not 1 to {MAX_ACTIONS}")
    calls = []
    for item in value:
        if not isinstance(item, dict):
            raise PlanError("a tool call is not an object")
        tool = item.get("tool", item.get("name"))
        args = item.get("args", item.get("arguments", {}))
        if isinstance(args, str):  # OpenAI function calling sends arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                raise PlanError("tool call arguments are not JSON") from None
        try:
            calls.append(ToolCall.model_validate({"tool": tool, "args": args}))
        except ValidationError as exc:
            raise PlanError(f"invalid tool call: {exc.errors()[0]['msg']}") from None
    return calls


def content_of(reply: Any) -> str:
    """The first choice's message content of a chat completions reply."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise PlanError("reply has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise PlanError("message content is not text")
    return content


@dataclass(frozen=True, slots=True)
class PlanOutcome:
    """A plan and what asking the model for it cost (None when no model was asked)."""

    calls: list[ToolCall]
    report: CallReport | None = None


class OpenAIPlanner:
    """Plans by asking a chat completions endpoint; fails closed on any problem.

    ``timeout`` is per attempt; ``max_attempts``, ``concurrency`` and ``rpm``
    go to the :class:`ModelClient` it makes. Given a ``client``, that
    client's endpoint and settings are used and the connection arguments
    here are ignored.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        concurrency: int = DEFAULT_CONCURRENCY,
        rpm: float | None = None,
        client: ModelClient | None = None,
    ) -> None:
        self.model = model
        if client is None:
            client = ModelClient(
                url,
                api_key=api_key,
                timeout=timeout,
                max_attempts=max_attempts,
                concurrency=concurrency,
                rpm=rpm,
                step="planner",
            )
        self.client = client
        self.url = client.url
        self.timeout = client.timeout

    def request_body(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> dict[str, Any]:
        messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        earlier = [turn.prompt for turn in history[-HISTORY_TURNS:]]
        if earlier:
            listing = "\n".join(f"- {p}" for p in earlier)
            messages.append({"role": "user", "content": f"Earlier requests:\n{listing}"})
        messages.append({"role": "user", "content": task.prompt})
        return {"model": self.model, "messages": messages, "temperature": 0}

    async def plan(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> list[ToolCall]:
        return (await self.plan_and_report(task, history)).calls

    async def plan_and_report(
        self, task: TaskAccepted, history: Sequence[HistoryTurn]
    ) -> PlanOutcome:
        """The plan (a failed one on any problem, never an exception) and the call's report."""
        try:
            result = await self.client.complete(self.request_body(task, history))
        except ModelCallError as exc:
            return PlanOutcome(plan_failed(str(exc)), exc.report)
        try:
            calls = parse_plan(content_of(result.body))
        except PlanError as exc:
            return PlanOutcome(plan_failed(str(exc)), result.report)
        return PlanOutcome(calls, result.report)

    async def aclose(self) -> None:
        """Close the client's pooled HTTP session (the process-wide one by default)."""
        await self.client.aclose()
