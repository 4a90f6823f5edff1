"""The triage app on sluicegate's in-memory harness: real runner and policy gate, stub model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from triage.app import POLICY, pipeline

from sluicegate.cli import main
from sluicegate.testing import MemoryPipeline, StubChat, make_event

BILLING = orjson.dumps({"category": "billing", "urgency": "low"}).decode()


def by_subject(messages: Sequence[Mapping[str, Any]]) -> str:
    """The stub model: the subject's first word is the category, "!" makes it urgent."""
    text = str(messages[-1]["content"])
    category = text.split()[0].strip("!").lower()
    urgency = "high" if "!" in text else "low"
    return orjson.dumps({"category": category, "urgency": urgency}).decode()


def ticket(subject: str, session: str = "c-1", body: str = "") -> Any:
    return make_event("ticket.opened", {"subject": subject, "body": body}, session=session)


async def test_tickets_are_routed_answered_or_escalated_by_policy() -> None:
    model = StubChat(by_subject)
    routed, replied, urgent = (
        ticket("Billing question"),
        ticket("Account login", "c-2"),
        ticket("Account locked!", "c-3"),
    )
    async with MemoryPipeline(pipeline(model)) as run:
        await run.publish("tickets", [routed, replied, urgent])
        await run.run()
        results = run.results
        assert results[routed.id].status == "routed"
        assert results[routed.id].answer == {
            "tool": "route_ticket",
            "queue": "finance",
            "position": "back",
        }
        assert results[replied.id].status == "replied"
        # The app's own Rego rule: no automatic answer to an urgent ticket.
        assert results[urgent.id].status == "escalated"
        assert results[urgent.id].answer["reasons"] == ["urgent_needs_human"]
        decisions = run.audit_of("decision", step="gate")
        assert sorted(str(d.decision) for d in decisions) == ["allow", "allow", "deny"]
        assert len(await run.events("triaged")) == 3
    # What the step asked the model (sessions run concurrently: in any order).
    assert {call[1][-1]["content"] for call in model.calls} == {
        "Billing question\n\n",
        "Account login\n\n",
        "Account locked!\n\n",
    }


async def test_a_customers_third_ticket_is_urgent() -> None:
    async with MemoryPipeline(pipeline(StubChat(BILLING))) as run:
        tickets = [ticket(f"Invoice {n}", session="c-9") for n in range(3)]
        await run.publish("tickets", tickets)
        await run.run()
        assert run.state("classify", session="c-9") == {"opened": 3}
        positions = [run.results[t.id].answer["position"] for t in tickets]
        assert positions == ["back", "back", "front"]


async def test_an_unusable_model_answer_is_dead_lettered_without_retries() -> None:
    model = StubChat("I think it is about billing?")
    async with MemoryPipeline(pipeline(model)) as run:
        await run.publish("tickets", [ticket("Billing question")])
        await run.run()
        [letter] = await run.dead_letters()
        assert (letter.step, letter.reason) == ("classify", "unclassifiable")
        assert run.results == {}
    assert len(model.calls) == 1


async def test_a_ticket_without_a_subject_never_reaches_the_model() -> None:
    model = StubChat(BILLING)
    async with MemoryPipeline(pipeline(model)) as run:
        await run.publish("tickets", [make_event("ticket.opened", {"body": "no subject"})])
        await run.run()
        [letter] = await run.dead_letters()
        assert letter.reason == "invalid_data"
    assert model.calls == []


def test_the_policy_bundle_passes_its_own_tests() -> None:
    assert main(["policy", "check", str(POLICY)]) == 0
