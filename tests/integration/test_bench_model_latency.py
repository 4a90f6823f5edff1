"""``sluice bench --mode pipeline --model-latency`` end to end on real NATS and Postgres.

A small run (200 tasks, a 50 ms model): the CLI as a user runs it, then the
JSON's fields are checked for presence and sanity, never for timings (the
figures of a shared machine are read, not asserted). The model stand-in's
plans go through the real policy gate, so the generated mix still ends in
both completed and denied tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sluicegate.bench.pipeline_mode import PRIMER_TASKS
from tests.integration.test_bench_cli import leftover_streams, run_bench
from tests.integration.test_bench_pipeline import schema_exists

pytestmark = pytest.mark.integration

TASKS = 200
MEDIAN_MS = 50


def check_run(obj: dict[str, Any], median_ms: float, database_url: str) -> None:
    """The figures one run (instant or slow) must have, whatever the machine's speed."""
    assert obj["error"] is None, obj["error"]
    assert obj["tasks_per_s"] > 0
    assert obj["tasks"] == obj["published"] == obj["completed"] == TASKS
    assert obj["duplicates"] == 0
    assert obj["statuses"].get("completed", 0) > 0 and obj["statuses"].get("denied", 0) > 0
    assert obj["results_rows"] == TASKS + PRIMER_TASKS
    latency = obj["latency_ms"]
    assert latency["count"] == TASKS - obj["warmup_tasks"] == 100
    assert 0 < latency["p50"] <= latency["p90"] <= latency["max"]
    # 100 measured tasks put ten beyond p90, one beyond p99: p99 and p99.9 are n/a.
    assert latency["p99"] is None and latency["p999"] is None
    model = obj["model"]
    assert model["median_ms"] == median_ms
    # Counted after the primer: one call per measured task (more only if a call was retried).
    assert model["requests"] >= TASKS and model["errors"] == 0
    assert 1 <= model["peak_in_flight"] <= model["requests"]
    assert model["in_flight"] == 0
    if median_ms:  # the delays it drew (not measured times): around the median asked for
        assert median_ms / 2 < model["delay_ms"]["p50"] < median_ms * 2
    else:
        assert model["delay_ms"]["max"] <= 0.001
    rss = obj["worker_rss_mb"]
    assert rss is not None and rss["samples"]
    assert 0 < rss["start"] <= rss["peak"] and rss["end"] <= rss["peak"]
    times = [t for t, _ in rss["samples"]]
    assert times[0] == 0.0 and times == sorted(times)
    assert not schema_exists(database_url, obj["db_schema"])


def test_model_latency_on_nats(
    tmp_path: Path, nats_url: str, database_url: str, prefix: str
) -> None:
    env = {
        "SLUICE_NATS_URL": nats_url,
        "SLUICE_DATABASE_URL": database_url,
        "SLUICE_TOPIC_PREFIX": prefix,
        "SLUICE_PARTITIONS": "3",
    }
    done = run_bench(
        [
            "--mode",
            "pipeline",
            "--transport",
            "nats",
            "--model-latency",
            str(MEDIAN_MS),
            "--messages",
            str(TASKS),
            "--json",
            "out.json",
            "--plot",
            "out.png",
        ],
        env=env,
        cwd=tmp_path,
        timeout=420,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "pipeline benchmark with a model: 200 tasks at 600/s offered" in done.stdout

    report: dict[str, Any] = json.loads((tmp_path / "out.json").read_text())
    assert report["mode"] == "pipeline"
    settings = report["settings"]
    assert settings["rate"] == 600.0 and settings["messages"] == TASKS
    assert settings["model"]["median_ms"] == MEDIAN_MS and settings["budget_ratio"] == 0.9
    assert settings["sessions"] == 136  # 4 x 600/s x the 50 ms model's mean delay
    assert settings["model"]["client_concurrency"] == 136  # as many as the sessions
    assert set(report["transports"]) == {"nats"}
    obj = report["transports"]["nats"]
    check_run(obj, MEDIAN_MS, database_url)
    check_run(obj["zero_latency"], 0.0, database_url)
    assert obj["zero_latency_tasks_per_s"] == obj["zero_latency"]["tasks_per_s"] > 0
    assert obj["model_peak_in_flight"] == obj["model"]["peak_in_flight"]
    ratio = obj["model_latency_ratio"]
    assert ratio == pytest.approx(obj["tasks_per_s"] / obj["zero_latency_tasks_per_s"], abs=0.01)
    assert obj["budget_ratio"] == 0.9 and obj["within_budget"] is (ratio >= 0.9)
    mid = obj["mid_run_ratio"]
    assert obj["mid_run_tasks_per_s"] > 0 and obj["zero_latency"]["mid_run_tasks_per_s"] > 0
    assert mid == pytest.approx(
        obj["mid_run_tasks_per_s"] / obj["zero_latency"]["mid_run_tasks_per_s"], abs=0.01
    )
    assert obj["mid_run_within_budget"] is (mid >= 0.9)
    assert isinstance(obj["zero_latency_saturated"], bool)
    assert obj["sessions"] == obj["zero_latency"]["sessions"] == 136
    assert leftover_streams(nats_url, prefix) == []
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
