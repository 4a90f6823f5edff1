"""The runner's commit protocol and dead-lettering, on the in-memory transport and store."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import orjson
import pytest
from pydantic import BaseModel

from sluicegate.agents.api import Step
from sluicegate.streams.checkpoint import MemoryCheckpointStore
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.runner import (
    H_DLQ_MESSAGE,
    H_DLQ_REASON,
    H_DLQ_SOURCE,
    H_DLQ_STEP,
    StepRunner,
)
from sluicegate.streams.step import Context, Output, StateKey
from sluicegate.streams.transport import Message, OutMessage, TransportError
from sluicegate.streams.transports.memory import MemoryTransport


class Ping(BaseModel):
    n: int


class Counter(Step):
    """Counts pings per session and echoes them with the running count."""

    name = "counter"
    inputs = ("in",)
    outputs = ("out",)
    accepts: ClassVar = {"ping": Ping}

    def __init__(self) -> None:
        self.calls = 0
        self.fail_times: dict[int, int] = {}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        self.calls += 1
        assert isinstance(ctx.data, Ping)
        ctx.state["count"] = ctx.state.get("count", 0) + 1
        remaining = self.fail_times.get(ctx.data.n, 0)
        if remaining:
            self.fail_times[ctx.data.n] = remaining - 1
            raise RuntimeError(f"flaky on {ctx.data.n}")
        if ctx.data.n < 0:
            return [ctx.output("elsewhere", "pong", {})]
        return [ctx.output("out", "pong", {"n": ctx.data.n, "count": ctx.state["count"]})]


def ping(n: int, session: str = "s1", **kw: object) -> Event:
    return Event(source="test", type="ping", tenant="t", session=session, data={"n": n}, **kw)  # type: ignore[arg-type]


async def publish(t: MemoryTransport, *events: Event) -> None:
    await t.publish_batch(
        [OutMessage("in", encode(e), key=e.key, headers=headers_for(e)) for e in events]
    )


async def drain_runner(runner: StepRunner) -> None:
    while await runner.run_once():
        pass


async def read(t: MemoryTransport, topic: str) -> list[Message]:
    sub = await t.subscribe([topic], group=None)
    return await sub.fetch(10_000, timeout=0)


@pytest.fixture
async def setup() -> tuple[MemoryTransport, MemoryCheckpointStore, Counter, StepRunner]:
    t = MemoryTransport(partitions=2)
    await t.ensure_topics(["in"])
    store = MemoryCheckpointStore()
    step = Counter()
    runner = StepRunner(step, t, store)
    await runner.start()
    return t, store, step, runner


async def test_state_offsets_audit_and_outputs_commit_together(setup) -> None:  # type: ignore[no-untyped-def]
    t, store, _step, runner = setup
    await publish(t, *(ping(i, session=f"s{i % 3}") for i in range(9)))
    await drain_runner(runner)
    out = await read(t, "out")
    assert len(out) == 9
    counts = {StateKey("t", f"s{i}"): orjson.loads(b)["count"] for i, b in _states(store).items()}
    assert counts == {StateKey("t", "s0"): 3, StateKey("t", "s1"): 3, StateKey("t", "s2"): 3}
    assert [r.kind for _, r in store.audit] == ["processed"] * 9
    assert sum(1 for _ in store.offsets) >= 1


def _states(store: MemoryCheckpointStore) -> dict[int, bytes]:
    return {int(key.session[1:]): blob for (_s, key), (_p, blob) in store.states.items()}


async def test_restart_resumes_where_the_store_says_not_the_broker(setup) -> None:  # type: ignore[no-untyped-def]
    t, store, step, runner = setup
    await publish(t, *(ping(i) for i in range(5)))
    await drain_runner(runner)
    # Crash after the Postgres commit but before the broker ack: rewind the broker.
    t._committed.clear()
    again = StepRunner(step, t, store)
    await again.start()
    await drain_runner(again)
    # It seeks past what Postgres holds: nothing is even fetched again.
    assert again.stats.processed == 0 and again.stats.duplicates == 0
    assert len(await read(t, "out")) == 5
    assert len([r for _, r in store.audit if r.kind == "processed"]) == 5


async def test_reproduced_outputs_are_absorbed_by_id(setup) -> None:  # type: ignore[no-untyped-def]
    t, store, _step, runner = setup
    e = ping(1)
    await publish(t, e)
    await publish(t, e)  # an upstream re-produce after its crash: same id, new offset
    await drain_runner(runner)
    assert runner.stats.processed == 1 and runner.stats.duplicates == 1
    assert len(await read(t, "out")) == 1
    # After a restart the dedupe set comes back from the audit log.
    await publish(t, e)
    again = StepRunner(Counter(), t, store)
    await again.start()
    await drain_runner(again)
    assert again.stats.duplicates == 1 and again.stats.processed == 0


async def test_poison_messages_go_to_dlq_and_valid_traffic_continues(setup) -> None:  # type: ignore[no-untyped-def]
    t, store, _step, runner = setup
    good = ping(1)
    wrong_type = Event(source="x", type="nope", tenant="t", session="s1", data={})
    bad_schema = Event(source="x", type="ping", tenant="t", session="s1", data={"n": "many"})
    await t.publish_batch(
        [
            OutMessage("in", b"{not json", key=b"s1"),
            OutMessage("in", encode(wrong_type), key=b"s1"),
            OutMessage("in", encode(bad_schema), key=b"s1"),
            OutMessage("in", b"x" * (1024 * 1024 + 1), key=b"s1"),
            OutMessage("in", encode(good), key=b"s1", headers=headers_for(good)),
        ]
    )
    await drain_runner(runner)
    dlq = await read(t, "dlq")
    reasons = [m.headers[H_DLQ_REASON] for m in dlq]
    assert reasons == ["invalid_json", "unknown_type", "invalid_data", "too_large"]
    assert dlq[0].value == b"{not json"  # the original bytes, untouched
    assert all(m.headers[H_DLQ_STEP] == "counter" for m in dlq)
    assert dlq[0].headers[H_DLQ_SOURCE].startswith("in/")
    assert "data.n" in dlq[2].headers[H_DLQ_MESSAGE]
    assert len(await read(t, "out")) == 1
    kinds = [r.kind for _, r in store.audit]
    assert kinds.count("dead_letter") == 4 and kinds.count("processed") == 1


async def test_flaky_step_is_retried_and_state_of_failed_attempts_discarded(setup) -> None:  # type: ignore[no-untyped-def]
    t, _store, step, runner = setup
    step.fail_times = {7: 2}
    await publish(t, ping(7))
    await drain_runner(runner)
    assert runner.stats.retries == 2 and runner.stats.dead_letters == 0
    [out] = await read(t, "out")
    assert orjson.loads(out.value)["data"]["count"] == 1  # not 3


async def test_step_that_keeps_failing_is_dead_lettered(setup) -> None:  # type: ignore[no-untyped-def]
    t, store, step, runner = setup
    step.fail_times = {7: 99}
    await publish(t, ping(7), ping(8))
    await drain_runner(runner)
    [dead] = await read(t, "dlq")
    assert dead.headers[H_DLQ_REASON] == "step_error"
    assert "flaky on 7" in dead.headers[H_DLQ_MESSAGE]
    assert len(await read(t, "out")) == 1
    assert orjson.loads(_states(store)[1])["count"] == 1  # only the successful event counted


async def test_output_to_undeclared_topic_is_a_dead_letter(setup) -> None:  # type: ignore[no-untyped-def]
    t, _store, step, runner = setup
    await publish(t, ping(-1))
    await drain_runner(runner)
    [dead] = await read(t, "dlq")
    assert "elsewhere" in dead.headers[H_DLQ_MESSAGE]
    assert step.calls == 1  # a contract violation is not retried


async def test_a_batch_under_a_stale_epoch_is_refused_and_the_partition_left(setup) -> None:  # type: ignore[no-untyped-def]
    t, store, _step, runner = setup
    await publish(t, ping(1))
    # Another worker claimed every partition since this runner took them.
    # (The store keys progress by each topic's log: transport, name, incarnation.)
    await store.claim("counter", [runner._log_tp(tp) for tp in runner._owned], "other-worker")
    await drain_runner(runner)
    assert runner.stats.stale_batches == 1
    assert store.audit == [] and store.offsets == {}
    # Fenced: it processes nothing more there, and commits nothing.
    await publish(t, ping(2))
    await drain_runner(runner)
    assert store.audit == [] and runner.stats.processed == 1
    # Assigned again (a rebalance gives them back, from the broker's committed
    # position: nothing was acked), it claims a new epoch and works.
    tps = runner._sub.assignment()
    await runner._on_revoke(tps)
    for tp in tps:
        await runner._sub.seek(tp, 0)
    await runner._on_assign(tps)
    await drain_runner(runner)
    assert sorted(r.kind for _, r in store.audit) == ["processed", "processed"]


async def test_failed_produce_rewinds_and_the_batch_is_retried(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    t, store, _step, runner = setup
    await publish(t, *(ping(i) for i in range(6)))
    real = t.publish_batch
    calls = {"n": 0}

    async def flaky(messages):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise TransportError("broker went away")
        await real(messages)

    monkeypatch.setattr(t, "publish_batch", flaky)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    for _ in range(200):
        if len([r for _, r in store.audit if r.kind == "processed"]) == 6:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert calls["n"] >= 2
    out = await read(t, "out")
    assert sorted(orjson.loads(m.value)["data"]["n"] for m in out) == list(range(6))
    assert len([r for _, r in store.audit if r.kind == "processed"]) == 6


async def test_failed_checkpoint_rewinds_without_touching_memory(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    t, store, _step, runner = setup
    runner.config.commit_attempts = 1
    await publish(t, ping(1))
    real = store.commit

    async def down(batch):  # type: ignore[no-untyped-def]
        raise OSError("postgres is down")

    monkeypatch.setattr(store, "commit", down)
    with pytest.raises(OSError):
        await runner.run_once()
    assert runner._states == {}  # memory still equals the (empty) store
    monkeypatch.setattr(store, "commit", real)
    await drain_runner(runner)
    out = await read(t, "out")
    # Produced before the failed commit and again on the retry: the same
    # event (same id, same count), which the next step absorbs.
    assert len({m.headers["ce_id"] for m in out}) == 1
    assert {orjson.loads(m.value)["data"]["count"] for m in out} == {1}
    assert len(store.audit) == 1


class Bloated(Counter):
    async def process(self, event: Event, ctx: Context) -> list[Output]:
        return [ctx.output("out", "pong", {"blob": "x" * (1024 * 1024)})]


async def test_output_that_cannot_be_encoded_dead_letters_its_input() -> None:
    t = MemoryTransport(partitions=2)
    await t.ensure_topics(["in"])
    runner = StepRunner(Bloated(), t, MemoryCheckpointStore())
    await runner.start()
    await publish(t, ping(1), ping(2))
    await drain_runner(runner)
    dead = await read(t, "dlq")
    assert [m.headers[H_DLQ_REASON] for m in dead] == ["step_error", "step_error"]
    assert "cannot be encoded" in dead[0].headers[H_DLQ_MESSAGE]
    assert await read(t, "out") == []
