"""Token budgets at the policy gate: ``usage`` on ``action.proposed``, into the policy input.

The planner side (what it puts on the events, and a whole session through
the pipeline) is in tests/unit/test_planner_usage.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sluicegate.agents.schemas import ActionAllowed, ActionDenied, ActionProposed
from sluicegate.agents.testing import MemoryPipeline
from sluicegate.policy.bundle import default_bundle_path, load_bundle
from sluicegate.policy.evaluator import LoadedPolicy, Request
from sluicegate.policy.features import InputBuilder
from sluicegate.policy.gate import PolicyGate
from sluicegate.policy.schemas import ACTIONS_PROPOSED, ProposedAction, TokenUsage
from sluicegate.policy.testing import context, proposed_event, write_bundle
from sluicegate.streams.step import Context, Output

ACTION: dict[str, Any] = {
    "task_id": "t",
    "agent": "assistant",
    "action_index": 0,
    "action_count": 1,
    "tool": "echo",
    "args": {"text": "hi"},
}
USAGE = {"total_tokens": 18, "session_total_tokens": 54}
MODELS = (ActionProposed, ProposedAction)


def usage(session_total: int, call: int = 18) -> dict[str, int]:
    return {"total_tokens": call, "session_total_tokens": session_total}


# -- schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_usage_is_optional_and_old_events_stay_valid(model: type[ActionProposed]) -> None:
    old = model.model_validate(ACTION)
    assert old.usage is None
    new = model.model_validate({**ACTION, "usage": USAGE})
    assert new.usage is not None
    assert new.usage.model_dump() == USAGE
    assert model.model_validate({**ACTION, "usage": None}).usage is None


def test_both_sides_read_usage_alike() -> None:
    data = {**ACTION, "usage": USAGE}
    assert (
        ActionProposed.model_validate(data).model_dump()
        == ProposedAction.model_validate(data).model_dump()
    )
    # What the gate forwards (the proposal plus its decision) keeps the usage.
    assert ActionAllowed.model_validate(data).usage == ActionProposed.model_validate(data).usage


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"total_tokens": 18}, "usage.session_total_tokens"),
        ({"total_tokens": -1, "session_total_tokens": 5}, "greater than or equal to 0"),
        ({"total_tokens": 1.5, "session_total_tokens": 5}, "valid integer"),
        ({"total_tokens": "18", "session_total_tokens": 18}, "valid integer"),
        ({"total_tokens": True, "session_total_tokens": 18}, "valid integer"),
        ({**USAGE, "prompt_tokens": 11}, "usage.prompt_tokens"),
        ({"total_tokens": 18, "session_total_tokens": 17}, "less than the call's total_tokens"),
        ("lots", "usage"),
    ],
)
@pytest.mark.parametrize("model", MODELS)
def test_bad_usage_refused(model: type[ActionProposed], bad: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        model.model_validate({**ACTION, "usage": bad})


async def test_bad_usage_is_a_dead_letter_at_the_gate() -> None:
    gate = PolicyGate()
    pipeline = MemoryPipeline([gate])
    bad = proposed_event("echo", {"text": "x"}, usage={"total_tokens": -3})
    good = proposed_event("echo", {"text": "x"}, usage=usage(18))
    await pipeline.publish(ACTIONS_PROPOSED, [bad, good])
    await pipeline.run()
    [dead] = await pipeline.dead_letters()
    assert (dead.step, dead.reason) == ("gate", "invalid_data")
    assert "data.usage.total_tokens" in dead.text
    assert "data.usage.session_total_tokens" in dead.text
    assert dead.event() == bad
    # The valid action behind it is decided as usual.
    assert gate.stats.decisions == 1 and gate.stats.allowed == 1


# -- the policy input ---------------------------------------------------------------------


def test_usage_goes_into_the_policy_input_as_sent() -> None:
    builder = InputBuilder(load_bundle(default_bundle_path()))
    common: dict[str, Any] = {
        "tenant": "acme",
        "agent": "assistant",
        "tool": "echo",
        "args": {},
        "spend": 0,
        "calls_in_window": 0,
    }
    assert builder.build(**common)["usage"] is None
    assert builder.build(**common, usage=USAGE)["usage"] == USAGE


def test_undeclared_usage_is_not_passed(tmp_path: Path) -> None:
    rego = (
        "package sluice.gate\n"
        'decision := {"decision": "allow", "reasons": [], "cost": 1, "masks": []}\n'
    )
    path = write_bundle(tmp_path / "b", {"x.rego": rego}, {"gate": {"input": ["tool"]}})
    policy = LoadedPolicy.load(path)
    request = Request("acme", "a", "echo", {}, 0, 0, TokenUsage.model_validate(USAGE))
    assert policy.policy_input(request) == {"tool": "echo"}


# -- decisions on the reference bundle (globex: token_budget 20000; acme: none) -----------


@pytest.fixture(scope="module")
def gate() -> PolicyGate:
    return PolicyGate()


async def decide(gate: PolicyGate, **kw: Any) -> tuple[Output, Context]:
    event = proposed_event("echo", {"text": "x"}, **kw)
    ctx = context(event, {})
    [out] = await gate.process(event, ctx)
    model = ActionAllowed if out.topic == "actions.allowed" else ActionDenied
    model.model_validate(out.event.data)
    return out, ctx


async def test_within_the_token_budget_allowed(gate: PolicyGate) -> None:
    out, ctx = await decide(gate, tenant="globex", usage=usage(20000))
    assert out.topic == "actions.allowed"
    assert out.event.data["usage"] == usage(20000), "forwarded as it came"
    [row] = ctx.audit
    assert row.detail["usage"] == usage(20000)


async def test_over_the_token_budget_denied(gate: PolicyGate) -> None:
    out, ctx = await decide(gate, tenant="globex", usage=usage(20001))
    assert out.topic == "actions.denied"
    assert out.event.data["reasons"] == ["token_budget_exceeded"]
    assert out.event.data["usage"] == usage(20001)
    [row] = ctx.audit
    assert (row.decision, list(row.reasons)) == ("deny", ["token_budget_exceeded"])
    assert "policy" not in ctx.state, "a denied action is not charged"


@pytest.mark.parametrize("tenant", ["acme", "newco"])
async def test_no_token_budget_configured_is_unlimited(gate: PolicyGate, tenant: str) -> None:
    out, _ = await decide(gate, tenant=tenant, usage=usage(10**9))
    assert out.topic == "actions.allowed"


async def test_an_action_without_usage_spends_no_tokens(gate: PolicyGate) -> None:
    # The rule-based planner, or a planner older than the field.
    out, ctx = await decide(gate, tenant="globex")
    assert out.topic == "actions.allowed"
    assert "usage" not in out.event.data and "usage" not in ctx.audit[0].detail


def test_usage_decisions_are_cached_per_total() -> None:
    policy = LoadedPolicy.load(default_bundle_path())
    request = Request("globex", "assistant", "echo", {}, 0, 0, TokenUsage.model_validate(USAGE))
    assert not policy.decide(request).cached
    assert policy.decide(request).cached
    over = Request("globex", "assistant", "echo", {}, 0, 0, TokenUsage.model_validate(usage(20001)))
    verdict = policy.decide(over)
    assert not verdict.cached and verdict.decision.reasons == ("token_budget_exceeded",)
