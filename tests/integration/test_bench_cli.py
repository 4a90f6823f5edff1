"""``sluice bench`` end to end on real NATS, the Kafka-protocol broker and Postgres.

Checks that the runs complete, write their files with DESIGN.md's JSON
fields, and clean up after themselves. No timed assertions: the figures of
a shared machine are for reading, not for asserting.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sluicegate.bench.endpoints import delete_nats_streams

pytestmark = pytest.mark.integration

RUN_SLUICE = "import sys; from sluicegate.cli import main; sys.exit(main())"


def run_bench(
    args: list[str], *, env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUN_SLUICE, "bench", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def leftover_streams(url: str, prefix: str) -> list[str]:
    # Deleting what is left both checks and tidies: the bench should leave nothing.
    return asyncio.run(delete_nats_streams(url, prefix))


def test_transport_mode_writes_json_and_plot(
    bench_env: dict[str, str], tmp_path: Path, nats_url: str, prefix: str
) -> None:
    done = run_bench(
        [
            "--mode",
            "transport",
            "--transport",
            "nats,kafka",
            "--messages",
            "2000",
            "--json",
            "out.json",
            "--plot",
            "out.png",
        ],
        env=bench_env,
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "NATS JetStream" in done.stdout and "Kafka" in done.stdout

    report: dict[str, Any] = json.loads((tmp_path / "out.json").read_text())
    assert report["mode"] == "transport"
    assert set(report["transports"]) == {"nats", "kafka"}
    for obj in (*report["transports"].values(), report["transports"]["nats"]["core"]):
        assert obj["throughput_msgs_per_s"] > 0
        assert obj["baseline_msgs_per_s"] > 0
        assert {"p50", "p90", "p99", "p999", "max"} <= set(obj["latency_ms"])
        assert obj["error"] is None
        assert obj["baseline"]["received"] == 2000
    brokers = report["versions"]["brokers"]
    assert brokers["nats"]["version"]
    assert brokers["kafka"]["software"]
    assert report["versions"]["clients"]["nats-py"]
    assert report["machine"]["cores"] >= 1
    assert report["settings"]["messages"] == 2000

    png = (tmp_path / "out.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert leftover_streams(nats_url, prefix) == []


def test_step_mode_with_faust(
    bench_env: dict[str, str], tmp_path: Path, nats_url: str, prefix: str
) -> None:
    done = run_bench(
        [
            "--mode",
            "step",
            "--transport",
            "nats,kafka",
            "--messages",
            "2000",
            "--faust-timeout",
            "60",
            "--json",
            "step.json",
        ],
        env=bench_env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    report: dict[str, Any] = json.loads((tmp_path / "step.json").read_text())
    assert report["mode"] == "step"
    for name in ("nats", "kafka"):
        obj = report["transports"][name]
        assert obj["step_msgs_per_s"] > 0
        assert obj["baseline_msgs_per_s"] > 0
        assert obj["ratio"] is not None
        assert obj["runner"]["processed"] == 2000
        assert obj["runner"]["dead_letters"] == 0
    kafka = report["transports"]["kafka"]
    assert kafka["faust"]["error"] is None, kafka["faust"]
    assert kafka["faust_msgs_per_s"] > 0
    assert kafka["faust"]["settings"]["broker_session_timeout"] == 10.0
    # Our Faust engine: the same step, Faust consuming, our runner checkpointing.
    assert kafka["faust_engine"]["error"] is None, kafka["faust_engine"]
    assert kafka["faust_engine"]["received"] == 2000
    assert kafka["faust_engine_msgs_per_s"] > 0
    assert kafka["native_vs_faust_engine"] > 0
    assert "faust_msgs_per_s" not in report["transports"]["nats"]
    assert "faust_engine" not in report["transports"]["nats"]
    assert leftover_streams(nats_url, prefix) == []
