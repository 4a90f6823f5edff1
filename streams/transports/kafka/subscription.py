"""A Kafka subscription: :class:`KafkaSubscription`, and its rebalance listener.

It owns one aiokafka consumer (a group member, a static owner or an
observer): joining or assigning, positioning at the true end for
``start="latest"``, fetching, committing, seeking and closing, and
(``_Rebalance``) the runner's callbacks on rebalances, whose first failure
the next fetch raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRebalanceListener
from aiokafka import TopicPartition as KafkaTopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError

from sluicegate.streams.transport import (
    Message,
    PartitionsCallback,
    StartFrom,
    TopicPartition,
    TransportError,
)
from sluicegate.streams.transports.kafka.clients import _error, _quietly
from sluicegate.streams.transports.kafka.names import _NO_HEADERS, _Headers, _Names

if TYPE_CHECKING:  # only for annotations: transport.py imports this module
    from sluicegate.streams.transports.kafka.transport import KafkaTransport


# Seconds an offset commit may take. Postgres holds the progress, so a commit
# that runs out is only logged; the next one (or a restart's seek) catches up.
COMMIT_TIMEOUT_S = 10.0


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
        # Even with an earlier error pending: a skipped on_assign would leave
        # the runner not knowing it owns these partitions, and them unread.
        if tps and self._on_assign is not None:
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
            # Bounded: aiokafka retries a commit the broker cannot take (a
            # broker back without the topic answers UnknownTopicOrPartition)
            # for as long as it is awaited, which held the runner's
            # checkpoint, and with it SIGTERM, for minutes.
            async with asyncio.timeout(COMMIT_TIMEOUT_S):
                await self._consumer.commit(offsets)
        except TimeoutError as exc:
            raise TransportError(
                f"committing {sorted(highest)} for {self._describe()} "
                f"took over {COMMIT_TIMEOUT_S:g}s"
            ) from exc
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
        """Raise (once) the first exception of a rebalance callback since the last one raised.

        Once: the runner backs off and retries what failed (a load of newly
        assigned partitions during a Postgres outage) itself; raising it on
        every fetch from then on would end the worker when it could recover.
        """
        listener = self._listener
        if listener is not None and listener.error is not None:
            error, listener.error = listener.error, None
            raise error

    def _describe(self) -> str:
        who = f"group {self._group_id!r}" if self._group_id else "an observer"
        return f"{who} on {self._transport.bootstrap}"
