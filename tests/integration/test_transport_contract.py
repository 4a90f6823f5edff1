"""One contract, three transports: in-memory, real NATS JetStream, real Kafka protocol (Tansu).

Every test here runs against each transport; NATS and Kafka are the real servers.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence

import pytest

from sluicegate.streams.codec import decode, encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.partitioning import partition_for
from sluicegate.streams.transport import (
    Message,
    OutMessage,
    Subscription,
    TopicPartition,
    Transport,
)

pytestmark = pytest.mark.integration

KINDS = ["memory", "nats", "kafka"]


async def drain(sub: Subscription, want: int, *, deadline_s: float = 20.0) -> list[Message]:
    """Fetch until ``want`` messages arrived (or the deadline passed)."""
    got: list[Message] = []
    end = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < end:
        got.extend(await sub.fetch(max(1, want - len(got)), timeout=0.5))
    return got


async def quiet(sub: Subscription, seconds: float = 1.5) -> list[Message]:
    """Whatever still arrives within ``seconds``: used to prove nothing more comes."""
    extra: list[Message] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        extra.extend(await sub.fetch(100, timeout=0.3))
    return extra


def out(topic: str, i: int, key: str | None = None) -> OutMessage:
    return OutMessage(topic=topic, value=f"m{i}".encode(), key=(key or f"s{i % 7}").encode())


@pytest.fixture(params=KINDS)
async def transport(request: pytest.FixtureRequest, make_transport) -> Transport:  # type: ignore[no-untyped-def]
    t = await make_transport(request.param)
    await t.ensure_topics(["tasks", "results"])
    return t  # type: ignore[no-any-return]


async def test_ensure_topics_is_idempotent(transport: Transport) -> None:
    await transport.ensure_topics(["tasks", "results"])
    await transport.ensure_topics(["tasks"])


async def test_roundtrip_keys_partitions_headers(transport: Transport) -> None:
    event = Event(
        source="test",
        type="task.submitted",
        tenant="acme",
        session="sess-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=x",
        data={"prompt": "héllo"},
    )
    await transport.publish(
        OutMessage("tasks", encode(event), key=event.key, headers=headers_for(event))
    )
    sub = await transport.subscribe(["tasks"], group="g1")
    [msg] = await drain(sub, 1)
    assert msg.topic == "tasks"
    assert msg.key == b"sess-1"
    assert msg.partition == partition_for(b"sess-1", transport.partitions)
    assert msg.headers["ce_id"] == event.id
    assert msg.headers["traceparent"] == event.traceparent
    assert msg.headers["tracestate"] == "vendor=x"
    assert msg.headers["content-type"] == "application/cloudevents+json"
    assert decode(msg.value) == event
    await sub.close()


async def test_batch_publish_all_arrive_in_partition_order(transport: Transport) -> None:
    n = 1500
    await transport.publish_batch([out("tasks", i) for i in range(n)])
    sub = await transport.subscribe(["tasks"], group="g1")
    got = await drain(sub, n)
    assert len(got) == n
    assert sorted(m.value for m in got) == sorted(f"m{i}".encode() for i in range(n))
    by_partition: dict[int, list[Message]] = defaultdict(list)
    for m in got:
        assert m.partition == partition_for(m.key, transport.partitions)
        by_partition[m.partition].append(m)
    for msgs in by_partition.values():
        offsets = [m.offset for m in msgs]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        # Within a key the publish order is kept.
        per_key: dict[bytes | None, list[int]] = defaultdict(list)
        for m in msgs:
            per_key[m.key].append(int(m.value[1:]))
        assert all(v == sorted(v) for v in per_key.values())
    await sub.close()


async def test_explicit_partition(transport: Transport) -> None:
    await transport.publish(OutMessage("tasks", b"x", key=b"k", partition=2))
    sub = await transport.subscribe(["tasks"], group="g1")
    [msg] = await drain(sub, 1)
    assert msg.partition == 2
    await sub.close()


async def test_fetch_times_out_empty(transport: Transport) -> None:
    sub = await transport.subscribe(["results"], group="g1")
    started = time.monotonic()
    assert await sub.fetch(10, timeout=0.3) == []
    assert time.monotonic() - started < 10
    await sub.close()


async def test_commit_then_resubscribe_resumes_after_commit(transport: Transport) -> None:
    await transport.publish_batch([out("tasks", i, key="one") for i in range(10)])
    sub = await transport.subscribe(["tasks"], group="g1")
    first = await drain(sub, 10)
    assert len(first) == 10
    await sub.commit(first[:6])
    await sub.close()

    again = await transport.subscribe(["tasks"], group="g1")
    rest = await drain(again, 4)
    assert [m.value for m in rest] == [f"m{i}".encode() for i in range(6, 10)]
    assert await quiet(again) == []
    await again.close()


async def test_uncommitted_messages_are_redelivered(transport: Transport) -> None:
    await transport.publish_batch([out("tasks", i, key="one") for i in range(5)])
    sub = await transport.subscribe(["tasks"], group="g1")
    assert len(await drain(sub, 5)) == 5
    await sub.close()  # no commit: as if the worker crashed
    again = await transport.subscribe(["tasks"], group="g1")
    redelivered = await drain(again, 5)
    assert [m.value for m in redelivered] == [f"m{i}".encode() for i in range(5)]
    await again.close()


async def test_seek_rewinds_and_skips(transport: Transport) -> None:
    await transport.publish_batch([out("tasks", i, key="one") for i in range(8)])
    sub = await transport.subscribe(["tasks"], group="g1")
    got = await drain(sub, 8)
    tp = got[0].tp
    await sub.seek(tp, got[3].offset)
    replay = await drain(sub, 5)
    assert [m.value for m in replay] == [f"m{i}".encode() for i in range(3, 8)]
    await sub.close()


async def test_static_partitions(transport: Transport) -> None:
    await transport.publish_batch([out("tasks", i, key=f"k{i}") for i in range(60)])
    sub = await transport.subscribe(["tasks"], group="g1", partitions=[1])
    assert sub.assignment() == frozenset({TopicPartition("tasks", 1)})
    expected = [i for i in range(60) if partition_for(f"k{i}".encode(), transport.partitions) == 1]
    got = await drain(sub, len(expected))
    assert sorted(int(m.value[1:]) for m in got) == expected
    assert await quiet(sub, 1.0) == []
    await sub.close()


async def test_on_assign_is_called_before_first_fetch(transport: Transport) -> None:
    seen: list[frozenset[TopicPartition]] = []

    async def on_assign(tps: frozenset[TopicPartition]) -> None:
        seen.append(tps)

    await transport.publish(out("tasks", 0))
    sub = await transport.subscribe(["tasks", "results"], group="g1", on_assign=on_assign)
    await drain(sub, 1)
    assert seen, "on_assign was never called"
    expected = {
        TopicPartition(t, p) for t in ("tasks", "results") for p in range(transport.partitions)
    }
    assert set().union(*seen) == expected
    await sub.close()


async def test_observer_does_not_move_group_offsets(transport: Transport) -> None:
    await transport.publish_batch([out("tasks", i, key="one") for i in range(4)])
    observer = await transport.subscribe(["tasks"], group=None, start="earliest")
    seen = await drain(observer, 4)
    assert len(seen) == 4
    await observer.commit(seen)  # a no-op for observers
    await observer.close()
    worker = await transport.subscribe(["tasks"], group="g1")
    assert len(await drain(worker, 4)) == 4
    await worker.close()


async def test_observer_from_latest_sees_only_new(transport: Transport) -> None:
    await transport.publish_batch([out("tasks", i, key="one") for i in range(3)])
    observer = await transport.subscribe(["tasks"], group=None, start="latest")
    await asyncio.sleep(0.5)
    await transport.publish(out("tasks", 99, key="one"))
    got = await drain(observer, 1)
    assert [m.value for m in got] == [b"m99"]
    assert await quiet(observer, 1.0) == []
    await observer.close()


async def test_groups_are_independent(transport: Transport) -> None:
    await transport.publish_batch([out("tasks", i) for i in range(20)])
    a = await transport.subscribe(["tasks"], group="a")
    b = await transport.subscribe(["tasks"], group="b")
    got_a, got_b = await drain(a, 20), await drain(b, 20)
    assert len(got_a) == len(got_b) == 20
    await a.close()
    await b.close()


def _values(msgs: Sequence[Message]) -> list[bytes]:
    return [m.value for m in msgs]


async def test_delete_topics_removes_messages(transport: Transport) -> None:
    await transport.publish(out("results", 1))
    await transport.delete_topics(["results", "never-made"])
    await transport.ensure_topics(["results"])
    observer = await transport.subscribe(["results"], group=None, start="earliest")
    assert await quiet(observer, 1.0) == []
    await observer.close()
