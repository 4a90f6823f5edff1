"""The pipeline bench's pieces that need no broker: tally, figures, report, table, plot, CLI.

No timings are asserted: every latency and rate here comes from synthetic
due and arrival times.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from sluicegate.bench.pipeline_mode import (
    PipelineResult,
    Tally,
    completion_rate,
    pipeline_warmup,
    process_cpu_seconds,
    publish_at_rate,
    result_of,
    summarise,
    task_objects,
)
from sluicegate.bench.plot import write_plot
from sluicegate.bench.report import build_pipeline_report, render_table
from sluicegate.cli_bench import MODES, BenchOptions, _failed, _total
from sluicegate.pipeline import task_registry
from sluicegate.settings import TransportName
from sluicegate.streams.publisher import Publisher
from sluicegate.streams.transports.memory import MemoryTransport

MS = 1_000_000  # ns

META: dict[str, Any] = {
    "date": "2026-01-01T00:00:00+00:00",
    "settings": {"messages": 200, "rate": 100.0, "worker": "subprocess"},
    "versions": {"clients": {}, "brokers": {}},
    "machine": {"cpu_model": "test", "cores": 2, "memory_bytes": 1},
}


def completed_body(task_id: str, status: str = "completed") -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"r-{task_id}",
            "type": "task.completed",
            "data": {"task_id": task_id, "status": status, "action_count": 1},
        }
    )


def scheduled(n: int, rate: float) -> Tally:
    """A tally of ``n`` tasks due every ``1/rate`` s from t=1 s, all sent."""
    tally = Tally(n)
    interval = int(1e9 / rate)
    for i in range(n):
        tally.expect(f"task-{i}", i, 1_000 * MS + i * interval)
    tally.sends = [(0, 1_000 * MS), (n, 1_000 * MS + n * interval)]
    tally.published = n
    return tally


def arrive(tally: Tally, latency_ns: Sequence[int], statuses: Sequence[str] = ()) -> None:
    for i, lat in enumerate(latency_ns):
        status = statuses[i] if statuses else "completed"
        tally.observe([completed_body(f"task-{i}", status)], tally.due_ns[i] + lat)


# -- the observer's side ---------------------------------------------------------------


def test_result_of_reads_task_id_and_status_and_refuses_the_rest() -> None:
    assert result_of(completed_body("abc", "denied")) == ("abc", "denied")
    assert result_of(b"{not json") == (None, None)
    assert result_of(b'{"data": 5}') == (None, None)
    assert result_of(b'{"data": {"task_id": 7, "status": "ok"}}') == (None, "ok")


def test_tally_counts_each_task_once_and_ignores_unknown_ids() -> None:
    tally = scheduled(3, 100.0)
    fresh = tally.observe(
        [
            completed_body("task-0"),
            completed_body("task-1", "denied"),
            completed_body("primer-task"),  # not scheduled: the primer's
            completed_body("task-0"),  # re-produced result
        ],
        now_ns=5_000 * MS,
    )
    assert fresh == 2
    assert tally.completed == 2 and tally.duplicates == 1
    assert dict(tally.statuses) == {"completed": 1, "denied": 1}
    assert tally.arrived_ns[0] == tally.arrived_ns[1] == 5_000 * MS and tally.arrived_ns[2] == 0


# -- the figures ------------------------------------------------------------------------


def test_warmup_rule() -> None:
    assert pipeline_warmup(200) == 100  # at most half
    assert pipeline_warmup(1000) == 100  # at least 100
    assert pipeline_warmup(2000) == 200  # 10%
    assert pipeline_warmup(10) == 5


def test_a_constant_latency_completes_at_the_offered_rate() -> None:
    rate, n = 100.0, 2000
    tally = scheduled(n, rate)
    arrive(tally, [50 * MS] * n)
    measured = list(range(pipeline_warmup(n), n))
    # 1800 tasks over 17.99 s of schedule plus one 50 ms latency.
    expected = 1800 / (1799 / rate + 0.05)
    assert completion_rate(measured, tally.due_ns, tally.arrived_ns) == pytest.approx(expected)


def test_a_growing_backlog_completes_at_the_pipeline_s_own_rate() -> None:
    rate, capacity, n = 300.0, 120.0, 3000
    tally = scheduled(n, rate)
    # Task i finishes at i / capacity: each one waits longer than the one before.
    first_due = tally.due_ns[0]
    for i in range(n):
        tally.observe([completed_body(f"task-{i}")], first_due + int(i * 1e9 / capacity) + MS)
    measured = list(range(300, n))
    got = completion_rate(measured, tally.due_ns, tally.arrived_ns)
    # A little under: the window opens at task 300's due time (1 s in), and
    # the backlog the warm-up left (1.5 s of work) is charged to the window.
    assert 0.9 * capacity < got <= capacity


def test_summarise_fills_latency_rate_statuses_and_publisher_figures() -> None:
    n = 200
    tally = scheduled(n, 100.0)
    statuses = ["completed", "denied", "partial", "failed"] * (n // 4)
    arrive(tally, [(10 + i % 10) * MS for i in range(n)], statuses)
    tally.worst_lag_ns = 3 * MS
    result = PipelineResult("nats", 100.0, n, pipeline_warmup(n))
    summarise(result, tally)
    assert result.error is None
    assert result.completed == n and result.published == n
    assert result.statuses == {"completed": 50, "denied": 50, "failed": 50, "partial": 50}
    assert result.latency.count == n - result.warmup  # the warm-up is left out
    assert 10.0 <= result.latency.p50 <= 19.1 and result.latency.max == pytest.approx(19, rel=1e-2)
    assert result.publish_rate == pytest.approx(100.0)
    assert result.publish_lag_ms == 3.0
    assert [p for p, _ in result.curve][:3] == [50.0, 75.0, 90.0]


def test_missing_results_are_an_error_and_a_partial_send_has_no_publish_rate() -> None:
    n = 200
    tally = scheduled(n, 100.0)
    tally.sends = [(0, 1_000 * MS), (100, 1_500 * MS)]  # stopped half way
    tally.published = 150
    arrive(tally, [20 * MS] * 150)
    result = PipelineResult("kafka", 100.0, n, pipeline_warmup(n))
    summarise(result, tally)
    assert result.error == "50 of 200 tasks have no result"
    assert result.published == 150 and result.publish_rate == 0.0
    assert result.sustained is False


def test_sustained_needs_90_percent_of_the_offered_rate_and_no_error() -> None:
    kept = PipelineResult("nats", 100.0, 2000, 200, tasks_per_s=91.0)
    assert kept.sustained
    assert not PipelineResult("nats", 100.0, 2000, 200, tasks_per_s=85.0).sustained
    assert not PipelineResult("nats", 100.0, 2000, 200, tasks_per_s=99.0, error="x").sustained


def test_worker_cpu_per_task_and_cores() -> None:
    result = PipelineResult(
        "nats", 100.0, 2000, 200, completed=2000, worker_cpu_s=6.0, worker_wall_s=20.0
    )
    assert result.worker_cpu_ms_per_task == pytest.approx(3.0)
    assert result.worker_cores == pytest.approx(0.3)
    unread = PipelineResult("nats", 100.0, 10, 5)
    assert unread.worker_cpu_ms_per_task is None and unread.worker_cores is None


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc, which only Linux has")
def test_process_cpu_seconds_reads_proc() -> None:
    assert (process_cpu_seconds(os.getpid()) or 0.0) > 0.0
    assert process_cpu_seconds(2**22 + 12345) is None  # no such process


# -- the load ---------------------------------------------------------------------------


async def test_publish_at_rate_stamps_due_times_and_sends_valid_tasks() -> None:
    transport = MemoryTransport(prefix="t", partitions=3)
    await transport.ensure_topics(["tasks"])
    publisher = Publisher(transport, source="sluice-bench", registry=task_registry())
    n, rate = 40, 20_000.0  # fast enough that the test does not wait
    tally = Tally(n)
    await publish_at_rate(publisher, task_objects(n), rate, tally, max_batch=8)

    assert tally.published == n and tally.sends[-1][0] == n
    assert all(b - a <= 8 for (a, _), (b, _) in zip(tally.sends, tally.sends[1:], strict=False))
    interval_ns = 1e9 / rate
    assert [tally.due_ns[i] - tally.due_ns[0] for i in range(n)] == [
        int(i * interval_ns) for i in range(n)
    ]
    sub = await transport.subscribe(["tasks"], group=None)
    events = [orjson.loads(m.value) for m in await sub.fetch(1000, 0.1)]
    assert len(events) == n
    assert {e["id"] for e in events} == set(tally.index)
    by_index = sorted(events, key=lambda e: tally.index[e["id"]])
    assert all(e["type"] == "task.submitted" and e["data"]["prompt"] for e in by_index)
    # Each event's time is its due time: the same spacing as the schedule.
    times = [e["time"] for e in by_index]
    assert times == sorted(times) and times[0] != times[-1]


# -- report, table, plot ----------------------------------------------------------------


def results() -> list[PipelineResult]:
    out = []
    cases: tuple[tuple[TransportName, int], ...] = (("nats", 30), ("kafka", 60))
    for key, latency in cases:
        tally = scheduled(200, 100.0)
        arrive(tally, [(latency + i % 20) * MS for i in range(200)], ["completed", "denied"] * 100)
        result = PipelineResult(key, 100.0, 200, 100, topic_prefix=f"p-{key}", db_schema="s")
        result.worker_cpu_s, result.worker_wall_s = 0.8, 4.0
        result.load_before, result.load_after = 1.5, 2.25
        summarise(result, tally)
        out.append(result)
    return out


def test_pipeline_json_has_the_contract_fields() -> None:
    report = json.loads(json.dumps(build_pipeline_report(results(), META)))
    assert report["mode"] == "pipeline"
    assert set(report["transports"]) == {"nats", "kafka"}
    for obj in report["transports"].values():
        assert obj["tasks_per_s"] > 0
        assert {"p50", "p90", "p99", "p999", "max"} <= set(obj["latency_ms"])
        assert obj["offered_rate_per_s"] == 100.0
        assert obj["tasks"] == 200 and obj["completed"] == 200
        assert obj["statuses"] == {"completed": 100, "denied": 100}
        assert obj["worker_cpu_ms_per_task"] == 4.0 and obj["worker_cores"] == 0.2
        assert obj["load_average"] == {"before": 1.5, "after": 2.25}
        assert obj["error"] is None
    for key in ("date", "settings", "versions", "machine"):
        assert key in report


def test_pipeline_table_shows_each_transport_its_statuses_and_errors() -> None:
    rs = results()
    rs[1].error = "12 of 200 tasks have no result"
    text = render_table(build_pipeline_report(rs, META))
    lines = text.splitlines()
    assert lines[0] == "pipeline benchmark: 200 tasks at 100/s offered, worker: subprocess"
    assert lines[1].split()[:4] == ["transport", "offered/s", "sent/s", "tasks/s"]
    assert any(line.startswith("nats ") for line in lines)
    assert "nats statuses: completed 100, denied 100; load average 1.50 -> 2.25" in lines
    assert "kafka ! 12 of 200 tasks have no result" in lines
    kafka_row = next(line for line in lines if line.startswith("kafka "))
    assert kafka_row.endswith("NO")


def test_pipeline_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.png"
    write_plot(build_pipeline_report(results(), META), path)
    assert path.read_bytes().startswith(b"\x89PNG")


# -- the CLI's side ----------------------------------------------------------------------


def options(**changes: Any) -> BenchOptions:
    base: dict[str, Any] = {
        "kinds": ("nats", "kafka"),
        "messages": 200,
        "sizes": (256,),
        "rate": 100.0,
        "batch": 1000,
        "timeout_s": 60.0,
        "faust": True,
        "faust_timeout_s": 60.0,
    }
    return BenchOptions(**{**base, **changes})


def test_pipeline_mode_is_registered_and_counts_one_result_per_task() -> None:
    assert "pipeline" in MODES
    assert _total("pipeline", options()) == 400
    assert _total("pipeline", options(kinds=("kafka",))) == 200


def test_a_pipeline_error_fails_the_run() -> None:
    rs = results()
    assert not _failed(build_pipeline_report(rs, META))
    rs[0].error = "the worker exited with 1"
    assert _failed(build_pipeline_report(rs, META))
