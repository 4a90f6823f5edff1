"""The Kafka transport: :class:`KafkaTransport`.

It owns the clients' lifecycle, topics (created with exactly
``partitions`` partitions, awaited, deleted), producing record batches
per partition, and ``subscribe``, which starts a consumer and wraps it in
a :class:`KafkaSubscription`; plus the Tansu workarounds the
subscriptions call back into (true end offsets, LeaveGroup).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

from sluicegate.streams.transport import (
    OutMessage,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
    target_partition,
)
from sluicegate.streams.transports.kafka.clients import (
    _ADMIN_OPTIONS,
    _CLIENT_OPTIONS,
    _CONSUMER_OPTIONS,
    _HEARTBEATS_PER_SESSION,
    _PREFERRED_SESSION_MS,
    _PRODUCER_OPTIONS,
    CONSUMER_DEFAULTS,
    PRODUCER_DEFAULTS,
    _check_tuning,
    _error,
    _pick,
    _quietly,
)
from sluicegate.streams.transports.kafka.names import _encode_headers, _Names
from sluicegate.streams.transports.kafka.quiet import quiet_aiokafka
from sluicegate.streams.transports.kafka.subscription import KafkaSubscription
from sluicegate.streams.transports.kafka.topic_ids import topic_ids

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("sluicegate.streams.transports.kafka")

# Kafka error codes we accept from CreateTopics.
_NO_ERROR: Final = 0
_TOPIC_ALREADY_EXISTS: Final = 36

# (logical topic, partition): a plain tuple, since hashing the TopicPartition
# dataclass per message is measurable on the hot paths.
_Slot = tuple[str, int]


class KafkaTransport:
    """The ``Transport`` protocol on Kafka (or any Kafka-protocol broker)."""

    name = "kafka"

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str,
        partitions: int,
        replication_factor: int = 1,
        connect_timeout: float = 5.0,
        join_timeout: float = 30.0,
        **tuning: Any,
    ) -> None:
        """``tuning`` holds aiokafka options; each client takes those it accepts."""
        if partitions <= 0:
            raise ValueError(f"partitions must be positive, got {partitions}")
        _check_tuning(tuning)
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.partitions = partitions
        self._replication_factor = replication_factor
        self._connect_timeout = connect_timeout
        self._join_timeout = join_timeout
        self._tuning = dict(tuning)
        self._names = _Names(prefix)
        self._admin: Any = None
        self._client: Any = None
        self._producer: Any = None
        self._ready_topics: set[str] = set()
        self._group_timing: dict[str, int] | None = None
        self._subscriptions: set[KafkaSubscription] = set()

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        if self._producer is not None:
            return
        # aiokafka logs each failed attempt while a broker is away (hundreds a second).
        quiet_aiokafka()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, **_pick(self._tuning, _ADMIN_OPTIONS)
        )
        # A plain client for the one raw request we need (see _leave_group).
        client = AIOKafkaClient(
            bootstrap_servers=self.bootstrap, **_pick(self._tuning, _CLIENT_OPTIONS)
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            **{**PRODUCER_DEFAULTS, **_pick(self._tuning, _PRODUCER_OPTIONS)},
        )
        try:
            await self._bounded(admin.start())
            await self._bounded(client.bootstrap())
            await self._bounded(producer.start())
        except BaseException:
            await _quietly(producer.stop())
            await _quietly(client.close())
            await _quietly(admin.close())
            raise
        self._admin, self._client, self._producer = admin, client, producer

    async def _bounded(self, started: Any) -> None:
        """Await a client's start, failing fast (naming the broker) if it is unreachable."""
        try:
            await asyncio.wait_for(started, self._connect_timeout)
        except TimeoutError:
            raise TransportError(
                f"Kafka at {self.bootstrap} did not answer within {self._connect_timeout:g}s"
            ) from None
        except KafkaError as exc:
            raise _error(f"cannot connect to Kafka at {self.bootstrap}", exc) from exc
        except KeyError as exc:
            # aiokafka's SCRAM client reads the server's final message without
            # checking for the error the server sends instead (unknown user,
            # wrong password): it surfaces as a KeyError for 'v'.
            raise TransportError(
                f"cannot connect to Kafka at {self.bootstrap}: SASL authentication failed "
                f"(the server's SCRAM answer had no {exc}: unknown user or wrong password?)",
                retriable=False,
            ) from exc

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        producer, client, admin = self._producer, self._client, self._admin
        self._producer = self._client = self._admin = None
        if producer is not None:
            await _quietly(producer.stop())
        if client is not None:
            await _quietly(client.close())
        if admin is not None:
            await _quietly(admin.close())

    def _connected(self) -> tuple[Any, Any]:
        if self._producer is None:
            raise TransportError(f"Kafka transport for {self.bootstrap} is not connected")
        return self._admin, self._producer

    # -- topics ------------------------------------------------------------

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        admin, _ = self._connected()
        names = [self._names.kafka(t) for t in topics]
        if not names:
            return
        # Create first, never look first: Tansu creates any topic a metadata
        # request names (with 4 partitions), so describing a missing topic
        # would create it with the wrong partition count.
        new = [NewTopic(n, self.partitions, self._replication_factor) for n in names]
        try:
            response = await admin.create_topics(new)
        except KafkaError as exc:
            raise _error(f"creating topics {names} on {self.bootstrap}", exc) from exc
        for topic, code, message in (tuple(e)[:3] for e in response.topic_errors):
            if code not in (_NO_ERROR, _TOPIC_ALREADY_EXISTS):
                raise TransportError(f"creating topic {topic!r} failed: {code} {message}")
        await self._await_topics(names)

    async def delete_topics(self, topics: Iterable[str]) -> None:
        admin, _ = self._connected()
        existing = set(await admin.list_topics())
        names = [n for n in (self._names.kafka(t) for t in topics) if n in existing]
        if not names:
            return
        try:
            await admin.delete_topics(names)
        except KafkaError as exc:
            raise _error(f"deleting topics {names} on {self.bootstrap}", exc) from exc
        self._ready_topics.difference_update(names)

    async def log_ids(self, topics: Sequence[str]) -> dict[str, str]:
        self._connected()
        names = {self._names.kafka(t): t for t in topics}
        try:
            ids = await topic_ids(self._client, list(names))
        except (KafkaError, TimeoutError, ValueError) as exc:
            raise _error(f"reading topic ids of {list(names)} on {self.bootstrap}", exc) from exc
        existing = set(ids)
        if len(existing) < len(names):
            # A broker without topic ids (before Kafka 2.8) gives the name
            # alone: then a recreated topic cannot be told from the old one.
            existing |= set(await self._admin.list_topics()) & set(names)
        return {
            logical: f"kafka:{name}@{ids.get(name, 'noid')}"
            for name, logical in names.items()
            if name in existing
        }

    async def log_ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        self._connected()
        wanted = {KafkaTopicPartition(self._names.kafka(tp.topic), tp.partition): tp for tp in tps}
        try:
            ends = await self._end_offsets(list(wanted))
        except KafkaError as exc:
            raise _error(f"reading the ends of {sorted(tps)} on {self.bootstrap}", exc) from exc
        # The end is the next offset to be written; the last message is one before.
        return {wanted[ktp]: end - 1 for ktp, end in ends.items()}

    async def _await_topics(self, names: Sequence[str], deadline_s: float = 10.0) -> None:
        """Wait until metadata shows every topic with all partitions led."""
        admin, _ = self._connected()
        end = time.monotonic() + deadline_s
        while True:
            described = await admin.describe_topics(list(names))
            waiting = [n for n in names if not self._is_ready(n, described)]
            if not waiting:
                self._ready_topics.update(names)
                return
            if time.monotonic() > end:
                raise TransportError(f"topics {waiting} not ready on {self.bootstrap}")
            await asyncio.sleep(0.05)

    def _is_ready(self, name: str, described: Sequence[Mapping[str, Any]]) -> bool:
        for topic in described:
            if topic["topic"] != name or topic["error_code"] != _NO_ERROR:
                continue
            parts = topic["partitions"]
            if parts and len(parts) != self.partitions:
                # Partition numbers are computed for ``partitions``: a topic with
                # another count would put keys where NATS does not.
                raise TransportError(
                    f"topic {name!r} has {len(parts)} partitions, but SLUICE_PARTITIONS is "
                    f"{self.partitions}: use {len(parts)}, or recreate the topic"
                )
            return len(parts) == self.partitions and all(p["leader"] >= 0 for p in parts)
        return False

    async def _require_topics(self, logical: Iterable[str]) -> list[str]:
        """Kafka names of existing topics; a missing one is an error, never auto-created."""
        names = [self._names.kafka(t) for t in logical]
        unknown = [n for n in names if n not in self._ready_topics]
        if unknown:
            admin, _ = self._connected()
            # Listing all topics is the one metadata request Tansu does not
            # answer by creating the topics it names.
            existing = set(await admin.list_topics())
            missing = [n for n in unknown if n not in existing]
            if missing:
                raise TransportError(
                    f"topic(s) {missing} do not exist on {self.bootstrap}; ensure_topics first"
                )
            await self._await_topics(unknown)
        return names

    # -- producing ---------------------------------------------------------

    async def publish(self, message: OutMessage) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        if not messages:
            return
        _, producer = self._connected()
        await self._require_topics({m.topic for m in messages})
        sent = await self._send_batches(producer, messages)
        results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        failures = [(slot, r) for (slot, _), r in zip(sent, results, strict=True) if _failed(r)]
        if failures:
            (topic, partition), exc = failures[0]
            raise TransportError(
                f"publishing to topic {topic!r} partition {partition} on {self.bootstrap} "
                f"failed ({len(failures)} of {len(sent)} batches): {type(exc).__name__}: {exc}"
            )

    async def _send_batches(
        self, producer: Any, messages: Sequence[OutMessage]
    ) -> list[tuple[_Slot, Any]]:
        """Append each message to its partition's batch; send each batch as it fills.

        Building record batches ourselves skips aiokafka's per-message
        accumulator work: ~3-4x the throughput of send() per message. Batches
        of one partition are queued in order and aiokafka keeps one in flight
        per partition, so per-key order holds.
        """
        sent: list[tuple[_Slot, Any]] = []
        open_batches: dict[_Slot, Any] = {}
        for m in messages:
            slot = (m.topic, target_partition(m, self.partitions))
            headers = _encode_headers(m.headers)
            batch = open_batches.get(slot)
            if (
                batch is None
                or batch.append(key=m.key, value=m.value, timestamp=None, headers=headers) is None
            ):
                if batch is not None:
                    sent.append((slot, await self._send_batch(producer, batch, slot)))
                batch = open_batches[slot] = producer.create_batch()
                # An empty batch always takes its first record, however large.
                batch.append(key=m.key, value=m.value, timestamp=None, headers=headers)
        for slot, batch in open_batches.items():
            sent.append((slot, await self._send_batch(producer, batch, slot)))
        return sent

    async def _send_batch(self, producer: Any, batch: Any, slot: _Slot) -> Any:
        """Queue a full batch; the returned future resolves when the broker acks it."""
        topic, partition = slot
        batch.close()
        try:
            return await producer.send_batch(batch, self._names.kafka(topic), partition=partition)
        except (KafkaError, AssertionError) as exc:
            raise _error(f"publishing to topic {topic!r} on {self.bootstrap}", exc) from exc

    # -- consuming ---------------------------------------------------------

    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        partitions: Sequence[int] | None = None,
        start: StartFrom = "earliest",
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> KafkaSubscription:
        self._connected()
        kafka_topics = await self._require_topics(topics)
        # Observers join no group, so they own every partition unless told otherwise.
        if group is None and partitions is None:
            partitions = range(self.partitions)
        owned = self._owned(kafka_topics, partitions)
        group_id = None if group is None else self._names.group(group)
        consumer = await self._start_consumer(group_id, start, static=owned is not None)
        sub = KafkaSubscription(self, consumer, group_id)
        try:
            if owned is None:
                await sub._join(kafka_topics, start, on_assign, on_revoke, self._join_timeout)
            else:
                await sub._assign(owned, start, on_assign)
        except BaseException:
            await sub.close()
            raise
        self._subscriptions.add(sub)
        return sub

    def _owned(
        self, kafka_topics: Sequence[str], partitions: Sequence[int] | None
    ) -> list[KafkaTopicPartition] | None:
        """Partitions to assign statically, or None to let the group assign them."""
        if partitions is None:
            return None
        bad = [p for p in partitions if not 0 <= p < self.partitions]
        if bad:
            raise TransportError(f"partitions {bad} do not exist (there are {self.partitions})")
        return [KafkaTopicPartition(t, p) for t in kafka_topics for p in partitions]

    async def _start_consumer(self, group_id: str | None, start: StartFrom, *, static: bool) -> Any:
        options = {**CONSUMER_DEFAULTS, **_pick(self._tuning, _CONSUMER_OPTIONS)}
        if group_id is not None and not static and "session_timeout_ms" not in options:
            options = {**(await self._group_timing_defaults()), **options}
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=start,
            # Co-partitioning: a step's state and recent ids are kept per
            # partition number, across its input topics (the responder joins
            # two), so one worker must own partition p of all of them. The
            # range assignor hands each member the same partition numbers of
            # every topic (all have SLUICE_PARTITIONS); round robin (aiokafka's
            # default) splits them as soon as members do not divide evenly.
            partition_assignment_strategy=(RangePartitionAssignor,),
            **options,
        )
        try:
            await self._bounded(consumer.start())
        except BaseException:
            await _quietly(consumer.stop())
            raise
        return consumer

    async def _group_timing_defaults(self) -> dict[str, int]:
        """Session and heartbeat for group members: as short as the broker allows."""
        if self._group_timing is None:
            floor = await self._broker_min_session_ms()
            session = max(_PREFERRED_SESSION_MS, floor or 0)
            self._group_timing = {
                "session_timeout_ms": session,
                "heartbeat_interval_ms": session // _HEARTBEATS_PER_SESSION,
            }
        return self._group_timing

    async def _broker_min_session_ms(self) -> int | None:
        """The broker's ``group.min.session.timeout.ms``, or None if it will not say.

        Tansu cannot parse a broker DescribeConfigs and drops the connection
        (the client reconnects); Kafka answers.
        """
        admin, _ = self._connected()
        key = "group.min.session.timeout.ms"
        try:
            cluster = await admin.describe_cluster()
            node = str(cluster["brokers"][0]["node_id"])
            resource = ConfigResource(ConfigResourceType.BROKER, node, {key: None})
            responses = await asyncio.wait_for(admin.describe_configs([resource]), 3.0)
            for response in responses:
                for res in response.resources:
                    for entry in res[4]:
                        if entry[0] == key and entry[1] is not None:
                            return int(entry[1])
        except (KafkaError, TimeoutError, LookupError, ValueError, TypeError) as exc:
            log.debug("broker at %s did not report %s: %r", self.bootstrap, key, exc)
        return None

    async def _end_offsets(
        self, tps: Sequence[KafkaTopicPartition], deadline_s: float = 5.0
    ) -> dict[KafkaTopicPartition, int]:
        """The end (high watermark) of each partition, read in a way Tansu gets right.

        Tansu answers ListOffsets(latest) with the base offset of the last
        record batch + 1, not the high watermark, so "latest" would replay the
        rest of the last batch. A fetch response carries the true high
        watermark, so a throwaway consumer reads from one before the listed
        end (on Kafka that is just the last record).
        """
        if not tps:
            return {}
        probe = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            **_pick(self._tuning, _CLIENT_OPTIONS),
        )
        try:
            # Inside the try: a start that fails (the broker away) is stopped
            # too, not left behind as an unclosed consumer on every attempt.
            await self._bounded(probe.start())
            ends: dict[KafkaTopicPartition, int] = dict(await probe.end_offsets(list(tps)))
            pending = {tp for tp, end in ends.items() if end > 0}
            probe.assign(list(pending))
            for tp in pending:
                probe.seek(tp, ends[tp] - 1)
            deadline = time.monotonic() + deadline_s
            while pending and time.monotonic() < deadline:
                batches = await probe.getmany(*pending, timeout_ms=200)
                for tp, records in batches.items():
                    if records:
                        high = probe.highwater(tp) or 0
                        ends[tp] = max(ends[tp], high, records[-1].offset + 1)
                        pending.discard(tp)
            return ends
        finally:
            await _quietly(probe.stop())

    def _forget(self, sub: KafkaSubscription) -> None:
        self._subscriptions.discard(sub)

    async def _leave_group(self, group_id: str, member_id: str, node_id: int) -> None:
        """Send LeaveGroup for a member that aiokafka would not let leave.

        Tansu numbers a group's first generation 0 where Kafka starts at 1, and
        aiokafka only leaves when ``generation > 0``. Without this, the next
        member of the group waits a whole session timeout for the ghost to
        expire, then goes through a failed sync (~4 s instead of 1 s).
        """
        client = self._client
        if client is None:
            return
        try:
            await asyncio.wait_for(
                client.send(node_id, LeaveGroupRequest(group_id, member_id)), 3.0
            )
        except (KafkaError, TimeoutError) as exc:
            log.debug("LeaveGroup for %s failed: %r", group_id, exc)


def _failed(result: object) -> bool:
    return isinstance(result, BaseException)
