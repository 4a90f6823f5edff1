"""One small interface over everything the transport benchmark publishes to and consumes from.

An :class:`Endpoint` is a topic with one producer and one consumer on it:
either our ``Transport`` (the measured side) or a raw client doing the same
job the simplest way its library offers (the baseline):

- ``RawNatsCore``: nats-py core publish + subscription callback (no
  persistence, no acks: the ceiling of the client);
- ``RawJetStream``: ``js.publish_async`` in a window + ``pull_subscribe``
  ``fetch`` with one AckAll per batch;
- ``RawKafka``: aiokafka ``send`` per message + ``getmany`` and a commit per
  batch, configured with the same producer/consumer options as our
  ``KafkaTransport``, so the ratio measures our code, not a configuration.

The raw baselines are shared with ``benchmarks/*_transport_micro.py``.
Every endpoint deletes what it created when closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import nats
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from sluicegate.streams.partitioning import partition_for
from sluicegate.streams.transport import OutMessage, Subscription, Transport
from sluicegate.streams.transports.kafka import CONSUMER_DEFAULTS, PRODUCER_DEFAULTS

log = logging.getLogger("sluicegate.bench")

# How long one receive() waits for messages before returning empty-handed.
RECEIVE_WAIT_S = 0.25


class Endpoint(Protocol):
    """A topic with a producer and a consumer, ready after ``open``."""

    label: str

    async def open(self) -> None: ...

    async def send(self, bodies: Sequence[bytes], keys: Sequence[bytes]) -> None:
        """Publish ``bodies`` (keyed by ``keys``); return once the broker has them."""
        ...

    async def receive(self, max_messages: int) -> list[bytes]:
        """The next bodies (none after a short wait), already acked or committed."""
        ...

    async def close(self) -> None: ...


# -- our transports ---------------------------------------------------------------


class TransportEndpoint:
    """Our ``Transport``: ``publish_batch``, then ``subscribe``/``fetch``/``commit``."""

    def __init__(
        self,
        transport: Transport,
        *,
        label: str,
        topic: str = "bench",
        group: str = "bench",
        cleanup: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.label = label
        self.transport = transport
        self.topic = topic
        self.group = group
        self._cleanup = cleanup
        self._sub: Subscription | None = None

    async def open(self) -> None:
        await self.transport.connect()
        await self.transport.ensure_topics([self.topic])
        # Static assignment of every partition (still committing to the
        # group): no group join on Kafka, and the same ownership as on NATS.
        self._sub = await self.transport.subscribe(
            [self.topic], group=self.group, partitions=list(range(self.transport.partitions))
        )

    async def send(self, bodies: Sequence[bytes], keys: Sequence[bytes]) -> None:
        topic = self.topic
        await self.transport.publish_batch(
            [OutMessage(topic, body, key=key) for body, key in zip(bodies, keys, strict=True)]
        )

    async def receive(self, max_messages: int) -> list[bytes]:
        assert self._sub is not None, "open() first"
        messages = await self._sub.fetch(max_messages, RECEIVE_WAIT_S)
        if messages:
            await self._sub.commit(messages)
        return [m.value for m in messages]

    async def close(self) -> None:
        try:
            if self._sub is not None:
                await self._sub.close()
            if self._cleanup is not None:
                await self._cleanup()
        finally:
            await self.transport.close()


# -- raw NATS ---------------------------------------------------------------------


async def connect_nats(url: str) -> NatsClient:
    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)


class RawNatsCore:
    """nats-py core publish/subscribe: no stream, no acks, a flush per batch."""

    label = "raw nats-py core pub/sub"

    def __init__(self, url: str, *, prefix: str) -> None:
        self.url = url
        self.subject = f"{prefix}.core"
        self._nc: NatsClient | None = None
        self._inbox: deque[bytes] = deque()
        self._arrived = asyncio.Event()

    async def open(self) -> None:
        self._nc = await connect_nats(self.url)

        async def on_message(msg: Msg) -> None:
            self._inbox.append(msg.data)
            self._arrived.set()

        # No pending limits: a slow consumer must show as latency, not as loss.
        await self._nc.subscribe(
            self.subject, cb=on_message, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        await self._nc.flush()

    async def send(self, bodies: Sequence[bytes], keys: Sequence[bytes]) -> None:
        nc = self._nc
        assert nc is not None, "open() first"
        for body in bodies:
            await nc.publish(self.subject, body)
        # The only "ack" core NATS has: the server answered a PING after these.
        await nc.flush()

    async def receive(self, max_messages: int) -> list[bytes]:
        if not self._inbox:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), RECEIVE_WAIT_S)
        inbox = self._inbox
        return [inbox.popleft() for _ in range(min(max_messages, len(inbox)))]

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.close()


async def create_raw_stream(nc: NatsClient, name: str, storage: StorageType) -> str:
    """A stream ``name`` holding the subjects ``<name>.>``; returns the name."""
    await nc.jetstream().add_stream(
        StreamConfig(name=name, subjects=[f"{name}.>"], storage=storage, duplicate_window=120)
    )
    return name


class RawJetStream:
    """``js.publish_async`` (bounded window) and a durable pull consumer with AckAll."""

    label = "raw js.publish_async + pull fetch"

    def __init__(self, url: str, *, prefix: str, storage: str = "file", window: int = 4096) -> None:
        self.url = url
        # Not under "<prefix>.": our transport's stream of the same run owns those subjects.
        self.stream = f"{prefix}_raw".replace(".", "_")
        self.storage = StorageType.MEMORY if storage == "memory" else StorageType.FILE
        # The same window as NatsTuning.publish_window, so both pipeline as deep.
        self.window = window
        self._nc: NatsClient | None = None
        self._js: Any = None
        self._psub: Any = None

    async def open(self) -> None:
        nc = self._nc = await connect_nats(self.url)
        await create_raw_stream(nc, self.stream, self.storage)
        self._js = nc.jetstream(publish_async_max_pending=self.window)
        self._psub = await self._js.pull_subscribe(
            f"{self.stream}.>",
            durable="raw",
            stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=65536),
        )

    async def send(self, bodies: Sequence[bytes], keys: Sequence[bytes]) -> None:
        js, subject = self._js, f"{self.stream}.0"
        for body in bodies:
            await js.publish_async(subject, body)
        await js.publish_async_completed()

    async def receive(self, max_messages: int) -> list[bytes]:
        try:
            msgs = await self._psub.fetch(max_messages, timeout=RECEIVE_WAIT_S)
        except (NatsTimeoutError, TimeoutError):
            return []
        if msgs:
            await msgs[-1].ack()  # AckAll: acks everything up to it
        return [m.data for m in msgs]

    async def close(self) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
            await nc.jetstream().delete_stream(self.stream)
        finally:
            await nc.close()


# -- raw Kafka --------------------------------------------------------------------


class RawKafka:
    """aiokafka ``send`` per message (futures gathered) and ``getmany`` + commit."""

    label = "raw aiokafka send + getmany"

    def __init__(
        self, bootstrap: str, *, topic: str, partitions: int, group: str, owns_topic: bool = True
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.group = group
        # Create the topic on open and delete it on close (else it exists and stays).
        self.owns_topic = owns_topic
        self._producer: Any = None
        self._consumer: Any = None

    async def open(self) -> None:
        if self.owns_topic:
            await create_kafka_topic(self.bootstrap, self.topic, self.partitions)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **PRODUCER_DEFAULTS)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **CONSUMER_DEFAULTS,
        )
        await self._consumer.start()
        self._consumer.assign([KafkaTopicPartition(self.topic, p) for p in range(self.partitions)])

    async def send(self, bodies: Sequence[bytes], keys: Sequence[bytes]) -> None:
        producer, topic, n = self._producer, self.topic, self.partitions
        futures = [
            await producer.send(topic, body, key=key, partition=partition_for(key, n))
            for body, key in zip(bodies, keys, strict=True)
        ]
        await asyncio.gather(*futures)

    async def receive(self, max_messages: int) -> list[bytes]:
        batches = await self._consumer.getmany(
            timeout_ms=int(RECEIVE_WAIT_S * 1000), max_records=max_messages
        )
        out = [r.value for records in batches.values() for r in records]
        if out:
            await self._consumer.commit()  # what was consumed, per partition
        return out

    async def close(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        if self.owns_topic:
            await delete_kafka_topics(self.bootstrap, [self.topic])


async def create_kafka_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


# -- clean-up -----------------------------------------------------------------------


async def delete_nats_streams(url: str, prefix: str) -> list[str]:
    """Delete every stream whose name starts with ``<prefix>_``; returns their names."""
    head = f"{prefix}_".replace(".", "_")
    nc = await connect_nats(url)
    deleted: list[str] = []
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name
            if name and name.startswith(head):
                await js.delete_stream(name)
                deleted.append(name)
    finally:
        await nc.close()
    return deleted


async def delete_kafka_topics(bootstrap: str, topics: Sequence[str]) -> None:
    """Best effort: a broker that cannot delete topics (or already did) is not an error."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        await admin.delete_topics(list(topics))
    except Exception as exc:
        log.debug("deleting Kafka topics %s failed: %r", topics, exc)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def kafka_topics_with_prefix(bootstrap: str, prefix: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return sorted(t for t in await admin.list_topics() if t.startswith(prefix))
    finally:
        await admin.close()


async def delete_kafka_prefix(bootstrap: str, prefix: str) -> None:
    """Best effort: delete every topic whose name starts with ``prefix``."""
    try:
        topics = await kafka_topics_with_prefix(bootstrap, prefix)
    except Exception as exc:
        log.debug("listing Kafka topics failed: %r", exc)
        return
    if topics:
        await delete_kafka_topics(bootstrap, topics)
