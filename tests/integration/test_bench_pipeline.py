"""``sluice bench --mode pipeline`` end to end on real NATS, the Kafka-protocol broker and Postgres.

Runs the CLI as a user would, then checks the JSON of DESIGN.md's contract,
that every task got exactly one result (seen on the ``results`` topic and
stored by the Postgres sink), and that the run left no streams, topics or
schema behind. No timed assertions: figures of a shared machine are read,
not asserted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sluicegate.bench.endpoints import kafka_topics_with_prefix
from sluicegate.bench.pipeline_mode import PRIMER_TASKS
from tests.integration.test_bench_cli import leftover_streams, run_bench

pytestmark = pytest.mark.integration

TASKS = 200


def schema_exists(database_url: str, schema: str) -> bool:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,))
        found = row.fetchone()
        return bool(found and found[0])


def test_pipeline_mode_on_both_transports(
    bench_env: dict[str, str],
    tmp_path: Path,
    nats_url: str,
    kafka_bootstrap: str,
    database_url: str,
    prefix: str,
) -> None:
    done = run_bench(
        [
            "--mode",
            "pipeline",
            "--transport",
            "nats,kafka",
            "--messages",
            str(TASKS),
            "--rate",
            "100",
            "--json",
            "out.json",
            "--plot",
            "out.png",
        ],
        env=bench_env,
        cwd=tmp_path,
        timeout=420,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "pipeline benchmark: 200 tasks at 100/s offered" in done.stdout

    report: dict[str, Any] = json.loads((tmp_path / "out.json").read_text())
    assert report["mode"] == "pipeline"
    assert report["settings"]["messages"] == TASKS and report["settings"]["rate"] == 100.0
    assert report["settings"]["steps"] == [
        "intake",
        "context",
        "planner",
        "gate",
        "tools",
        "responder",
    ]
    assert set(report["transports"]) == {"nats", "kafka"}
    for name, obj in report["transports"].items():
        assert obj["error"] is None, (name, obj["error"])
        assert obj["tasks_per_s"] > 0
        latency = obj["latency_ms"]
        assert {"p50", "p90", "p99", "p999", "max"} <= set(latency)
        assert 0 < latency["p50"] <= latency["max"]
        assert latency["count"] == TASKS - obj["warmup_tasks"]
        # Fewer than 1,000 measured tasks cannot resolve p99 (ten samples beyond it).
        assert latency["p99"] is None
        assert obj["offered_rate_per_s"] == 100.0
        assert obj["tasks"] == obj["published"] == obj["completed"] == TASKS
        assert obj["duplicates"] == 0
        # The generated mix passes and fails the policy gate: both kinds of result.
        assert sum(obj["statuses"].values()) == TASKS
        assert obj["statuses"].get("completed", 0) > 0 and obj["statuses"].get("denied", 0) > 0
        # The Postgres sink stored one row per task (and per primer task).
        assert obj["results_rows"] == TASKS + PRIMER_TASKS
        assert obj["worker"] == "subprocess"
        # Everything the case made is gone.
        assert not schema_exists(database_url, obj["db_schema"])
    kafka_prefix = report["transports"]["kafka"]["topic_prefix"]
    assert asyncio.run(kafka_topics_with_prefix(kafka_bootstrap, kafka_prefix)) == []
    assert leftover_streams(nats_url, prefix) == []

    png = (tmp_path / "out.png").read_bytes()
    assert png.startswith(b"\x89PNG")
