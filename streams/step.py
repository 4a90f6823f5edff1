"""What the runner needs from a step, and what a step sees while it runs.

A step is an object with a ``name``, declared ``inputs`` and ``outputs``
topics, and ``async process(event, ctx) -> list[Output]``. The user-facing API
(base class, decorator) lives in ``agents``; the runner only relies on the
``Processor`` protocol here, so it does not care which engine or transport
runs the step.

The context gives the step the keyed state of the event's (tenant, session),
a way to build output events with deterministic ids, and a way to add audit
records and final results to the batch's Postgres transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, NamedTuple, Protocol, runtime_checkable

import orjson
from pydantic import BaseModel

# PEP 696 defaults (Python 3.13's typing has them): a bare ``Context`` is
# ``Context[Any]``, so untyped steps need no type argument under mypy strict.
from typing_extensions import TypeVar

from sluicegate.streams.approvals import ApprovalDesk, ApprovalRequest
from sluicegate.streams.envelope import Event
from sluicegate.streams.errors import SluiceError

JSON = dict[str, Any]

# The validated ``data`` of a step's input: its declared model, else Any.
D = TypeVar("D", default=Any)


class DeadLetter(SluiceError):
    """Raised by a step: dead-letter this input now, without retrying it.

    For input the step can tell will never succeed (a ticket in a language
    nobody reads, a reference to a record that does not exist). ``reason``
    is a short code (the dead letter's ``sluice-dlq-reason`` header, what
    ``sluice dlq list --reason`` filters on); ``message`` says more. Any
    other exception is retried first.
    """

    def __init__(self, reason: str, message: str = "") -> None:
        reason = reason.strip()
        if not reason:
            raise ValueError("DeadLetter needs a reason")
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Output:
    """One event a step emits, and the logical topic it goes to."""

    topic: str
    event: Event


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit row, before the writer chains and hashes it.

    ``kind`` is ``processed``, ``decision``, ``dead_letter`` or
    ``shadow_divergence``.
    """

    kind: str
    step: str
    event_id: str
    event_type: str
    tenant: str
    session: str
    causation_id: str | None = None
    decision: str | None = None
    reasons: tuple[str, ...] = ()
    policy_version: str | None = None
    trace_id: str | None = None
    detail: JSON = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """A final answer for one accepted upstream task (``results`` table)."""

    task_id: str
    tenant: str
    session: str
    status: str
    answer: JSON
    trace_id: str | None = None


class StateKey(NamedTuple):
    """A session's key: state, ordering and concurrency are per (tenant, session).

    A named tuple, not a dataclass: the runner builds and looks one up several
    times per event, and a tuple hashes and compares in C (issue 20).
    """

    tenant: str
    session: str


class Context(Generic[D]):
    """Per-event view handed to ``process``. Built by the runner; not shared across events.

    ``Context[Ticket]`` says ``data`` is the input's data validated as
    ``Ticket`` (a step declares it as ``Step[Ticket]``); a bare ``Context``
    leaves ``data`` untyped.
    """

    __slots__ = (
        "_index",
        "approvals",
        "audit",
        "data",
        "detail",
        "event",
        "partition",
        "results",
        "state",
        "step",
    )

    def __init__(
        self,
        *,
        step: str,
        event: Event,
        state: MutableMapping[str, Any],
        partition: int,
        data: D = None,  # type: ignore[assignment]  # (None when no model is declared)
    ) -> None:
        self.step = step
        self.event = event
        self.state = state
        self.partition = partition
        # ``event.data`` validated against the step's model for its type, if it declares one.
        self.data: D = data
        self.audit: list[AuditRecord] = []
        self.results: list[ResultRecord] = []
        # Actions held for a person to decide, committed with the batch.
        self.approvals: list[ApprovalRequest] = []
        # Extra detail for the runner's ``processed`` audit row of this input.
        self.detail: JSON = {}
        self._index = 0

    def output(self, topic: str, type: str, data: JSON, *, subject: str | None = None) -> Output:
        """An output event derived from the input, with a deterministic id."""
        event = self.event.derive(
            step=self.step, index=self._index, type=type, data=data, subject=subject
        )
        self._index += 1
        return Output(topic, event)

    def record(
        self,
        kind: str,
        *,
        decision: str | None = None,
        reasons: Sequence[str] = (),
        policy_version: str | None = None,
        detail: JSON | None = None,
        event: Event | None = None,
    ) -> None:
        """Add an audit row about ``event`` (default: the input) to this batch."""
        about = event or self.event
        self.audit.append(
            AuditRecord(
                kind=kind,
                step=self.step,
                event_id=about.id,
                event_type=about.type,
                tenant=about.tenant,
                session=about.session,
                causation_id=about.causationid,
                decision=decision,
                reasons=tuple(reasons),
                policy_version=policy_version,
                trace_id=trace_id_of(about.traceparent),
                detail=detail or {},
            )
        )

    def request_approval(
        self,
        approval_id: str,
        *,
        task_id: str,
        tool: str,
        args: JSON,
        reasons: Sequence[str],
        deadline: datetime,
        policy_version: str | None = None,
    ) -> ApprovalRequest:
        """Hold an action for a person to decide (``approvals``), committed with the batch.

        The answer comes back through the ``ApprovalDesk`` of a later
        ``tick`` (see ``streams.approvals``); nothing waits for it here.
        """
        request = ApprovalRequest(
            id=approval_id,
            step=self.step,
            tenant=self.event.tenant,
            session=self.event.session,
            partition=self.partition,
            task_id=task_id,
            tool=tool,
            args=args,
            reasons=tuple(reasons),
            deadline=deadline,
            event_id=self.event.id,
            policy_version=policy_version,
            trace_id=trace_id_of(self.event.traceparent),
        )
        self.approvals.append(request)
        return request

    def result(self, task_id: str, status: str, answer: JSON) -> None:
        """Store the final result of an upstream task (exactly once, with the batch)."""
        self.results.append(
            ResultRecord(
                task_id=task_id,
                tenant=self.event.tenant,
                session=self.event.session,
                status=status,
                answer=answer,
                trace_id=trace_id_of(self.event.traceparent),
            )
        )


@runtime_checkable
class Processor(Protocol):
    """The runner's view of a step.

    ``accepts`` maps each input event type to the pydantic model of its
    ``data``; an input of another type is a dead letter (``unknown_type``).
    ``ANY_TYPE`` (``"*"``) as a key validates every other type against its
    model. An empty mapping accepts every type unvalidated.

    The lifecycle is declared here, so the runner calls it without looking
    for optional methods: ``open`` before the first event (connect clients,
    load a model), ``close`` after the last (on shutdown, also after a
    failure); ``tick`` about once a second when ``ticks`` is true.
    :class:`Hooks` gives steps that need none of them the no-op versions.
    """

    # Read-only properties, so that class attributes (as ``agents.api.Step``
    # declares them) satisfy the protocol as well as instance attributes.
    @property
    def name(self) -> str: ...
    @property
    def inputs(self) -> Sequence[str]: ...
    @property
    def outputs(self) -> Sequence[str]: ...
    @property
    def accepts(self) -> Mapping[str, type[BaseModel]]: ...
    @property
    def ticks(self) -> bool: ...

    async def process(self, event: Event, ctx: Context) -> list[Output]: ...
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def tick(self, now: datetime, tc: TickContext) -> list[Output]: ...


class Hooks:
    """No-op lifecycle hooks, for steps that need none (see :class:`Processor`)."""

    # A step that ticks sets this (``agents.api.Step`` does when ``tick`` is overridden).
    ticks: bool = False

    async def open(self) -> None:
        """Before the first event of this worker: connect, load, warm up."""

    async def close(self) -> None:
        """After the last event of this worker, also after a failure."""

    async def tick(self, now: datetime, tc: TickContext) -> list[Output]:
        """Time-driven work (deadlines) on the sessions with nothing in flight."""
        return []


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id field of a W3C ``traceparent`` (``00-<trace>-<span>-<flags>``)."""
    if not traceparent:
        return None
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


class TickContext:
    """What a step's ``tick(now, tc)`` sees: the states of its owned sessions.

    The runner calls ``tick`` between batches (about once a second) on steps
    whose ``ticks`` is true, for time-driven work such as deadlines. A tick has no input
    event, so outputs get ids derived from a seed the step chooses (for
    example the task id), which keeps them deterministic across a replay.
    Changes to the states it hands out are committed with the next batch.
    """

    def __init__(
        self,
        *,
        step: str,
        states: Mapping[StateKey, MutableMapping[str, Any]] | None = None,
        approvals: ApprovalDesk | None = None,
        blobs: Mapping[StateKey, bytes] | None = None,
    ) -> None:
        self.step = step
        # Decoded states, and the canonical JSON of those not decoded yet
        # (the runner hands over bytes: decoding every session's state every
        # second would cost a step that looks at few of them).
        self._states: dict[StateKey, MutableMapping[str, Any]] = dict(states or {})
        self._blobs = {k: b for k, b in (blobs or {}).items() if k not in self._states}
        # Where held actions' answers are read (the checkpoint store), if it keeps them.
        self.approvals = approvals
        self.touched: set[StateKey] = set()
        self.audit: list[AuditRecord] = []
        self.results: list[ResultRecord] = []

    def states(self) -> list[tuple[StateKey, MutableMapping[str, Any]]]:
        """Every loaded session state; reading one marks it as possibly changed."""
        return self._hand_out(list(self._blobs), list(self._states))

    def states_with(self, key: str) -> list[tuple[StateKey, MutableMapping[str, Any]]]:
        """The session states that have top-level ``key`` (others are not even decoded)."""
        marker = orjson.dumps(key) + b":"
        # A cheap byte search first; a false match (the text inside a nested
        # object) only costs decoding that state.
        maybe = [k for k, blob in self._blobs.items() if marker in blob]
        items = self._hand_out(maybe, [k for k, v in self._states.items() if key in v])
        return [(k, state) for k, state in items if key in state]

    def state_of(self, key: StateKey) -> MutableMapping[str, Any]:
        """A state handed out by ``states``/``states_with`` (the runner commits it)."""
        return self._states[key]

    def _hand_out(
        self, undecoded: list[StateKey], decoded: list[StateKey]
    ) -> list[tuple[StateKey, MutableMapping[str, Any]]]:
        for k in undecoded:
            self._states[k] = orjson.loads(self._blobs.pop(k))
        keys = [*decoded, *undecoded]
        self.touched.update(keys)
        return [(k, self._states[k]) for k in keys]

    def output(
        self,
        key: StateKey,
        topic: str,
        type: str,
        data: JSON,
        *,
        seed: str,
        causation: Event | None = None,
        traceparent: str | None = None,
    ) -> Output:
        from sluicegate.streams.ids import derived_id

        event = Event(
            id=derived_id(seed, f"{self.step}.tick", 0),
            source=f"sluicegate/{self.step}",
            type=type,
            tenant=key.tenant,
            session=key.session,
            causationid=causation.id if causation else seed,
            traceparent=traceparent,
            data=data,
        )
        return Output(topic, event)

    def record(
        self,
        key: StateKey,
        kind: str,
        *,
        event_id: str,
        event_type: str,
        decision: str | None = None,
        reasons: Sequence[str] = (),
        policy_version: str | None = None,
        causation_id: str | None = None,
        traceparent: str | None = None,
        detail: JSON | None = None,
    ) -> None:
        """Add an audit row about an event of ``key``'s session to the next checkpoint."""
        self.audit.append(
            AuditRecord(
                kind=kind,
                step=self.step,
                event_id=event_id,
                event_type=event_type,
                tenant=key.tenant,
                session=key.session,
                causation_id=causation_id,
                decision=decision,
                reasons=tuple(reasons),
                policy_version=policy_version,
                trace_id=trace_id_of(traceparent),
                detail=detail or {},
            )
        )

    def result(
        self,
        key: StateKey,
        task_id: str,
        status: str,
        answer: JSON,
        *,
        traceparent: str | None = None,
    ) -> None:
        self.results.append(
            ResultRecord(
                task_id=task_id,
                tenant=key.tenant,
                session=key.session,
                status=status,
                answer=answer,
                trace_id=trace_id_of(traceparent),
            )
        )
