"""Hot reload of a running gate, and shadow bundles."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from sluicegate.policy.bundle import Bundle, load_bundle
from sluicegate.policy.engine import PolicyEngine, compile_bundle
from sluicegate.policy.gate import PolicyGate
from sluicegate.policy.testing import context, copy_reference_bundle, proposed_event, write_bundle

ALLOW = (
    "package sluice.gate\n"
    'decision := {"decision": "allow", "reasons": [], "cost": 1, "masks": []}\n'
)
DENY = 'package sluice.gate\ndecision := {"decision": "deny", "reasons": ["closed"], "masks": []}\n'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def touch(path: Path, step: int) -> None:
    """A distinct mtime for every write: a filesystem's clock may be coarse."""
    for file in path.iterdir():
        os.utime(file, ns=(step * 10**9, step * 10**9))


async def run(gate: PolicyGate, tool: str = "echo", **kw: Any) -> tuple[dict[str, Any], list[Any]]:
    event = proposed_event(tool, {"text": "hi"}, **kw)
    ctx = context(event)
    [out] = await gate.process(event, ctx)
    return out.event.data, ctx.audit


async def test_changed_bundle_swapped_in_broken_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_bundle(tmp_path / "live", {"gate.rego": ALLOW})
    clock = Clock()
    gate = PolicyGate(path, reload_interval_s=5, monotonic=clock)
    v1 = gate.policy.version
    data, _ = await run(gate)
    assert (data["decision"], data["policy_version"]) == ("allow", v1)

    # A good new bundle: picked up at the next poll, not before.
    write_bundle(path, {"gate.rego": DENY})
    touch(path, 1)
    clock.now += 1
    data, _ = await run(gate)
    assert data["policy_version"] == v1, "polled at most every reload_interval_s"
    clock.now += 5
    data, audit = await run(gate)
    v2 = gate.policy.version
    assert v2 != v1
    assert (data["decision"], data["reasons"], data["policy_version"]) == ("deny", ["closed"], v2)
    assert audit[0].policy_version == v2
    assert gate.stats.reloads == 1

    # A broken bundle: refused with an error log, the old one keeps deciding.
    caplog.set_level(logging.ERROR, logger="sluicegate.policy")
    write_bundle(path, {"gate.rego": "package sluice.gate\ndecision := {"})
    touch(path, 2)
    clock.now += 5
    data, _ = await run(gate)
    assert (data["decision"], data["policy_version"]) == ("deny", v2)
    assert gate.stats.refused_reloads == 1
    [record] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert str(path) in record.getMessage() and v2 in record.getMessage()
    # Reported once, not at every poll.
    clock.now += 5
    await run(gate)
    assert gate.stats.refused_reloads == 1

    # Bad data.json and a bundle that loses its decision rule are refused too.
    write_bundle(path, {"gate.rego": ALLOW})
    (path / "data.json").write_text("{not json")
    touch(path, 3)
    clock.now += 5
    await run(gate)
    write_bundle(path, {"gate.rego": "package sluice.gate\nother := 1\n"})
    touch(path, 4)
    clock.now += 5
    data, _ = await run(gate)
    assert gate.stats.refused_reloads == 3
    assert data["policy_version"] == v2

    # Fixed: swapped in again.
    write_bundle(path, {"gate.rego": ALLOW})
    touch(path, 5)
    clock.now += 5
    data, _ = await run(gate)
    assert (data["decision"], data["policy_version"]) == ("allow", v1)


async def test_touched_but_unchanged_bundle_is_not_recompiled(tmp_path: Path) -> None:
    path = copy_reference_bundle(tmp_path / "live")
    clock = Clock()
    gate = PolicyGate(path, reload_interval_s=1, monotonic=clock)
    policy = gate.policy
    touch(path, 7)
    clock.now += 2
    await run(gate)
    assert gate.policy is policy
    assert gate.stats.reloads == 0


async def test_reload_changes_reference_data(tmp_path: Path) -> None:
    path = copy_reference_bundle(tmp_path / "live")
    clock = Clock()
    gate = PolicyGate(path, reload_interval_s=1, monotonic=clock)
    data, _ = await run(gate, "echo")
    assert data["decision"] == "allow"
    bundle = orjson.loads((path / "data.json").read_bytes())
    bundle["gate"]["tenants"]["acme"]["tools"].remove("echo")
    (path / "data.json").write_bytes(orjson.dumps(bundle))
    touch(path, 9)
    clock.now += 2
    data, _ = await run(gate, "echo")
    assert data["reasons"] == ["tool_not_allowed"]
    assert data["policy_version"] == load_bundle(path).version


async def test_sighup_reloads_at_once(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "live", {"gate.rego": ALLOW})
    gate = PolicyGate(path, reload_interval_s=3600)
    loop = asyncio.get_running_loop()
    gate.install_sighup(loop)
    try:
        write_bundle(path, {"gate.rego": DENY})
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if gate.stats.reloads:
                break
            await asyncio.sleep(0.01)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
    data, _ = await run(gate)
    assert data["reasons"] == ["closed"]


async def test_shadow_divergence_recorded(tmp_path: Path) -> None:
    shadow = copy_reference_bundle(tmp_path / "candidate")
    bundle = orjson.loads((shadow / "data.json").read_bytes())
    # The candidate drops echo for acme and makes search cost more.
    bundle["gate"]["tenants"]["acme"]["tools"].remove("echo")
    bundle["gate"]["tools"]["costs"]["search"] = 3
    (shadow / "data.json").write_bytes(orjson.dumps(bundle))
    gate = PolicyGate(shadow=shadow)
    assert gate.shadow_policy is not None
    candidate = gate.shadow_policy.version
    assert candidate != gate.policy.version

    data, audit = await run(gate, "echo")
    assert data["decision"] == "allow", "the shadow is never enforced"
    assert [row.kind for row in audit] == ["shadow_divergence", "decision"]
    row = audit[0]
    assert (row.decision, row.reasons, row.policy_version) == (
        "deny",
        ("tool_not_allowed",),
        candidate,
    )
    assert row.detail["live"]["decision"] == "allow"
    assert row.detail["live"]["policy_version"] == gate.policy.version
    assert row.detail["shadow"]["reasons"] == ["tool_not_allowed"]

    # Same verdict, different cost: also a divergence (it changes what is charged).
    _, audit = await run(gate, "search")
    assert [row.kind for row in audit] == ["shadow_divergence", "decision"]
    assert (audit[0].detail["live"]["cost"], audit[0].detail["shadow"]["cost"]) == (2, 3)

    # Agreement: no row.
    _, audit = await run(gate, "shell")
    assert [row.kind for row in audit] == ["decision"]
    assert gate.stats.shadow_divergences == 2


async def test_broken_shadow_does_not_stop_the_gate(tmp_path: Path) -> None:
    broken = write_bundle(tmp_path / "candidate", {"gate.rego": "package sluice.gate\nx := {"})
    gate = PolicyGate(shadow=broken)
    assert gate.shadow_policy is None
    data, audit = await run(gate)
    assert data["decision"] == "allow"
    assert [row.kind for row in audit] == ["decision"]


async def test_shadow_from_environment(tmp_path: Path) -> None:
    live = write_bundle(tmp_path / "live", {"gate.rego": ALLOW})
    candidate = write_bundle(tmp_path / "candidate", {"gate.rego": DENY})
    gate = PolicyGate(
        environ={"SLUICE_POLICY_BUNDLE": str(live), "SLUICE_POLICY_SHADOW": str(candidate)}
    )
    data, audit = await run(gate)
    assert data["decision"] == "allow"
    assert audit[0].kind == "shadow_divergence"
    assert audit[0].detail["shadow"]["reasons"] == ["closed"]
    assert PolicyGate(environ={}).shadow_policy is None
    # Arguments win over the environment.
    explicit = PolicyGate(live, environ={"SLUICE_POLICY_BUNDLE": str(candidate)})
    assert explicit.policy.version == gate.policy.version


async def test_compiler_crash_on_reload_is_a_refusal(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "live", {"gate.rego": ALLOW})
    calls = []

    def flaky(bundle: Bundle) -> PolicyEngine:
        calls.append(bundle.version)
        if len(calls) > 1:
            raise RuntimeError("compiler bug")
        return compile_bundle(bundle)

    clock = Clock()
    gate = PolicyGate(path, compiler=flaky, reload_interval_s=1, monotonic=clock)
    write_bundle(path, {"gate.rego": DENY})
    touch(path, 11)
    clock.now += 2
    data, _ = await run(gate)
    assert data["decision"] == "allow"
    assert gate.stats.refused_reloads == 1
