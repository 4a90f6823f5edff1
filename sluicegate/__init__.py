"""sluicegate: policy-aware stream processing for AI agents, on NATS JetStream or Kafka.

What a user writes a pipeline with, in one import::

    from sluicegate import Context, Event, Output, Pipeline, Step

    class Shout(Step):
        name = "shout"
        inputs = ("tasks",)
        outputs = ("shouted",)

        async def process(self, event: Event, ctx: Context) -> list[Output]:
            return [ctx.output("shouted", "task.shouted", {"text": event.data["prompt"].upper()})]

    pipeline = Pipeline(steps=[Shout()])

run with ``sluice run --pipeline shoutapp:pipeline`` and tested without
brokers through :mod:`sluicegate.testing`. The model client
(``ModelClient``, ``ChatResult``, ``ModelCallError``, ``ChatClient``) is
imported on first use, so a pipeline without model calls never loads its
HTTP stack. The rest of the package is the application: settings, the CLI,
the local stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sluicegate.agents.api import FunctionStep, Step, step
from sluicegate.agents.graph import Pipeline
from sluicegate.streams.envelope import Event
from sluicegate.streams.errors import SluiceError
from sluicegate.streams.step import Context, DeadLetter, Output, TickContext

if TYPE_CHECKING:
    from sluicegate.agents.model_client import (
        ChatClient,
        ChatResult,
        ModelCallError,
        ModelClient,
    )

__all__ = [
    "ChatClient",
    "ChatResult",
    "Context",
    "DeadLetter",
    "Event",
    "FunctionStep",
    "ModelCallError",
    "ModelClient",
    "Output",
    "Pipeline",
    "SluiceError",
    "Step",
    "TickContext",
    "step",
]

_LAZY = {"ChatClient", "ChatResult", "ModelCallError", "ModelClient"}


def __getattr__(name: str) -> Any:
    # PEP 562: the model client pulls in aiohttp, which most commands never need.
    if name in _LAZY:
        return getattr(importlib.import_module("sluicegate.agents.model_client"), name)
    raise AttributeError(f"module 'sluicegate' has no attribute {name!r}")
