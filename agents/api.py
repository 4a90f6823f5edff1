"""The step API: what a user writes to add a step to a pipeline.

Either subclass :class:`Step`, naming the model of its input data as the
type argument, so ``ctx.data`` is typed and validated before ``process``
runs::

    class Ticket(BaseModel):
        subject: str
        body: str

    class Triage(Step[Ticket]):
        name = "triage"
        inputs = ("tickets",)
        outputs = ("triaged",)

        async def process(self, event: Event, ctx: Context[Ticket]) -> list[Output]:
            ctx.state["seen"] = ctx.state.get("seen", 0) + 1
            return [ctx.output("triaged", "ticket.triaged", {"subject": ctx.data.subject})]

or decorate a function with :func:`step`. A bare ``Step`` (no type
argument) takes any input, unvalidated; ``accepts`` maps event types to
models when one step reads several types. Nothing here depends on the
transport or the engine that runs the step.

Lifecycle: override ``open`` / ``close`` (clients, models) and ``tick``
(time-driven work; overriding it is what makes the runner call it). Raise
:class:`DeadLetter` for input that can never succeed: it is dead-lettered at
once, not retried.
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, overload

from pydantic import BaseModel

from sluicegate.streams.codec import ANY_TYPE
from sluicegate.streams.envelope import Event
from sluicegate.streams.step import Context, D, Hooks, Output

M = typing.TypeVar("M", bound=BaseModel)
ProcessFn = Callable[[Event, Context[D]], Awaitable[list[Output]]]


class Step(Hooks, Generic[D]):
    """Base class for steps. Subclasses set the class attributes and ``process``.

    ``types`` narrows which event types a typed step accepts (default: all,
    each validated as the step's model); an input of another type is a dead
    letter (``unknown_type``).
    """

    name: ClassVar[str] = ""
    inputs: ClassVar[Sequence[str]] = ()
    outputs: ClassVar[Sequence[str]] = ()
    accepts: ClassVar[Mapping[str, type[BaseModel]]] = {}
    types: ClassVar[Sequence[str]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        model = _declared_model(cls)
        if model is not None and "accepts" not in cls.__dict__:
            cls.accepts = _accepts(model, cls.types)
        if "tick" in cls.__dict__ and "ticks" not in cls.__dict__:
            # Overriding tick declares that the step ticks (unless it says otherwise).
            cls.ticks = True

    async def process(self, event: Event, ctx: Context[D]) -> list[Output]:
        raise NotImplementedError(f"step {self.name!r} does not implement process()")


class FunctionStep(Hooks, Generic[D]):
    """A step made from an async function by :func:`step`."""

    def __init__(
        self,
        fn: ProcessFn[D],
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

    async def process(self, event: Event, ctx: Context[D]) -> list[Output]:
        return await self._fn(event, ctx)


@overload
def step(
    *,
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    model: type[M],
    types: Sequence[str] = (),
) -> Callable[[ProcessFn[M]], FunctionStep[M]]: ...


@overload
def step(
    *,
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    accepts: Mapping[str, type[BaseModel]] | None = None,
) -> Callable[[ProcessFn[Any]], FunctionStep[Any]]: ...


def step(
    *,
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    model: type[BaseModel] | None = None,
    types: Sequence[str] = (),
    accepts: Mapping[str, type[BaseModel]] | None = None,
) -> Callable[[ProcessFn[Any]], FunctionStep[Any]]:
    """Turn ``async def fn(event, ctx) -> list[Output]`` into a step.

    With ``model=Ticket`` the function takes ``ctx: Context[Ticket]`` and
    every input (of ``types``, if given) is validated as ``Ticket`` first.
    """
    if model is not None:
        accepts = _accepts(model, types)

    def wrap(fn: ProcessFn[Any]) -> FunctionStep[Any]:
        return FunctionStep(fn, name=name, inputs=inputs, outputs=outputs, accepts=accepts)

    return wrap


def _accepts(model: type[BaseModel], types: Sequence[str]) -> dict[str, type[BaseModel]]:
    return {t: model for t in types} if types else {ANY_TYPE: model}


def _declared_model(cls: type) -> type[BaseModel] | None:
    """The model ``cls`` names as its input in ``class X(Step[Model])``, if any."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if not (isinstance(origin, type) and issubclass(origin, Step)):
            continue
        (arg,) = typing.get_args(base)
        if arg is Any or isinstance(arg, typing.TypeVar):
            return None  # untyped, or itself generic: a subclass names the model
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        raise TypeError(
            f"{cls.__name__}: Step[...] takes a pydantic model class (the input's data), "
            f"not {arg!r}"
        )
    return None
