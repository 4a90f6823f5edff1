"""Who reads which partition of a consumer group: :class:`Ownership`.

JetStream has no consumer-group rebalancing, so workers of one group share
its partitions through the ownership bucket (leases.py):

- every worker heartbeats ``m.<group>.<worker>``; the live members are the
  heartbeats the bucket still holds (its ``max_age`` is the lease TTL);
- rendezvous hashing over the live members says who should own each
  partition; a worker takes (``kv.create``) the free leases it should own,
  keeps its leases alive with compare-and-set updates, and gives up those it
  should no longer own, so a membership change moves only what it must;
- giving up waits for the runner: the partition leaves the fetch rotation,
  ``on_revoke`` is awaited (the runner lets in-flight work finish and
  checkpoints), the readers close, and only then is the lease deleted, so a
  new owner's ``on_assign`` starts after the old owner's ``on_revoke``
  returned. Taking is the mirror image: lease, readers, ``on_assign`` (the
  runner loads its state and seeks), then fetching;
- a dead worker stops refreshing: its leases vanish after the TTL and the
  others take them at their next round (every heartbeat). A worker that
  closes revokes, then deletes its leases and heartbeat, and the others,
  woken by the deletes, take over at once.

With fixed partitions (``--instance i/n``) there is no rebalancing: the
worker claims the leases of its partitions at start, refusing to start when
a live worker holds one, and keeps them until it closes. Observers take
nothing.

Two tasks run per subscription: the keepalive (heartbeat and lease refresh,
never blocked by the runner's callbacks, so a slow drain cannot let the
leases expire) and the rebalancer (one round at a time: snapshot, revoke,
take, assign).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscriptionHandle
from nats.errors import Error as NatsError

from sluicegate.streams.transport import TransportError
from sluicegate.streams.transports.nats.leases import (
    LEASE,
    MEMBER,
    Holder,
    OwnerBucket,
    lease_key,
    member_key,
    rendezvous_owner,
)
from sluicegate.streams.transports.nats.names import NatsTuning, key_token

if TYPE_CHECKING:  # only for annotations: subscription.py imports this module
    from sluicegate.streams.transports.nats.subscription import NatsSubscription

# One logger for the whole transport, named as when it was one module.
log = logging.getLogger("sluicegate.streams.transports.nats")

_KV_OPERATION = "KV-Operation"
# While waiting to see whether a static partition's holder is alive, look
# this many times per heartbeat: a live holder shows itself within one.
_CLAIM_POLLS_PER_HEARTBEAT = 4


class Ownership:
    """The leases one subscription holds for its group, and the loops that keep them."""

    def __init__(
        self,
        bucket: OwnerBucket,
        sub: NatsSubscription,
        *,
        group: str,
        partitions: int,
        static: Sequence[int] | None,
        worker: str,
        tuning: NatsTuning,
    ) -> None:
        self.bucket = bucket
        self.sub = sub
        self.group = group
        self.group_key = key_token(group)
        self.partitions = partitions
        self.static = None if static is None else frozenset(static)
        self.holder = Holder(worker, secrets.token_hex(4))
        self.tuning = tuning
        self._lease_value = self.holder.encode()
        self._member_key = member_key(group, worker, static=self.static is not None)
        self._member_value = self.holder.encode(pid=os.getpid(), static=self.static is not None)
        # The leases held: partition -> revision, and when each was last
        # refreshed (loop time the refresh was sent, so never later than the
        # server's clock for it).
        self._held: dict[int, int] = {}
        self._refreshed: dict[int, float] = {}
        # Lease writes (create, refresh, delete) one at a time, so a refresh
        # never races a delete on the same revision.
        self._kv_lock = asyncio.Lock()
        self._members: frozenset[str] = frozenset({worker})
        self._wake = asyncio.Event()
        self._stop_rebalancing = asyncio.Event()
        self._stop_keepalive = asyncio.Event()
        self._keepalive: asyncio.Task[None] | None = None
        self._rebalancer: asyncio.Task[None] | None = None
        self._watch: NatsSubscriptionHandle | None = None
        self._failing = False  # the keepalive logs a failure streak once
        self._closed = False
        self._claimed = False  # fixed partitions: all claimed at start

    @property
    def worker(self) -> str:
        return self.holder.worker

    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    def failure(self) -> BaseException | None:
        """Why a loop ended when it should still run (a bug, not a broker error)."""
        for task in (self._keepalive, self._rebalancer):
            if task is not None and task.done() and not task.cancelled():
                exc = task.exception()
                if exc is not None:
                    return exc
        return None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Claim or take the first partitions and start the loops; raises TransportError."""
        loop = asyncio.get_running_loop()
        if self.static is not None:
            await self._beat()
            # Before claiming: a claim taken at once must stay alive while
            # another partition's holder is watched for up to a TTL.
            self._keepalive = loop.create_task(self._keep_alive(), name=self._task_name("leases"))
            await self._claim_static()
            self._claimed = True
            await self.sub.assign(sorted(self.static))
            return
        await self._beat()  # first, so the others count this worker in at once
        self._watch = await self.bucket.nc.subscribe(
            self.bucket.subject(f"*.{self.group_key}.*"), cb=self._on_change
        )
        self._keepalive = loop.create_task(self._keep_alive(), name=self._task_name("leases"))
        await self._rebalance()
        self._rebalancer = loop.create_task(self._rebalance_loop(), name=self._task_name("owner"))

    async def close(self) -> None:
        """Revoke everything (awaiting ``on_revoke``), then delete the leases and heartbeat."""
        if self._closed:
            return
        self._closed = True
        self._stop_rebalancing.set()
        self._wake.set()
        if self._rebalancer is not None:
            if not self.bucket.nc.is_connected:
                # NATS away: the round would only wait out its timeouts and
                # hold up the shutdown (SLUICE_SHUTDOWN_GRACE); what it did
                # not finish, the leases' expiry settles.
                self._rebalancer.cancel()
            # The round in progress finishes: its on_assign/on_revoke completes.
            await asyncio.gather(self._rebalancer, return_exceptions=True)
        try:
            await self.sub.revoke(self.sub.assigned_partitions())
        except Exception:
            log.warning("%s: on_revoke at close failed", self.group, exc_info=True)
        finally:
            # Kept alive until here: the leases must outlast the runner's drain.
            self._stop_keepalive.set()
            if self._keepalive is not None:
                await asyncio.gather(self._keepalive, return_exceptions=True)
            await self._unwatch()
            # Not while NATS is away: each delete would wait out its timeout
            # and hold up the shutdown; the leases expire after their TTL,
            # as a crashed worker's do.
            if self.bucket.nc.is_connected:
                await self._release(self.held())
                with contextlib.suppress(NatsError, TimeoutError):
                    await self.bucket.delete(self._member_key)

    async def abandon(self) -> None:
        """Stop at once, revoking and releasing nothing: what a crash leaves behind."""
        self._closed = True
        for task in (self._keepalive, self._rebalancer):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._keepalive, self._rebalancer) if t is not None),
            return_exceptions=True,
        )
        await self._unwatch()

    async def _unwatch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and not self.bucket.nc.is_closed:
            with contextlib.suppress(NatsError):
                await watch.unsubscribe()

    def _task_name(self, what: str) -> str:
        return f"nats {what} {self.group} {self.worker}"

    # -- keepalive ---------------------------------------------------------------

    async def _keep_alive(self) -> None:
        heartbeat = self.tuning.heartbeat
        while not self._stop_keepalive.is_set():
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancel (abandon) that meets the event being set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(heartbeat):
                    await self._stop_keepalive.wait()
            if self._stop_keepalive.is_set():
                return
            errors: list[BaseException] = []
            # The heartbeat after the leases, so it expires after them: when
            # the others see a worker gone, its leases are gone too.
            steps = [self._refresh_leases, self._beat]
            if self.static is not None:
                steps.append(self._reclaim_static)
            for step in steps:
                try:
                    await step()
                except (NatsError, TimeoutError, TransportError) as exc:
                    errors.append(exc)
            if errors and not self._failing:
                log.warning("%s: heartbeat to NATS failed: %r", self.group, errors[0])
            elif not errors and self._failing:
                log.info("%s: heartbeats to NATS resumed", self.group)
            self._failing = bool(errors)

    async def _beat(self) -> None:
        await self.bucket.put(self._member_key, self._member_value)

    async def _refresh_leases(self) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        async with self._kv_lock:
            items = list(self._held.items())
            results = await asyncio.gather(
                *(self._refresh(p, revision) for p, revision in items), return_exceptions=True
            )
            lost: list[int] = []
            for (p, _), result in zip(items, results, strict=True):
                if isinstance(result, int):
                    self._held[p], self._refreshed[p] = result, sent
                elif result is None:
                    lost.append(p)  # someone else holds it now
                elif sent - self._refreshed[p] > self.tuning.lease_ttl - self.tuning.heartbeat:
                    # Unrefreshed for about the TTL: the server drops it (or did).
                    lost.append(p)
            for p in lost:
                del self._held[p], self._refreshed[p]
        if lost:
            log.warning("%s: lost the leases on partitions %s", self.group, sorted(lost))
            self._wake.set()
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise failed[0]

    async def _refresh(self, partition: int, revision: int) -> int | None:
        """The lease's new revision, or None when it is no longer ours."""
        key = lease_key(self.group, partition)
        new = await self.bucket.update(key, self._lease_value, revision)
        if new is not None:
            return new
        # A refresh that timed out may still have landed: then it is ours at
        # a later revision.
        current = await self.bucket.get(key)
        if current is None:
            # Gone before its TTL ran out: the bucket was lost (it lives in
            # memory; a NATS restart empties it) and made again. The lease
            # is still ours by time, so write it again; should another
            # worker have written it first, it is theirs.
            fresh = asyncio.get_running_loop().time() - self._refreshed[partition]
            if fresh < self.tuning.lease_ttl:
                return await self.bucket.create(key, self._lease_value)
            return None
        if Holder.decode(current[0]) != self.holder:
            return None
        return await self.bucket.update(key, self._lease_value, current[1])

    # -- rebalancing ---------------------------------------------------------------

    async def _rebalance_loop(self) -> None:
        while not self._stop_rebalancing.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tuning.heartbeat):
                    await self._wake.wait()
            if self._stop_rebalancing.is_set():
                return
            self._wake.clear()  # a change during the round wakes the next one
            try:
                await self._rebalance()
            except (NatsError, TimeoutError, TransportError) as exc:
                log.warning("%s: rebalancing failed (retrying): %r", self.group, exc)
            except Exception:
                # The runner's on_assign failed: the leases are released and
                # the next round tries again.
                log.warning("%s: taking partitions failed (retrying)", self.group, exc_info=True)

    async def _rebalance(self) -> None:
        lost = self.sub.assigned_partitions() - self._held.keys()
        if lost:
            # First, and without NATS: a lease lost while NATS is unreachable
            # must stop being read even when the snapshot below fails.
            await self._revoke(lost)
        entries = await self.bucket.snapshot(f"*.{self.group_key}.*")
        members = {e.name for e in entries if e.kind == MEMBER} | {self.worker}
        self._members = frozenset(members)
        leases = {int(e.name): e for e in entries if e.kind == LEASE and e.name.isdigit()}
        desired = {
            p
            for p in range(self.partitions)
            if rendezvous_owner(self.group_key, p, members) == self.worker
        }
        # Leases of this subscription it stopped counting (a refresh that
        # timed out but landed): take them back or let them go.
        for p, entry in leases.items():
            if p not in self._held and entry.holder == self.holder:
                await self._adopt(p, entry.revision)
        assigned = self.sub.assigned_partitions()
        keep = desired & self._held.keys()
        if assigned - keep:
            await self._revoke(assigned - keep)
        unused = self._held.keys() - desired - self.sub.assigned_partitions()
        if unused:
            await self._release(unused)
        free = sorted(p for p in desired - self._held.keys() if p not in leases)
        if free:
            await self._take(free)
        todo = (desired & self._held.keys()) - self.sub.assigned_partitions()
        if todo:
            await self._assign(todo, members=len(members))

    async def _adopt(self, partition: int, revision: int) -> None:
        async with self._kv_lock:
            sent = asyncio.get_running_loop().time()
            new = await self.bucket.update(
                lease_key(self.group, partition), self._lease_value, revision
            )
            if new is not None:
                self._held[partition], self._refreshed[partition] = new, sent

    async def _take(self, partitions: Sequence[int]) -> None:
        async with self._kv_lock:
            sent = asyncio.get_running_loop().time()
            # Should one fail, those created meanwhile name this subscription:
            # the next round adopts them.
            value = self._lease_value
            revisions = await asyncio.gather(
                *(self.bucket.create(lease_key(self.group, p), value) for p in partitions)
            )
            for p, revision in zip(partitions, revisions, strict=True):
                if revision is not None:  # else another worker was quicker
                    self._held[p], self._refreshed[p] = revision, sent

    async def _assign(self, partitions: set[int], *, members: int) -> None:
        try:
            await self.sub.assign(sorted(partitions))
        except Exception:
            await self._release(partitions)
            raise
        log.info(
            "%s: %s took partitions %s (%d live workers)",
            self.group,
            self.worker,
            sorted(partitions),
            members,
        )

    async def _revoke(self, partitions: set[int]) -> None:
        try:
            await self.sub.revoke(partitions)
        except Exception:
            # Released all the same: holding the lease would stall the group.
            log.warning("%s: on_revoke of %s failed", self.group, sorted(partitions), exc_info=True)
        await self._release(partitions & self._held.keys())
        log.info("%s: %s gave up partitions %s", self.group, self.worker, sorted(partitions))

    async def _release(self, partitions: Iterable[int]) -> None:
        async with self._kv_lock:
            doomed = {p: self._held.pop(p) for p in partitions if p in self._held}
            for p in doomed:
                self._refreshed.pop(p, None)
            results = await asyncio.gather(
                *(self._delete_lease(p, rev) for p, rev in doomed.items()), return_exceptions=True
            )
        for p, result in zip(doomed, results, strict=True):
            if isinstance(result, BaseException):
                # It expires after the TTL instead.
                log.warning("%s: deleting the lease on %d failed: %r", self.group, p, result)

    async def _delete_lease(self, partition: int, revision: int) -> None:
        key = lease_key(self.group, partition)
        if await self.bucket.delete(key, revision):
            return
        current = await self.bucket.get(key)  # a refresh landed after all?
        if current is not None and Holder.decode(current[0]) == self.holder:
            await self.bucket.delete(key, current[1])

    async def _on_change(self, msg: Msg) -> None:
        """Wake the rebalancer when a member joins or leaves or a lease is freed.

        Every write to the group's keys is published on their subjects, so a
        plain subscription sees them; heartbeats of known members and
        expiries (which publish nothing) are left to the periodic round.
        """
        key = msg.subject[len(self.bucket.subject("")) :]
        kind, _, rest = key.partition(".")
        name = rest.partition(".")[2]
        removed = bool(msg.headers and msg.headers.get(_KV_OPERATION))
        freed = kind == LEASE and removed
        joined_or_left = kind == MEMBER and name != self.worker
        if freed or (joined_or_left and (removed or name not in self._members)):
            self._wake.set()

    # -- fixed partitions (--instance) ---------------------------------------------------

    async def _claim_static(self) -> None:
        assert self.static is not None
        results = await asyncio.gather(
            *(self._claim(p) for p in sorted(self.static)), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self._release(self.held())
            first = failed[0]
            if isinstance(first, NatsError | TimeoutError):
                raise TransportError(f"cannot claim partitions of {self.group!r}: {first!r}")
            raise first

    async def _claim(self, partition: int) -> None:
        """Take the lease, or wait to see whether its holder is alive: then refuse.

        A live holder refreshes its lease every heartbeat; a crashed one's
        lease vanishes within the TTL. Either shows within TTL + heartbeat.
        """
        loop = asyncio.get_running_loop()
        key = lease_key(self.group, partition)
        deadline = loop.time() + self.tuning.lease_ttl + self.tuning.heartbeat
        seen: int | None = None
        while True:
            sent = loop.time()
            revision = await self.bucket.create(key, self._lease_value)
            if revision is not None:
                async with self._kv_lock:
                    self._held[partition], self._refreshed[partition] = revision, sent
                return
            current = await self.bucket.get(key)
            if current is None:
                continue  # it just expired: create again
            holder = Holder.decode(current[0])
            if holder == self.holder:  # a create that timed out but landed
                async with self._kv_lock:
                    self._held[partition], self._refreshed[partition] = current[1], sent
                return
            name = holder.worker if holder else "an unknown writer"
            if seen is None:
                seen = current[1]
                log.info(
                    "%s: partition %d is held by %s; waiting up to %gs to see whether it is alive",
                    self.group,
                    partition,
                    name,
                    deadline - loop.time(),
                )
            elif current[1] != seen or loop.time() > deadline:
                raise TransportError(
                    f"partition {partition} of group {self.group!r} is held by live worker "
                    f"{name}: is another worker running with the same --instance?"
                )
            await asyncio.sleep(self.tuning.heartbeat / _CLAIM_POLLS_PER_HEARTBEAT)

    async def _reclaim_static(self) -> None:
        """A fixed partition whose lease was lost (NATS unreachable for a TTL): take it back."""
        assert self.static is not None
        if not self._claimed:
            return  # still claiming: _claim decides
        for p in sorted(self.static - self._held.keys()):
            async with self._kv_lock:
                sent = asyncio.get_running_loop().time()
                revision = await self.bucket.create(lease_key(self.group, p), self._lease_value)
                if revision is not None:
                    self._held[p], self._refreshed[p] = revision, sent
            if revision is None:
                log.warning(
                    "%s: partition %d is fixed to this worker but another holds its lease",
                    self.group,
                    p,
                )
