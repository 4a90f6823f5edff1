"""A partition count that disagrees with existing topics is refused, by publishers and workers.

Topics are made with 4 partitions; `sluice publish` and `sluice run` started
with SLUICE_PARTITIONS=8 must stop with one line naming the topic and both
counts, publish nothing and process nothing (on NATS, where streams have no
partitions of their own, the count is kept in the stream's description).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sluicegate.pipeline import TOPICS
from sluicegate.runtime import make_transport
from sluicegate.streams.transport import TopicPartition
from tests.integration.pipeline_support import (
    drop_schema,
    env_for,
    prepare_database,
    settings_for,
    unique_prefix,
)

pytestmark = pytest.mark.integration


def sluice(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("kind", ["nats", "kafka"])
async def test_publish_and_run_refuse_a_partition_count_the_topics_do_not_have(
    kind: str, nats_url: str, kafka_bootstrap: str, database_url: str
) -> None:
    settings = settings_for(
        kind,  # type: ignore[arg-type]
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        prefix=unique_prefix(),
        partitions=4,
    )
    await prepare_database(settings)
    transport = make_transport(settings)
    await transport.connect()
    try:
        await transport.ensure_topics(TOPICS)
        env = {**env_for(settings), "SLUICE_PARTITIONS": "8"}

        published = sluice(["publish", "--generate", "5"], env)
        assert published.returncode == 1, published.stderr
        [line] = [ln for ln in published.stderr.splitlines() if "partitions" in ln]
        assert "has 4 partitions, but SLUICE_PARTITIONS is 8" in line
        assert "Traceback" not in published.stderr

        ran = sluice(["run", "--log-level", "WARNING"], env)
        assert ran.returncode == 1, ran.stderr
        assert "has 4 partitions, but SLUICE_PARTITIONS is 8" in ran.stderr
        assert "Traceback" not in ran.stderr

        # Nothing reached the topics: the 4-partition ones are still empty.
        ends = await transport.log_ends([TopicPartition("tasks", p) for p in range(4)])
        assert all(end <= 0 for end in ends.values()), ends
    finally:
        await transport.delete_topics(TOPICS)
        await transport.close()
        await drop_schema(settings)
