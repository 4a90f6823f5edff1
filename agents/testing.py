"""Helpers for testing steps: one ``process()`` call by hand, or steps on the real runner.

Users reach this as :mod:`sluicegate.testing`.

- :func:`make_event` and :func:`context_for` build an input and the
  ``Context`` the runner would hand over, to unit-test one step's
  ``process()`` directly.
- :class:`MemoryPipeline` runs steps on the real :class:`~streams.runner.StepRunner`
  (one per step) over a shared :class:`~streams.transports.memory.MemoryTransport`
  and :class:`~streams.checkpoint.MemoryCheckpointStore`, so a test exercises
  the actual commit protocol: decoding and validation against ``accepts``,
  dead letters, retries, dedupe by event id, keyed state stored as canonical
  JSON, audit rows and results written with the offsets. It adds nothing of
  its own beyond driving the runners until nothing is left to consume. It
  takes a :class:`~agents.graph.Pipeline` or a list of steps.
- :class:`StubChat` stands in for the model client: a step written against
  ``ChatClient`` gets canned replies, and the test sees what it asked.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson

from sluicegate.agents import topics
from sluicegate.agents.graph import Pipeline
from sluicegate.agents.model_client import CallReport, ChatResult
from sluicegate.agents.schemas import TASK_COMPLETED
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.codec import DecodeError, decode, encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import (
    DLQ_TOPIC,
    H_DLQ_ERROR,
    H_DLQ_MESSAGE,
    H_DLQ_REASON,
    H_DLQ_SOURCE,
    H_DLQ_STEP,
    RunnerConfig,
    StepRunner,
)
from sluicegate.streams.step import AuditRecord, Context, Processor, ResultRecord, StateKey
from sluicegate.streams.transport import Message, OutMessage
from sluicegate.streams.transports.memory import MemoryTransport


def make_event(
    type: str,
    data: Mapping[str, Any],
    *,
    tenant: str = "acme",
    session: str = "s1",
    id: str | None = None,
    time: datetime | None = None,
) -> Event:
    """An upstream-style event (fresh id and time unless given)."""
    extra: dict[str, Any] = {}
    if id is not None:
        extra["id"] = id
    if time is not None:
        extra["time"] = time
    return Event(
        source="tests", type=type, tenant=tenant, session=session, data=dict(data), **extra
    )


def context_for(
    step: Processor, event: Event, state: MutableMapping[str, Any] | None = None
) -> Context:
    """A ``Context`` like the runner's, with ``data`` validated by the step's model."""
    model = step.accepts.get(event.type)
    data = model.model_validate(event.data) if model is not None else None
    return Context(
        step=step.name, event=event, state={} if state is None else state, partition=0, data=data
    )


class StubChat:
    """A ``ChatClient`` answering from ``reply`` (text, or a function of the messages).

    ``calls`` keeps each request's model and messages, so a test can check
    what the step asked.
    """

    def __init__(self, reply: str | Callable[[Sequence[Mapping[str, Any]]], str]) -> None:
        self._reply = reply
        self.calls: list[tuple[str, list[Mapping[str, Any]]]] = []

    async def chat(
        self, model: str, messages: Sequence[Mapping[str, Any]], **params: Any
    ) -> ChatResult:
        self.calls.append((model, list(messages)))
        text = self._reply if isinstance(self._reply, str) else self._reply(messages)
        body = {"model": model, "choices": [{"message": {"role": "assistant", "content": text}}]}
        return ChatResult(body, CallReport(model=model, usage=None, attempts=1, latency_s=0.0))


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    """One message on ``dlq``: the original bytes, and the runner's headers saying why."""

    message: Message

    @property
    def step(self) -> str:
        return self.message.headers[H_DLQ_STEP]

    @property
    def reason(self) -> str:
        return self.message.headers[H_DLQ_REASON]

    @property
    def error(self) -> str:
        return self.message.headers[H_DLQ_ERROR]

    @property
    def text(self) -> str:
        return self.message.headers[H_DLQ_MESSAGE]

    @property
    def source(self) -> str:
        """``topic/partition/offset`` of the original message."""
        return self.message.headers[H_DLQ_SOURCE]

    @property
    def value(self) -> bytes:
        return self.message.value

    def event(self) -> Event | None:
        """The original event, if its envelope decodes at all."""
        try:
            return decode(self.message.value)
        except DecodeError:
            return None


class MemoryPipeline:
    """Steps on real runners over one in-memory transport and checkpoint store.

    Time only moves when the test says so: the runners never tick on their
    own, and :meth:`tick` calls each step's ``tick`` through the runner with
    an explicit ``now``. Fetches do not wait, so :meth:`run` returns as soon
    as a full round over the runners handled no message.

    Use as ``async with MemoryPipeline(steps) as pipeline:``, or let the
    first :meth:`publish` or :meth:`run` start it.
    """

    def __init__(
        self,
        steps: Pipeline | Sequence[Processor],
        *,
        partitions: int = 4,
        config: RunnerConfig | None = None,
        prefix: str = "test",
    ) -> None:
        if isinstance(steps, Pipeline):
            steps = steps.steps
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique: {names}")
        self.steps = list(steps)
        self.transport = MemoryTransport(prefix=prefix, partitions=partitions)
        self.store = MemoryCheckpointStore()
        base = config if config is not None else RunnerConfig(retry_backoff_s=0.0)
        self.config = replace(base, fetch_timeout_s=0.0, tick_interval_s=math.inf)
        # What the runners' clock says, as handed to ``tick``.
        self.now = datetime.now(UTC)
        self.runners: dict[str, StepRunner] = {}
        self._started = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Create every topic and start one runner per step (once)."""
        if self._started:
            return
        self._started = True
        wanted = [*topics.ALL, DLQ_TOPIC]
        for step in self.steps:
            wanted += [*step.inputs, *step.outputs]
        await self.transport.ensure_topics(dict.fromkeys(wanted))
        await self._start_runners()

    async def restart(self) -> None:
        """Replace every runner by a fresh one, as a worker restart does.

        The new runners load offsets, keyed state and recent input ids from
        the store; nothing in the old runners' memory survives.
        """
        await self.start()
        await self.close()
        await self._start_runners()

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.close()

    async def __aenter__(self) -> MemoryPipeline:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _start_runners(self) -> None:
        self.runners = {}
        for step in self.steps:
            runner = StepRunner(
                step,
                self.transport,
                self.store,
                config=replace(self.config),
                clock=lambda: self.now,
            )
            await runner.start()
            self.runners[step.name] = runner

    # -- driving -----------------------------------------------------------

    async def publish(self, topic: str, events: Iterable[Event]) -> None:
        """Publish events as a publisher does: encoded, keyed by session, with headers."""
        await self.start()
        await self.transport.publish_batch(
            [OutMessage(topic, encode(e), key=e.key, headers=headers_for(e)) for e in events]
        )

    async def publish_raw(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish arbitrary bytes (a malformed message, say)."""
        await self.start()
        await self.transport.publish(OutMessage(topic, value, key=key, headers=headers))

    async def run(self, *, max_rounds: int = 10_000) -> int:
        """Call ``run_once`` on each runner in turn until a full round handles nothing.

        Returns how many messages the runners fetched in all (duplicates and
        skipped ones included).
        """
        await self.start()
        handled = 0
        for _ in range(max_rounds):
            progress = 0
            for runner in self.runners.values():
                progress += await runner.run_once()
            if progress == 0:
                return handled
            handled += progress
        raise RuntimeError(f"pipeline does not settle after {max_rounds} rounds (a loop?)")

    async def tick(self, now: datetime) -> int:
        """Run every step's ``tick`` at ``now`` through its runner, then :meth:`run`.

        Returns how many messages were handled meanwhile.
        """
        await self.start()
        self.now = now
        handled = 0
        for runner in self.runners.values():
            await runner.tick(now)
        return handled + await self.run()

    # -- what happened -----------------------------------------------------

    async def messages(self, topic: str) -> list[Message]:
        """Every message on ``topic``, partition by partition, read by an observer."""
        await self.start()
        sub = await self.transport.subscribe([topic], group=None)
        try:
            batch: list[Message] = []
            while chunk := await sub.fetch(10_000, timeout=0):
                batch += chunk
            return batch
        finally:
            await sub.close()

    async def events(self, topic: str, type: str | None = None) -> list[Event]:
        """The decoded events on ``topic`` (of ``type``, if given)."""
        decoded = [decode(m.value) for m in await self.messages(topic)]
        return [e for e in decoded if type is None or e.type == type]

    async def dead_letters(self) -> list[DeadLetterMessage]:
        return [DeadLetterMessage(m) for m in await self.messages(DLQ_TOPIC)]

    @property
    def audit(self) -> list[AuditRecord]:
        """Every committed audit row, in commit order."""
        return [record for _partition, record in self.store.audit]

    def audit_of(self, kind: str, *, step: str | None = None) -> list[AuditRecord]:
        return [r for r in self.audit if r.kind == kind and (step is None or r.step == step)]

    @property
    def results(self) -> dict[str, ResultRecord]:
        """The stored final results by task id (the first one kept, as Postgres does)."""
        return self.store.results

    async def completions(self) -> Counter[str]:
        """How many ``task.completed`` events ``results`` holds per task id.

        The store keeps one result per task, so this is where a task answered
        twice shows.
        """
        return Counter(
            str(e.data.get("task_id")) for e in await self.events(topics.RESULTS, TASK_COMPLETED)
        )

    def state(self, step: str, *, tenant: str = "acme", session: str = "s1") -> dict[str, Any]:
        """The committed keyed state of one session of ``step`` (empty if none)."""
        stored = self.store.states.get((step, StateKey(tenant, session)))
        if stored is None:
            return {}
        value: dict[str, Any] = orjson.loads(stored[1])
        return value
