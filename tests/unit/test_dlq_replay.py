"""``sluicegate.dlq.replay`` on the in-memory transport and store: once, audited, or missing."""

from __future__ import annotations

from datetime import UTC, datetime

from sluicegate.dlq import DeadLetter, replay
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.dead_letters import DLQ_TOPIC, H_REPLAY, dead_letter
from sluicegate.streams.transport import Message
from sluicegate.streams.transports.memory import MemoryTransport


def dead(source_offset: int, replays: int = 0) -> DeadLetter:
    return DeadLetter(
        id=f"intake/0/{source_offset}",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        step="intake",
        reason="invalid_json",
        error="DecodeError",
        message="not JSON",
        topic="tasks",
        partition=0,
        offset=source_offset,
        event_id=f"tasks/0/{source_offset}",
        event_type="",
        tenant="",
        session="",
        trace_id=None,
        replays=replays,
    )


async def test_replay_republishes_the_bytes_once_and_audits_it() -> None:
    transport = MemoryTransport(partitions=1)
    await transport.ensure_topics(["tasks", DLQ_TOPIC])
    store = MemoryCheckpointStore()
    original = Message("tasks", 0, 5, b"s1", b"{oops", {}, 0)
    out, _row = dead_letter(original, "intake", "invalid_json", ValueError("bad"), None)
    await transport.publish_batch([out])

    fresh, before, gone = dead(5), dead(5, replays=1), dead(6)
    outcome = await replay(transport, store, [fresh, before, gone])
    assert [d.id for d in outcome.replayed] == ["intake/0/5"]
    assert [d.id for d in outcome.already] == ["intake/0/5"]  # replayed before: no --again
    assert [d.id for d in outcome.missing] == ["intake/0/6"]  # its bytes are not on dlq

    sub = await transport.subscribe(["tasks"], group=None)
    (sent,) = await sub.fetch(10, timeout=0)
    assert sent.value == b"{oops" and sent.key == b"s1"
    assert sent.headers[H_REPLAY] == "intake/0/5#1"
    assert not any(name.startswith("sluice-dlq-") for name in sent.headers)
    ((_partition, row),) = store.audit
    assert (row.kind, row.step, row.detail["dead_letter"]) == ("dlq_replay", "intake", "intake/0/5")


async def test_a_dry_run_publishes_and_audits_nothing() -> None:
    transport = MemoryTransport(partitions=1)
    await transport.ensure_topics(["tasks", DLQ_TOPIC])
    store = MemoryCheckpointStore()
    original = Message("tasks", 0, 5, b"s1", b"{oops", {}, 0)
    out, _row = dead_letter(original, "intake", "invalid_json", ValueError("bad"), None)
    await transport.publish_batch([out])
    outcome = await replay(transport, store, [dead(5)], dry_run=True)
    assert [d.id for d in outcome.replayed] == ["intake/0/5"]
    sub = await transport.subscribe(["tasks"], group=None)
    assert await sub.fetch(10, timeout=0) == [] and store.audit == []
