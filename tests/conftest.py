from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.services import SESSION_PREFIXES, configured, new_prefix, require_reachable


@pytest.fixture(scope="session")
def stack_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sluice-stack")


@pytest.fixture(scope="session")
def nats_url(stack_home: Path) -> Iterator[str]:
    url = configured("SLUICE_NATS_URL")
    if url:
        require_reachable("SLUICE_NATS_URL", url, 4222)
        yield url
        # A configured server outlives the tests: remove the streams they made.
        asyncio.run(delete_test_streams(url))
        return
    from sluicegate import localstack

    service = localstack.start_nats(port=localstack.free_port(), home=stack_home)
    try:
        yield service.url
    finally:
        service.stop()


TEST_STREAM = re.compile(r"^t[0-9a-f]{10}_")


async def delete_test_streams(url: str) -> None:
    """Delete the JetStream streams of test prefixes (``t<10 hex>_...``)."""
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        # The stream list comes in pages: repeat until a pass finds none.
        while True:
            names = [i.config.name for i in await js.streams_info() if i.config.name]
            # ... and the KV buckets of their worker leases (KV_<prefix>_owners).
            doomed = [
                name
                for name in names
                if TEST_STREAM.match(name.removeprefix("KV_"))
                and name.removeprefix("KV_").split("_", 1)[0] in SESSION_PREFIXES
            ]
            if not doomed:
                return
            for name in doomed:
                await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_home: Path) -> Iterator[str]:
    url = configured("SLUICE_KAFKA_BOOTSTRAP")
    if url:
        require_reachable("SLUICE_KAFKA_BOOTSTRAP", url, 9092)
        yield url
        return
    from sluicegate import localstack

    service = localstack.start_kafka(port=localstack.free_port(), home=stack_home)
    try:
        yield service.url
    finally:
        service.stop()


async def drop_test_schemas(url: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname ~ '^s_t[0-9a-f]{10}$'"
        )
        for (name,) in await cur.fetchall():
            if name.removeprefix("s_") in SESSION_PREFIXES:
                await conn.execute(f'DROP SCHEMA "{name}" CASCADE')


@pytest.fixture(scope="session")
def database_url(stack_home: Path) -> Iterator[str]:
    url = configured("SLUICE_DATABASE_URL")
    if url:
        require_reachable("SLUICE_DATABASE_URL", url, 5432)
        yield url
        # A configured database outlives the tests: drop the schemas they made
        # (also those of a failed test, which keeps its schema for a look).
        asyncio.run(drop_test_schemas(url))
        return
    from sluicegate import localstack

    service = localstack.start_postgres(port=localstack.free_port(), home=stack_home)
    try:
        yield service.url
    finally:
        service.stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix unique to one test, so tests never see each other's messages."""
    return new_prefix()


TransportFactory = Callable[..., object]


@pytest.fixture
async def make_transport(
    request: pytest.FixtureRequest, prefix: str
) -> AsyncIterator[Callable[..., object]]:
    """Build connected transports of one kind; all are closed after the test."""
    made: list[object] = []

    async def factory(kind: str, *, partitions: int = 3, prefix_: str | None = None) -> object:
        p = prefix_ or prefix
        if kind == "memory":
            from sluicegate.streams.transports.memory import MemoryTransport

            t: object = MemoryTransport(prefix=p, partitions=partitions)
        elif kind == "nats":
            from sluicegate.streams.transports.nats import NatsTransport

            t = NatsTransport(request.getfixturevalue("nats_url"), prefix=p, partitions=partitions)
        elif kind == "kafka":
            from sluicegate.streams.transports.kafka import KafkaTransport

            t = KafkaTransport(
                request.getfixturevalue("kafka_bootstrap"), prefix=p, partitions=partitions
            )
        else:
            raise ValueError(kind)
        await t.connect()  # type: ignore[attr-defined]
        made.append(t)
        return t

    yield factory
    for t in reversed(made):
        await t.close()  # type: ignore[attr-defined]


@pytest.fixture
def metric_reader() -> Iterator[InMemoryMetricReader]:
    """Metrics of ``streams.metrics`` collected in memory for one test."""
    from sluicegate.streams import metrics

    reader = InMemoryMetricReader()
    metrics.configure(readers=[reader])
    yield reader
    metrics.shutdown()
