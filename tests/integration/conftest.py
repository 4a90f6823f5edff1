"""Fixtures shared by the integration tests (the services' are in tests/conftest.py)."""

from __future__ import annotations

import pytest


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
