"""One owned partition of a NATS subscription: :class:`_PartitionReader`.

It owns the partition's JetStream consumer (durable or observer; created,
reset after a crashed worker, recreated by ``seek``), its inbox, the one
pull request in flight, and the messages delivered but not yet fetched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscriptionHandle
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from sluicegate.streams.transport import Message, StartFrom, TopicPartition, TransportError
from sluicegate.streams.transports.nats.names import _ERR_STREAM_NOT_FOUND
from sluicegate.streams.transports.nats.wire import _DESCRIPTION_HEADER, _status_of, split_headers

if TYPE_CHECKING:  # only for annotations: subscription.py imports this module
    from sluicegate.streams.transports.nats.subscription import NatsSubscription

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("sluicegate.streams.transports.nats")

# The reply subject of a JetStream delivery carries its metadata:
#   $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>       (9 tokens)
#   $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<x>
_V1_ACK_TOKENS = 9
_REFUSED_PULL_BACKOFF = 0.5

# What commit needs of a fetched message: the generation of the consumer that
# delivered it and its ack subject. A plain tuple: it is built per message.
_AckHandle = tuple[int, str]


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
        # Listening first: should the recreate fail (NATS away), the reader
        # keeps an inbox, so the retried seek or the stall watch's repair
        # finds it in a state that can deliver, never one pulling into an
        # inbox nobody reads.
        await self._listen()
        await self._recreate(seq)

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
