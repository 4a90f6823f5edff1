"""The step API: what a user writes to add a step to the pipeline.

Either subclass :class:`Step`::

    class Shout(Step):
        name = "shout"
        inputs = ("tasks",)
        outputs = ("results",)
        accepts = {"task.submitted": TaskSubmitted}

        async def process(self, event: Event, ctx: Context) -> list[Output]:
            ctx.state["count"] = ctx.state.get("count", 0) + 1
            return [ctx.output("results", "task.shouted", {"text": event.data["prompt"].upper()})]

or decorate a function with :func:`step`. Nothing here depends on the
transport or the engine that runs the step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import ClassVar

from pydantic import BaseModel

from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, Output

ProcessFn = Callable[[Event, Context], Awaitable[list[Output]]]


class Step:
    """Base class for steps. Subclasses set the class attributes and ``process``."""

    name: ClassVar[str] = ""
    inputs: ClassVar[Sequence[str]] = ()
    outputs: ClassVar[Sequence[str]] = ()
    accepts: ClassVar[Mapping[str, type[BaseModel]]] = {}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        raise NotImplementedError(f"step {self.name!r} does not implement process()")


class FunctionStep:
    """A step made from an async function by :func:`step`."""

    def __init__(
        self,
        fn: ProcessFn,
        *,
        name: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        accepts: Mapping[str, type[BaseModel]] | None = None,
    ) -> None:
        self._fn = fn
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.accepts: Mapping[str, type[BaseModel]] = dict(accepts or {})

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        return await self._fn(event, ctx)


def step(
    *,
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    accepts: Mapping[str, type[BaseModel]] | None = None,
) -> Callable[[ProcessFn], FunctionStep]:
    """Turn ``async def fn(event, ctx) -> list[Output]`` into a step."""

    def wrap(fn: ProcessFn) -> FunctionStep:
        return FunctionStep(fn, name=name, inputs=inputs, outputs=outputs, accepts=accepts)

    return wrap
