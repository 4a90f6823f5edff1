"""The default planner: deterministic rules from a prompt to tool calls.

A prompt is split into requests on ``;`` and ``and then``; each request
becomes one tool call, so one prompt can fan out into several actions. The
rules, first match wins:

- ``run shell: CMD`` → ``shell`` {command}; ``write sql: Q`` → ``sql_write``
  {query}; ``post [BODY] to URL [: BODY]`` → ``http_post`` {url, body}. No
  such tools exist: they are there so the policy gate has something to deny;
- ``refund AMOUNT [for] [order] ORDER`` → ``refund`` {amount, order}
  ("refund 250 for order A-1");
- ``echo TEXT`` → ``echo`` {text};
- ``email|send|mail ... ADDRESS ...`` → ``echo`` {text, to}: the address
  passes through in the arguments, for PII policies to catch;
- ``search|find|look up Q`` → ``search`` {query};
- ``calculate|compute|evaluate|calc EXPR`` → ``calculator`` {expression}, whatever
  EXPR is (the tool rejects what is not arithmetic), and a request that is an
  arithmetic expression (optionally after "what is") → ``calculator``;
- a request mentioning the time or date → ``clock``;
- ``again`` → the previous prompt of the session, planned afresh;
- any other question → ``search``; anything else → ``echo``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sluicegate.agents.schemas import MAX_ACTIONS, HistoryTurn, TaskAccepted, ToolCall

_SPLIT = re.compile(r"\s*(?:;|\band\s+then\b)\s*", re.IGNORECASE)
_SHELL = re.compile(r"^(?:please\s+)?(?:run\s+)?shell\s*:\s*(?P<cmd>.+)$", re.I | re.S)
_SQL = re.compile(r"^(?:write|run|execute)\s+sql\s*:\s*(?P<query>.+)$", re.I | re.S)
_POST = re.compile(
    r"^post\s+(?P<pre>.*?)\s*\bto\s+(?P<url>https?://\S+)\s*(?:with\b\s*)?(?P<post>.*)$",
    re.I | re.S,
)
_REFUND = re.compile(
    r"^refund\s+(?P<amount>\d+(?:\.\d+)?)\s+(?:for\s+)?(?:order\s+)?(?P<order>[A-Za-z0-9][\w-]*)",
    re.I,
)
_ECHO = re.compile(r"^echo\b[\s:]*(?P<text>.*)$", re.I | re.S)
_MAIL_VERB = re.compile(r"^(?:e-?mail|send|mail)\b", re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_SEARCH = re.compile(r"^(?:search(?:\s+for)?|find|look\s*up)\b[\s:]*(?P<query>.+)$", re.I | re.S)
_CALC = re.compile(r"^(?:calculate|compute|evaluate|calc)\b[\s:]*(?P<expr>.+)$", re.I | re.S)
_WHAT_IS = re.compile(r"^(?:what\s+is|what's|how\s+much\s+is)\s+", re.I)
_ARITHMETIC = re.compile(r"^[\d\s.+\-*/%()]+$")
_OPERATOR = re.compile(r"[+\-*/%()]")
_TIME = re.compile(r"\b(?:time|date|clock|today|what\s+day)\b", re.I)
_AGAIN = re.compile(r"^(?:again|repeat(?:\s+that)?|do\s+it\s+again)[.!]?$", re.I)
_QUESTION = re.compile(
    r"^(?:what|who|whom|whose|which|when|where|why|how|is|are|does|do|can|could|should)\b", re.I
)


def requests(prompt: str) -> list[str]:
    """The prompt's requests, in order, without empty ones."""
    return [part.strip() for part in _SPLIT.split(prompt) if part and part.strip()]


def _trim(text: str) -> str:
    return text.strip().rstrip("?.!").strip()


def _arithmetic(text: str) -> str | None:
    """``text`` as a bare arithmetic expression, if it is one."""
    candidate = _trim(_WHAT_IS.sub("", text.strip()))
    if (
        _ARITHMETIC.match(candidate)
        and any(c.isdigit() for c in candidate)
        and _OPERATOR.search(candidate)
    ):
        return candidate
    return None


def plan_request(text: str) -> ToolCall:
    """The one tool call for a single request."""
    if m := _SHELL.match(text):
        return ToolCall(tool="shell", args={"command": m["cmd"].strip()})
    if m := _SQL.match(text):
        return ToolCall(tool="sql_write", args={"query": m["query"].strip()})
    if m := _POST.match(text):
        body = (m["post"] or m["pre"] or "").strip()
        # "post to URL: body" leaves the colon on the URL; punctuation never ends one.
        url = m["url"].rstrip(":,.;")
        return ToolCall(tool="http_post", args={"url": url, "body": body})
    if m := _REFUND.match(text):
        number = float(m["amount"])
        amount: int | float = int(number) if number.is_integer() else number
        return ToolCall(tool="refund", args={"amount": amount, "order": m["order"]})
    if m := _ECHO.match(text):
        return ToolCall(tool="echo", args={"text": m["text"].strip() or text})
    if _MAIL_VERB.match(text) and (address := _EMAIL.search(text)):
        return ToolCall(tool="echo", args={"text": text, "to": address.group(0)})
    if m := _SEARCH.match(text):
        return ToolCall(tool="search", args={"query": _trim(m["query"]) or text})
    if m := _CALC.match(text):
        return ToolCall(tool="calculator", args={"expression": _trim(m["expr"]) or text})
    if expression := _arithmetic(text):
        return ToolCall(tool="calculator", args={"expression": expression})
    if _TIME.search(text):
        return ToolCall(tool="clock", args={})
    if text.endswith("?") or _QUESTION.match(text):
        return ToolCall(tool="search", args={"query": _trim(text) or text})
    return ToolCall(tool="echo", args={"text": text})


class RuleBasedPlanner:
    """Plans by the module's rules; needs no model and no network."""

    async def plan(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for request in requests(task.prompt):
            if _AGAIN.match(request) and history:
                # "again" re-plans the session's previous prompt, never recursively.
                previous = requests(history[-1].prompt)
                calls.extend(plan_request(r) for r in previous if not _AGAIN.match(r))
                continue
            calls.append(plan_request(request))
        if not calls:
            calls.append(ToolCall(tool="echo", args={"text": task.prompt}))
        # A longer plan is cut rather than refused: the first requests still run.
        return calls[:MAX_ACTIONS]
