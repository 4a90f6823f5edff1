"""The planner step records what its model calls cost: audit detail, keyed state, metrics.

And it puts the tokens on each ``action.proposed`` (``usage``), which the
policy gate turns into a per-session token budget (tests/unit/test_token_budget.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from sluicegate.agents import topics
from sluicegate.agents.model_client import ModelClient, SessionPool
from sluicegate.agents.model_limits import LimitRegistry
from sluicegate.agents.openai_planner import OpenAIPlanner
from sluicegate.agents.pipeline import reference_steps
from sluicegate.agents.planner import TOKENS_KEY, PlannerStep
from sluicegate.agents.schemas import (
    CONTEXT_PACKED,
    TASK_SUBMITTED,
    ActionDenied,
    ActionProposed,
    ContextPacked,
    TaskAccepted,
    TaskCompleted,
)
from sluicegate.agents.testing import MemoryPipeline, context_for, make_event
from sluicegate.policy.gate import PolicyGate
from sluicegate.policy.schemas import ProposedAction
from sluicegate.policy.testing import copy_reference_bundle
from tests.metrics_support import metric_points
from tests.model_endpoint import Endpoint, RecordingSleep, Reply, completion, serve

PLAN = json.dumps([{"tool": "clock", "args": {}}, {"tool": "echo", "args": {"text": "hi"}}])


@pytest.fixture
async def server() -> AsyncIterator[Endpoint]:
    async with serve() as endpoint:
        endpoint.default = Reply(json=completion(PLAN))
        yield endpoint


@pytest.fixture
async def pool() -> AsyncIterator[SessionPool]:
    pool = SessionPool()
    yield pool
    await pool.aclose()


def planner_step(server: Endpoint, pool: SessionPool, **options: Any) -> PlannerStep:
    client = ModelClient(
        server.url,
        pool=pool,
        limits=LimitRegistry(),
        sleep=RecordingSleep(),
        step="planner",
        **options,
    )
    return PlannerStep(OpenAIPlanner(server.url, client=client))


async def plan_raw(
    step: PlannerStep, state: dict[str, Any], prompt: str = "what time is it?"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The planner's ``action.proposed`` data as it goes on the wire, and its audit detail."""
    task = TaskAccepted(task_id="task-1", prompt=prompt)
    packed = ContextPacked(task=task, history=[], history_tokens=0, token_budget=512)
    event = make_event(CONTEXT_PACKED, packed.model_dump(mode="json"))
    ctx = context_for(step, event, state)
    outputs = await step.process(event, ctx)
    return [o.event.data for o in outputs], ctx.detail


async def plan_one(
    step: PlannerStep, state: dict[str, Any], prompt: str = "what time is it?"
) -> tuple[list[ActionProposed], dict[str, Any]]:
    data, detail = await plan_raw(step, state, prompt)
    return [ActionProposed.model_validate(d) for d in data], detail


async def test_usage_goes_to_the_audit_detail_and_the_session_totals(
    server: Endpoint, pool: SessionPool
) -> None:
    step = planner_step(server, pool)
    state: dict[str, Any] = {}
    actions, detail = await plan_one(step, state)
    assert [a.tool for a in actions] == ["clock", "echo"]
    model = detail["model"]
    assert model["model"] == "tiny-1"
    assert (model["prompt_tokens"], model["completion_tokens"], model["total_tokens"]) == (
        11,
        7,
        18,
    )
    assert model["attempts"] == 1 and isinstance(model["latency_ms"], int)
    assert state[TOKENS_KEY] == {"prompt": 11, "completion": 7, "total": 18, "calls": 1}
    # A retried call: its attempts are recorded, its tokens added once.
    server.script = [Reply(503)]
    _, detail = await plan_one(step, state)
    assert detail["model"]["attempts"] == 2
    assert state[TOKENS_KEY] == {"prompt": 22, "completion": 14, "total": 36, "calls": 2}


async def test_exhausted_retries_fail_closed_and_record_the_attempts(
    server: Endpoint, pool: SessionPool
) -> None:
    step = planner_step(server, pool, max_attempts=3)
    server.default = Reply(503)
    state: dict[str, Any] = {"tokens": {"prompt": 1, "completion": 1, "total": 2, "calls": 1}}
    actions, detail = await plan_one(step, state)
    assert [(a.tool, a.action_count) for a in actions] == [("echo", 1)]
    assert actions[0].args["text"] == "plan failed: endpoint answered HTTP 503 (after 3 attempts)"
    assert detail["model"]["attempts"] == 3
    assert detail["model"]["error"].endswith("(after 3 attempts)")
    assert "total_tokens" not in detail["model"]
    # No usage reported, so the session's totals are as they were.
    assert state[TOKENS_KEY] == {"prompt": 1, "completion": 1, "total": 2, "calls": 1}
    assert server.requests == 3


async def test_an_unusable_plan_still_counts_its_tokens(
    server: Endpoint, pool: SessionPool
) -> None:
    server.default = Reply(json=completion("I would rather chat."))
    state: dict[str, Any] = {}
    actions, detail = await plan_one(planner_step(server, pool), state)
    assert actions[0].args["text"].startswith("plan failed: reply is not JSON")
    assert detail["model"]["total_tokens"] == 18
    assert state[TOKENS_KEY]["total"] == 18


async def test_the_rule_based_planner_reports_no_usage() -> None:
    state: dict[str, Any] = {}
    actions, detail = await plan_one(PlannerStep(), state)
    assert actions and "model" not in detail
    assert state == {}


async def test_model_metrics_carry_the_step(
    server: Endpoint, pool: SessionPool, metric_reader: InMemoryMetricReader
) -> None:
    await plan_one(planner_step(server, pool), {})
    points = metric_points(metric_reader)
    tokens = {
        (p.attributes["sluice.step"], p.attributes["gen_ai.token.type"]): p.value
        for p in points["sluice.model.tokens"]
    }
    assert tokens == {("planner", "input"): 11, ("planner", "output"): 7}
    [duration] = points["sluice.model.call.duration"]
    assert duration.count == 1 and dict(duration.attributes) == {"sluice.step": "planner"}


async def test_through_the_runner_usage_is_audited_and_committed(
    server: Endpoint, pool: SessionPool
) -> None:
    # The real runner and commit protocol: the detail lands in the planner's
    # processed audit row, and the totals in its committed keyed state.
    planner = planner_step(server, pool).planner
    pipeline = MemoryPipeline(reference_steps(planner=planner))
    events = [make_event(TASK_SUBMITTED, {"prompt": f"task {i}"}) for i in range(3)]
    await pipeline.publish(topics.TASKS, events)
    await pipeline.run()
    finals = [TaskCompleted.model_validate(e.data) for e in await pipeline.events(topics.RESULTS)]
    assert sorted(f.status for f in finals) == ["completed"] * 3
    rows = pipeline.audit_of("processed", step="planner")
    assert [row.detail["model"]["total_tokens"] for row in rows] == [18, 18, 18]
    assert pipeline.state("planner")[TOKENS_KEY] == {
        "prompt": 33,
        "completion": 21,
        "total": 54,
        "calls": 3,
    }


async def test_actions_carry_the_call_and_session_totals(
    server: Endpoint, pool: SessionPool
) -> None:
    step = planner_step(server, pool)
    state: dict[str, Any] = {"tokens": {"prompt": 100, "completion": 0, "total": 100, "calls": 4}}
    data, _ = await plan_raw(step, state)
    # Every action of the plan: the call's tokens, and the session's total after it.
    assert [d["usage"] for d in data] == [{"total_tokens": 18, "session_total_tokens": 118}] * 2
    data, _ = await plan_raw(step, state)
    assert {d["usage"]["session_total_tokens"] for d in data} == {136}
    # Both sides' schemas take it.
    for d in data:
        ProposedAction.model_validate(d)


async def test_no_usage_leaves_the_key_out(server: Endpoint, pool: SessionPool) -> None:
    # No "usage": null either, so the event stays valid for a gate that
    # predates the field (rolling upgrade: gates first, but this keeps the
    # rule-based planner and usage-less endpoints working during it).
    server.default = Reply(json=completion(PLAN, usage=None))
    data, detail = await plan_raw(planner_step(server, pool), {})
    assert data and all("usage" not in d for d in data)
    assert "total_tokens" not in detail["model"]
    data, _ = await plan_raw(PlannerStep(), {})
    assert data and all("usage" not in d for d in data)
    old_gate_schema = set(ProposedAction.model_fields) - {"usage"}
    assert all(set(d) <= old_gate_schema for d in data)


async def test_a_failed_plan_carries_its_tokens_too(server: Endpoint, pool: SessionPool) -> None:
    server.default = Reply(json=completion("I would rather chat."))
    data, _ = await plan_raw(planner_step(server, pool), {})
    [echo] = data
    assert echo["tool"] == "echo" and echo["usage"] == {
        "total_tokens": 18,
        "session_total_tokens": 18,
    }


async def test_a_session_past_its_token_budget_is_denied_at_the_gate(
    server: Endpoint, pool: SessionPool, tmp_path: Path
) -> None:
    # The real runner, planner and policy gate on the reference bundle with
    # acme's token_budget set to 40: every call costs 18 tokens, so a
    # session's third plan (54 tokens so far) is denied, and a session of
    # its own starts from nothing (a budget per tenant, applied per session).
    bundle = copy_reference_bundle(tmp_path / "bundle")
    data = json.loads((bundle / "data.json").read_text())
    data["gate"]["tenants"]["acme"]["token_budget"] = 40
    (bundle / "data.json").write_text(json.dumps(data))
    planner = planner_step(server, pool).planner
    pipeline = MemoryPipeline(
        reference_steps(planner=planner, make_gate=lambda: PolicyGate(bundle))
    )
    first = [make_event(TASK_SUBMITTED, {"prompt": f"task {i}"}) for i in range(3)]
    other = make_event(TASK_SUBMITTED, {"prompt": "task 3"}, session="s2")
    await pipeline.publish(topics.TASKS, [*first, other])
    await pipeline.run()
    finals = [TaskCompleted.model_validate(e.data) for e in await pipeline.events(topics.RESULTS)]
    status = {final.task_id: final.status for final in finals}
    assert [status[e.id] for e in first] == ["completed", "completed", "denied"]
    assert status[other.id] == "completed"
    denied = [
        ActionDenied.model_validate(e.data) for e in await pipeline.events(topics.ACTIONS_DENIED)
    ]
    assert [(d.tool, d.reasons) for d in denied] == [
        ("clock", ["token_budget_exceeded"]),
        ("echo", ["token_budget_exceeded"]),
    ]
    usage = {"total_tokens": 18, "session_total_tokens": 54}
    assert [d.model_dump()["usage"] for d in denied] == [usage, usage]
    # The decision rows say which total was judged.
    rows = pipeline.audit_of("decision", step="gate")
    totals = sorted(r.detail["usage"]["session_total_tokens"] for r in rows)
    assert totals == [18] * 4 + [36] * 2 + [54] * 2
    assert pipeline.state("planner")[TOKENS_KEY]["total"] == 54
    assert pipeline.state("planner", session="s2")[TOKENS_KEY]["total"] == 18
    assert await pipeline.dead_letters() == []
