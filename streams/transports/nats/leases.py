"""The ownership bucket: heartbeats and partition leases in NATS KV.

One KV bucket per topic prefix (``<prefix>_owners``) holds, per consumer
group ``g`` (a :func:`key_token`):

- ``m.<g>.<worker>``: the heartbeat of a worker sharing ``g``'s partitions,
  re-put every heartbeat;
- ``s.<g>.<worker>``: the heartbeat of a worker with fixed partitions
  (``--instance i/n``); shown to operators, never counted as a member;
- ``l.<g>.<partition>``: the lease on one partition, naming its holder,
  created with ``kv.create`` and kept alive by compare-and-set updates.

The bucket's ``max_age`` is the lease TTL: NATS before 2.11 has no per-key
TTL, so a key that is not re-written within it simply vanishes, which is how
a dead worker's heartbeat and leases go away.

This module owns the bucket (opening it, checking its TTL), the keys and
their values (:class:`Holder`), reading a group's keys in one snapshot,
rendezvous hashing, and :func:`read_ownership` for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    StorageType,
)
from nats.js.client import JetStreamContext
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from sluicegate.streams.transport import TransportError
from sluicegate.streams.transports.nats.names import (
    _ERR_STREAM_NAME_IN_USE,
    _ERR_WRONG_LAST_SEQUENCE,
    NatsTuning,
    key_token,
    owners_bucket,
)
from sluicegate.streams.transports.nats.wire import _status_of

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("sluicegate.streams.transports.nats")

MEMBER, STATIC, LEASE = "m", "s", "l"
Kind = Literal["m", "s", "l"]
_KV_OPERATION = "KV-Operation"  # set on delete and purge markers
# Tokens of a delivery's reply subject (metadata) in the old format (see reader.py):
# $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
_V1_ACK_TOKENS = 9


def new_worker_id() -> str:
    """``<host>-<pid>-<random>``: unique per process, readable by operators."""
    return key_token(f"{socket.gethostname().split('.')[0]}-{os.getpid()}-{secrets.token_hex(3)}")


def lease_key(group: str, partition: int) -> str:
    return f"{LEASE}.{key_token(group)}.{partition}"


def member_key(group: str, worker: str, *, static: bool = False) -> str:
    return f"{STATIC if static else MEMBER}.{key_token(group)}.{worker}"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who wrote a lease or heartbeat: a worker id and the incarnation of its subscription.

    The incarnation tells a subscription's own leases from those a crashed
    earlier process with the same (settable) worker id left behind.
    """

    worker: str
    incarnation: str

    def encode(self, **extra: object) -> bytes:
        return orjson.dumps({"worker": self.worker, "incarnation": self.incarnation, **extra})

    @staticmethod
    def decode(value: bytes) -> Holder | None:
        try:
            raw = orjson.loads(value)
            return Holder(str(raw["worker"]), str(raw["incarnation"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None  # not written by us: nobody we can name


@dataclass(frozen=True, slots=True)
class Entry:
    """One live key of the bucket, as of a snapshot."""

    kind: Kind
    group: str
    name: str  # the worker (m, s) or the partition (l)
    value: bytes
    revision: int
    written_ns: int  # server time of the last write, ns since the epoch

    @property
    def holder(self) -> Holder | None:
        return Holder.decode(self.value)


def rendezvous_owner(group: str, partition: int, members: Iterable[str]) -> str | None:
    """The member with the highest weight for (``group``, ``partition``).

    Each member's weight is a hash of it with the partition, so adding or
    removing a member moves only the partitions it wins or held.
    """
    return max(members, key=lambda m: (_weight(group, partition, m), m), default=None)


def _weight(group: str, partition: int, member: str) -> int:
    digest = hashlib.blake2b(f"{group}\0{partition}\0{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class OwnerBucket:
    """The ``<prefix>_owners`` bucket of one connection."""

    def __init__(self, nc: Client, js: JetStreamContext, prefix: str, tuning: NatsTuning) -> None:
        self.nc = nc
        self.js = js
        self.name = owners_bucket(prefix)
        self.stream = f"KV_{self.name}"
        self.tuning = tuning
        self._kv: KeyValue | None = None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise TransportError(f"ownership bucket {self.name} is not open")
        return self._kv

    def subject(self, pattern: str) -> str:
        return f"$KV.{self.name}.{pattern}"

    async def open(self) -> None:
        """Bind to the bucket, creating it if missing; refuse one with another TTL."""
        ttl = self.tuning.lease_ttl
        try:
            try:
                kv = await self.js.key_value(self.name)
            except BucketNotFoundError:
                config = KeyValueConfig(
                    bucket=self.name,
                    history=1,
                    ttl=ttl,
                    # Soft state, re-asserted every heartbeat: no need for disk.
                    storage=StorageType.MEMORY,
                    replicas=self.tuning.replicas,
                )
                try:
                    kv = await self.js.create_key_value(config)
                except APIError as exc:
                    if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                        raise
                    kv = await self.js.key_value(self.name)  # another worker made it first
            actual = (await kv.status()).ttl or 0.0
        except (NatsError, TimeoutError) as exc:
            raise TransportError(f"cannot open the ownership bucket {self.name}: {exc!r}") from exc
        if abs(actual - ttl) > 1e-3:
            raise TransportError(
                f"ownership bucket {self.name} has a lease TTL of {actual:g}s but this worker "
                f"uses {ttl:g}s: give every worker the same lease_ttl, or delete the bucket "
                f"(nats kv rm {self.name}) when no worker runs"
            )
        self._kv = kv

    # -- single keys ----------------------------------------------------------

    async def create(self, key: str, value: bytes) -> int | None:
        """Write ``key`` if it does not exist; its revision, or None when it exists."""
        try:
            return await self.kv.create(key, value)
        except KeyWrongLastSequenceError:
            return None

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        """Compare-and-set: rewrite ``key`` if it is still at ``revision``; else None."""
        try:
            return await self.kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            return None

    async def put(self, key: str, value: bytes) -> int:
        return await self.kv.put(key, value)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and revision of ``key``, or None when it is gone."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value or b"", entry.revision or 0

    async def delete(self, key: str, revision: int | None = None) -> bool:
        """Delete ``key`` (only if still at ``revision``, when given); False if it moved on."""
        try:
            await self.kv.delete(key, last=revision)
        except APIError as exc:
            if exc.err_code in _ERR_WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    # -- snapshots ------------------------------------------------------------

    async def snapshot(self, pattern: str = ">") -> list[Entry]:
        """Every live key matching ``pattern`` (a subject pattern over keys), at one moment.

        An ephemeral consumer delivers the last message per key, and one
        no-wait pull request takes them all; delete markers are left out.
        """
        timeout = self.tuning.api_timeout
        config = ConsumerConfig(
            filter_subject=self.subject(pattern),
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            # Removed by the server should our delete below not arrive.
            inactive_threshold=max(timeout, 1.0),
        )
        try:
            info = await self.js.add_consumer(self.stream, config)
        except NotFoundError:
            # The bucket is kept in memory: a NATS restart loses it. Its
            # content is soft state that every worker re-asserts on its next
            # heartbeat, so make it again rather than fail every rebalance
            # from now on (the leases would lapse and the partitions stall).
            log.warning("ownership bucket %s is gone (a NATS restart?); making it again", self.name)
            await self.open()
            try:
                info = await self.js.add_consumer(self.stream, config)
            except NotFoundError as exc:
                raise TransportError(f"ownership bucket {self.name} is gone: {exc}") from exc
        name = info.name or ""
        try:
            if not info.num_pending:
                return []
            return await self._pull_all(name, info.num_pending, timeout)
        finally:
            # Should this fail, its inactive_threshold removes it.
            with contextlib.suppress(NatsError, TimeoutError):
                await self.js.delete_consumer(self.stream, name)

    async def _pull_all(self, consumer: str, pending: int, timeout: float) -> list[Entry]:
        done = asyncio.get_running_loop().create_future()
        entries: list[Entry] = []
        prefix_len = len(self.subject(""))
        delivered = 0

        async def on_message(msg: Msg) -> None:
            nonlocal delivered
            if done.done():
                return
            if not msg.reply:  # a status: the request ended (404, 408 on a 2.9 server)
                if _status_of(msg) != "100":
                    done.set_result(None)
                return
            delivered += 1
            tokens = msg.reply.split(".")
            base = 2 if len(tokens) == _V1_ACK_TOKENS else 4
            entry = _entry(msg, msg.subject[prefix_len:], tokens, base)
            if entry is not None:
                entries.append(entry)
            # The request is fulfilled (the server sends no status then), or
            # nothing is left: keys written since the consumer began are the
            # next snapshot's.
            if delivered >= pending or int(tokens[base + 6]) == 0:
                done.set_result(None)

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_message)
        try:
            body = orjson.dumps({"batch": pending, "no_wait": True})
            await self.nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{consumer}", body, reply=inbox
            )
            async with asyncio.timeout(timeout):
                await done
        except TimeoutError as exc:
            raise TransportError(f"reading the ownership bucket {self.name} timed out") from exc
        finally:
            await sub.unsubscribe()
        return entries


def _entry(msg: Msg, key: str, tokens: list[str], base: int) -> Entry | None:
    if msg.headers and msg.headers.get(_KV_OPERATION):
        return None  # a delete or purge marker: the key is gone
    kind, _, rest = key.partition(".")
    group, _, name = rest.partition(".")
    if kind not in (MEMBER, STATIC, LEASE) or not group or not name or "." in name:
        return None  # not one of ours
    return Entry(
        kind=kind,  # type: ignore[arg-type]  # checked just above
        group=group,
        name=name,
        value=msg.data,
        revision=int(tokens[base + 3]),
        written_ns=int(tokens[base + 5]),
    )


# -- for operators -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A live worker: its id, the groups it heartbeats in, and its last heartbeat."""

    worker: str
    groups: tuple[str, ...]
    last_heartbeat: datetime
    static: bool  # --instance: fixed partitions, no leases taken from others


@dataclass(frozen=True, slots=True)
class OwnershipView:
    """Who is alive and who holds which partition, for ``sluice status``.

    Groups are as they appear in keys (:func:`key_token` of the group name).
    """

    workers: list[WorkerInfo] = field(default_factory=list)
    leases: dict[tuple[str, int], str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "workers": [
                {
                    "worker": w.worker,
                    "groups": list(w.groups),
                    "last_heartbeat": w.last_heartbeat.isoformat(),
                    "static": w.static,
                }
                for w in self.workers
            ],
            "leases": [
                {"group": g, "partition": p, "owner": owner}
                for (g, p), owner in sorted(self.leases.items())
            ],
        }


async def read_ownership(nc: Client, prefix: str, *, timeout: float = 5.0) -> OwnershipView:
    """The live workers and the leases of ``prefix``; empty when no worker ever ran."""
    tuning = NatsTuning(api_timeout=timeout)
    bucket = OwnerBucket(nc, nc.jetstream(timeout=timeout), prefix, tuning)
    try:
        bucket._kv = await bucket.js.key_value(bucket.name)
    except BucketNotFoundError:
        return OwnershipView()
    except (NatsError, TimeoutError) as exc:
        raise TransportError(f"cannot open the ownership bucket {bucket.name}: {exc!r}") from exc
    try:
        entries = await bucket.snapshot()
    except (NatsError, TimeoutError) as exc:
        raise TransportError(f"cannot read the ownership bucket {bucket.name}: {exc!r}") from exc
    return ownership_view(entries)


def ownership_view(entries: Iterable[Entry]) -> OwnershipView:
    beats: dict[str, tuple[list[str], int, bool]] = {}
    leases: dict[tuple[str, int], str] = {}
    for e in entries:
        if e.kind == LEASE:
            holder = e.holder
            if e.name.isdigit():
                leases[(e.group, int(e.name))] = holder.worker if holder else "?"
            continue
        groups, last, static = beats.get(e.name, ([], 0, False))
        groups.append(e.group)
        beats[e.name] = (groups, max(last, e.written_ns), static or e.kind == STATIC)
    workers = [
        WorkerInfo(
            worker=name,
            groups=tuple(sorted(groups)),
            last_heartbeat=datetime.fromtimestamp(last / 1e9, tz=UTC),
            static=static,
        )
        for name, (groups, last, static) in sorted(beats.items())
    ]
    return OwnershipView(workers=workers, leases=leases)
