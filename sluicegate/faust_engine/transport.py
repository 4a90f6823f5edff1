"""``FaustTransport``: the ``Transport`` a ``StepRunner`` sees when Faust carries its step.

- ``subscribe`` declares a Faust agent on the step's input topics (raw keys
  and values, so a poisoned body reaches the runner's dead-letter path instead
  of Faust's deserializer) and returns the ``FaustSubscription`` it feeds;
- ``publish_batch`` sends through Faust's producer with the partition chosen
  explicitly by ``streams.partitioning.partition_for`` and the headers the
  runner built (``codec.encode`` + ``headers_for``), and returns once the
  broker acked every message: the outputs are byte for byte what the native
  Kafka transport would write, so native or Faust steps downstream read them;
- topics are created (and deleted) through the native ``KafkaTransport``'s
  admin path, which creates exactly ``partitions`` partitions and knows the
  Tansu quirks; Faust's own declarations then find them in place.

Faust's consumer group is the app's, so ``group`` only names the agent, and
static partitions (``--instance``) are refused: Faust assigns partitions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import faust
from faust.types import TP

from sluicegate.faust_engine.app import KafkaNames
from sluicegate.faust_engine.subscription import FaustSubscription
from sluicegate.streams.transport import (
    Message,
    OutMessage,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
    target_partition,
)
from sluicegate.streams.transports.kafka import KafkaTransport


class FaustTransport:
    """The ``Transport`` protocol over one Faust app (and a Kafka admin client for topics)."""

    # The messaging system, as tracing and metrics name it: the wire is Kafka's.
    name = "kafka"

    def __init__(self, app: faust.App, admin: KafkaTransport, *, queue_capacity: int) -> None:
        self.app = app
        self.prefix = admin.prefix
        self.partitions = admin.partitions
        self.names = KafkaNames(admin.prefix)
        self.subscriptions: list[FaustSubscription] = []
        self._admin = admin
        self._queue_capacity = queue_capacity
        self._ready: set[str] = set()

    async def connect(self) -> None:
        await self._admin.connect()

    async def close(self) -> None:
        for sub in self.subscriptions:
            await sub.close()
        await self._admin.close()

    # -- topics --------------------------------------------------------------------

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        wanted = list(topics)
        await self._admin.ensure_topics(wanted)
        self._ready.update(wanted)

    async def delete_topics(self, topics: Iterable[str]) -> None:
        doomed = list(topics)
        await self._admin.delete_topics(doomed)
        self._ready.difference_update(doomed)

    # -- producing -----------------------------------------------------------------

    async def log_ids(self, topics: Sequence[str]) -> dict[str, str]:
        # The same logs as the native Kafka transport's: an engine switch keeps progress.
        return await self._admin.log_ids(topics)

    async def log_ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return await self._admin.log_ends(tps)

    async def publish(self, message: OutMessage) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        """Send every message through Faust's producer; return once all are acked."""
        if not messages:
            return
        unknown = sorted({m.topic for m in messages} - self._ready)
        if unknown:
            # Never let a send create a topic: Tansu would make it with its
            # own partition count, and keys would land where NATS does not.
            raise TransportError(f"topic(s) {unknown} were not ensured; ensure_topics first")
        producer = self.app.producer
        pending: list[tuple[OutMessage, Any]] = []
        try:
            for m in messages:
                sent = await producer.send(
                    self.names.kafka(m.topic),
                    m.key,
                    m.value,
                    target_partition(m, self.partitions),
                    None,
                    _headers(m.headers),
                )
                pending.append((m, sent))
        except Exception as exc:
            raise TransportError(f"publishing through Faust's producer: {exc!r}") from exc
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        failed = [(m, r) for (m, _), r in zip(pending, results, strict=True) if _failed(r)]
        if failed:
            first, error = failed[0]
            raise TransportError(
                f"publishing to topic {first.topic!r} through Faust's producer failed "
                f"({len(failed)} of {len(pending)} messages): {error!r}"
            )

    # -- consuming -----------------------------------------------------------------

    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        partitions: Sequence[int] | None = None,
        start: StartFrom = "earliest",
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> FaustSubscription:
        """Declare an agent on ``topics`` and return the subscription it feeds.

        Must be called before the app starts (Faust fixes its agents then).
        """
        if group is None:
            raise TransportError("the Faust engine runs group members only; observe with Kafka")
        if partitions is not None:
            raise TransportError(
                "the Faust engine cannot own static partitions: Faust's group assigns them"
            )
        if start != "earliest":
            raise TransportError("the Faust engine starts from Postgres's offsets, not 'latest'")
        if self.app.started:
            raise TransportError("subscribe before the Faust app starts")
        sub = FaustSubscription(
            topics,
            name=group,
            capacity=self._queue_capacity,
            on_assign=on_assign,
            on_revoke=on_revoke,
        )
        self._declare_agent(sub, list(topics), group)
        self.subscriptions.append(sub)
        return sub

    def _declare_agent(self, sub: FaustSubscription, topics: list[str], name: str) -> None:
        channel = self.app.topic(
            *self.names.kafka_topics(topics),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )
        names = self.names
        app = self.app

        def highwater(tp: TopicPartition) -> int | None:
            try:
                return int(app.consumer.highwater(TP(names.kafka(tp.topic), tp.partition)))
            except Exception:  # consumer not started, partition not fetched yet
                return None

        async def feed(stream: Any) -> None:
            # Manual acks: an event is acked when its runner commits it
            # (FaustSubscription.commit), never when the agent moves on.
            manual = stream.noack()

            async def ack(event: Any) -> None:
                await manual.ack(event)

            sub.attach(ack, highwater)
            async for event in manual.events():
                await sub.offer(to_message(event, names))

        # Faust labels an agent (in its logs and its agent list) by the
        # function's qualified name: the step's name, not "...transport.feed".
        feed.__name__ = feed.__qualname__ = name
        feed.__module__ = "sluicegate.step"
        app.agent(channel, name=f"{app.conf.id}.{name}")(feed)


def to_message(event: Any, names: KafkaNames) -> Message:
    """A Faust event as the runner's ``Message`` (logical topic; the event is the handle)."""
    raw = event.message
    return Message(
        names.logical(raw.topic),
        raw.partition,
        raw.offset,
        raw.key,
        b"" if raw.value is None else raw.value,
        _decode_headers(raw.headers),
        int(raw.timestamp * 1000),
        handle=event,
    )


def _decode_headers(raw: Any) -> Mapping[str, str]:
    if not raw:
        return {}
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    # Headers are advisory (the body is the event): an undecodable foreign
    # header must not fail the consumer, as in the Kafka transport.
    return {k: v.decode(errors="replace") for k, v in pairs if v is not None}


def _headers(headers: Mapping[str, str] | None) -> list[tuple[str, bytes]] | None:
    if not headers:
        return None
    return [(k, v.encode()) for k, v in headers.items()]


def _failed(result: object) -> bool:
    return isinstance(result, BaseException)
