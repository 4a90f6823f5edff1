"""The local stack's servers, started for real under tmp_path and used through real clients.

Each test checks the server by using it (JetStream publish and fetch, a Kafka
topic round trip, SQL), and that ``stop()`` leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sluicegate.localstack import (
    LocalStackError,
    PortInUseError,
    RunningService,
    free_port,
    start_kafka,
    start_nats,
    start_postgres,
)

pytestmark = pytest.mark.integration

Starter = Callable[..., RunningService]
STARTERS: dict[str, tuple[Starter, str]] = {
    "nats": (start_nats, "SLUICE_LOCAL_NATS_PORT"),
    "kafka": (start_kafka, "SLUICE_LOCAL_KAFKA_PORT"),
    "postgres": (start_postgres, "SLUICE_LOCAL_POSTGRES_PORT"),
}


def processes_mentioning(path: Path) -> list[str]:
    """Live (non-zombie) processes whose arguments name ``path`` or that run inside it.

    The working directory matters for Tansu, whose arguments name no path.
    """
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue  # exited while we looked
        inside = cwd == str(path) or cwd.startswith(f"{path}/")
        if state != "Z" and (str(path) in cmdline or inside):
            found.append(f"{proc.name}: {cmdline} (in {cwd})")
    return found


def assert_stopped(service: RunningService, home: Path) -> None:
    assert service.pid is not None
    assert not Path(f"/proc/{service.pid}").exists() or _state(service.pid) == "Z"
    leftovers = processes_mentioning(home)
    assert not leftovers, f"{service.name} left processes behind: {leftovers}"
    assert service.pidfile is not None and not service.pidfile.exists(), "pid file left behind"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "stack"


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port with a listener that is not ours to replace."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_nats_serves_jetstream(home: Path) -> None:
    import nats

    service = start_nats(port=free_port(), home=home)
    try:
        assert service.url.startswith("nats://127.0.0.1:")
        nc = await nats.connect(service.url)
        try:
            js = nc.jetstream()
            info = await js.account_info()
            assert info.limits is not None
            stream = f"S{uuid.uuid4().hex[:8]}"
            await js.add_stream(name=stream, subjects=[f"{stream}.>"])
            ack = await js.publish(f"{stream}.a", b"hello")
            assert ack.seq == 1
            sub = await js.pull_subscribe(f"{stream}.>", durable="probe")
            [msg] = await sub.fetch(1, timeout=5)
            assert msg.data == b"hello"
            await msg.ack()
            # Core NATS as well: a plain publish reaches a subscriber.
            core = await nc.subscribe("plain.subject")
            await nc.publish("plain.subject", b"ping")
            assert (await core.next_msg(timeout=5)).data == b"ping"
        finally:
            await nc.close()
        assert (home / "nats" / "jetstream").is_dir(), "JetStream does not store under home/nats"
        assert processes_mentioning(home), "the leftover check cannot see a running nats"
    finally:
        service.stop()
    assert_stopped(service, home)


async def test_kafka_round_trips_a_message(home: Path) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    service = start_kafka(port=free_port(), home=home)
    try:
        topic = f"t{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=service.url)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
            assert topic in await admin.list_topics()
        finally:
            await admin.close()

        producer = AIOKafkaProducer(bootstrap_servers=service.url)
        await producer.start()
        try:
            sent = await producer.send_and_wait(topic, b"hello", key=b"session-1")
        finally:
            await producer.stop()

        # Assigned, not subscribed: a group join would only add seconds here.
        consumer = AIOKafkaConsumer(bootstrap_servers=service.url, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, sent.partition)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            record = await asyncio.wait_for(consumer.getone(), timeout=10)
        finally:
            await consumer.stop()
        assert (record.key, record.value) == (b"session-1", b"hello")
        assert processes_mentioning(home), "the leftover check cannot see a running broker"
    finally:
        service.stop()
    assert_stopped(service, home)


def test_postgres_answers_sql_and_keeps_data_across_restarts(home: Path) -> None:
    import psycopg

    service = start_postgres(port=free_port(), home=home)
    try:
        assert service.url.startswith("postgresql://postgres@127.0.0.1:")
        with psycopg.connect(service.url, autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            conn.execute("create table kept (v text)")
            conn.execute("insert into kept values ('across restarts')")
        assert processes_mentioning(home), "the leftover check cannot see a running postgres"
        if os.geteuid() == 0:
            uid = _uid_of(service.pid)
            assert uid != 0, "postgres must not run as root"
    finally:
        service.stop()
    assert_stopped(service, home)

    # Same home, another port: initdb is not run again and the data is there.
    again = start_postgres(port=free_port(), home=home)
    try:
        with psycopg.connect(again.url) as conn:
            assert conn.execute("select v from kept").fetchone() == ("across restarts",)
    finally:
        again.stop()
    assert_stopped(again, home)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _uid_of(pid: int | None) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])


@pytest.mark.parametrize("name", STARTERS)
def test_taken_port_is_refused_naming_port_and_setting(
    home: Path, listening_port: int, name: str
) -> None:
    start, setting = STARTERS[name]
    with pytest.raises(PortInUseError) as raised:
        start(port=listening_port, home=home)
    message = str(raised.value)
    assert str(listening_port) in message
    assert setting in message
    assert not processes_mentioning(home)


@pytest.mark.parametrize("name", ["nats", "postgres"])
def test_second_start_in_the_same_home_is_refused(home: Path, name: str) -> None:
    start, _ = STARTERS[name]
    first = start(port=free_port(), home=home)
    try:
        assert first.url.startswith(("nats://", "postgresql://"))
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        for again in (port, free_port()):  # its own port, or another: the same answer
            with pytest.raises(LocalStackError, match="already running"):
                start(port=again, home=home)
    finally:
        first.stop()
    assert_stopped(first, home)


def test_a_server_that_dies_is_reported_with_its_log(home: Path) -> None:
    data = home / "postgres"
    data.mkdir(parents=True, mode=0o700)
    # Looks initialised (so initdb is skipped), but the server finds no config and exits.
    (data / "PG_VERSION").write_text("18\n")
    with pytest.raises(LocalStackError) as raised:
        start_postgres(port=free_port(), home=home, timeout=30)
    message = str(raised.value)
    assert "exited with code" in message
    assert "postgres.log" in message
    assert "postgresql.conf" in message, message  # the server's own explanation, from its log
    assert not processes_mentioning(home)
