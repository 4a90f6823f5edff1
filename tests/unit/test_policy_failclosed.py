"""The gate fails closed: every way a policy can go wrong is a policy_error deny, audited."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from sluicegate.agents.schemas import ActionDenied
from sluicegate.policy.bundle import Bundle
from sluicegate.policy.engine import Compiler, Mode, PolicyEngine, compile_bundle
from sluicegate.policy.gate import PolicyGate
from sluicegate.policy.testing import context, proposed_event, write_bundle

ENGINES = ["rvm", "interpreter"]

GOOD = """package sluice.gate
decision := {"decision": "allow", "reasons": [], "cost": 1, "masks": []}
"""


def compiler(mode: str) -> Compiler:
    engine_mode: Mode = "rvm" if mode == "rvm" else "interpreter"
    return functools.partial(compile_bundle, mode=engine_mode)


async def assert_policy_error(gate: PolicyGate, args: dict[str, Any] | None = None) -> str:
    """Run one action through ``gate``; it must be denied with policy_error, audited."""
    event = proposed_event("echo", args or {"text": "bob@example.com"})
    ctx = context(event)
    [out] = await gate.process(event, ctx)
    assert out.topic == "actions.denied"
    denied = ActionDenied.model_validate(out.event.data)
    assert denied.reasons == ["policy_error"]
    assert denied.policy_version == gate.policy.version
    # Arguments nobody vouched for are not forwarded.
    assert denied.args == {}
    [row] = ctx.audit
    assert (row.kind, row.decision, row.reasons) == ("decision", "deny", ("policy_error",))
    assert row.policy_version == gate.policy.version
    assert ctx.state == {}, "nothing is charged"
    error = row.detail["error"]
    assert isinstance(error, str) and error
    return error


@pytest.mark.parametrize("mode", ENGINES)
@pytest.mark.parametrize(
    "rego",
    [
        # A builtin that fails on this input.
        'package sluice.gate\ndecision := {"decision": "allow", "reasons": [], '
        '"cost": to_number(input.tool), "masks": []}\n',
        # Two values for one complete rule.
        'package sluice.gate\ndecision := {"decision": "allow", "reasons": [], "cost": 1,'
        ' "masks": []} if true\ndecision := {"decision": "deny", "reasons": ["x"]} if true\n',
        # Division by zero.
        'package sluice.gate\ndecision := {"decision": "allow", "reasons": [], '
        '"cost": 1 / count(input.pii), "masks": []}\n',
    ],
    ids=["bad-builtin-arg", "conflict", "div-by-zero"],
)
async def test_runtime_error(tmp_path: Path, mode: str, rego: str) -> None:
    # The interpreter raises, the RVM returns undefined: both deny.
    gate = PolicyGate(write_bundle(tmp_path / "b", {"gate.rego": rego}), compiler=compiler(mode))
    await assert_policy_error(gate)


@pytest.mark.parametrize("mode", ENGINES)
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('"allow"', "must be an object"),
        ("true", "must be an object"),
        ("null", "must be an object"),
        ('{"decision": "maybe", "reasons": []}', "allow, deny, redact or hold"),
        ('{"decision": "allow"}', "cost must be a number"),
        ('{"decision": "allow", "reasons": [], "cost": -1, "masks": []}', "out of range"),
        ('{"decision": "allow", "reasons": [], "cost": "1", "masks": []}', "must be a number"),
        ('{"decision": "allow", "reasons": [], "cost": true, "masks": []}', "must be a number"),
        ('{"decision": "allow", "reasons": ["ok"], "cost": 1, "masks": []}', "no reasons"),
        ('{"decision": "deny", "reasons": []}', "at least one reason"),
        ('{"decision": "deny", "reasons": ["Not A Code"]}', "not a reason code"),
        ('{"decision": "deny", "reasons": "nope"}', "list"),
        ('{"decision": "deny", "reasons": ["policy_error"]}', "the gate's own"),
        ('{"decision": "allow", "reasons": [], "cost": 1, "masks": [], "x": 1}', "unknown keys"),
        ('{"decision": "redact", "reasons": ["pii"], "cost": 1, "masks": []}', "at least one mask"),
        (
            '{"decision": "redact", "reasons": ["pii"], "cost": 1, '
            '"masks": [{"path": ["nope"], "match": "a", "mask": "b"}]}',
            "does not exist",
        ),
        (
            '{"decision": "redact", "reasons": ["pii"], "cost": 1, '
            '"masks": [{"path": ["text"], "match": "not there", "mask": "b"}]}',
            "not found",
        ),
        (
            '{"decision": "redact", "reasons": ["pii"], "cost": 1, '
            '"masks": [{"path": [], "match": "a", "mask": "b"}]}',
            "path",
        ),
    ],
)
async def test_garbage_decision(tmp_path: Path, mode: str, value: str, why: str) -> None:
    rego = f"package sluice.gate\ndecision := {value}\n"
    gate = PolicyGate(write_bundle(tmp_path / "b", {"gate.rego": rego}), compiler=compiler(mode))
    error = await assert_policy_error(gate)
    assert why in error


@pytest.mark.parametrize("mode", ENGINES)
async def test_undefined_decision(tmp_path: Path, mode: str) -> None:
    rego = 'package sluice.gate\ndecision := {"decision": "allow"} if input.tool == "never"\n'
    gate = PolicyGate(write_bundle(tmp_path / "b", {"gate.rego": rego}), compiler=compiler(mode))
    assert "undefined" in await assert_policy_error(gate)


class SlowEngine:
    """A valid engine that takes ``delay`` seconds per evaluation."""

    mode = "slow"

    def __init__(self, bundle: Bundle, delay: float) -> None:
        self.version = bundle.version
        self.inner = compile_bundle(bundle)
        self.delay = delay

    def evaluate(self, input_json: str) -> Any:
        time.sleep(self.delay)
        return self.inner.evaluate(input_json)

    def evaluate_many(self, inputs: Sequence[str]) -> list[Any]:
        return [self.evaluate(item) for item in inputs]


class BusyEngine(SlowEngine):
    """Burns ``delay`` seconds of CPU per evaluation (a slow policy, not a blocked one)."""

    def evaluate(self, input_json: str) -> Any:
        until = time.thread_time() + self.delay
        while time.thread_time() < until:
            pass
        return self.inner.evaluate(input_json)


async def test_slow_evaluation_cpu(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", {"gate.rego": GOOD})
    gate = PolicyGate(bundle, compiler=lambda b: BusyEngine(b, 0.02), eval_budget_s=0.01)
    assert "over the 10.0 ms budget" in await assert_policy_error(gate)


async def test_slow_evaluation(tmp_path: Path) -> None:
    # An engine that blocks: caught by the wall-clock ceiling (4x the budget).
    def slow(bundle: Bundle) -> PolicyEngine:
        return SlowEngine(bundle, 0.06)

    bundle = write_bundle(tmp_path / "b", {"gate.rego": GOOD})
    gate = PolicyGate(bundle, compiler=slow, eval_budget_s=0.01)
    assert "over the 10.0 ms budget" in await assert_policy_error(gate)
    # Not cached: the next evaluation is measured again, and still too slow.
    await assert_policy_error(gate)
    # Within the budget the same engine decides.
    relaxed = PolicyGate(bundle, compiler=slow, eval_budget_s=1.0)
    event = proposed_event("echo", {})
    [out] = await relaxed.process(event, context(event))
    assert out.topic == "actions.allowed"


async def test_pathological_policy_is_stopped(tmp_path: Path) -> None:
    # The RVM stops any evaluation after 25,000 instructions: the loop below
    # would take a million, and the gate denies without waiting for it.
    rego = (
        "package sluice.gate\n"
        'decision := {"decision": "allow", "reasons": [], "cost": n, "masks": []} if {\n'
        "\tn := count([x | some x in numbers.range(1, 1000000); x % 7 == 0])\n"
        "}\n"
    )
    gate = PolicyGate(write_bundle(tmp_path / "b", {"gate.rego": rego}))
    assert gate.policy.engine.mode == "rvm"
    assert "instruction limit" in await assert_policy_error(gate)


async def test_engine_that_raises_anything(tmp_path: Path) -> None:
    class Broken(SlowEngine):
        def evaluate(self, input_json: str) -> Any:
            raise MemoryError("boom")

    gate = PolicyGate(
        write_bundle(tmp_path / "b", {"gate.rego": GOOD}), compiler=lambda b: Broken(b, 0)
    )
    assert "boom" in await assert_policy_error(gate)


@pytest.mark.parametrize(
    "state",
    [
        {"policy": "garbage"},
        {"policy": {"spend": -1, "calls": []}},
        {"policy": {"spend": "1", "calls": []}},
        {"policy": {"spend": 1, "calls": "x"}},
        {"policy": {"spend": 1, "calls": ["x"]}},
    ],
)
async def test_unreadable_state(state: dict[str, Any]) -> None:
    gate = PolicyGate()
    event = proposed_event("echo", {"text": "hi"})
    ctx = context(event, state)
    [out] = await gate.process(event, ctx)
    assert out.event.data["reasons"] == ["policy_error"]
    assert "bad gate state" in ctx.audit[0].detail["error"]


async def test_too_much_pii_to_scan() -> None:
    gate = PolicyGate()
    error = await assert_policy_error(gate, {"text": " ".join(f"u{i}@x.io" for i in range(200))})
    assert "not scannable" in error


async def test_too_deep_to_scan() -> None:
    args: dict[str, Any] = {"text": "x"}
    for _ in range(40):
        args = {"a": args}
    assert "not scannable" in await assert_policy_error(PolicyGate(), args)


def test_bundle_without_decision_rule_does_not_start(tmp_path: Path) -> None:
    from sluicegate.policy.engine import PolicyCompileError

    rego = "package sluice.other\nx := 1\n"
    with pytest.raises(PolicyCompileError):
        PolicyGate(write_bundle(tmp_path / "b", {"gate.rego": rego}))
