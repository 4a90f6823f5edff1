from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from sluicegate.agents.history import ContextStep, estimate_tokens, evict
from sluicegate.agents.intake import IntakeStep
from sluicegate.agents.schemas import (
    TASK_ACCEPTED,
    TASK_SUBMITTED,
    ContextPacked,
    HistoryTurn,
    TaskAccepted,
    TaskSubmitted,
)
from sluicegate.agents.testing import context_for, make_event
from sluicegate.agents.topics import CONTEXT, TASKS_ACCEPTED


async def test_intake_accepts_and_drops_duplicates() -> None:
    step = IntakeStep()
    state: dict[str, Any] = {}
    event = make_event(TASK_SUBMITTED, {"prompt": "2+2", "metadata": {"ticket": 7}})
    ctx = context_for(step, event, state)
    [out] = await step.process(event, ctx)
    assert out.topic == TASKS_ACCEPTED and out.event.type == TASK_ACCEPTED
    accepted = TaskAccepted.model_validate(out.event.data)
    assert accepted.task_id == event.id
    assert (accepted.prompt, accepted.agent, accepted.metadata) == (
        "2+2",
        "assistant",
        {"ticket": 7},
    )
    assert accepted.submitted_at == event.time
    assert (ctx.audit, ctx.detail) == ([], {})

    # The duplicate is marked on the runner's processed row for it, not in a row of its own.
    again = context_for(step, event, state)
    assert await step.process(event, again) == []
    assert (again.audit, again.detail) == ([], {"duplicate": True})


async def test_intake_remembers_a_bounded_number_of_ids() -> None:
    step = IntakeStep(remember_ids=3)
    state: dict[str, Any] = {}
    events = [make_event(TASK_SUBMITTED, {"prompt": f"p{i}"}) for i in range(5)]
    for event in events:
        assert len(await step.process(event, context_for(step, event, state))) == 1
    assert state["recent_ids"] == [e.id for e in events[-3:]]
    # The newest ids are still known; the oldest has been forgotten.
    assert await step.process(events[4], context_for(step, events[4], state)) == []
    assert len(await step.process(events[0], context_for(step, events[0], state))) == 1


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"prompt": ""},
        {"prompt": "x" * 8001},
        {"prompt": "ok", "agent": "bad agent!"},
        {"prompt": "ok", "surprise": 1},
        {"prompt": "ok", "metadata": {"blob": "x" * 5000}},
    ],
)
def test_task_submitted_validation(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TaskSubmitted.model_validate(data)


def test_estimate_tokens() -> None:
    assert estimate_tokens("one two three") == 4  # 13 chars / 4 rounds up beyond 3 words
    assert estimate_tokens("a b c d e f") == 6  # words win for short words
    assert estimate_tokens("x" * 400) == 100  # one long "word" still costs its length
    assert estimate_tokens("") == 0


def test_evict_drops_oldest_first() -> None:
    turns = [HistoryTurn(task_id=str(i), prompt="w", tokens=t) for i, t in enumerate([5, 3, 4, 2])]
    assert [t.task_id for t in evict(turns, budget=9, max_turns=10)] == ["1", "2", "3"]
    assert [t.task_id for t in evict(turns, budget=6, max_turns=10)] == ["2", "3"]
    assert [t.task_id for t in evict(turns, budget=100, max_turns=2)] == ["2", "3"]
    assert evict(turns, budget=1, max_turns=10) == []


def accepted(i: int, words: int) -> Any:
    prompt = " ".join(f"w{i}" for _ in range(words))
    data = TaskAccepted(task_id=f"task-{i}", prompt=prompt).model_dump(mode="json")
    return make_event(TASK_ACCEPTED, data)


async def test_context_packs_history_under_the_budget() -> None:
    step = ContextStep(token_budget=10)
    state: dict[str, Any] = {}
    packed: list[ContextPacked] = []
    for i, words in enumerate([4, 4, 4, 12, 3]):
        event = accepted(i, words)
        [out] = await step.process(event, context_for(step, event, state))
        assert out.topic == CONTEXT
        packed.append(ContextPacked.model_validate(out.event.data))

    def ids(p: ContextPacked) -> list[str]:
        return [t.task_id for t in p.history]

    assert ids(packed[0]) == []
    assert ids(packed[1]) == ["task-0"]
    assert ids(packed[2]) == ["task-0", "task-1"]
    # 4+4+4 = 12 > 10: the oldest was evicted when task-2 joined.
    assert ids(packed[3]) == ["task-1", "task-2"]
    # task-3 alone is over the budget, so it evicted everything, itself included.
    assert ids(packed[4]) == []
    assert all(p.history_tokens <= 10 and p.token_budget == 10 for p in packed)
    assert packed[2].history_tokens == 8
    assert [t["task_id"] for t in state["history"]] == ["task-4"]
    assert packed[4].task.task_id == "task-4"


async def test_context_drops_duplicate_tasks_and_survives_corrupt_state() -> None:
    step = ContextStep(token_budget=100)
    state: dict[str, Any] = {
        "history": [{"task_id": "old", "prompt": "hello", "tokens": 2}, "junk"]
    }
    event = accepted(1, 2)
    [out] = await step.process(event, context_for(step, event, state))
    assert [t.task_id for t in ContextPacked.model_validate(out.event.data).history] == ["old"]
    ctx = context_for(step, event, state)
    assert await step.process(event, ctx) == []
    assert (ctx.audit, ctx.detail) == ([], {"duplicate": True})
    assert [t["task_id"] for t in state["history"]] == ["old", "task-1"]
