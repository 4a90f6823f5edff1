"""Kafka transport on aiokafka: topics, producing, consumer groups, observers.

It owns the mapping of the ``Transport`` contract onto the Kafka protocol:

- a logical topic ``name`` is the Kafka topic ``<prefix>.<name>``, created with
  exactly ``partitions`` partitions; a consumer group ``g`` is the Kafka group
  ``<prefix>.<g>``, so one prefix namespaces a whole deployment (and a test);
- we pick the partition ourselves with :func:`streams.partitioning.partition_for`
  and pass it explicitly, so a key lands on the same partition number as on NATS;
- ``publish_batch`` builds one record batch per partition and pipelines them;
- group subscriptions commit manually (``offset + 1`` per partition), static
  ones (``partitions=``) assign and still use the group's committed offsets,
  observers (``group=None``) assign everything and never commit.

It is tuned for, and tested against, both Apache Kafka and the Tansu broker of
the local stack; the Tansu quirks it works around are noted where they bite.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from aiokafka import (
    AIOKafkaClient,
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
)
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import ConsumerStoppedError, KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

from streams.partitioning import partition_for
from streams.transport import (
    Message,
    OutMessage,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
)

log = logging.getLogger(__name__)

# Kafka error codes we accept from CreateTopics.
_NO_ERROR: Final = 0
_TOPIC_ALREADY_EXISTS: Final = 36

# Records are batched per partition up to this size. 128-256 KiB measured best
# on Tansu (16 KiB, aiokafka's default, is half as fast); it stays well under
# Kafka's default 1 MiB ``message.max.bytes``, which a batch must not exceed.
_BATCH_BYTES: Final = 256 * 1024

PRODUCER_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        # The runner checkpoints to Postgres only after the broker acked its
        # outputs, so an ack must mean "replicated": acks=all. On a single
        # broker (Tansu, compose) it costs nothing measurable.
        "acks": "all",
        # Tansu answers InitProducerId with an error, so idempotence is off by
        # default. aiokafka keeps one request in flight per partition, so a
        # retry can duplicate but never reorder; duplicates carry the same
        # event ids, which the next step absorbs. Pass
        # enable_idempotence=True against real Kafka to avoid them.
        "enable_idempotence": False,
        "max_batch_size": _BATCH_BYTES,
        # publish_batch sends closed batches, which never linger; a single
        # publish() is awaited on its own, so lingering would only add latency.
        "linger_ms": 0,
    }
)

CONSUMER_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        # When a partition has nothing new, answer within 100 ms rather than
        # aiokafka's 500 ms, so a fetch(timeout) near its deadline still sees
        # messages that arrive meanwhile.
        "fetch_max_wait_ms": 100,
        # Fetch sizes barely matter here: consuming is bound by aiokafka's
        # per-record Python cost, not by round trips (see the micro benchmark).
        "max_partition_fetch_bytes": 1024 * 1024,
    }
)

# Group membership timing. Tansu holds a JoinGroup for about half the session
# timeout (at least 1 s), so a short session makes joins fast: 2 s gives 1 s
# joins, Kafka's usual 10 s would give 5 s. A session shorter than the broker's
# ``group.min.session.timeout.ms`` (6 s on Apache Kafka) is refused, so we ask
# the broker for that floor first. Heartbeats go every quarter session.
_PREFERRED_SESSION_MS: Final = 2000
_HEARTBEATS_PER_SESSION: Final = 4

_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})

# (logical topic, partition): a plain tuple, since hashing the TopicPartition
# dataclass per message is measurable on the hot paths.
_Slot = tuple[str, int]


def _parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls).parameters)


# Options that aiokafka's classes take from us, never from tuning.
_OURS: Final = frozenset(
    {"topics", "loop", "bootstrap_servers", "group_id", "enable_auto_commit", "auto_offset_reset"}
)
_PRODUCER_OPTIONS: Final = _parameters(AIOKafkaProducer) - _OURS
_CONSUMER_OPTIONS: Final = _parameters(AIOKafkaConsumer) - _OURS
_ADMIN_OPTIONS: Final = _parameters(AIOKafkaAdminClient) - _OURS
_CLIENT_OPTIONS: Final = _parameters(AIOKafkaClient) - _OURS


def _pick(options: Mapping[str, Any], accepted: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in accepted}


def _check_tuning(tuning: Mapping[str, Any]) -> None:
    known = _PRODUCER_OPTIONS | _CONSUMER_OPTIONS | _ADMIN_OPTIONS
    unknown = sorted(set(tuning) - known)
    if unknown:
        raise TypeError(f"unknown Kafka tuning option(s): {', '.join(unknown)}")


def _encode_headers(headers: Mapping[str, str] | None) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    return [(k, v.encode()) for k, v in headers.items()]


class _Headers(Mapping[str, str]):
    """A record's headers, decoded on first access.

    Decoding every header of every record up front costs more than building
    the Message itself, and most consumers never look at most headers.
    """

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: Sequence[tuple[str, bytes | None]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        if self._decoded is None:
            try:
                self._decoded = {k: v.decode() for k, v in self._raw if v is not None}
            except UnicodeDecodeError:
                # Headers are advisory (the body is the event): a foreign
                # producer's undecodable header must not fail the consumer.
                self._decoded = {
                    k: v.decode(errors="replace") for k, v in self._raw if v is not None
                }
        return self._decoded

    def __getitem__(self, key: str) -> str:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def __repr__(self) -> str:
        return repr(self._dict())


def _error(what: str, exc: BaseException) -> TransportError:
    # aiokafka's errors already start with their class name.
    detail = str(exc) if isinstance(exc, KafkaError) else f"{type(exc).__name__}: {exc}"
    return TransportError(f"{what}: {detail}")


class _Names:
    """Logical names <-> Kafka names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self._head = f"{prefix}."
        self._logical: dict[str, str] = {}

    def kafka(self, logical: str) -> str:
        return self._head + logical

    def group(self, group: str) -> str:
        return self._head + group

    def logical(self, kafka_topic: str) -> str:
        name = self._logical.get(kafka_topic)
        if name is None:
            name = kafka_topic.removeprefix(self._head)
            self._logical[kafka_topic] = name
        return name

    def kafka_tp(self, tp: TopicPartition) -> KafkaTopicPartition:
        return KafkaTopicPartition(self.kafka(tp.topic), tp.partition)

    def logical_tps(self, tps: Iterable[Any]) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(self.logical(tp.topic), tp.partition) for tp in tps)


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
                    f"topic {name!r} has {len(parts)} partitions, this transport uses "
                    f"{self.partitions}"
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
            slot = (m.topic, self._partition_of(m))
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

    def _partition_of(self, message: OutMessage) -> int:
        if message.partition is None:
            return partition_for(message.key, self.partitions)
        if not 0 <= message.partition < self.partitions:
            raise TransportError(
                f"topic {message.topic!r} has no partition {message.partition} "
                f"(it has {self.partitions})"
            )
        return message.partition

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
        await self._bounded(probe.start())
        try:
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


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Positions newly assigned partitions, then awaits the runner's callbacks.

    aiokafka logs and swallows listener exceptions; a failed checkpoint load
    must instead stop the runner before it processes those partitions, so the
    first failure is kept and raised by the next fetch.
    """

    def __init__(
        self,
        names: _Names,
        position: Callable[[Sequence[KafkaTopicPartition]], Awaitable[None]] | None,
        on_assign: PartitionsCallback | None,
        on_revoke: PartitionsCallback | None,
    ) -> None:
        self._names = names
        self._position = position
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self.assigned = asyncio.Event()
        self.error: BaseException | None = None

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        tps = self._names.logical_tps(revoked)
        if tps and self._on_revoke is not None:
            await self._guarded(self._on_revoke(tps))

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        owned = list(assigned)
        if owned and self._position is not None:
            await self._guarded(self._position(owned))
        tps = self._names.logical_tps(owned)
        if tps and self._on_assign is not None and self.error is None:
            await self._guarded(self._on_assign(tps))
        self.assigned.set()

    async def _guarded(self, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            self.error = self.error or exc


class KafkaSubscription:
    """One aiokafka consumer: a group member, a static owner, or an observer."""

    def __init__(self, transport: KafkaTransport, consumer: Any, group_id: str | None) -> None:
        self._transport = transport
        self._names = transport._names
        self._consumer = consumer
        self._group_id = group_id
        self._listener: _Rebalance | None = None
        self._closed = False

    async def _join(
        self,
        kafka_topics: Sequence[str],
        start: StartFrom,
        on_assign: PartitionsCallback | None,
        on_revoke: PartitionsCallback | None,
        timeout: float,
    ) -> None:
        """Join the group and wait for the first assignment (and its on_assign)."""
        position = self._position_latest if start == "latest" else None
        listener = self._listener = _Rebalance(self._names, position, on_assign, on_revoke)
        self._consumer.subscribe(list(kafka_topics), listener=listener)
        deadline = time.monotonic() + timeout
        while not listener.assigned.is_set():
            self._raise_join_error()
            if time.monotonic() > deadline:
                raise TransportError(f"{self._describe()} got no assignment within {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.assigned.wait(), 0.1)
        self._raise_callback_error()

    def _raise_join_error(self) -> None:
        """Surface a failed join (say, a session timeout the broker refuses) now.

        aiokafka parks such errors until the next getmany, which we must not
        call before the first assignment; its coordinator's check_errors is
        the only other way to see them (an internal, pinned with aiokafka 0.14).
        """
        check = getattr(getattr(self._consumer, "_coordinator", None), "check_errors", None)
        if check is None:
            return
        try:
            check()
        except KafkaError as exc:
            raise _error(f"joining {self._describe()}", exc) from exc

    async def _assign(
        self,
        owned: Sequence[KafkaTopicPartition],
        start: StartFrom,
        on_assign: PartitionsCallback | None,
    ) -> None:
        """Own ``owned`` statically, positioned (committed offset, else ``start``) on return."""
        self._consumer.assign(list(owned))
        # Resolving positions now makes start="latest" mean "latest at
        # subscribe()", not "latest at the first fetch".
        try:
            if start == "latest":
                await self._position_latest(owned)
            await asyncio.gather(*(self._consumer.position(tp) for tp in owned))
        except KafkaError as exc:
            raise _error(f"positioning {self._describe()}", exc) from exc
        if on_assign is not None:
            await on_assign(self._names.logical_tps(owned))

    async def _position_latest(self, owned: Sequence[KafkaTopicPartition]) -> None:
        """Put partitions without a committed offset at their true end.

        aiokafka would reset them with ListOffsets(latest), which Tansu gets
        wrong (see KafkaTransport._end_offsets).
        """
        ends = await self._transport._end_offsets(await self._uncommitted(owned))
        for tp, end in ends.items():
            self._consumer.seek(tp, end)

    async def _uncommitted(self, owned: Sequence[KafkaTopicPartition]) -> list[KafkaTopicPartition]:
        if self._group_id is None:
            return list(owned)
        committed = await asyncio.gather(*(self._consumer.committed(tp) for tp in owned))
        return [tp for tp, off in zip(owned, committed, strict=True) if off is None]

    async def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        self._check_open()
        self._raise_callback_error()
        if max_messages <= 0:
            return []
        try:
            batches = await self._consumer.getmany(
                timeout_ms=max(0, int(timeout * 1000)), max_records=max_messages
            )
        except (KafkaError, ConsumerStoppedError) as exc:
            raise _error(f"fetching for {self._describe()}", exc) from exc
        self._raise_callback_error()
        return self._messages(batches)

    def _messages(self, batches: Mapping[Any, Sequence[Any]]) -> list[Message]:
        """aiokafka records -> Messages, partition by partition (so in offset order)."""
        # The hot loop of consuming: a list comprehension with local names is
        # measurably faster than a generator fed to extend().
        message, lazy, none, logical = Message, _Headers, _NO_HEADERS, self._names.logical
        out: list[Message] = []
        for ktp, records in batches.items():
            topic = logical(ktp.topic)
            out += [
                message(
                    topic,
                    r.partition,
                    r.offset,
                    r.key,
                    b"" if r.value is None else r.value,
                    lazy(r.headers) if r.headers else none,
                    r.timestamp,
                )
                for r in records
            ]
        return out

    async def commit(self, messages: Sequence[Message]) -> None:
        self._check_open()
        if self._group_id is None or not messages:
            return  # observers never move a group's offsets
        highest: dict[tuple[str, int], int] = {}
        for m in messages:
            key = (m.topic, m.partition)
            if m.offset > highest.get(key, -1):
                highest[key] = m.offset
        kafka = self._names.kafka
        offsets = {KafkaTopicPartition(kafka(t), p): off + 1 for (t, p), off in highest.items()}
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:
            raise _error(f"committing {sorted(highest)} for {self._describe()}", exc) from exc

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check_open()
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if tp not in self.assignment():
            raise TransportError(f"{tp} is not assigned to {self._describe()}")
        self._consumer.seek(self._names.kafka_tp(tp), offset)

    def assignment(self) -> frozenset[TopicPartition]:
        if self._closed:
            return frozenset()
        return self._names.logical_tps(self._consumer.assignment())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport._forget(self)
        ghost = self._generation_zero_member()
        await _quietly(self._consumer.stop())
        if ghost is not None:
            await self._transport._leave_group(*ghost)

    def _generation_zero_member(self) -> tuple[str, str, int] | None:
        """(group, member, coordinator) when aiokafka will skip LeaveGroup (see _leave_group).

        Reads aiokafka internals (pinned 0.14); if they change it returns None
        and we are back to waiting out the session timeout.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", None)
        member_id = getattr(coordinator, "member_id", None)
        node_id = getattr(coordinator, "coordinator_id", None)
        if self._group_id is None or self._listener is None:
            return None
        if generation == 0 and member_id and isinstance(node_id, int):
            return self._group_id, str(member_id), node_id
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"subscription of {self._describe()} is closed")

    def _raise_callback_error(self) -> None:
        """Re-raise (on every call) the first exception of a rebalance callback."""
        listener = self._listener
        if listener is not None and listener.error is not None:
            raise listener.error

    def _describe(self) -> str:
        who = f"group {self._group_id!r}" if self._group_id else "an observer"
        return f"{who} on {self._transport.bootstrap}"


def _failed(result: object) -> bool:
    return isinstance(result, BaseException)


async def _quietly(closing: Any) -> None:
    """Await a stop/close, logging rather than raising: used on cleanup paths."""
    try:
        await closing
    except Exception as exc:
        log.debug("ignored error while closing a Kafka client: %r", exc)
