"""Fixtures shared by the integration tests (the services' are in tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql

from sluicegate.sinks.migrate import migrate


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[str]:
    """A migrated schema of this test's own, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await migrate(database_url, schema=name)
    yield name
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def bench_env(
    nats_url: str, kafka_bootstrap: str, database_url: str, prefix: str
) -> dict[str, str]:
    """The environment a ``sluice bench`` subprocess needs to reach this session's services."""
    return {
        "SLUICE_NATS_URL": nats_url,
        "SLUICE_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "SLUICE_DATABASE_URL": database_url,
        "SLUICE_TOPIC_PREFIX": prefix,
        "SLUICE_PARTITIONS": "3",
    }
