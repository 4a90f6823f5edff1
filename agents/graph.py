"""``Pipeline``: a set of steps and the topics between them, as ``sluice run`` takes it.

A pipeline is a value a user's module defines::

    pipeline = Pipeline(steps=[Triage(), Route()])

and ``sluice run --pipeline myapp:pipeline`` runs it. It checks what can be
checked before anything connects (unique step names, steps that are
steps), and knows its topics, which of them are *upstream* (consumed by a
step, produced by none: where outside systems publish) and the schema of
what may be published there, which ``sluice publish`` validates against.
The policy gate is a step like any other, placed between the topics it
reads and writes (``sluicegate.policy.gate.PolicyGate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from sluicegate.streams.codec import ANY_TYPE, DataRegistry
from sluicegate.streams.dead_letters import DLQ_TOPIC
from sluicegate.streams.step import Processor

Schemas = Mapping[str, type[BaseModel]]


class Pipeline:
    """Steps in order, their topics, the upstream schemas and sample inputs.

    ``upstream`` maps an upstream topic to its event types and their data
    models (default: derived from the ``accepts`` of the steps reading each
    topic no step writes). ``samples`` maps a topic to example events (JSON
    objects: at least ``tenant``, ``session``, ``data``) that ``sluice demo
    --pipeline`` publishes.
    """

    def __init__(
        self,
        steps: Iterable[Processor],
        *,
        upstream: Mapping[str, Schemas] | None = None,
        samples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        name: str = "pipeline",
    ) -> None:
        self.name = name
        self.steps: tuple[Processor, ...] = tuple(steps)
        _check_steps(self.steps)
        produced = {t for s in self.steps for t in s.outputs}
        consumed = [t for s in self.steps for t in s.inputs]
        self.topics: tuple[str, ...] = tuple(
            dict.fromkeys(t for s in self.steps for t in (*s.inputs, *s.outputs))
        )
        if upstream is None:
            upstream = _derived_upstream(self.steps, [t for t in consumed if t not in produced])
        unknown = sorted(set(upstream) - set(self.topics))
        if unknown:
            raise ValueError(f"upstream topic {', '.join(unknown)} is not read by any step")
        self.upstream: dict[str, dict[str, type[BaseModel]]] = {
            topic: dict(schemas) for topic, schemas in upstream.items()
        }
        self.samples: dict[str, list[dict[str, Any]]] = {
            topic: [dict(s) for s in events] for topic, events in (samples or {}).items()
        }
        missing = sorted(set(self.samples) - set(self.topics))
        if missing:
            raise ValueError(f"samples for topic {', '.join(missing)}, which no step reads")

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]

    def select(self, wanted: str | None) -> list[Processor]:
        """The steps named in the comma-separated ``wanted`` (all when None, "" or "all")."""
        if wanted is None or wanted.strip() in ("", "all"):
            return list(self.steps)
        names = [name.strip() for name in wanted.split(",") if name.strip()]
        by_name = {s.name: s for s in self.steps}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise ValueError(
                f"unknown step {', '.join(unknown)}; the pipeline has {', '.join(by_name)}"
            )
        return [by_name[name] for name in names]

    def registry(self, topic: str) -> DataRegistry | None:
        """The schemas an upstream ``topic`` takes; None where only the envelope is checked."""
        schemas = self.upstream.get(topic)
        if not schemas:  # written by steps, or read by a step that takes anything
            return None
        registry = DataRegistry()
        for event_type, model in schemas.items():
            registry.register(event_type, model)
        return registry

    def default_type(self, topic: str) -> str | None:
        """The event type a published line without ``type`` gets: the topic's only one."""
        named = [t for t in self.upstream.get(topic, {}) if t != ANY_TYPE]
        return named[0] if len(named) == 1 else None

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, steps={self.step_names})"


def _check_steps(steps: Sequence[Processor]) -> None:
    if not steps:
        raise ValueError("a pipeline needs at least one step")
    for item in steps:
        if not isinstance(item, Processor):
            raise TypeError(
                f"{item!r} is not a step: subclass sluicegate.Step or use @sluicegate.step"
            )
    names = [s.name for s in steps]
    if any(not n for n in names):
        raise ValueError("every step needs a name")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"step names must be unique; twice: {', '.join(twice)}")
    for s in steps:
        if DLQ_TOPIC in (*s.inputs, *s.outputs):
            raise ValueError(f"step {s.name!r}: {DLQ_TOPIC!r} is the runner's own topic")


def _derived_upstream(steps: Sequence[Processor], topics: Iterable[str]) -> dict[str, Schemas]:
    """For each upstream topic, what its readers accept (a reader accepting all: nothing)."""
    upstream: dict[str, Schemas] = {}
    for topic in dict.fromkeys(topics):
        schemas: dict[str, type[BaseModel]] = {}
        for s in steps:
            if topic in s.inputs:
                schemas.update(s.accepts)
        upstream[topic] = schemas
    return upstream
