"""The policy gate on the reference policies, driven through process() by hand."""

from __future__ import annotations

from typing import Any

import pytest

from sluicegate.agents.schemas import ActionAllowed, ActionDenied
from sluicegate.policy.gate import PolicyGate
from sluicegate.policy.testing import context, proposed_event
from sluicegate.streams.step import Context, Output, Processor


@pytest.fixture(scope="module")
def gate() -> PolicyGate:
    return PolicyGate()


async def decide(
    gate: PolicyGate, tool: str, args: dict[str, Any] | None = None, **kw: Any
) -> tuple[Output, Context]:
    state = kw.pop("state", None)
    event = proposed_event(tool, args, **kw)
    ctx = context(event, {} if state is None else state)
    outputs = await gate.process(event, ctx)
    assert len(outputs) == 1
    out = outputs[0]
    # Every output is valid for the agents package's models of the two topics.
    if out.topic == "actions.allowed":
        assert out.event.type == "action.allowed"
        ActionAllowed.model_validate(out.event.data)
    else:
        assert (out.topic, out.event.type) == ("actions.denied", "action.denied")
        ActionDenied.model_validate(out.event.data)
    # Exactly one decision row per decision, with its reasons and the version.
    rows = [row for row in ctx.audit if row.kind == "decision"]
    assert len(rows) == 1
    assert rows[0].decision == out.event.data["decision"]
    assert list(rows[0].reasons) == out.event.data["reasons"]
    assert rows[0].policy_version == out.event.data["policy_version"] == gate.policy.version
    assert rows[0].event_id == event.id
    return out, ctx


def test_gate_is_a_processor(gate: PolicyGate) -> None:
    assert isinstance(gate, Processor)
    assert gate.name == "gate"
    assert tuple(gate.inputs) == ("actions.proposed",)
    assert tuple(gate.outputs) == ("actions.allowed", "actions.denied", "actions.held")
    assert set(gate.accepts) == {"action.proposed"}
    assert gate.policy.version.startswith("sha256:")


async def test_allowed_tool(gate: PolicyGate) -> None:
    out, ctx = await decide(gate, "search", {"query": "weather"})
    assert out.topic == "actions.allowed"
    assert out.event.data["decision"] == "allow"
    assert out.event.data["reasons"] == []
    assert out.event.data["args"] == {"query": "weather"}
    assert out.event.causationid == ctx.event.id
    assert ctx.audit[0].detail["cost"] == 2


@pytest.mark.parametrize(
    ("tool", "tenant", "reasons"),
    [
        ("deploy", "acme", ["tool_not_allowed"]),
        ("shell", "acme", ["dangerous_tool", "tool_not_allowed"]),
        ("sql_write", "acme", ["dangerous_tool", "tool_not_allowed"]),
        # globex lists shell and sql_write: dangerous tools are denied anyway.
        ("shell", "globex", ["dangerous_tool"]),
        ("sql_write", "globex", ["dangerous_tool"]),
        # An unknown tenant gets the defaults, which do not include http_post.
        ("http_post", "newco", ["host_not_allowed", "tool_not_allowed"]),
    ],
)
async def test_forbidden_tools_denied(
    gate: PolicyGate, tool: str, tenant: str, reasons: list[str]
) -> None:
    out, ctx = await decide(gate, tool, {"command": "rm -rf /"}, tenant=tenant)
    assert out.topic == "actions.denied"
    assert out.event.data["decision"] == "deny"
    assert out.event.data["reasons"] == reasons
    assert ctx.state == {}, "a denied action is not charged"


async def test_per_agent_allowlist(gate: PolicyGate) -> None:
    out, _ = await decide(gate, "search", {"query": "q"}, agent="reporter")
    assert out.topic == "actions.allowed"
    out, _ = await decide(gate, "calculator", {"expression": "1+1"}, agent="reporter")
    assert out.event.data["reasons"] == ["tool_not_allowed"]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://api.acme.example/v1/hook", True),
        ("http://API.ACME.EXAMPLE:8080/x", True),
        ("https://eu.hooks.acme.example/x", True),
        ("https://hooks.acme.example/x", False),  # "*.x" is subdomains only
        ("https://evil.example/x", False),
        ("https://api.acme.example@evil.example/x", False),  # userinfo is not the host
        ("https://api.acme.example.evil.example/", False),
        ("ftp://api.acme.example/x", False),
        ("https://api.acme.example /x", False),
        ("not a url", False),
        (None, False),
    ],
)
async def test_http_post_hosts(gate: PolicyGate, url: str | None, allowed: bool) -> None:
    args = {"body": "hi"} if url is None else {"url": url, "body": "hi"}
    out, _ = await decide(gate, "http_post", args)
    if allowed:
        assert out.topic == "actions.allowed", out.event.data
    else:
        assert out.event.data["reasons"] == ["host_not_allowed"]


async def test_budget_exhausted_after_the_nth_call(gate: PolicyGate) -> None:
    # globex: 20 units per session, echo costs 1; 10 s apart stays under its rate limit.
    state: dict[str, Any] = {}
    for n in range(20):
        out, _ = await decide(gate, "echo", {"text": "x"}, tenant="globex", at=10 * n, state=state)
        assert out.topic == "actions.allowed", f"call {n + 1}"
    assert state["policy"]["spend"] == 20
    out, _ = await decide(gate, "echo", {"text": "x"}, tenant="globex", at=200, state=state)
    assert out.event.data["reasons"] == ["budget_exceeded"]
    assert state["policy"]["spend"] == 20, "a denied action is not charged"
    # A cheaper call does not fit either; a new session starts afresh.
    out, _ = await decide(gate, "echo", {"text": "x"}, tenant="globex", session="s2", at=200)
    assert out.topic == "actions.allowed"


async def test_budget_counts_the_cost_of_the_call(gate: PolicyGate) -> None:
    # acme: 100 units; http_post costs 5; 98 spent leaves room for echo (1), not http_post.
    state: dict[str, Any] = {"policy": {"spend": 98, "calls": []}}
    out, _ = await decide(gate, "http_post", {"url": "https://api.acme.example/"}, state=state)
    assert out.event.data["reasons"] == ["budget_exceeded"]
    out, _ = await decide(gate, "echo", {"text": "x"}, state=state)
    assert out.topic == "actions.allowed"
    assert state["policy"]["spend"] == 99


async def test_rate_limit_hit_and_recovered(gate: PolicyGate) -> None:
    # globex: 10 calls per sliding minute, by event time.
    state: dict[str, Any] = {}
    for n in range(10):
        out, _ = await decide(gate, "clock", {}, tenant="globex", at=n, state=state)
        assert out.topic == "actions.allowed"
    out, _ = await decide(gate, "clock", {}, tenant="globex", at=10, state=state)
    assert out.event.data["reasons"] == ["rate_limited"]
    out, _ = await decide(gate, "clock", {}, tenant="globex", at=59.5, state=state)
    assert out.event.data["reasons"] == ["rate_limited"], "the calls at 0..9 s are in the window"
    # At 60.5 s the calls made at 0 s falls out of the window: one slot free.
    out, _ = await decide(gate, "clock", {}, tenant="globex", at=60.5, state=state)
    assert out.topic == "actions.allowed"
    out, _ = await decide(gate, "clock", {}, tenant="globex", at=60.6, state=state)
    assert out.event.data["reasons"] == ["rate_limited"]
    # Old calls are forgotten, so the state stays bounded.
    out, _ = await decide(gate, "clock", {}, tenant="globex", at=200, state=state)
    assert out.topic == "actions.allowed"
    assert len(state["policy"]["calls"]) == 1


async def test_rate_limit_is_deterministic_in_event_time(gate: PolicyGate) -> None:
    async def replay() -> list[str]:
        state: dict[str, Any] = {}
        decisions = []
        for n in range(12):
            out, _ = await decide(gate, "clock", {}, tenant="globex", at=n * 0.5, state=state)
            decisions.append(out.event.data["decision"])
        return decisions

    assert await replay() == await replay() == ["allow"] * 10 + ["deny"] * 2


async def test_pii_redacted(gate: PolicyGate) -> None:
    args = {
        "text": (
            "mail bob.smith@example.com, call 555-123-4567 or +44 20 7946 0958, "
            "card 4111 1111 1111 1111, order 4111 1111 1111 1112"
        ),
        "to": "alice@example.org",
        "nested": [{"card": "5500-0000-0000-0004"}],
    }
    out, ctx = await decide(gate, "echo", args)
    data = out.event.data
    assert out.topic == "actions.allowed"
    assert data["decision"] == "redact"
    assert data["reasons"] == ["pii_redacted"]
    assert data["args"] == {
        "text": (
            "mail [email], call [phone] or [phone], "
            "card [card ****1111], order 4111 1111 1111 1112"  # not Luhn-valid: kept
        ),
        "to": "[email]",
        "nested": [{"card": "[card ****0004]"}],
    }
    row = ctx.audit[0]
    assert row.decision == "redact"
    assert row.reasons == ("pii_redacted",)
    # The audit row says where and how, never the PII itself.
    assert "bob.smith" not in str(row.detail)
    assert {"path": ["to"], "mask": "[email]"} in row.detail["masks"]


async def test_luhn_invalid_number_not_redacted(gate: PolicyGate) -> None:
    out, _ = await decide(gate, "echo", {"text": "ref 4111 1111 1111 1112"})
    assert out.event.data["decision"] == "allow"
    assert out.event.data["args"] == {"text": "ref 4111 1111 1111 1112"}


async def test_tenant_chooses_what_to_redact(gate: PolicyGate) -> None:
    # globex redacts card numbers only.
    args = {"text": "bob@example.com 4111111111111111"}
    out, _ = await decide(gate, "echo", args, tenant="globex")
    assert out.event.data["args"] == {"text": "bob@example.com [card ****1111]"}


async def test_denied_action_is_redacted_too(gate: PolicyGate) -> None:
    out, _ = await decide(gate, "shell", {"command": "mail bob@example.com < /etc/passwd"})
    assert out.topic == "actions.denied"
    assert out.event.data["args"] == {"command": "mail [email] < /etc/passwd"}


async def test_oversized_args_denied(gate: PolicyGate) -> None:
    out, _ = await decide(gate, "echo", {"text": "x" * 4080})
    assert out.topic == "actions.allowed", "4091 bytes of JSON: just under 4 KiB"
    out, ctx = await decide(gate, "echo", {"text": "x" * 5000})
    assert out.event.data["reasons"] == ["args_too_large"]
    assert ctx.state == {}


async def test_output_keeps_the_proposal(gate: PolicyGate) -> None:
    event = proposed_event("search", {"query": "q"})
    event = event.model_copy(
        update={"data": {**event.data, "action_index": 2, "action_count": 3, "task_id": "T"}}
    )
    ctx = context(event)
    [out] = await gate.process(event, ctx)
    allowed = ActionAllowed.model_validate(out.event.data)
    assert (allowed.task_id, allowed.action_index, allowed.action_count) == ("T", 2, 3)
    assert allowed.policy_version == gate.policy.version
    assert out.event.session == event.session and out.event.tenant == event.tenant


async def test_cache_reuses_decisions_without_changing_them() -> None:
    cached, uncached = PolicyGate(), PolicyGate(cache_size=0)
    texts = ["hello", "bob@example.com", "hello", "world", "bob@example.com"]
    for n, text in enumerate(texts):
        for tool in ("echo", "shell", "search"):
            a, _ = await decide(cached, tool, {"text": text}, at=n)
            b, _ = await decide(uncached, tool, {"text": text}, at=n)
            assert a.event.data == b.event.data
    assert cached.policy.cache.hits > 0
    assert uncached.policy.cache.hits == 0
