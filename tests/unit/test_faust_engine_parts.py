"""The Faust engine's parts without a broker: naming, producing, the state mirror, the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sluicegate.cli import main
from sluicegate.faust_engine.app import KafkaNames, app_id, build_app, table_name
from sluicegate.faust_engine.state import MirroredStore, SessionTable
from sluicegate.faust_engine.transport import FaustTransport, to_message
from sluicegate.streams.checkpoint import CommitBatch, MemoryCheckpointStore
from sluicegate.streams.codec import encode, headers_for
from sluicegate.streams.envelope import Event
from sluicegate.streams.partitioning import partition_for
from sluicegate.streams.step import StateKey
from sluicegate.streams.transport import OutMessage, TopicPartition, TransportError
from sluicegate.streams.transports.kafka import KafkaTransport

# -- naming -------------------------------------------------------------------------------


def test_app_id_is_short_for_the_whole_pipeline_and_names_a_subset() -> None:
    everything = ["intake", "context", "gate"]
    assert app_id("p", ["gate", "intake", "context"], everything) == "p.faust"
    assert app_id("p", ["gate", "context"], everything) == "p.faust.context.gate"
    assert table_name("gate") == "gate-state"


def test_kafka_names_match_the_kafka_transport_and_skip_foreign_topics() -> None:
    names = KafkaNames("p")
    assert names.kafka("tool.results") == "p.tool.results"
    tps = [
        SimpleNamespace(topic="p.tasks", partition=1),
        SimpleNamespace(topic="other.tasks", partition=1),
    ]
    assert names.logical_tps(tps) == {TopicPartition("tasks", 1)}


def test_the_app_carries_the_documented_settings(tmp_path: Path) -> None:
    app = build_app(app_id="p.faust", bootstrap="127.0.0.1:1", partitions=6, datadir=tmp_path)
    assert app.conf.id == "p.faust"
    assert app.conf.topic_partitions == 6
    assert app.conf.broker_session_timeout == 10.0
    assert app.conf.stream_wait_empty is False
    assert str(app.conf.store) == "memory:"


# -- producing ----------------------------------------------------------------------------


class FakeProducer:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self.fail = fail

    async def send(self, *args: Any) -> asyncio.Future[None]:
        self.sent.append(args)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(ConnectionError("broker gone"))
        else:
            future.set_result(None)
        return future


def faust_transport(producer: FakeProducer) -> FaustTransport:
    app: Any = SimpleNamespace(producer=producer, started=False)
    admin = KafkaTransport("127.0.0.1:1", prefix="p", partitions=4)  # never connected
    transport = FaustTransport(app, admin, queue_capacity=8)
    transport._ready.update({"results", "dlq"})
    return transport


async def test_outputs_go_out_as_the_native_transport_writes_them() -> None:
    producer = FakeProducer()
    transport = faust_transport(producer)
    event = Event(source="t", type="task.completed", tenant="acme", session="s-7", data={})
    out = OutMessage("results", encode(event), key=event.key, headers=headers_for(event))
    await transport.publish_batch([out, OutMessage("dlq", b"{bad", key=None, partition=3)])
    first, second = producer.sent
    topic, key, value, partition, timestamp, headers = first
    assert (topic, key, value) == ("p.results", b"s-7", encode(event))
    assert partition == partition_for(b"s-7", 4)
    assert timestamp is None
    assert dict(headers) == {k: v.encode() for k, v in headers_for(event).items()}
    assert second[0] == "p.dlq" and second[3] == 3 and second[5] is None


async def test_a_topic_that_was_not_ensured_is_refused_not_created() -> None:
    transport = faust_transport(FakeProducer())
    with pytest.raises(TransportError, match="ensure_topics"):
        await transport.publish_batch([OutMessage("elsewhere", b"{}")])


async def test_a_failed_send_is_a_transport_error() -> None:
    transport = faust_transport(FakeProducer(fail=True))
    with pytest.raises(TransportError, match="1 of 1"):
        await transport.publish_batch([OutMessage("results", b"{}", key=b"k")])


async def test_subscribe_refuses_what_faust_does_not_do() -> None:
    transport = faust_transport(FakeProducer())
    with pytest.raises(TransportError, match="static"):
        await transport.subscribe(["tasks"], group="g", partitions=[0])
    with pytest.raises(TransportError, match="group members"):
        await transport.subscribe(["tasks"], group=None)
    with pytest.raises(TransportError, match="latest"):
        await transport.subscribe(["tasks"], group="g", start="latest")


def test_a_faust_event_becomes_the_runners_message() -> None:
    raw = SimpleNamespace(
        topic="p.tasks",
        partition=2,
        offset=41,
        key=b"s",
        value=None,
        headers=[("ce_id", b"abc"), ("odd", b"\xff"), ("none", None)],
        timestamp=1700000000.25,
    )
    event = SimpleNamespace(message=raw)
    msg = to_message(event, KafkaNames("p"))
    assert (msg.topic, msg.partition, msg.offset, msg.key, msg.value) == ("tasks", 2, 41, b"s", b"")
    assert msg.headers == {"ce_id": "abc", "odd": "\ufffd"}
    assert msg.timestamp_ms == 1700000000250
    assert msg.handle is event


# -- the state mirror ---------------------------------------------------------------------


class FakeTable:
    """What SessionTable uses of a Faust Table: its store and its changelog topic."""

    key_serializer = "json"
    value_serializer = "raw"

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], bytes] = {}
        self.changelog: list[tuple[int, tuple[str, str], bytes | None]] = []
        self.changelog_topic = self

    async def send(self, **kw: Any) -> None:
        assert kw["force"] is True
        assert (kw["key_serializer"], kw["value_serializer"]) == ("json", "raw")
        self.changelog.append((kw["partition"], kw["key"], kw["value"]))


def key(session: str) -> StateKey:
    return StateKey("acme", session)


def partition(session: str) -> int:
    return partition_for(session.encode(), 4)


async def test_a_write_reaches_the_changelog_once_in_the_sessions_partition() -> None:
    fake = FakeTable()
    table = SessionTable(fake, 4)
    assert await table.write(partition("a"), key("a"), b'{"n":1}')
    assert not await table.write(partition("a"), key("a"), b'{"n":1}')
    assert fake.changelog == [(partition("a"), ("acme", "a"), b'{"n":1}')]
    assert table.get(key("a")) == b'{"n":1}'


async def test_the_table_is_written_only_after_the_postgres_commit() -> None:
    class Failing(MemoryCheckpointStore):
        async def commit(self, batch: CommitBatch) -> None:
            raise RuntimeError("no")

    fake = FakeTable()
    batch = CommitBatch(step="s", states={(partition("a"), key("a")): b"{}"})
    with pytest.raises(RuntimeError):
        await MirroredStore(Failing(), SessionTable(fake, 4)).commit(batch)
    assert fake.data == {} and fake.changelog == []
    store = MirroredStore(MemoryCheckpointStore(), SessionTable(fake, 4))
    await store.commit(batch)
    assert fake.data == {("acme", "a"): b"{}"}


async def test_loading_states_makes_the_table_equal_to_postgres() -> None:
    sessions = [f"s{i}" for i in range(40)]
    p0 = [s for s in sessions if partition(s) == 0]
    p1 = [s for s in sessions if partition(s) == 1]
    stale, missing, extra = p0[0], p0[1], p0[2]
    inner = MemoryCheckpointStore()
    for s in (stale, missing):
        inner.states[("step", key(s))] = (0, b'{"v":"pg"}')
    fake = FakeTable()
    fake.data = {
        ("acme", stale): b'{"v":"old"}',
        ("acme", extra): b'{"v":"gone"}',
        ("acme", p1[0]): b'{"v":"other partition"}',
    }
    table = SessionTable(fake, 4)
    states = await MirroredStore(inner, table).load_states("step", [0])
    assert states == {key(stale): b'{"v":"pg"}', key(missing): b'{"v":"pg"}'}
    assert fake.data == {
        ("acme", stale): b'{"v":"pg"}',
        ("acme", missing): b'{"v":"pg"}',
        ("acme", p1[0]): b'{"v":"other partition"}',
    }
    assert (0, ("acme", extra), None) in fake.changelog  # a tombstone
    assert (table.stats.repaired, table.stats.removed) == (2, 1)
    table.forget([1])
    assert ("acme", p1[0]) not in fake.data
    assert len(fake.changelog) == 3  # forgetting is local: the changelog keeps it


# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_HOME", str(tmp_path))


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run", "--engine", "faust", "--transport", "nats"], "Kafka only"),
        (["run", "--engine", "faust"], "Kafka only"),  # SLUICE_TRANSPORT defaults to nats
        (["run", "--engine", "faust", "--transport", "kafka", "--instance", "0/2"], "--instance"),
    ],
)
def test_what_faust_cannot_do_is_one_line_and_exit_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert says in lines[0]
    assert captured.out == ""


# -- the rebalance bridge -----------------------------------------------------------------


class FakeSignal:
    def __init__(self) -> None:
        self.receivers: list[Any] = []

    def connect(self, receiver: Any) -> None:
        self.receivers.append(receiver)

    async def send(self, sender: Any, *args: Any) -> None:
        for receiver in self.receivers:
            await receiver(sender, *args, signal=self)


class FakeConsumer:
    def __init__(self, assigned: set[Any]) -> None:
        self.assigned = assigned
        self.committed: list[dict[Any, int]] = []
        self.sought: list[dict[Any, int]] = []

    def assignment(self) -> set[Any]:
        return self.assigned

    async def _commit(self, offsets: dict[Any, int]) -> bool:
        self.committed.append(dict(offsets))
        return True

    async def seek_wait(self, offsets: dict[Any, int]) -> None:
        self.sought.append(dict(offsets))


async def test_the_bridge_moves_the_group_to_postgres_offsets_and_forgets_on_revoke() -> None:
    from faust.types import TP

    from sluicegate.faust_engine.rebalance import RebalanceBridge
    from sluicegate.faust_engine.subscription import FaustSubscription

    stored = {
        ("a", TopicPartition("shared", 0)): 9,
        ("b", TopicPartition("shared", 0)): 4,
        ("b", TopicPartition("own", 0)): 2,
    }
    loaded: list[tuple[str, frozenset[TopicPartition]]] = []
    subs: dict[str, FaustSubscription] = {}

    def loader(step: str) -> Any:
        async def on_assign(tps: frozenset[TopicPartition]) -> None:
            loaded.append((step, tps))
            for tp in tps:
                if (step, tp) in stored:
                    await subs[step].seek(tp, stored[(step, tp)] + 1)

        return on_assign

    for step, topics in (("a", ["shared"]), ("b", ["shared", "own", "fresh"])):
        subs[step] = FaustSubscription(topics, name=step, capacity=4, on_assign=loader(step))
    assigned = {TP("p.shared", 0), TP("p.own", 0), TP("p.fresh", 0)}
    consumer = FakeConsumer({*assigned, TP("p.faust-a-state-changelog", 0)})
    app: Any = SimpleNamespace(
        consumer=consumer, on_partitions_revoked=FakeSignal(), on_rebalance_complete=FakeSignal()
    )
    bridge = RebalanceBridge(app, KafkaNames("p"))
    tables = {step: SessionTable(FakeTable(), 4) for step in subs}
    for step, sub in subs.items():
        bridge.add(sub, tables[step])
    bridge.connect()

    await app.on_rebalance_complete.send(app)
    assert sorted(loaded) == [
        ("a", frozenset({TopicPartition("shared", 0)})),
        ("b", frozenset({TopicPartition(t, 0) for t in ("own", "shared", "fresh")})),
    ]
    # A topic two steps read resumes at the earlier of their offsets.
    # Postgres has nothing of "fresh": from its beginning.
    assert consumer.committed == [{TP("p.shared", 0): 5, TP("p.own", 0): 3, TP("p.fresh", 0): 0}]
    # And the consumer is moved there by the bridge itself: aiokafka's
    # seek_to_committed, which Faust runs next, would skip an offset of 0.
    assert consumer.sought == consumer.committed

    in_p0 = next(f"s{i}" for i in range(100) if partition(f"s{i}") == 0)
    tables["b"].table.data[("acme", in_p0)] = b"{}"
    await app.on_partitions_revoked.send(app, assigned)
    assert subs["a"].assignment() == subs["b"].assignment() == frozenset()
    assert tables["b"].table.data == {}  # this worker's copy; the changelog keeps it
