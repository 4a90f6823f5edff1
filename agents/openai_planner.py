"""A planner that asks an OpenAI-compatible chat completions endpoint for tool calls.

The model is asked for a JSON array of ``{"tool": ..., "args": {...}}``
objects. Its reply is untrusted input: it is parsed and validated, and any
failure (HTTP error, timeout, unparseable or invalid reply, too many calls)
yields a single ``echo`` call saying the plan failed, never an exception, so
a misbehaving model fails closed instead of stalling the pipeline. Whatever it
proposes still passes the policy gate.

Unlike the rule-based planner this one is not deterministic: a replayed task
may get a different plan, but its action events keep their ids, and the
steps downstream drop re-produced ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import aiohttp
from pydantic import ValidationError

from agents.schemas import MAX_ACTIONS, HistoryTurn, TaskAccepted, ToolCall

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_TIMEOUT_S = 20.0
# A plan is a few hundred bytes; a reply far larger is not one.
MAX_REPLY_BYTES = 256 * 1024
# How many earlier prompts go to the model as context.
HISTORY_TURNS = 8

SYSTEM_PROMPT = (
    "You plan tool calls for an agent. Available tools:\n"
    '- calculator {"expression": "<arithmetic: + - * / // % ** and parentheses>"}\n'
    '- search {"query": "<keywords>"}: searches documentation about stream processing\n'
    "- clock {}: the current date and time\n"
    '- echo {"text": "<text>", "to": "<optional recipient>"}: answer with text\n'
    f"Reply with only a JSON array of at most {MAX_ACTIONS} objects of the form\n"
    '{"tool": "<name>", "args": {...}}, one per step, in order. No prose.'
)

_FENCE = re.compile(r"^```(?:json)?\s*(?P<body>.*?)\s*```$", re.S)


class PlanError(ValueError):
    """The model's reply is not a usable plan."""


def plan_failed(reason: str) -> list[ToolCall]:
    """The fail-closed plan: one echo saying why planning failed."""
    return [ToolCall(tool="echo", args={"text": f"plan failed: {reason}"[:500]})]


def endpoint(url: str) -> str:
    """Accept a base URL (``.../v1``) or the full chat completions URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


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


class OpenAIPlanner:
    """Plans by asking a chat completions endpoint; fails closed on any problem."""

    def __init__(
        self,
        url: str,
        *,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = endpoint(url)
        self.model = model
        self._api_key = api_key
        self.timeout = timeout

    def request_body(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> dict[str, Any]:
        messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        earlier = [turn.prompt for turn in history[-HISTORY_TURNS:]]
        if earlier:
            listing = "\n".join(f"- {p}" for p in earlier)
            messages.append({"role": "user", "content": f"Earlier requests:\n{listing}"})
        messages.append({"role": "user", "content": task.prompt})
        return {"model": self.model, "messages": messages, "temperature": 0}

    async def plan(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> list[ToolCall]:
        try:
            reply = await self._complete(self.request_body(task, history))
            return parse_plan(content_of(reply))
        except PlanError as exc:
            return plan_failed(str(exc))
        except TimeoutError:
            return plan_failed(f"no reply within {self.timeout:g}s")
        except aiohttp.ClientError as exc:
            return plan_failed(f"request failed: {type(exc).__name__}")

    async def _complete(self, body: dict[str, Any]) -> Any:
        headers = {"content-type": "application/json"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        # A session per call: planning is rare next to the model's latency, and
        # nothing is left open for the application to close.
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(self.url, json=body, headers=headers) as response,
        ):
            if response.status != 200:
                raise PlanError(f"endpoint answered HTTP {response.status}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise PlanError("reply is too large")
                chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except ValueError:
            raise PlanError("response body is not JSON") from None
