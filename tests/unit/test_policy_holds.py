"""The ``hold`` decision end to end on the in-memory harness: held, decided, resumed.

The real runners, the reference steps and the Rego gate; the memory store
plays the approvals table (``decide_approval`` is what ``sluice approvals``
does in Postgres).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from sluicegate.agents.pipeline import reference_steps
from sluicegate.agents.rule_planner import plan_request
from sluicegate.agents.tools import ToolContext, ToolError, refund
from sluicegate.policy.decision import MalformedDecision, parse_decision
from sluicegate.policy.features import amount_of
from sluicegate.policy.gate import PolicyGate, approval_timeout_from
from sluicegate.streams.approvals import ApprovalError
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import StateKey, TickContext
from sluicegate.testing import MemoryPipeline

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
TIMEOUT = timedelta(seconds=60)


def task(prompt: str, *, session: str = "s1", tenant: str = "acme") -> Event:
    return Event(
        source="tests",
        type="task.submitted",
        tenant=tenant,
        session=session,
        time=T0,
        data={"prompt": prompt},
    )


def pipeline() -> MemoryPipeline:
    def gate() -> PolicyGate:
        return PolicyGate(approval_timeout_s=TIMEOUT.total_seconds(), clock=lambda: T0)

    return MemoryPipeline(reference_steps(make_gate=gate))


async def test_small_refund_passes_and_large_one_is_held_until_approved() -> None:
    async with pipeline() as p:
        small, large, after = (
            task("refund 40 for order A-1"),
            task("refund 250 for order A-2"),
            task("echo still here"),
        )
        await p.publish("tasks", [small, large, after])
        await p.run()
        # The small refund and the session's next task finished; the large one waits.
        assert p.results[small.id].status == "completed"
        assert p.results[after.id].status == "completed"
        assert large.id not in p.results
        [held] = p.store.approvals.values()
        assert (held.tool, held.args, held.reasons) == (
            "refund",
            {"amount": 250, "order": "A-2"},
            ("refund_over_threshold",),
        )
        assert held.deadline == T0 + TIMEOUT
        [decision] = [r for r in p.audit_of("decision", step="gate") if r.decision == "hold"]
        assert decision.reasons == ("refund_over_threshold",)
        assert "held" in p.state("gate")

        # Nothing happens until someone decides.
        await p.tick(T0 + timedelta(seconds=5))
        assert large.id not in p.results

        p.store.decide_approval(held.id, approved=True, by="ops", reason="ok", now=T0)
        await p.tick(T0 + timedelta(seconds=6))
        result = p.results[large.id]
        assert result.status == "completed"
        assert "refunded 250 on order A-2 [ops: ok]" in result.answer["text"]
        assert result.answer["outcomes"][0]["approval"]["by"] == "ops"
        [row] = p.audit_of("approval", step="gate")
        assert (row.decision, row.reasons) == ("allow", ("approval_granted",))
        assert (row.detail["by"], row.detail["reason"], row.detail["id"]) == ("ops", "ok", held.id)
        assert "held" not in p.state("gate")
        # Approved refunds are charged like allowed ones (1 each).
        assert p.state("gate")["policy"]["spend"] == 3

        # A second tick resumes nothing again.
        await p.tick(T0 + timedelta(seconds=7))
        assert len(p.audit_of("approval")) == 1
        assert (await p.completions())[large.id] == 1


async def test_denied_and_timed_out_holds_reach_the_responder() -> None:
    async with pipeline() as p:
        denied, late = task("refund 300 for order B-1"), task("refund 900 order B-2", session="s2")
        await p.publish("tasks", [denied, late])
        await p.run()
        by_task = {a.task_id: a for a in p.store.approvals.values()}
        p.store.decide_approval(
            by_task[denied.id].id, approved=False, by="ops", reason="no", now=T0
        )
        await p.tick(T0 + TIMEOUT)  # the deadline of both: the undecided one times out
        assert p.results[denied.id].status == "denied"
        assert "denied (approval_denied) [ops: no]" in p.results[denied.id].answer["text"]
        assert p.results[late.id].status == "denied"
        assert "approval_timeout" in str(p.results[late.id].answer)
        reasons = {r.session: (r.decision, r.reasons) for r in p.audit_of("approval")}
        assert reasons == {
            "s1": ("deny", ("approval_denied",)),
            "s2": ("deny", ("approval_timeout",)),
        }
        # Decided is decided: approving late is refused.
        with pytest.raises(ApprovalError):
            p.store.decide_approval(by_task[late.id].id, approved=True, by="x", reason="y", now=T0)


async def test_held_actions_survive_a_restart() -> None:
    async with pipeline() as p:
        first, second = task("refund 500 for order C-1"), task("refund 600 for order C-2")
        await p.publish("tasks", [first, second])
        await p.run()
        await p.restart()
        for held in list(p.store.approvals.values()):
            p.store.decide_approval(held.id, approved=True, by="ops", reason="fine", now=T0)
        await p.tick(T0 + timedelta(seconds=1))
        assert {p.results[first.id].status, p.results[second.id].status} == {"completed"}


async def test_multi_action_plan_waits_for_its_held_action() -> None:
    """The responder's own deadline does not cut off an action waiting for a person."""
    async with pipeline() as p:
        both = task("echo hi; refund 200 for order D-1")
        await p.publish("tasks", [both])
        await p.run()
        # Past the responder's 30 s, inside the approval deadline plus 30 s.
        await p.tick(T0 + timedelta(seconds=45))
        assert both.id not in p.results
        [held] = p.store.approvals.values()
        p.store.decide_approval(held.id, approved=True, by="ops", reason="ok", now=T0)
        await p.tick(T0 + timedelta(seconds=46))
        assert p.results[both.id].status == "completed"


def test_hold_decisions_parse_strictly() -> None:
    held = parse_decision({"decision": "hold", "reasons": ["big"], "cost": 1, "masks": []}, "v")
    assert (held.decision, held.allowed, held.charged) == ("hold", False, True)
    with pytest.raises(MalformedDecision):
        parse_decision({"decision": "hold", "reasons": [], "cost": 1}, "v")


def test_approval_timeout_setting() -> None:
    assert approval_timeout_from({}) == 3600
    assert approval_timeout_from({"SLUICE_APPROVAL_TIMEOUT": "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match="SLUICE_APPROVAL_TIMEOUT"):
            approval_timeout_from({"SLUICE_APPROVAL_TIMEOUT": bad})


def test_a_tick_decodes_only_the_states_it_asks_for() -> None:
    held, plain = StateKey("acme", "h"), StateKey("acme", "p")
    blobs = {
        held: orjson.dumps({"held": {"a": {}}, "policy": {}}, option=orjson.OPT_SORT_KEYS),
        plain: orjson.dumps({"policy": {"text": '"held":'}}),
    }
    tc = TickContext(step="gate", blobs=blobs)
    assert [key for key, _ in tc.states_with("held")] == [held]
    assert tc.touched == {held}
    assert tc.state_of(held)["held"] == {"a": {}}


async def test_refund_rule_and_tool() -> None:
    call = plan_request("refund 250 for order A-1")
    assert (call.tool, call.args) == ("refund", {"amount": 250, "order": "A-1"})
    assert plan_request("Refund 12.5 order B_2").args == {"amount": 12.5, "order": "B_2"}
    ctx = ToolContext(now=T0, tenant="acme", session="s", task_id="t", agent="a")
    out = await refund.run({"amount": 12.5, "order": "B_2"}, ctx)
    assert out["summary"] == "refunded 12.5 on order B_2"
    for bad in ({"amount": True, "order": "A"}, {"amount": 0, "order": "A"}, {"amount": 5}):
        with pytest.raises(ToolError):
            await refund.run(bad, ctx)
    assert [amount_of(v) for v in (3, 2.5, True, "7", float("nan"), None)] == [
        3,
        2.5,
        None,
        None,
        None,
        None,
    ]


def test_approvals_cli_refuses_bad_input_in_one_line() -> None:
    from click.testing import CliRunner

    from sluicegate.cli_approvals import approvals

    missing = CliRunner().invoke(approvals, ["approve", "some-id"])
    assert missing.exit_code == 2 and "--reason" in missing.output
    empty = CliRunner().invoke(approvals, ["deny", "some-id", "--reason", "  "])
    assert empty.exit_code == 2 and "must not be empty" in empty.output


async def test_approvals_away_resume_nothing_and_log_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Away:
        async def settle_approvals(self, step: str, ids: object, now: datetime) -> list[object]:
            raise OSError("connection refused\n  at somewhere")

    gate = PolicyGate(approval_timeout_s=60, clock=lambda: T0)
    state = {"held": {"a-1": {"data": {"task_id": "t"}}}}
    for _ in range(3):
        tc = TickContext(step="gate", states={StateKey("acme", "s"): state}, approvals=Away())  # type: ignore[arg-type]
        assert await gate.tick(T0, tc) == []
    assert state["held"] == {"a-1": {"data": {"task_id": "t"}}}
    lines = [r.getMessage() for r in caplog.records if "cannot read approvals" in r.getMessage()]
    assert lines == [
        "gate: cannot read approvals, held actions wait: connection refused at somewhere"
    ]
