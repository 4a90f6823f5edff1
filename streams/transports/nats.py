"""NATS JetStream transport.

This module owns everything sluicegate does on NATS: one JetStream stream per
logical topic (``<prefix>_<topic>``, dots become ``_``) holding the subjects
``<prefix>.<topic>.<partition>``; pipelined publishing with broker acks; and
consumption through one pull consumer per owned partition, durable per
(group, partition) with AckAll, or ephemeral with AckNone for observers.

NATS has no message keys, no consumer groups and no rebalancing, so:

- the key travels in a header (``sluice-key``, or ``sluice-key-b64`` when it is
  not printable text) and the partition comes from
  :func:`streams.partitioning.partition_for`, the same function Kafka uses;
- ``Nats-Msg-Id`` is the event id (header ``ce_id``), so JetStream's duplicate
  window absorbs outputs that a replayed step produces again;
- partitions are owned statically (``partitions=``), and a new subscription of
  a group resets each durable to just after its ack floor, so whatever a
  crashed worker fetched and never committed comes back at once instead of
  after ``ack_wait``.

Offsets are JetStream stream sequences: they grow within a partition but are
shared by all partitions of a topic, so they have gaps.

Throughput is bound by nats-py's per-message Python cost, so both paths
avoid its slow spots (benchmarks/nats_transport_micro.py measures them):

- publishing sends each message as a core publish with a reply subject under
  one wildcard inbox and counts the acks per batch, in a bounded window,
  instead of a future per message (``js.publish_async``); the HPUB command is
  built here, because nats-py's header encoding costs more than the rest of a
  publish (``fast_publish``; it uses nats-py internals, pinned at 2.16);
- fetching keeps one pull request per owned partition in flight, raw on
  ``$JS.API.CONSUMER.MSG.NEXT``, into one inbox subscription per partition,
  and prefetches the next batch while the caller works on the current one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import logging
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscriptionHandle
from nats.errors import Error as NatsError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

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

KEY_HEADER = "sluice-key"
KEY_B64_HEADER = "sluice-key-b64"
MSG_ID_HEADER = "Nats-Msg-Id"
EVENT_ID_HEADER = "ce_id"
_STATUS_HEADER = "Status"
_DESCRIPTION_HEADER = "Description"
# Headers the server or this module adds; never shown to consumers.
_NATS_HEADER_PREFIX = "Nats-"

# JetStream API error codes we act on.
_ERR_STREAM_NAME_IN_USE = 10058
_ERR_STREAM_NOT_FOUND = 10059

_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]+")
# What nats-py accepts as a header name (an HTTP token).
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES_TO_SPACES = str.maketrans({"\r": " ", "\n": " "})
_CONSUMER_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

# The reply subject of a JetStream delivery carries its metadata:
#   $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>       (9 tokens)
#   $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<x>
_V1_ACK_TOKENS = 9
_REFUSED_PULL_BACKOFF = 0.5


@dataclass(frozen=True, slots=True)
class NatsTuning:
    """Knobs of :class:`NatsTransport`, passed as keyword arguments.

    Sizes in bytes, durations in seconds.
    """

    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    duplicate_window: float = 120.0
    # 1 MiB events plus headers. The server's own ``max_payload`` (1 MiB by
    # default) must be raised to match for events that large.
    max_msg_size: int = 1024 * 1024 + 64 * 1024
    max_age: float = 0.0  # 0 keeps messages until the limits below remove them
    max_bytes: int = -1
    # Publishing: acks outstanding at once, per publish_batch call.
    publish_window: int = 4096
    publish_window_bytes: int = 32 * 1024 * 1024
    # A batch fails when no ack at all arrived for this long.
    publish_ack_timeout: float = 10.0
    # Write HPUB commands straight into nats-py's output buffer (see _hpub).
    fast_publish: bool = True
    api_timeout: float = 5.0
    connect_timeout: float = 5.0
    max_reconnect_attempts: int = 60
    # Consuming. ack_wait only matters for a worker that hangs without closing:
    # a new subscription resets the durable and redelivers at once.
    ack_wait: float = 120.0
    max_ack_pending: int = 65536
    pull_expires: float = 5.0
    fetch_max_bytes: int = 16 * 1024 * 1024
    # How long fetch keeps waiting for a batch the server says is on its way.
    fill_wait: float = 0.05
    observer_inactive_threshold: float = 60.0

    def __post_init__(self) -> None:
        if self.storage not in ("file", "memory"):
            raise ValueError(f"storage must be 'file' or 'memory', got {self.storage!r}")
        if self.publish_window < 2 or self.publish_window_bytes <= 0:
            raise ValueError("publish_window must be at least 2 and publish_window_bytes positive")
        if self.pull_expires <= 0 or self.fetch_max_bytes <= 0:
            raise ValueError("pull_expires and fetch_max_bytes must be positive")


def stream_name(prefix: str, topic: str) -> str:
    return f"{prefix}_{topic}".replace(".", "_")


def subject_for(prefix: str, topic: str, partition: int) -> str:
    return f"{prefix}.{topic}.{partition}"


def consumer_name(group: str, partition: int) -> str:
    return f"{_CONSUMER_UNSAFE.sub('_', group)}-p{partition}"


# Keys are sessions, which repeat: memoise like partition_for does.
@functools.lru_cache(maxsize=65536)
def encode_key(key: bytes) -> tuple[str, str]:
    """The header carrying ``key``: plain text when it survives NATS headers intact."""
    try:
        text = key.decode()
    except UnicodeDecodeError:
        text = ""
    else:
        # nats-py strips values and folds CR/LF, so only keep clean text as is.
        if text and text == text.strip() and text.isprintable():
            return KEY_HEADER, text
    return KEY_B64_HEADER, base64.b64encode(key).decode()


def split_headers(raw: dict[str, str] | None) -> tuple[bytes | None, dict[str, str]]:
    """Take the key out of ``raw`` and return it with what a consumer should see.

    ``raw`` is changed in place: nats-py builds a fresh dict per message, and
    not copying it is a measurable part of the per-message cost.
    """
    if not raw:
        return None, {}
    text = raw.pop(KEY_HEADER, None)
    key = None if text is None else text.encode()
    if KEY_B64_HEADER in raw:
        key = base64.b64decode(raw.pop(KEY_B64_HEADER))
    raw.pop(MSG_ID_HEADER, None)
    internal = [name for name in raw if name.startswith(_NATS_HEADER_PREFIX)]
    for name in internal:
        del raw[name]
    return key, raw


def _check_topic(topic: str) -> None:
    if not _TOPIC_RE.fullmatch(topic):
        raise TransportError(f"topic {topic!r} is not a valid NATS subject token sequence")


def _check_size(message: OutMessage, headers: Mapping[str, str], max_payload: int) -> None:
    """Refuse what the server would refuse by closing the connection.

    nats-py only compares the body with ``max_payload``, but the server counts
    headers too, drops the connection, and nats-py resends the same message
    after reconnecting.
    """
    header_bytes = 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
    size = len(message.value) + header_bytes
    if size > max_payload:
        raise TransportError(
            f"message for topic {message.topic!r} is {size} bytes with headers, over the "
            f"server's max_payload of {max_payload}"
        )


@functools.lru_cache(maxsize=4096)
def _header_name_ok(name: str) -> bool:
    return _HEADER_NAME_RE.fullmatch(name) is not None


def _hpub(subject: str, reply: str, headers: Mapping[str, str], payload: bytes) -> bytes:
    """The HPUB protocol command nats-py would write for this message, built faster.

    nats-py 2.16 runs ``str.translate`` over every header value to fold CR/LF,
    which costs ~3 us per header, more than the rest of a publish. Header
    values rarely hold CR/LF, so only those that do are translated; names are
    checked once each (they repeat). The result is byte-for-byte what
    ``Client.publish`` sends: values stripped, CR/LF replaced by spaces.
    """
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if not _header_name_ok(name):
            raise TransportError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES_TO_SPACES)
        lines.append(f"{name}: {value.strip()}\r\n")
    lines.append("\r\n")
    block = "".join(lines).encode()
    head = f"HPUB {subject} {reply} {len(block)} {len(block) + len(payload)}\r\n".encode()
    return head + block + payload + b"\r\n"


def _status_of(msg: Msg) -> str | None:
    return msg.headers.get(_STATUS_HEADER) if msg.headers else None


def _ack_failure(msg: Msg) -> str | None:
    """Why a JetStream publish ack reports a failure, or None for success."""
    status = _status_of(msg)
    if status == "503":
        return "no stream listens on its subject (was the topic created?)"
    if status is not None:
        return f"status {status} {msg.headers.get(_DESCRIPTION_HEADER, '') if msg.headers else ''}"
    if b'"error"' not in msg.data:
        return None
    try:
        error = orjson.loads(msg.data)["error"]
        return f"{error.get('description', error)} (code {error.get('err_code')})"
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return msg.data.decode(errors="replace")


def _can_write_commands(nc: Client) -> bool:
    """Whether this nats-py has the internals :func:`_write_command` uses (2.16 does)."""
    return all(hasattr(nc, a) for a in ("_send_command", "_flush_pending", "_flush_queue"))


async def _write_command(nc: Client, command: bytes) -> None:
    """Queue a protocol command as ``Client._send_publish`` does, and kick the flusher."""
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(command)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


class _PublishBatch:
    """The acks outstanding for one ``publish_batch`` call."""

    def __init__(self, messages: Sequence[OutMessage]) -> None:
        self.messages = messages
        self.sent = 0
        self.acked = 0
        self.in_flight_bytes = 0
        self.error: str | None = None
        self._wake_at = -1
        self._wake = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked

    def on_sent(self, size: int) -> None:
        self.sent += 1
        self.in_flight_bytes += size

    def on_ack(self, index: int, failure: str | None) -> None:
        self.acked += 1
        self.in_flight_bytes -= len(self.messages[index].value)
        if failure is not None and self.error is None:
            topic = self.messages[index].topic
            self.error = f"publish to topic {topic!r} failed: {failure}"
        if self.in_flight <= self._wake_at or self.error is not None:
            self._wake.set()

    async def wait_until(self, in_flight: int, timeout: float) -> None:
        """Wait until at most ``in_flight`` acks are outstanding; fail if acks stop coming."""
        while self.in_flight > in_flight and self.error is None:
            self._wake_at = in_flight
            self._wake.clear()
            acked_before = self.acked
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                if self.acked == acked_before:
                    topics = sorted({m.topic for m in self.messages})
                    self.error = (
                        f"no publish ack from NATS for {timeout}s "
                        f"({self.in_flight} outstanding, topics {topics})"
                    )
        self._wake_at = -1


# What commit needs of a fetched message: the generation of the consumer that
# delivered it and its ack subject. A plain tuple: it is built per message.
_AckHandle = tuple[int, str]


class NatsTransport:
    name = "nats"

    def __init__(self, url: str, *, prefix: str, partitions: int, **tuning: Any) -> None:
        if partitions <= 0:
            raise ValueError(f"partitions must be positive, got {partitions}")
        if not _PREFIX_RE.fullmatch(prefix):
            # It is a subject token and part of stream names.
            raise ValueError(f"prefix {prefix!r} may only hold letters, digits, '_' and '-'")
        self.url = url
        self.prefix = prefix
        self.partitions = partitions
        self.tuning = NatsTuning(**tuning)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._ack_prefix = ""
        self._batches: dict[int, _PublishBatch] = {}
        self._batch_ids = itertools.count(1)
        self._last_error: BaseException | None = None
        self._valid_topics: set[str] = set()

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
        )

    async def _abandon(self, nc: Client) -> None:
        try:
            await asyncio.wait_for(nc.close(), self.tuning.api_timeout)
        except Exception:  # already broken: nothing more to clean up
            log.debug("closing a failed NATS connection to %s", self.url, exc_info=True)

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
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
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
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
        )

    async def _ensure_stream(self, topic: str) -> None:
        _check_topic(topic)
        _, js = self._conn()
        name = stream_name(self.prefix, topic)
        try:
            await js.stream_info(name)
            return
        except NotFoundError:
            pass
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot look up stream {name} ({topic!r}): {exc}") from exc
        try:
            await js.add_stream(self._stream_config(topic))
        except APIError as exc:
            if exc.err_code != _ERR_STREAM_NAME_IN_USE:  # else another worker won the race
                raise TransportError(f"cannot create stream {name} ({topic!r}): {exc}") from exc
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot create stream {name} ({topic!r}): {exc}") from exc

    # -- publishing ---------------------------------------------------------

    def _subject(self, message: OutMessage) -> str:
        if message.topic not in self._valid_topics:
            # Subjects go out unvalidated by nats-py: a space would break the protocol.
            _check_topic(message.topic)
            self._valid_topics.add(message.topic)
        p = message.partition
        if p is None:
            p = partition_for(message.key, self.partitions)
        elif not 0 <= p < self.partitions:
            raise TransportError(
                f"partition {p} of topic {message.topic!r} is outside 0..{self.partitions - 1}"
            )
        return f"{self.prefix}.{message.topic}.{p}"

    @staticmethod
    def _wire_headers(message: OutMessage) -> dict[str, str]:
        headers = dict(message.headers) if message.headers else {}
        if message.key is not None:
            name, value = encode_key(message.key)
            headers[name] = value
        event_id = headers.get(EVENT_ID_HEADER)
        if event_id:
            # Deterministic event ids make re-produced outputs duplicates.
            headers[MSG_ID_HEADER] = event_id
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
        nc, js = self._conn()
        owned = range(self.partitions) if partitions is None else list(dict.fromkeys(partitions))
        topics = list(dict.fromkeys(topics))
        for p in owned:
            if not 0 <= p < self.partitions:
                raise TransportError(f"partition {p} is outside 0..{self.partitions - 1}")
        for topic in topics:
            _check_topic(topic)
        sub = NatsSubscription(nc, js, self.tuning, group)
        observer_id = uuid.uuid4().hex[:12]
        readers = [
            _PartitionReader(
                sub,
                TopicPartition(topic, p),
                stream=stream_name(self.prefix, topic),
                subject=subject_for(self.prefix, topic, p),
                consumer=consumer_name(group, p) if group else f"obs-{observer_id}-p{p}",
            )
            for topic in topics
            for p in owned
        ]
        try:
            await asyncio.gather(*(r.open(start) for r in readers))
            if on_assign is not None:
                await on_assign(sub.assignment())
        except BaseException:
            await sub.close()
            raise
        sub.on_revoke = on_revoke  # only partitions that were assigned get revoked
        return sub


class NatsSubscription:
    """Batches from the owned partitions, each pulled through its own consumer."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        tuning: NatsTuning,
        group: str | None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.tuning = tuning
        self.group = group
        self.on_revoke: PartitionsCallback | None = None
        self._readers: dict[TopicPartition, _PartitionReader] = {}
        self._order: list[_PartitionReader] = []
        self._next = 0  # round-robin start, so no partition starves
        self._closed = False
        # Set by readers whenever a message or the end of a pull request arrives.
        self.wake = asyncio.Event()

    def add(self, reader: _PartitionReader) -> None:
        self._readers[reader.tp] = reader
        self._order.append(reader)

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._readers)

    # -- fetch --------------------------------------------------------------

    def _buffered(self) -> int:
        return sum(len(r.buffer) for r in self._order)

    def _more_coming(self) -> bool:
        return any(r.more_coming() for r in self._order)

    async def _pull(self, max_messages: int) -> None:
        """Give every partition without a live pull request one, sized to what fetch lacks."""
        now = asyncio.get_running_loop().time()
        for reader in self._order:
            room = max_messages - len(reader.buffer)
            if room > 0 and not reader.pulling(now):
                await reader.pull(room, now)

    def _take(self, max_messages: int) -> list[Message]:
        batch: list[Message] = []
        n = len(self._order)
        for i in range(n):
            buffer = self._order[(self._next + i) % n].buffer
            while buffer and len(batch) < max_messages:
                batch.append(buffer.popleft())
        self._next = (self._next + 1) % max(n, 1)
        return batch

    async def fetch(self, max_messages: int, timeout: float) -> list[Message]:
        if self._closed:
            raise TransportError("fetch on a closed NATS subscription")
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fill_deadline: float | None = None
        try:
            await self._pull(max_messages)
            while True:
                buffered = self._buffered()
                if buffered >= max_messages or (buffered and not self._more_coming()):
                    break
                now = loop.time()
                if buffered and fill_deadline is None:
                    fill_deadline = min(deadline, now + self.tuning.fill_wait)
                wait = (fill_deadline or deadline) - now
                if wait <= 0:
                    break
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
                # Requests that ended empty-handed (timeout, no messages) are renewed.
                await self._pull(max_messages)
        except NatsError as exc:
            raise TransportError(f"fetch from {sorted(self._readers)} failed: {exc!r}") from exc
        batch = self._take(max_messages)
        try:
            # Prefetch: the next batch streams in while the caller works on this one.
            await self._pull(max_messages)
        except NatsError:
            # The batch is already taken; the next fetch reports the failure.
            log.debug("prefetch on %s failed", sorted(self._readers), exc_info=True)
        return batch

    # -- commit, seek, close -----------------------------------------------

    async def commit(self, messages: Sequence[Message]) -> None:
        if self.group is None or not messages:
            return
        last: dict[tuple[str, int], Message] = {}
        for m in messages:
            key = (m.topic, m.partition)  # not m.tp: that builds an object per message
            seen = last.get(key)
            if seen is None or m.offset > seen.offset:
                last[key] = m
        await asyncio.gather(*(self._ack(m) for m in last.values()))

    async def _ack(self, message: Message) -> None:
        reader = self._readers.get(message.tp)
        handle = message.handle
        if reader is None or not isinstance(handle, tuple):
            raise TransportError(f"{message.tp} offset {message.offset} was not fetched here")
        generation, reply = handle
        if generation != reader.generation:
            return  # fetched before a seek; that consumer no longer exists
        try:
            # AckAll on the last message; a request, so the server has applied
            # it before we return and a resubscription sees the new ack floor.
            await self.nc.request(reply, b"+ACK", timeout=self.tuning.api_timeout)
        except (NatsError, TimeoutError) as exc:
            raise TransportError(
                f"commit of {message.tp} at offset {message.offset} failed: {exc!r}"
            ) from exc

    async def seek(self, tp: TopicPartition, offset: int) -> None:
        reader = self._readers.get(tp)
        if reader is None:
            raise TransportError(f"{tp} is not assigned to this subscription")
        await reader.restart_at(max(1, offset))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(r.close() for r in self._order), return_exceptions=True)
        if self.on_revoke is not None:
            await self.on_revoke(self.assignment())


class _PartitionReader:
    """One owned partition: its consumer, its inbox, and what arrived but was not fetched.

    At most one pull request is live at a time; its reply subject ends in a
    request token, so a late "request ended" status of an older request is
    ignored. Each (re)created consumer gets a new generation and inbox, so
    nothing of a consumer replaced by ``seek`` leaks into the buffer.
    """

    def __init__(
        self,
        owner: NatsSubscription,
        tp: TopicPartition,
        *,
        stream: str,
        subject: str,
        consumer: str,
    ) -> None:
        self.owner = owner
        self.tp = tp
        self._topic, self._partition = tp.topic, tp.partition
        self.stream = stream
        self.subject = subject
        self.consumer = consumer
        self.durable = owner.group is not None
        self.buffer: deque[Message] = deque()
        self.generation = 0
        self._inbox = ""
        self._handle: NatsSubscriptionHandle | None = None
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._tokens = itertools.count(1)
        self._request: str | None = None  # token of the live pull request
        self._remaining = 0  # messages the live request may still deliver
        self._busy_until = 0.0  # no new pull request before this (loop time)
        self._delivered = 0  # by the live request
        self._server_pending = 0  # from the last delivery: messages left on the server
        self._last_seq = 0
        owner.add(self)

    # -- consumer lifecycle ---------------------------------------------------

    async def open(self, start: StartFrom) -> None:
        if self.durable:
            await self._open_durable(start)
        else:
            policy = DeliverPolicy.ALL if start == "earliest" else DeliverPolicy.NEW
            await self._create(policy, None)
        await self._listen()

    async def _open_durable(self, start: StartFrom) -> None:
        js = self.owner.js
        try:
            info: ConsumerInfo = await js.consumer_info(self.stream, self.consumer)
        except NotFoundError as exc:
            if exc.err_code == _ERR_STREAM_NOT_FOUND:
                raise self._missing_stream(exc) from exc
            info = await self._create_fresh(start)
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot look up consumer for {self.tp}: {exc!r}") from exc
        if info.num_ack_pending or info.num_waiting:
            # A previous worker fetched without committing (or still has pull
            # requests parked): restart right after what it committed.
            await self._recreate(self._resume_seq(info))

    async def _create_fresh(self, start: StartFrom) -> ConsumerInfo:
        if start == "earliest":
            return await self._create(DeliverPolicy.ALL, None)
        # "latest" as an explicit sequence: the consumer's config then records
        # where it began, which a 2.9 server's ack floor does not.
        state = (await self.owner.js.stream_info(self.stream)).state
        return await self._create(DeliverPolicy.BY_START_SEQUENCE, state.last_seq + 1)

    @staticmethod
    def _resume_seq(info: ConsumerInfo) -> int:
        """The first stream sequence not committed on this durable.

        The ack floor says what was acked; before the first ack, servers up to
        2.9 report 0 there, so fall back to where the consumer was told to
        start. A start below the stream's first sequence (messages removed by
        limits or purge) is fine: the server begins at the first one left.
        """
        cfg = info.config
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if cfg.deliver_policy == DeliverPolicy.BY_START_SEQUENCE and cfg.opt_start_seq:
            configured = cfg.opt_start_seq
        elif cfg.deliver_policy == DeliverPolicy.ALL:
            configured = 1
        else:
            configured = floor + 1
        return max(configured, floor + 1)

    def _config(self, policy: DeliverPolicy, start_seq: int | None) -> ConsumerConfig:
        t = self.owner.tuning
        if self.durable:
            return ConsumerConfig(
                name=self.consumer,
                durable_name=self.consumer,
                filter_subject=self.subject,
                deliver_policy=policy,
                opt_start_seq=start_seq,
                ack_policy=AckPolicy.ALL,
                ack_wait=t.ack_wait,
                max_ack_pending=t.max_ack_pending,
            )
        return ConsumerConfig(
            name=self.consumer,
            filter_subject=self.subject,
            deliver_policy=policy,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=t.observer_inactive_threshold,
            mem_storage=True,
        )

    async def _create(self, policy: DeliverPolicy, start_seq: int | None) -> ConsumerInfo:
        try:
            return await self.owner.js.add_consumer(self.stream, self._config(policy, start_seq))
        except NotFoundError as exc:
            raise self._missing_stream(exc) from exc
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot create consumer for {self.tp}: {exc!r}") from exc

    async def _delete(self) -> None:
        try:
            await self.owner.js.delete_consumer(self.stream, self.consumer)
        except NotFoundError:
            pass
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot delete consumer for {self.tp}: {exc!r}") from exc

    async def _recreate(self, start_seq: int) -> None:
        await self._delete()
        await self._create(DeliverPolicy.BY_START_SEQUENCE, start_seq)

    def _missing_stream(self, exc: Exception) -> TransportError:
        return TransportError(f"topic {self.tp.topic!r} has no stream {self.stream}: {exc}")

    async def _listen(self) -> None:
        self.generation += 1
        self._inbox = self.owner.nc.new_inbox()
        self._handle = await self.owner.nc.subscribe(
            f"{self._inbox}.*", cb=self._handler(self.generation)
        )

    async def _unlisten(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and not self.owner.nc.is_closed:
            await handle.unsubscribe()

    async def restart_at(self, seq: int) -> None:
        """Replace the consumer by one that starts at stream sequence ``seq``."""
        await self._unlisten()
        self.buffer.clear()
        self._request, self._remaining, self._server_pending = None, 0, 0
        self._busy_until = 0.0
        self._last_seq = seq - 1
        await self._recreate(seq)
        await self._listen()

    async def close(self) -> None:
        await self._unlisten()
        self.buffer.clear()
        if not self.durable and not self.owner.nc.is_closed:
            await self._delete()  # observers leave nothing behind

    # -- pull requests and deliveries --------------------------------------

    def pulling(self, now: float) -> bool:
        """A request is live, or the last one failed and we are backing off."""
        return now < self._busy_until

    def more_coming(self) -> bool:
        """The live request will deliver more, and the server has more to deliver."""
        return self._request is not None and self._remaining > 0 and self._server_pending > 0

    async def pull(self, batch: int, now: float) -> None:
        t = self.owner.tuning
        token = str(next(self._tokens))
        self._request, self._remaining, self._delivered = token, batch, 0
        # A little past the server's expiry, in case its "request ended" status is lost.
        self._busy_until = now + t.pull_expires + 1.0
        body = b'{"batch":%d,"expires":%d,"max_bytes":%d}' % (
            batch,
            int(t.pull_expires * 1e9),
            max(t.fetch_max_bytes, 2 * t.max_msg_size),
        )
        await self.owner.nc.publish(self._next_subject, body, reply=f"{self._inbox}.{token}")

    def _handler(self, generation: int) -> Callable[[Msg], Awaitable[None]]:
        async def handle(msg: Msg) -> None:
            if generation == self.generation:
                if msg.reply:
                    self._deliver(msg)
                else:
                    self._request_ended(msg)

        return handle

    def _deliver(self, msg: Msg) -> None:
        tokens = msg.reply.split(".")
        base = 2 if len(tokens) == _V1_ACK_TOKENS else 4
        if self._remaining > 0:
            self._remaining -= 1
            self._delivered += 1
            if self._remaining == 0:
                self._request, self._busy_until = None, 0.0
        seq = int(tokens[base + 3])
        if seq <= self._last_seq:
            return  # an ack_wait redelivery of a message this worker already has
        self._last_seq = seq
        self._server_pending = int(tokens[base + 6])
        key, headers = split_headers(msg.headers)
        handle: _AckHandle = (self.generation, msg.reply)
        # Positional arguments: this runs per message and keywords cost ~0.5 us.
        timestamp_ms = int(tokens[base + 5]) // 1_000_000
        message = Message(
            self._topic, self._partition, seq, key, msg.data, headers, timestamp_ms, handle
        )
        self.buffer.append(message)
        self.owner.wake.set()

    def _request_ended(self, msg: Msg) -> None:
        status = _status_of(msg)
        if status == "100":
            return  # idle heartbeat
        if msg.subject.rpartition(".")[2] != self._request:
            return  # an older request; its successor is live
        # 404 no messages, 408 expired, 409 limits or consumer gone: all end it.
        self._request, self._remaining, self._busy_until = None, 0, 0.0
        if status == "409" and not self._delivered:
            # A limit refused the request outright; retrying at once would spin.
            description = msg.headers.get(_DESCRIPTION_HEADER) if msg.headers else None
            log.warning("pull request on %s refused: %s", self.tp, description)
            self._busy_until = asyncio.get_running_loop().time() + _REFUSED_PULL_BACKOFF
        self.owner.wake.set()
