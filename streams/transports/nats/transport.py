"""The NATS JetStream transport: :class:`NatsTransport`.

It owns the connection, one stream per topic (created, checked, deleted),
pipelined publishing with its acks counted per batch on one wildcard
inbox, and ``subscribe``, which builds a :class:`NatsSubscription` with
one partition reader per owned partition of each topic and, for a group,
the :class:`Ownership` that decides which partitions those are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from sluicegate.streams.dead_letters import H_REPLAY
from sluicegate.streams.transport import (
    OutMessage,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
    target_partition,
)
from sluicegate.streams.transports.nats import logs
from sluicegate.streams.transports.nats.leases import (
    OwnerBucket,
    OwnershipView,
    new_worker_id,
    read_ownership,
)
from sluicegate.streams.transports.nats.names import (
    _ERR_STREAM_NAME_IN_USE,
    _PREFIX_RE,
    NatsTuning,
    _check_topic,
    consumer_name,
    key_token,
    stream_name,
    subject_for,
)
from sluicegate.streams.transports.nats.ownership import Ownership
from sluicegate.streams.transports.nats.partitions import check_partitions, describe_partitions
from sluicegate.streams.transports.nats.reader import _PartitionReader
from sluicegate.streams.transports.nats.subscription import NatsSubscription
from sluicegate.streams.transports.nats.wire import (
    EVENT_ID_HEADER,
    MSG_ID_HEADER,
    _ack_failure,
    _can_write_commands,
    _check_size,
    _hpub,
    _PublishBatch,
    _write_command,
    encode_key,
)

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("sluicegate.streams.transports.nats")


class NatsTransport:
    name = "nats"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        partitions: int,
        worker_id: str | None = None,
        connect_options: Mapping[str, Any] | None = None,
        **tuning: Any,
    ) -> None:
        """``worker_id`` names this worker in the ownership bucket (default
        ``<host>-<pid>-<random>``); ``connect_options`` go to nats-py's
        ``connect`` as they are (credentials, TLS: ``user_credentials``,
        ``nkeys_seed``, ``user``, ``password``, ``tls``); ``tuning`` are
        :class:`NatsTuning` fields."""
        if partitions <= 0:
            raise ValueError(f"partitions must be positive, got {partitions}")
        if not _PREFIX_RE.fullmatch(prefix):
            # It is a subject token and part of stream names.
            raise ValueError(f"prefix {prefix!r} may only hold letters, digits, '_' and '-'")
        self.url = url
        self.prefix = prefix
        self.partitions = partitions
        self.tuning = NatsTuning(**tuning)
        self._connect_options = dict(connect_options or {})
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._ack_prefix = ""
        self._batches: dict[int, _PublishBatch] = {}
        self._batch_ids = itertools.count(1)
        self._last_error: BaseException | None = None
        self._valid_topics: set[str] = set()
        if worker_id is not None and key_token(worker_id) != worker_id:
            raise ValueError(f"worker_id {worker_id!r} may only hold letters, digits, '_' and '-'")
        self.worker_id = worker_id or new_worker_id()
        self._owners: OwnerBucket | None = None
        self._owners_lock = asyncio.Lock()
        self._elastic: dict[str, NatsSubscription] = {}
        # Closed with the transport: their leases are released, not left to expire.
        self._subscriptions: weakref.WeakSet[NatsSubscription] = weakref.WeakSet()

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        if self._nc is not None:
            return
        nc = Client()
        try:
            await asyncio.wait_for(self._open(nc), self.tuning.connect_timeout)
        except (TimeoutError, OSError, NatsError) as exc:
            await self._abandon(nc)
            cause = self._last_error or exc
            raise TransportError(f"cannot connect to NATS at {self.url}: {cause!r}") from exc
        js = nc.jetstream(timeout=self.tuning.api_timeout)
        try:
            await js.account_info()
        except (NatsError, TimeoutError) as exc:
            await self._abandon(nc)
            raise TransportError(f"NATS at {self.url} has no JetStream: {exc!r}") from exc
        # One wildcard inbox for all publish acks: a counter per batch is much
        # cheaper than nats-py's future per message in publish_async.
        self._ack_prefix = nc.new_inbox()
        await nc.subscribe(f"{self._ack_prefix}.*.*", cb=self._on_publish_ack)
        self._nc, self._js = nc, js

    async def _open(self, nc: Client) -> None:
        # nats-py retries an unreachable server forever during the first
        # connect; the caller's wait_for bounds it.
        await nc.connect(
            servers=[self.url],
            name=f"sluicegate-{self.prefix}",
            connect_timeout=max(1, round(self.tuning.connect_timeout)),
            max_reconnect_attempts=self.tuning.max_reconnect_attempts,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            drain_timeout=max(1, int(self.tuning.api_timeout)),
            # Every subject we use is built from a checked prefix and topic;
            # nats-py's per-publish regex checks cost ~10% of publish time.
            skip_subject_validation=True,
            **self._connect_options,
        )

    async def _abandon(self, nc: Client) -> None:
        try:
            await asyncio.wait_for(nc.close(), self.tuning.api_timeout)
        except Exception:  # already broken: nothing more to clean up
            log.debug("closing a failed NATS connection to %s", self.url, exc_info=True)

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        # During the first connect, connect() reports the last error itself,
        # in one line; logging each retry too would print it twice or more.
        if self._nc is not None:
            log.warning("NATS %s: %r", self.url, exc)

    async def _on_disconnected(self) -> None:
        if self._nc is not None:  # not while close() drains
            log.warning("NATS %s: disconnected", self.url)

    async def _on_reconnected(self) -> None:
        log.info("NATS %s: reconnected", self.url)

    def _conn(self) -> tuple[Client, JetStreamContext]:
        if self._nc is None or self._js is None or self._nc.is_closed:
            raise TransportError(f"NATS transport for {self.url} is not connected")
        return self._nc, self._js

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            if not sub.closed and self._nc is not None and not self._nc.is_closed:
                try:
                    await sub.close()
                except Exception:
                    log.warning("closing a subscription of %s failed", self.url, exc_info=True)
        self._subscriptions.clear()
        self._owners = None
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        if not nc.is_connected:
            # Reconnecting (the server is away): nothing to drain, and
            # waiting for it would only hold up a worker's shutdown.
            await self._abandon(nc)
            return
        try:
            await asyncio.wait_for(nc.drain(), self.tuning.api_timeout + 1)
        except Exception:
            log.debug("draining NATS %s failed; closing", self.url, exc_info=True)
            await self._abandon(nc)

    # -- topics -------------------------------------------------------------

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        await asyncio.gather(*(self._ensure_stream(t) for t in dict.fromkeys(topics)))

    async def delete_topics(self, topics: Iterable[str]) -> None:
        _, js = self._conn()
        for topic in dict.fromkeys(topics):
            name = stream_name(self.prefix, topic)
            try:
                await js.delete_stream(name)
            except NotFoundError:
                continue
            except (NatsError, TimeoutError) as exc:
                raise TransportError(f"cannot delete stream {name} ({topic!r}): {exc}") from exc

    async def log_ids(self, topics: Sequence[str]) -> dict[str, str]:
        _, js = self._conn()
        return await logs.log_ids(js, self.prefix, topics)

    async def log_ends(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        _, js = self._conn()
        return await logs.log_ends(js, self.prefix, tps)

    def _stream_config(self, topic: str) -> StreamConfig:
        t = self.tuning
        return StreamConfig(
            name=stream_name(self.prefix, topic),
            subjects=[f"{self.prefix}.{topic}.*"],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            storage=StorageType.MEMORY if t.storage == "memory" else StorageType.FILE,
            num_replicas=t.replicas,
            duplicate_window=t.duplicate_window,
            max_msg_size=t.max_msg_size,
            max_age=t.max_age,
            max_bytes=t.max_bytes,
            # JetStream has no partitions: the count lives here, so a worker or
            # publisher configured with another count is refused (partitions.py).
            description=describe_partitions(topic, self.partitions),
        )

    async def _ensure_stream(self, topic: str) -> None:
        _check_topic(topic)
        _, js = self._conn()
        name = stream_name(self.prefix, topic)
        for attempt in (1, 2):
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                pass
            except (NatsError, TimeoutError) as exc:
                raise TransportError(f"cannot look up stream {name} ({topic!r}): {exc}") from exc
            else:
                check_partitions(info.config.description, name, topic, self.partitions)
                return
            if attempt == 2:
                break
            try:
                await js.add_stream(self._stream_config(topic))
                return
            except APIError as exc:
                # Another worker won the race: look at what it created.
                if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                    raise TransportError(f"cannot create stream {name} ({topic!r}): {exc}") from exc
            except (NatsError, TimeoutError) as exc:
                raise TransportError(f"cannot create stream {name} ({topic!r}): {exc}") from exc
        raise TransportError(f"stream {name} ({topic!r}) was created and is gone again")

    # -- publishing ---------------------------------------------------------

    def _subject(self, message: OutMessage) -> str:
        if message.topic not in self._valid_topics:
            # Subjects go out unvalidated by nats-py: a space would break the protocol.
            _check_topic(message.topic)
            self._valid_topics.add(message.topic)
        return f"{self.prefix}.{message.topic}.{target_partition(message, self.partitions)}"

    @staticmethod
    def _wire_headers(message: OutMessage) -> dict[str, str]:
        headers = dict(message.headers) if message.headers else {}
        if message.key is not None:
            name, value = encode_key(message.key)
            headers[name] = value
        event_id = headers.get(EVENT_ID_HEADER)
        if event_id:
            # Deterministic event ids make re-produced outputs duplicates; a
            # replayed dead letter is a new message on purpose.
            replay = headers.get(H_REPLAY)
            headers[MSG_ID_HEADER] = f"{event_id}~{replay}" if replay else event_id
        return headers

    async def publish(self, message: OutMessage) -> None:
        await self.publish_batch([message])

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        if not messages:
            return
        nc, _ = self._conn()
        batch_id = next(self._batch_ids)
        batch = _PublishBatch(messages)
        self._batches[batch_id] = batch
        try:
            await self._send_batch(nc, batch, f"{self._ack_prefix}.{batch_id}.")
            await batch.wait_until(0, self.tuning.publish_ack_timeout)
        except NatsError as exc:
            raise TransportError(
                f"publish to topic {messages[0].topic!r} via {self.url} failed: {exc!r}"
            ) from exc
        finally:
            del self._batches[batch_id]
        if batch.error is not None:
            raise TransportError(batch.error)

    async def _send_batch(self, nc: Client, batch: _PublishBatch, reply_prefix: str) -> None:
        t = self.tuning
        max_payload = nc.max_payload
        fast = t.fast_publish and _can_write_commands(nc)
        for index, message in enumerate(batch.messages):
            # A full window drains to half before sending resumes, so each
            # wake-up sends a burst instead of one message per ack.
            if batch.in_flight >= t.publish_window:
                await batch.wait_until(t.publish_window // 2, t.publish_ack_timeout)
            elif batch.in_flight_bytes >= t.publish_window_bytes and batch.in_flight > 0:
                await batch.wait_until(batch.in_flight // 2, t.publish_ack_timeout)
            if batch.error is not None:
                return
            headers = self._wire_headers(message)
            if len(message.value) > max_payload // 2:  # headers alone are never that big
                _check_size(message, headers, max_payload)
            batch.on_sent(len(message.value))
            # Core publish with a reply subject is a JetStream publish; the
            # stream answers on the reply, which our wildcard inbox counts.
            subject, reply = self._subject(message), f"{reply_prefix}{index}"
            if fast and nc.is_connected and not nc.is_draining_pubs:
                await _write_command(nc, _hpub(subject, reply, headers, message.value))
            else:  # reconnecting or draining: nats-py's own checks apply
                await nc.publish(subject, message.value, reply=reply, headers=headers)

    async def _on_publish_ack(self, msg: Msg) -> None:
        batch_token, _, index_token = msg.subject[len(self._ack_prefix) + 1 :].partition(".")
        batch = self._batches.get(int(batch_token))
        if batch is None:
            return  # the batch already failed or timed out
        # Success acks have neither headers nor an "error" member: skip parsing them.
        failure = None if not msg.headers and b'"error"' not in msg.data else _ack_failure(msg)
        batch.on_ack(int(index_token), failure)

    # -- consuming ----------------------------------------------------------

    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        group: str | None,
        partitions: Sequence[int] | None = None,
        start: StartFrom = "earliest",
        on_assign: PartitionsCallback | None = None,
        on_revoke: PartitionsCallback | None = None,
    ) -> NatsSubscription:
        """Consume ``topics``; see :meth:`streams.transport.Transport.subscribe`.

        A group without ``partitions`` shares the partitions with the other
        workers of the group through leases (ownership.py): this returns once
        this worker took the share that was free, and partitions come and go
        later, each through ``on_assign``/``on_revoke``. With ``partitions``
        the worker claims exactly those, refusing to start (TransportError)
        when a live worker holds one. Observers (``group=None``) take no lease.
        """
        nc, js = self._conn()
        topics = list(dict.fromkeys(topics))
        for topic in topics:
            _check_topic(topic)
        static = None if partitions is None else list(dict.fromkeys(partitions))
        for p in static or ():
            if not 0 <= p < self.partitions:
                raise TransportError(f"partition {p} is outside 0..{self.partitions - 1}")
        if group is not None and static is None:
            existing = self._elastic.get(group)
            if existing is not None and not existing.closed:
                raise TransportError(
                    f"group {group!r} already has a subscription in worker {self.worker_id}"
                )
        observer_id = uuid.uuid4().hex[:12]

        def new_reader(sub: NatsSubscription, tp: TopicPartition) -> _PartitionReader:
            return _PartitionReader(
                sub,
                tp,
                stream=stream_name(self.prefix, tp.topic),
                subject=subject_for(self.prefix, tp.topic, tp.partition),
                consumer=(
                    consumer_name(group, tp.partition)
                    if group
                    else f"obs-{observer_id}-p{tp.partition}"
                ),
            )

        sub = NatsSubscription(
            nc, js, self.tuning, group, topics=topics, start=start, new_reader=new_reader
        )
        sub.on_assign, sub.on_revoke = on_assign, on_revoke
        try:
            if group is None:
                await sub.assign(range(self.partitions) if static is None else static)
            else:
                sub.ownership = Ownership(
                    await self._owner_bucket(),
                    sub,
                    group=group,
                    partitions=self.partitions,
                    static=static,
                    worker=self.worker_id,
                    tuning=self.tuning,
                )
                if static is None:
                    self._elastic[group] = sub
                await sub.ownership.start()
        except BaseException:
            await sub.close()
            raise
        self._subscriptions.add(sub)
        return sub

    async def _owner_bucket(self) -> OwnerBucket:
        async with self._owners_lock:
            if self._owners is None:
                nc, js = self._conn()
                bucket = OwnerBucket(nc, js, self.prefix, self.tuning)
                await bucket.open()
                self._owners = bucket
            return self._owners

    async def ownership(self) -> OwnershipView:
        """The live workers and who holds which partition, for ``sluice status``."""
        nc, _ = self._conn()
        return await read_ownership(nc, self.prefix, timeout=self.tuning.api_timeout)
