"""A replayed dead letter is processed once, even though its id was dead-lettered before."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from sluicegate import DeadLetter, Step
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.dead_letters import H_REPLAY, dead_letter
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import StepRunner
from sluicegate.streams.step import Context, Output
from sluicegate.streams.transport import Message, OutMessage
from sluicegate.streams.transports.memory import MemoryTransport


class Ping(BaseModel):
    n: int


class Gate(Step):
    name = "gate"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {"ping": Ping}
    refuse = True

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        if self.refuse:
            raise DeadLetter("closed")
        return [ctx.output("out", "pong", dict(event.data))]


def kinds(store: MemoryCheckpointStore, event_id: str) -> list[str]:
    return [row.kind for _, row in store.audit if row.event_id == event_id]


async def test_replay_once_then_absorbed_also_after_a_restart() -> None:
    transport = MemoryTransport(partitions=1)
    await transport.ensure_topics(["in", "out"])
    store, step = MemoryCheckpointStore(), Gate()
    event = Event(source="t", type="ping", tenant="t", session="s", data={"n": 1})
    plain = OutMessage("in", encode(event), key=event.key, headers=headers_for(event))

    async def run(runner: StepRunner, *messages: OutMessage) -> None:
        await transport.publish_batch(list(messages))
        while await runner.run_once():
            pass

    runner = StepRunner(step, transport, store)
    await runner.start()
    await run(runner, plain)
    assert kinds(store, event.id) == ["dead_letter"]
    step.refuse = False
    # A plain copy of a dead-lettered id is absorbed; a replay is processed, once.
    replay = OutMessage("in", plain.value, key=plain.key, headers={**plain.headers, H_REPLAY: "1"})
    await run(runner, plain, replay, replay)
    assert kinds(store, event.id) == ["dead_letter", "processed"]
    await runner.close()

    # After a restart the store says it was processed since: another replay is absorbed.
    again = StepRunner(step, transport, store)
    await again.start()
    await run(again, replay)
    assert kinds(store, event.id) == ["dead_letter", "processed"]
    assert await store.load_dead_lettered_ids("gate", 0, 100) == set()


def test_an_undecodable_dead_letter_keeps_tenant_and_session_from_its_body() -> None:
    body = b'{"tenant": "acme", "session": "s9", "type": "task.submitted", "data": null}'
    msg = Message(
        topic="tasks", partition=0, offset=7, key=b"s9", value=body, headers={}, timestamp_ms=0
    )
    _out, row = dead_letter(msg, "intake", "invalid_event", ValueError("bad"), None)
    assert (row.tenant, row.session, row.event_type) == ("acme", "s9", "task.submitted")
    assert row.event_id == "tasks/0/7"


async def test_an_event_without_time_is_processed_with_the_broker_time() -> None:
    transport = MemoryTransport(partitions=1)
    await transport.ensure_topics(["in", "out"])
    store, step = MemoryCheckpointStore(), Gate()
    step.refuse = False
    runner = StepRunner(step, transport, store)
    await runner.start()
    body = b'{"specversion":"1.0","id":"e1","source":"up","type":"ping","tenant":"t","session":"s",'
    await transport.publish_batch([OutMessage("in", body + b'"data":{"n":1}}', key=b"s")])
    while await runner.run_once():
        pass
    assert kinds(store, "e1") == ["processed"]
