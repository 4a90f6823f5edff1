"""The publisher for upstream systems: validate, complete and publish events in batches.

Upstream code (or ``sluice publish``) hands it JSON objects. Missing ``id``,
``time``, ``source`` and ``specversion`` are filled in; the envelope and, when
a registry is given, the ``data`` of the event's type are validated; valid
events are published in batches on the transport's pipelined path::

    publisher = Publisher(transport, registry=task_schemas())
    event = publisher.prepare({"type": "task.submitted", "tenant": "acme",
                               "session": "s-1", "data": {"prompt": "what is 2+2"}})
    await publisher.publish([event])

Invalid input raises :class:`~streams.codec.DecodeError` with a reason and
nothing of it is published.

When tracing is on (``streams.tracing.configure``) and no ``before_send`` hook
is given, each event starts its task's trace: a ``send <topic>`` span whose
context the event carries (``streams.tracing.publish_hook``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sluicegate.streams import tracing
from sluicegate.streams.codec import (
    DEFAULT_MAX_BYTES,
    REASON_TOO_LARGE,
    DataRegistry,
    DecodeError,
    EncodeError,
    encode,
    from_mapping,
    headers_for,
    json_type,
)
from sluicegate.streams.envelope import Event
from sluicegate.streams.ids import new_id
from sluicegate.streams.transport import OutMessage, Transport, TransportError

log = logging.getLogger("sluicegate.publisher")

# Seconds a failing batch is retried: a NATS or Kafka restart takes a few.
DEFAULT_RETRY_FOR_S = 30.0

# Called with each event just before it is encoded; returns the event to send
# (tracing uses it to start a trace and stamp ``traceparent``). Without one,
# the tracing hook applies whenever tracing is on.
EventHook = Callable[[Event], Event]


class Publisher:
    def __init__(
        self,
        transport: Transport,
        *,
        topic: str = "tasks",
        source: str = "sluicegate/publisher",
        default_type: str | None = "task.submitted",
        registry: DataRegistry | None = None,
        batch_size: int = 500,
        max_bytes: int = DEFAULT_MAX_BYTES,
        before_send: EventHook | None = None,
        retry_for_s: float = DEFAULT_RETRY_FOR_S,
    ) -> None:
        self.transport = transport
        self.topic = topic
        self.source = source
        self.default_type = default_type
        self.registry = registry
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.before_send = before_send
        # How long a batch that fails (a broker restarting) is retried.
        self.retry_for_s = retry_for_s
        self.published = 0
        self.retries = 0  # batches sent again after a failure
        self._traced: EventHook | None = None

    def prepare(self, raw: Mapping[str, Any]) -> Event:
        """Complete and validate one event; raise ``DecodeError`` naming what is wrong."""
        if not isinstance(raw, Mapping):
            raise DecodeError("not_an_object", f"expected a JSON object, got {json_type(raw)}")
        fields = dict(raw)
        fields.setdefault("specversion", "1.0")
        fields.setdefault("id", new_id())
        fields.setdefault("time", datetime.now(UTC))
        fields.setdefault("source", self.source)
        if self.default_type is not None:
            fields.setdefault("type", self.default_type)
        event = from_mapping(fields)
        if self.registry is not None:
            self.registry.validate(event)
        return event

    def encode(self, event: Event) -> OutMessage:
        hook = self.before_send
        if hook is None and tracing.enabled():
            hook = self._traced or self._tracing_hook()
        if hook is not None:
            event = hook(event)
        try:
            body = encode(event, max_bytes=self.max_bytes)
        except EncodeError as exc:
            raise DecodeError(REASON_TOO_LARGE, str(exc)) from None
        return OutMessage(self.topic, body, key=event.key, headers=headers_for(event))

    async def publish(self, events: Iterable[Event]) -> int:
        """Publish ``events`` in batches; returns how many the broker acknowledged."""
        batch: list[OutMessage] = []
        sent = 0
        for event in events:
            batch.append(self.encode(event))
            if len(batch) >= self.batch_size:
                sent += await self._flush(batch)
                batch = []
        if batch:
            sent += await self._flush(batch)
        return sent

    async def publish_encoded(self, messages: Sequence[OutMessage]) -> int:
        """Publish messages ``encode`` made (checked and sized already), in batches.

        For callers that must know an event is valid before it is queued
        (the HTTP gateway answers each request on its own), and then send
        many requests' events together. Broker failures are ridden out as in
        ``publish``.
        """
        sent = 0
        for start in range(0, len(messages), self.batch_size):
            sent += await self._flush(messages[start : start + self.batch_size])
        return sent

    def _tracing_hook(self) -> EventHook:
        # The hook reads the live tracer on each call, so it may be kept.
        hook = tracing.publish_hook(
            self.topic,
            system=self.transport.name,
            destination=f"{self.transport.prefix}.{self.topic}",
        )
        self._traced = hook
        return hook or (lambda event: event)

    async def _flush(self, batch: Sequence[OutMessage]) -> int:
        """Publish one batch, riding out a broker restart for up to ``retry_for_s``.

        A retry sends the same messages, so the same event ids: NATS drops
        the copies of what it already stored (its duplicate window), and on
        Kafka the pipeline absorbs them by id. Giving up says what happened
        and how much was published before.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.transport.publish_batch(batch)
                break
            except TransportError as exc:
                waited = loop.time() - started
                if waited >= self.retry_for_s:
                    raise TransportError(
                        f"publishing {len(batch)} events to topic {self.topic!r} failed "
                        f"{attempt} times over {waited:.0f}s (the broker down or restarting?); "
                        f"{self.published} events were published before them, and publishing "
                        f"these again is safe (same ids). Last error: {exc}"
                    ) from exc
                self.retries += 1
                delay = min(2.0, 0.1 * 2**attempt, self.retry_for_s - waited)
                log.warning(
                    "publishing to %r failed (attempt %d, retrying for up to %.0fs more): %s",
                    self.topic,
                    attempt,
                    self.retry_for_s - waited,
                    exc,
                )
                await asyncio.sleep(delay)
        self.published += len(batch)
        return len(batch)
