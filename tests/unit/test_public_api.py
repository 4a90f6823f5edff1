"""The API a user writes a pipeline with, all from ``sluicegate``, on the in-memory harness.

Typed input (``Step[Model]``, ``@step(model=...)``), ``DeadLetter`` without
retries, declared lifecycle hooks, and ``Pipeline``'s checks and topics.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

import sluicegate
from sluicegate import (
    Context,
    DeadLetter,
    Event,
    Output,
    Pipeline,
    Step,
    TickContext,
    step,
)
from sluicegate.streams.codec import ANY_TYPE, DecodeError
from sluicegate.testing import MemoryPipeline, make_event


class Order(BaseModel):
    item: str
    qty: int


class Count(Step[Order]):
    name = "count"
    inputs = ("orders",)
    outputs = ("counted",)

    def __init__(self) -> None:
        self.calls = 0
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        self.closed += 1

    async def process(self, event: Event, ctx: Context[Order]) -> list[Output]:
        self.calls += 1
        if ctx.data.qty < 0:
            raise DeadLetter("negative_quantity", f"qty {ctx.data.qty}")
        if ctx.data.item == "boom":
            raise RuntimeError("a bug")
        ctx.state["total"] = ctx.state.get("total", 0) + ctx.data.qty
        return [ctx.output("counted", "order.counted", {"total": ctx.state["total"]})]


def order(item: str, qty: int, session: str = "s1") -> Event:
    return make_event("order.placed", {"item": item, "qty": qty}, session=session)


def test_the_public_names_come_from_sluicegate() -> None:
    for name in sluicegate.__all__:
        assert getattr(sluicegate, name) is not None, name
    assert sluicegate.ModelClient.__name__ == "ModelClient"


def test_a_typed_step_validates_every_input_as_its_model() -> None:
    assert Count.accepts == {ANY_TYPE: Order}

    class OnlyPlaced(Step[Order]):
        name = "placed"
        types = ("order.placed",)

    assert OnlyPlaced.accepts == {"order.placed": Order}
    with pytest.raises(TypeError, match="pydantic model"):

        class Wrong(Step[int]):  # type: ignore[type-var]
            name = "wrong"


async def test_typed_data_state_and_dead_letter_without_retries() -> None:
    counter = Count()
    app = Pipeline([counter])
    async with MemoryPipeline(app) as run:
        await run.publish("orders", [order("tea", 2), order("tea", 3)])
        await run.publish("orders", [order("tea", -1), order("boom", 1, session="s2")])
        await run.publish_raw("orders", b'{"not": "an event"}')
        await run.run()
        assert [e.data for e in await run.events("counted")] == [{"total": 2}, {"total": 5}]
        assert run.state("count") == {"total": 5}
        letters = {d.reason: d for d in await run.dead_letters()}
        assert set(letters) == {"negative_quantity", "step_error", "missing_attribute"}
        assert letters["negative_quantity"].text == "qty -1"
        # DeadLetter: one call; the bug: retried up to the runner's attempts (3).
        assert counter.calls == 2 + 1 + 3
        assert run.runners["count"].stats.retries == 2
        assert counter.opened == 1 and counter.closed == 0
    assert counter.closed == 1


async def test_invalid_data_is_a_dead_letter_before_process() -> None:
    counter = Count()
    async with MemoryPipeline([counter]) as run:
        await run.publish("orders", [make_event("order.placed", {"item": "tea"})])
        await run.run()
        [letter] = await run.dead_letters()
        assert letter.reason == "invalid_data"
    assert counter.calls == 0


class Remind(Step):
    name = "remind"
    inputs = ("orders",)
    outputs = ("reminders",)

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        ctx.state["due"] = True
        return []

    async def tick(self, now: datetime, tc: TickContext) -> list[Output]:
        out = []
        for key, state in tc.states():
            if state.pop("due", False):
                out.append(tc.output(key, "reminders", "reminder", {}, seed=key.session))
        return out


async def test_tick_is_declared_by_overriding_it() -> None:
    assert Remind.ticks and not Count.ticks
    async with MemoryPipeline([Remind()]) as run:
        await run.publish("orders", [order("tea", 1)])
        await run.run()
        await run.tick(datetime.now(UTC) + timedelta(seconds=5))
        assert len(await run.events("reminders")) == 1
        assert run.state("remind") == {}


async def test_the_step_decorator_types_ctx_data() -> None:
    @step(name="double", inputs=("orders",), outputs=("doubled",), model=Order)
    async def double(event: Event, ctx: Context[Order]) -> list[Output]:
        return [ctx.output("doubled", "order.doubled", {"qty": ctx.data.qty * 2})]

    assert double.accepts == {ANY_TYPE: Order}
    async with MemoryPipeline([double]) as run:
        await run.publish("orders", [order("tea", 4)])
        await run.run()
        assert [e.data for e in await run.events("doubled")] == [{"qty": 8}]


def test_pipeline_topics_upstream_and_checks() -> None:
    @step(name="ship", inputs=("counted",), outputs=("shipped",))
    async def ship(event: Event, ctx: Context) -> list[Output]:
        return []

    app = Pipeline([Count(), ship])
    assert app.topics == ("orders", "counted", "shipped")
    assert app.upstream == {"orders": {ANY_TYPE: Order}}
    assert app.default_type("orders") is None
    registry = app.registry("orders")
    assert registry is not None and app.registry("counted") is None
    with pytest.raises(DecodeError, match="invalid_data"):
        registry.validate(order("tea", 1).model_copy(update={"data": {"qty": "x"}}))
    assert [s.name for s in app.select("ship")] == ["ship"]
    with pytest.raises(ValueError, match="unknown step nope; the pipeline has count, ship"):
        app.select("nope")
    with pytest.raises(ValueError, match="twice: count"):
        Pipeline([Count(), Count()])
    with pytest.raises(TypeError, match="is not a step"):
        Pipeline([object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not read by any step"):
        Pipeline([Count()], upstream={"elsewhere": {}})


def test_dead_letter_needs_a_reason() -> None:
    with pytest.raises(ValueError):
        DeadLetter("  ")
    assert DeadLetter("spam").reason == "spam"
