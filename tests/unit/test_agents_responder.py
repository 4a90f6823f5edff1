from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sluicegate.agents.responder import ResponderStep
from sluicegate.agents.schemas import (
    ACTION_DENIED,
    TASK_COMPLETED,
    TOOL_RESULT,
    ActionDenied,
    TaskCompleted,
    ToolResult,
)
from sluicegate.agents.testing import MemoryPipeline, context_for, make_event
from sluicegate.agents.topics import ACTIONS_DENIED, RESULTS, TOOL_RESULTS
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Output, ResultRecord, StateKey, TickContext

T0 = datetime(2024, 5, 6, 12, 0, 0, tzinfo=UTC)
KEY = StateKey("acme", "s1")


def result_event(
    index: int, count: int, *, ok: bool = True, task: str = "task-1", **extra: Any
) -> Event:
    data: dict[str, Any] = {
        "task_id": task,
        "action_index": index,
        "action_count": count,
        "tool": "calculator",
        "ok": ok,
        "output": {"summary": f"answer {index}", "value": index} if ok else None,
        "error": None if ok else f"broke {index}",
        "attempts": 1,
    }
    data.update(extra)
    return make_event(TOOL_RESULT, ToolResult.model_validate(data).model_dump(mode="json"))


def denied_event(index: int, count: int, *, task: str = "task-1") -> Event:
    data = ActionDenied(
        task_id=task,
        action_index=index,
        action_count=count,
        tool="shell",
        args={"command": "rm -rf /"},
        reasons=["tool shell is not allowed"],
        policy_version="sha256:abc",
    )
    return make_event(ACTION_DENIED, data.model_dump(mode="json"))


class Harness:
    """Feeds events to one responder with one session state, collecting results."""

    def __init__(self, **options: Any) -> None:
        self.now = T0
        self.step = ResponderStep(clock=lambda: self.now, **options)
        self.state: dict[str, Any] = {}
        self.outputs: list[Output] = []
        self.results: list[ResultRecord] = []
        # Inputs the step marked as duplicates (``ctx.detail``), by event id.
        self.duplicates: list[str] = []

    async def feed(self, *events: Event) -> list[Output]:
        new: list[Output] = []
        for event in events:
            ctx = context_for(self.step, event, self.state)
            new += await self.step.process(event, ctx)
            self.results += ctx.results
            assert ctx.audit == []
            if ctx.detail.get("duplicate"):
                self.duplicates.append(event.id)
        self.outputs += new
        return new

    async def tick(self, now: datetime) -> TickContext:
        tc = TickContext(step=self.step.name, states={KEY: self.state})
        self.outputs += await self.step.tick(now, tc)
        self.results += tc.results
        return tc

    def final(self) -> TaskCompleted:
        [out] = self.outputs
        assert out.topic == RESULTS and out.event.type == TASK_COMPLETED
        [record] = self.results
        completed = TaskCompleted.model_validate(out.event.data)
        assert (record.task_id, record.status) == (completed.task_id, completed.status)
        assert record.answer == completed.answer.model_dump(mode="json")
        return completed


async def test_out_of_order_and_duplicate_outcomes_give_one_result() -> None:
    h = Harness()
    first, second, third = result_event(0, 3), result_event(1, 3), result_event(2, 3)
    assert await h.feed(third, first) == []
    assert await h.feed(third) == []  # the same event again
    copy = result_event(0, 3)
    assert await h.feed(copy) == []  # the same outcome from another copy
    assert h.duplicates == [third.id, copy.id]
    assert len(await h.feed(second)) == 1
    # Anything after the result is absorbed.
    late = [second, result_event(1, 3), denied_event(2, 3)]
    assert await h.feed(*late) == []
    assert h.duplicates[2:] == [e.id for e in late]
    final = h.final()
    assert final.status == "completed"
    assert [o.action_index for o in final.answer.outcomes] == [0, 1, 2]
    assert final.answer.text.splitlines() == [
        "All 3 action(s) succeeded.",
        "1. calculator: answer 0",
        "2. calculator: answer 1",
        "3. calculator: answer 2",
    ]
    assert h.state["pending"] == {}
    assert h.state["done_tasks"] == ["task-1"]


async def test_all_denied_is_denied() -> None:
    h = Harness()
    await h.feed(denied_event(1, 2), denied_event(0, 2))
    final = h.final()
    assert final.status == "denied"
    assert final.answer.outcomes[0].reasons == ["tool shell is not allowed"]
    assert "2. shell: denied (tool shell is not allowed)" in final.answer.text


async def test_some_denied_or_failed_is_partial() -> None:
    h = Harness()
    await h.feed(result_event(0, 3), denied_event(1, 3), result_event(2, 3, ok=False))
    final = h.final()
    assert final.status == "partial"
    assert [o.status for o in final.answer.outcomes] == ["ok", "denied", "error"]
    assert final.answer.text.startswith("1 of 3 action(s) succeeded.")
    assert "3. calculator: failed: broke 2" in final.answer.text


async def test_nothing_succeeded_is_failed() -> None:
    h = Harness()
    await h.feed(result_event(0, 2, ok=False), denied_event(1, 2))
    assert h.final().status == "failed"


async def test_malformed_outcome_fails_the_task_at_once() -> None:
    h = Harness()
    await h.feed(result_event(0, 3), result_event(1, 3, ok=True, output=None))
    final = h.final()
    assert final.status == "failed"
    assert "a successful tool result has no output" in final.answer.text
    assert [o.status for o in final.answer.outcomes] == ["ok", "ok", "missing"]
    assert await h.feed(result_event(2, 3)) == []


async def test_disagreeing_plan_size_fails_the_task() -> None:
    h = Harness()
    await h.feed(result_event(0, 2), result_event(1, 3))
    final = h.final()
    assert final.status == "failed" and "plan size 3 disagrees with 2" in final.answer.text


async def test_conflicting_outcomes_fail_the_task() -> None:
    h = Harness()
    await h.feed(result_event(0, 2), denied_event(0, 2))
    final = h.final()
    assert final.status == "failed" and "conflicting outcomes for action 0" in final.answer.text


async def test_deadline_gives_timeout_via_tick() -> None:
    h = Harness(deadline=30)
    await h.feed(result_event(2, 3), result_event(0, 3))
    assert h.state["pending"]["task-1"]["deadline"] == (T0 + timedelta(seconds=30)).isoformat()
    await h.tick(T0 + timedelta(seconds=29))
    assert h.outputs == [] and h.results == []
    tc = await h.tick(T0 + timedelta(seconds=30))
    final = h.final()
    assert final.status == "timeout"
    assert [o.status for o in final.answer.outcomes] == ["ok", "missing", "ok"]
    assert final.answer.text.splitlines()[0] == "Timed out with 2 of 3 outcome(s)."
    assert "2. ?: no outcome received" in final.answer.text
    assert tc.results[0].tenant == "acme" and tc.results[0].session == "s1"
    assert h.state["pending"] == {}
    # The late outcome gets no second result; neither does a later tick.
    assert await h.feed(result_event(1, 3)) == []
    await h.tick(T0 + timedelta(hours=1))
    assert len(h.outputs) == 1 and len(h.results) == 1


async def test_tick_output_ids_are_deterministic() -> None:
    ids = []
    for _ in range(2):
        h = Harness(deadline=1)
        await h.feed(result_event(0, 2))
        await h.tick(T0 + timedelta(seconds=5))
        ids.append(h.outputs[0].event.id)
    assert ids[0] == ids[1]


async def test_tick_expires_corrupt_joins_and_ignores_unrelated_state() -> None:
    h = Harness()
    h.state.update({"pending": {"task-x": {"deadline": "not a time"}}, "other": 1})
    await h.tick(T0)
    final = h.final()
    assert (final.task_id, final.status, final.action_count) == ("task-x", "timeout", 0)


async def test_tasks_join_independently() -> None:
    h = Harness()
    await h.feed(result_event(0, 2, task="a"), result_event(0, 1, task="b"))
    assert [TaskCompleted.model_validate(o.event.data).task_id for o in h.outputs] == ["b"]
    await h.feed(result_event(1, 2, task="a"))
    assert [r.task_id for r in h.results] == ["b", "a"]


async def test_corrupt_stored_join_fails_the_task() -> None:
    h = Harness()
    h.state["pending"] = {"task-1": {"action_count": "two", "outcomes": ["junk"]}}
    await h.feed(result_event(0, 2))
    final = h.final()
    assert final.status == "failed" and "stored join is corrupt" in final.answer.text


# On the real runner (in-memory transport and store): state goes through the
# store as JSON, survives a restart, and ticks are driven by the runner.


async def test_join_survives_a_restart_on_the_runner() -> None:
    pipeline = MemoryPipeline([ResponderStep()])
    await pipeline.publish(TOOL_RESULTS, [result_event(0, 2)])
    await pipeline.run()
    assert list(pipeline.state("responder")["pending"]) == ["task-1"]
    await pipeline.restart()
    copy = result_event(0, 2)  # the same outcome again, under another id
    await pipeline.publish(TOOL_RESULTS, [copy])
    await pipeline.run()
    await pipeline.publish(ACTIONS_DENIED, [denied_event(1, 2)])
    await pipeline.run()
    [final] = await pipeline.events(RESULTS, TASK_COMPLETED)
    completed = TaskCompleted.model_validate(final.data)
    assert (completed.task_id, completed.status) == ("task-1", "partial")
    assert [o.status for o in completed.answer.outcomes] == ["ok", "denied"]
    assert pipeline.results["task-1"].status == "partial"
    rows = pipeline.audit_of("processed", step="responder")
    assert [r.detail for r in rows] == [
        {"outputs": 0},
        {"duplicate": True, "outputs": 0},
        {"outputs": 1},
    ]
    assert rows[1].event_id == copy.id
    # A late outcome after the answer gets none of its own.
    await pipeline.publish(TOOL_RESULTS, [result_event(1, 2)])
    await pipeline.run()
    assert await pipeline.completions() == {"task-1": 1}
    assert pipeline.state("responder") == {"done_tasks": ["task-1"], "pending": {}}


async def test_deadline_through_the_runner_tick() -> None:
    pipeline = MemoryPipeline([ResponderStep(deadline=30, clock=lambda: T0)])
    await pipeline.publish(TOOL_RESULTS, [result_event(0, 2)])
    await pipeline.run()
    await pipeline.tick(T0 + timedelta(seconds=29))
    assert pipeline.results == {} and await pipeline.events(RESULTS) == []
    await pipeline.tick(T0 + timedelta(seconds=30))
    [final] = await pipeline.events(RESULTS, TASK_COMPLETED)
    assert final.data["status"] == "timeout" and final.causationid == "task-1"
    record = pipeline.results["task-1"]
    assert (record.status, record.tenant, record.session) == ("timeout", "acme", "s1")
    assert pipeline.state("responder")["pending"] == {}
    # Neither a late outcome nor a later tick, even after a restart, answers again.
    await pipeline.publish(TOOL_RESULTS, [result_event(1, 2)])
    await pipeline.restart()
    await pipeline.tick(T0 + timedelta(hours=1))
    assert await pipeline.completions() == {"task-1": 1}
