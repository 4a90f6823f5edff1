"""The publisher rides out a NATS restart: nothing lost, nothing doubled, no error.

A nats-server of the test's own (file storage) is SIGTERM-restarted with 2 s
down while the publisher sends 2,000 events in small paced batches. A batch
that fails is retried with the same event ids, so the stream ends up with
each event exactly once. When the broker stays away longer than the
publisher's patience, its error says what happened and what was published.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluicegate import localstack
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transport import TransportError
from sluicegate.streams.transports.nats import NatsTransport
from sluicegate.streams.transports.nats.names import stream_name
from tests.integration.fault_support import OwnNats
from tests.integration.pipeline_support import mixed_tasks, unique_prefix

pytestmark = pytest.mark.integration

EVENTS = 2000


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[OwnNats]:
    nats = OwnNats(localstack.free_port(), tmp_path / "own-nats")
    nats.start()
    try:
        yield nats
    finally:
        nats.stop(signal.SIGKILL)


async def _stored(url: str, prefix: str) -> int:
    transport = NatsTransport(url, prefix=prefix, partitions=4)
    await transport.connect()
    try:
        _, js = transport._conn()
        info = await js.stream_info(stream_name(prefix, "tasks"))
        return int(info.state.messages)
    finally:
        await transport.close()


async def test_publisher_rides_out_a_nats_restart(own_nats: OwnNats) -> None:
    prefix = unique_prefix()
    events = [t.event for t in mixed_tasks(EVENTS, sessions=200)]
    # Acks given up on after 1 s: the 2 s outage fails a batch for sure.
    transport = NatsTransport(own_nats.url, prefix=prefix, partitions=4, publish_ack_timeout=1.0)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        publisher = Publisher(transport, batch_size=50)

        underway = asyncio.Event()

        async def paced() -> None:
            for i in range(0, EVENTS, 50):
                await publisher.publish(events[i : i + 50])
                if publisher.published >= 400:
                    underway.set()
                await asyncio.sleep(0.05)

        sending = asyncio.create_task(paced())
        async with asyncio.timeout(30):
            await underway.wait()
        await asyncio.to_thread(own_nats.stop, signal.SIGTERM)
        await asyncio.sleep(2)
        await asyncio.to_thread(own_nats.start)
        await sending
        assert publisher.published == EVENTS
        assert publisher.retries >= 1, "no batch failed: the restart did not land mid-publish"
        print(f"publisher retried {publisher.retries} batches across the restart")
    finally:
        await transport.close()
    # Retried batches were partly stored before: the duplicate window drops the copies.
    assert await _stored(own_nats.url, prefix) == EVENTS


async def test_publisher_gives_up_in_one_line_saying_what_happened(own_nats: OwnNats) -> None:
    prefix = unique_prefix()
    events = [t.event for t in mixed_tasks(100, sessions=10)]
    transport = NatsTransport(own_nats.url, prefix=prefix, partitions=4, publish_ack_timeout=1.0)
    await transport.connect()
    try:
        await transport.ensure_topics(["tasks"])
        publisher = Publisher(transport, batch_size=50, retry_for_s=3.0)
        await publisher.publish(events[:50])
        await asyncio.to_thread(own_nats.stop, signal.SIGKILL)
        with pytest.raises(TransportError) as failed:
            await publisher.publish(events[50:])
    finally:
        await transport.close()
    message = str(failed.value)
    assert "\n" not in message
    assert "50 events were published before" in message and "same ids" in message, message
    print(message)
