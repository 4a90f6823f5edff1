"""What keeps a checkpoint short: outputs sent as events complete, broker acks in the background.

On the in-memory transport and store with the real runner; broker calls are
held on asyncio events the tests control, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.outbox import Outbox
from sluicegate.streams.runner import RunnerConfig, StepRunner
from sluicegate.streams.transport import OutMessage, TopicPartition, TransportError
from sluicegate.streams.transports.memory import MemoryTransport
from tests.unit.test_runner_concurrency import (
    Gated,
    item,
    outputs,
    publish,
    running,
    started,
    until,
)


class HeldTransport(MemoryTransport):
    """A memory transport whose publishes wait for ``release`` and may fail."""

    def __init__(self) -> None:
        super().__init__(partitions=1)
        self.release = asyncio.Event()
        self.release.set()
        self.calls: list[list[str]] = []
        self.fail_next = 0

    async def publish_batch(self, messages: Sequence[OutMessage]) -> None:
        self.calls.append([m.value.decode() for m in messages])
        await self.release.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise TransportError("broker away")
        await super().publish_batch(messages)


def stored(store: MemoryCheckpointStore) -> int | None:
    """The stored offset of the one input partition (keyed by its log's identity)."""
    return max(store.offsets.values(), default=None)


def out(text: str) -> OutMessage:
    return OutMessage("out", text.encode(), key=b"k")


async def test_the_outbox_sends_in_order_and_a_flush_waits_only_for_what_came_before() -> None:
    t = HeldTransport()
    await t.ensure_topics(["out"])
    box: Outbox[OutMessage] = Outbox(t.publish_batch, "step")
    t.release.clear()
    box.send([out("a"), out("b")])
    await until(lambda: len(t.calls) == 1, "the first send started")
    box.send([out("c")])  # queued behind the send in progress
    flushed = asyncio.create_task(box.flush())
    await asyncio.sleep(0)
    box.send([out("d")])  # after the flush began: not waited for
    assert not flushed.done()
    t.release.set()
    await flushed
    assert [text for call in t.calls for text in call][:3] == ["a", "b", "c"]
    await box.flush()
    sub = await t.subscribe(["out"], group=None)
    assert [m.value for m in await sub.fetch(10, timeout=0)] == [b"a", b"b", b"c", b"d"]


async def test_a_failed_send_fails_the_next_flush_once_and_drops_what_was_queued() -> None:
    t = HeldTransport()
    await t.ensure_topics(["out"])
    box: Outbox[OutMessage] = Outbox(t.publish_batch, "step")
    t.fail_next = 1
    box.send([out("a")])
    with pytest.raises(TransportError, match="broker away"):
        await box.flush()
    await box.flush()  # reported once: the runner resets and does the work again
    box.send([out("b")])
    await box.flush()
    sub = await t.subscribe(["out"], group=None)
    assert [m.value for m in await sub.fetch(10, timeout=0)] == [b"b"]


async def test_a_failed_publish_resets_the_runner_and_loses_nothing() -> None:
    t = HeldTransport()
    await t.ensure_topics(["in", "out"])
    store = MemoryCheckpointStore()
    config = RunnerConfig(fetch_timeout_s=0.01, commit_interval_s=0.0, retry_backoff_s=0.001)
    runner = StepRunner(Gated(), t, store, config=config)
    await runner.start()
    sessions = [f"s{i}" for i in range(20)]
    await publish(t, [item(n, s) for n in range(3) for s in sessions])
    t.fail_next = 1  # the runner's first publish

    async def body() -> None:
        await until(lambda: stored(store) == 59, "every input checkpointed")

    await running(runner, body)
    assert runner.stats.resets >= 1
    got = await outputs(t)
    # Outputs sent before the failure are sent again with the same ids; a
    # next step absorbs those copies. Each input has exactly one output id.
    assert len({e.id for e in got}) == 60
    assert sorted(r.event_id for _, r in store.audit if r.kind == "processed") == sorted(
        {e.causationid for e in got if e.causationid}
    )


async def test_a_slow_broker_ack_does_not_hold_up_the_next_checkpoint() -> None:
    t, store, _, runner = await started()
    sub = runner._sub
    assert sub is not None
    held = asyncio.Event()
    acked: list[int] = []
    commit = sub.commit

    async def slow_commit(messages: Sequence[object]) -> None:
        await held.wait()
        acked.append(len(messages))
        await commit(messages)  # type: ignore[arg-type]

    sub.commit = slow_commit  # type: ignore[method-assign]
    tp = TopicPartition("in", 0)

    async def body() -> None:
        await publish(t, [item(0, "a")])
        await until(lambda: stored(store) == 0, "the first checkpoint")
        await publish(t, [item(1, "a"), item(2, "b")])
        # The first ack is still held, and the next checkpoint lands anyway.
        await until(lambda: stored(store) == 2, "the second checkpoint")
        assert acked == []
        held.set()
        await until(lambda: sum(acked) == 3, "the acks, in one or two commits")

    await running(runner, body)
    assert t._committed[("gated", tp)] == 3  # the group offset: next to read
