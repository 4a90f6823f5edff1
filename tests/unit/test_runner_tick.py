"""A tick that awaits (the gate reading approvals) never commits work on a state that moved on.

On the in-memory transport and store with the real runner; the step's tick
waits on an asyncio event the test controls, and an event of the same
session is processed meanwhile.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import ClassVar

from pydantic import BaseModel

from sluicegate.agents.api import Step
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import RunnerConfig, StepRunner
from sluicegate.streams.step import Context, Output, StateKey, TickContext
from sluicegate.streams.transport import OutMessage
from sluicegate.streams.transports.memory import MemoryTransport

KEY = StateKey("t", "s1")


class Item(BaseModel):
    n: int


class Counter(Step):
    name = "counter"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {"item": Item}

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.ticking = asyncio.Event()

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        ctx.state["count"] = ctx.state.get("count", 0) + 1
        return []

    async def tick(self, now: datetime, tc: TickContext) -> list[Output]:
        outputs = []
        for key, state in tc.states_with("count"):
            state["ticked"] = state.get("ticked", 0) + 1
            tc.record(key, "processed", event_id=f"tick-{state['ticked']}", event_type="tick")
            outputs.append(tc.output(key, "out", "ticked", {}, seed=f"tick-{state['ticked']}"))
        self.ticking.set()
        await self.release.wait()  # as the gate awaits Postgres
        return outputs


async def test_a_tick_on_a_state_that_moved_on_is_dropped_then_redone() -> None:
    transport = MemoryTransport(prefix="t", partitions=1)
    store = MemoryCheckpointStore()
    step = Counter()
    runner = StepRunner(
        step, transport, store, config=RunnerConfig(fetch_timeout_s=0.0, tick_interval_s=math.inf)
    )
    await runner.start()

    async def publish(n: int) -> None:
        event = Event(source="t", type="item", tenant="t", session="s1", data={"n": n})
        await transport.publish_batch(
            [OutMessage("in", encode(event), key=event.key, headers=headers_for(event))]
        )

    await publish(1)
    await runner.run_once()
    now = datetime(2026, 12, 7, tzinfo=UTC)
    tick = asyncio.create_task(runner.tick(now))
    await step.ticking.wait()
    await publish(2)  # the session moves on while the tick waits
    await runner.run_once()
    step.release.set()
    await tick
    stored = store.states[("counter", KEY)][1]
    assert b'"count":2' in stored and b"ticked" not in stored
    assert [r.event_id for _, r in store.audit if r.event_type == "tick"] == []

    step.ticking.clear()
    await runner.tick(now)  # nothing in the way now: done once, with its state
    stored = store.states[("counter", KEY)][1]
    assert b'"ticked":1' in stored
    assert [r.event_id for _, r in store.audit if r.event_type == "tick"] == ["tick-1"]
    await runner.close()
