from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sluicegate.agents import topics
from sluicegate.agents.api import Step
from sluicegate.agents.gate import AllowAllGate
from sluicegate.agents.keyed import data_as
from sluicegate.agents.pipeline import reference_steps
from sluicegate.agents.schemas import (
    ACTION_ALLOWED,
    ACTION_DENIED,
    ACTION_PROPOSED,
    TASK_COMPLETED,
    TASK_SUBMITTED,
    ActionAllowed,
    ActionDenied,
    ActionProposed,
    TaskCompleted,
)
from sluicegate.agents.testing import MemoryPipeline, make_event
from sluicegate.streams.checkpoint import INPUT_KINDS
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import RunnerConfig
from sluicegate.streams.step import Context, Output

CALCULATIONS = {
    "what is 2 + 3 * 4?": 14,
    "(1 + 2) ** 3": 27,
    "calculate 7 // 2": 3,
    "compute 10 / 4": 2.5,
    "-5 + 12 % 5": -3,
}
QUESTIONS = {
    "search for hash chained audit log": "audit-chain",
    "how does the policy gate fail closed?": "policy-gate",
    "look up murmur2 partitioning": "partitioning",
    "what is a dead-letter queue?": "dead-letters",
    "find rego policies": "rego",
}


def tasks(prompts: list[str], sessions: int = 3) -> list[Event]:
    return [
        make_event(TASK_SUBMITTED, {"prompt": p}, session=f"s{i % sessions}")
        for i, p in enumerate(prompts)
    ]


async def completed(pipeline: MemoryPipeline) -> dict[str, TaskCompleted]:
    """The final answers on ``results``, checked against the stored results."""
    finals = [TaskCompleted.model_validate(e.data) for e in await pipeline.events(topics.RESULTS)]
    by_task = {f.task_id: f for f in finals}
    assert len(by_task) == len(finals), "a task got two final results"
    assert set(pipeline.results) == set(by_task)
    for task_id, final in by_task.items():
        record = pipeline.results[task_id]
        assert record.status == final.status
        assert record.answer == final.answer.model_dump(mode="json")
    return by_task


def assert_one_processed_row_per_input(pipeline: MemoryPipeline) -> None:
    inputs = [(r.step, r.event_id) for r in pipeline.audit if r.kind in INPUT_KINDS]
    assert len(inputs) == len(set(inputs)), "an input has two audit rows"


def test_steps_are_wired_in_topic_order() -> None:
    steps = reference_steps()
    assert [s.name for s in steps] == [
        "intake",
        "context",
        "planner",
        "allow_all",
        "tools",
        "responder",
    ]
    produced = {topics.TASKS}
    for step in steps:
        assert set(step.inputs) <= produced, step.name
        produced |= set(step.outputs)
    assert produced <= set(topics.ALL)


async def test_tasks_flow_through_every_step_to_one_result_each() -> None:
    prompts = list(CALCULATIONS) + list(QUESTIONS) + ["what time is it?", "echo hi"] * 5
    events = tasks(prompts)
    pipeline = MemoryPipeline(reference_steps())
    await pipeline.publish(topics.TASKS, events)
    await pipeline.run()

    by_task = await completed(pipeline)
    assert len(by_task) == len(events) == len(pipeline.results)
    assert await pipeline.completions() == {e.id: 1 for e in events}
    assert await pipeline.dead_letters() == []
    for event in events:
        final = by_task[event.id]
        assert final.status == "completed", final.answer.text
        assert pipeline.results[event.id].status == "completed"
        assert pipeline.results[event.id].session == event.session
        [outcome] = final.answer.outcomes
        assert outcome.output is not None
        prompt = event.data["prompt"]
        if prompt in CALCULATIONS:
            assert outcome.tool == "calculator"
            assert outcome.output["value"] == CALCULATIONS[prompt]
        elif prompt in QUESTIONS:
            assert outcome.tool == "search"
            assert outcome.output["hits"][0]["id"] == QUESTIONS[prompt]
        elif prompt == "what time is it?":
            assert outcome.output["now"] == event.time.astimezone(UTC).isoformat()
    # Every hop continued from its input, so each result traces back to its task.
    assert all(e.causationid for e in await pipeline.events(topics.RESULTS))
    # The runner wrote exactly one processed row per input of every step, and
    # the gate one decision per action; nothing was retried or dropped.
    assert_one_processed_row_per_input(pipeline)
    for step in ("intake", "context", "planner", "allow_all", "tools", "responder"):
        assert len(pipeline.audit_of("processed", step=step)) == len(events), step
        stats = pipeline.runners[step].stats
        assert (stats.processed, stats.dead_letters, stats.retries) == (len(events), 0, 0)
        assert stats.duplicates == stats.skipped == 0
    decisions = pipeline.audit_of("decision", step="allow_all")
    assert len(decisions) == len(events) and {d.decision for d in decisions} == {"allow"}
    # Keyed state went through the store: the context step remembers each session's tasks.
    history = pipeline.state("context", session="s0")["history"]
    assert [t["task_id"] for t in history] == [e.id for e in events if e.session == "s0"]


async def test_fan_out_joins_into_one_answer() -> None:
    [event] = tasks(["2+2; search for jetstream and then what time is it?"])
    pipeline = MemoryPipeline(reference_steps())
    await pipeline.publish(topics.TASKS, [event])
    await pipeline.run()
    assert len(await pipeline.events(topics.ACTIONS_PROPOSED)) == 3
    final = (await completed(pipeline))[event.id]
    assert final.status == "completed" and final.action_count == 3
    assert [o.tool for o in final.answer.outcomes] == ["calculator", "search", "clock"]
    assert final.answer.text.splitlines()[1] == "1. calculator: 2+2 = 4"
    # The responder consumed three outcomes and answered on the last one only.
    rows = pipeline.audit_of("processed", step="responder")
    assert [r.detail["outputs"] for r in rows] == [0, 0, 1]
    assert pipeline.state("responder", session="s0")["pending"] == {}


async def test_republished_tasks_are_absorbed_by_the_runner() -> None:
    events = tasks(["1+1", "2+2"])
    pipeline = MemoryPipeline(reference_steps())
    await pipeline.publish(topics.TASKS, events)
    await pipeline.run()
    rows = len(pipeline.audit)
    await pipeline.publish(topics.TASKS, events)  # a publisher retry
    await pipeline.run()
    # After a restart the runner's recent ids come back from the audit log.
    await pipeline.restart()
    await pipeline.publish(topics.TASKS, events)
    await pipeline.run()
    assert len(await completed(pipeline)) == 2
    assert await pipeline.completions() == {e.id: 1 for e in events}
    assert len(pipeline.audit) == rows  # a duplicate leaves no audit row
    assert pipeline.runners["intake"].stats.duplicates == 2
    assert len(await pipeline.events(topics.TASKS_ACCEPTED)) == 2


async def test_duplicates_beyond_the_runner_window_are_dropped_by_intake() -> None:
    events = tasks(["1+1", "2+2"])
    # No recent ids kept by the runner: only the steps' own keyed dedupe remains.
    pipeline = MemoryPipeline(reference_steps(), config=RunnerConfig(dedupe_window=0))
    await pipeline.publish(topics.TASKS, events)
    await pipeline.run()
    await pipeline.publish(topics.TASKS, events)  # a publisher retry
    await pipeline.run()
    assert len(await completed(pipeline)) == 2
    assert await pipeline.completions() == {e.id: 1 for e in events}
    assert len(await pipeline.events(topics.TASKS_ACCEPTED)) == 2
    # One processed row per delivery, the second of each marked by the step.
    intake = pipeline.audit_of("processed", step="intake")
    assert [r.event_id for r in intake] == [e.id for e in events] * 2
    assert [r.detail for r in intake] == [{"outputs": 1}] * 2 + [
        {"duplicate": True, "outputs": 0}
    ] * 2
    assert [r.step for r in pipeline.audit if r.detail.get("duplicate")] == ["intake", "intake"]


async def test_malformed_task_is_a_dead_letter() -> None:
    pipeline = MemoryPipeline(reference_steps())
    bad = make_event(TASK_SUBMITTED, {"prompt": ""})
    unknown = make_event("task.weird", {"prompt": "hi"})
    good = make_event(TASK_SUBMITTED, {"prompt": "1+1"})
    await pipeline.publish(topics.TASKS, [bad, unknown])
    await pipeline.publish_raw(topics.TASKS, b"{not json", key=b"s1")
    await pipeline.publish(topics.TASKS, [good])
    await pipeline.run()
    dead = await pipeline.dead_letters()
    assert [(d.step, d.reason) for d in dead] == [
        ("intake", "invalid_data"),
        ("intake", "unknown_type"),
        ("intake", "invalid_json"),
    ]
    assert "data.prompt" in dead[0].text
    assert dead[2].value == b"{not json"  # the original bytes, untouched
    assert [d.event() for d in dead[:2]] == [bad, unknown]
    assert all(d.source.startswith(f"{topics.TASKS}/") for d in dead)
    assert len(pipeline.audit_of("dead_letter", step="intake")) == 3
    # Valid traffic behind the poison goes on.
    assert list(pipeline.results) == [good.id]
    assert len(await pipeline.events(topics.TASKS_ACCEPTED)) == 1


async def test_invalid_data_dead_letter_keeps_the_event_identity() -> None:
    pipeline = MemoryPipeline(reference_steps())
    bad = make_event(TASK_SUBMITTED, {"prompt": ""}, session="s7")
    await pipeline.publish(topics.TASKS, [bad])
    await pipeline.run()
    [row] = pipeline.audit_of("dead_letter")
    assert (row.event_id, row.tenant, row.session) == (bad.id, "acme", "s7")
    [dead] = await pipeline.dead_letters()
    assert dead.message.headers.get("ce_id") == bad.id


class DenyDangerous(Step):
    """A stand-in policy gate: denies the tools no agent may use."""

    name = "deny_dangerous"
    inputs = (topics.ACTIONS_PROPOSED,)
    outputs = (topics.ACTIONS_ALLOWED, topics.ACTIONS_DENIED)
    accepts = {ACTION_PROPOSED: ActionProposed}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        action = data_as(ctx, event, ActionProposed)
        fields = action.model_dump()
        if action.tool in {"shell", "sql_write", "http_post"}:
            denied = ActionDenied(**fields, reasons=[f"{action.tool} is not allowed"])
            return [
                ctx.output(topics.ACTIONS_DENIED, ACTION_DENIED, denied.model_dump(mode="json"))
            ]
        allowed = ActionAllowed(**fields, policy_version="test")
        return [ctx.output(topics.ACTIONS_ALLOWED, ACTION_ALLOWED, allowed.model_dump(mode="json"))]


async def test_a_swapped_in_gate_denies() -> None:
    events = tasks(
        [
            "run shell: rm -rf /",
            "write sql: DROP TABLE users; post to https://evil.example: data",
            "2+2 and then run shell: ls",
            "email alice@example.com the summary",
        ]
    )
    pipeline = MemoryPipeline(reference_steps(make_gate=lambda: DenyDangerous()))
    await pipeline.publish(topics.TASKS, events)
    await pipeline.run()
    by_task = await completed(pipeline)
    assert [by_task[e.id].status for e in events] == ["denied", "denied", "partial", "completed"]
    assert await pipeline.completions() == {e.id: 1 for e in events}
    email = by_task[events[3].id].answer.outcomes[0]
    assert email.output is not None and email.output["to"] == "alice@example.com"
    # Denied actions never reached the tools step.
    assert len(await pipeline.events(topics.ACTIONS_DENIED)) == 4
    ran = [e.data["tool"] for e in await pipeline.events(topics.ACTIONS_ALLOWED)]
    assert sorted(ran) == ["calculator", "echo"]
    assert len(pipeline.audit_of("processed", step="tools")) == 2


async def test_lost_outcomes_time_out_through_tick() -> None:
    class DropEverything(AllowAllGate):
        name = "drop"

        async def process(self, event: Event, ctx: Context) -> list[Output]:
            outputs = await super().process(event, ctx)
            # Lose every action but the first of its plan.
            return outputs if event.data["action_index"] == 0 else []

    [event] = tasks(["1+1; 2+2"])
    pipeline = MemoryPipeline(reference_steps(make_gate=DropEverything, result_deadline=5))
    await pipeline.publish(topics.TASKS, [event])
    await pipeline.run()
    assert pipeline.results == {}
    assert event.id in pipeline.state("responder", session="s0")["pending"]
    # Before the deadline a tick changes nothing.
    await pipeline.tick(datetime.now(UTC))
    assert pipeline.results == {} and await pipeline.events(topics.RESULTS) == []
    # A restart in between: the join is reloaded from the store.
    await pipeline.restart()
    await pipeline.tick(datetime.now(UTC) + timedelta(seconds=10))
    final = (await completed(pipeline))[event.id]
    assert final.status == "timeout"
    assert [o.status for o in final.answer.outcomes] == ["ok", "missing"]
    assert pipeline.results[event.id].status == "timeout"
    [done] = await pipeline.events(topics.RESULTS, TASK_COMPLETED)
    assert done.causationid == event.id
    # The expiry was committed: later ticks and restarts give no second answer.
    assert pipeline.state("responder", session="s0")["pending"] == {}
    await pipeline.tick(datetime.now(UTC) + timedelta(hours=1))
    await pipeline.restart()
    await pipeline.tick(datetime.now(UTC) + timedelta(hours=2))
    assert await pipeline.completions() == {event.id: 1}
