"""``--model-latency`` without brokers: budgets, sessions, RSS, the JSON, table, plot and CLI.

Every rate and latency here comes from synthetic due and arrival times.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from sluicegate.bench.latency import LatencyRecorder
from sluicegate.bench.model_latency import (
    ModelLatencyPair,
    budget_for,
    client_concurrency,
    model_latency_settings,
    sessions_for,
)
from sluicegate.bench.model_standin import StandinStats
from sluicegate.bench.pipeline_mode import ModelSpec, PipelineResult, mid_run_rate, summarise
from sluicegate.bench.plot import write_plot
from sluicegate.bench.report import (
    build_model_latency_report,
    build_pipeline_report,
    percentile_supported,
    render_table,
    supported_latency,
)
from sluicegate.bench.rss import RssSampler, RssSeries, read_rss_mb
from sluicegate.cli import main
from sluicegate.cli_bench import _failed, _total
from sluicegate.settings import TransportName
from tests.unit.test_bench_pipeline import META, MS, arrive, options, scheduled

SPEC = ModelSpec(200.0)


def meta() -> dict[str, Any]:
    settings = {**META["settings"], "rate": 400.0, "sessions": 363}
    return {**META, "settings": {**settings, **model_latency_settings(SPEC)}}


def run(key: TransportName, spec: ModelSpec, tasks: int, latency_ms: int, stretch: float) -> Any:
    """A run of ``tasks`` at 400/s whose task ``i`` completes ``stretch`` x later than due."""
    tally = scheduled(tasks, 400.0)
    first = tally.due_ns[0]
    arrive(tally, [latency_ms * MS] * tasks, ["completed", "denied"] * (tasks // 2))
    for i in range(tasks):  # a capacity below the offered rate: the backlog grows
        tally.arrived_ns[i] = first + int((tally.due_ns[i] - first) * stretch) + latency_ms * MS
    result = PipelineResult(key, 400.0, tasks, tasks // 10, sessions=363, model_spec=spec)
    result.rss = RssSeries(1.0, [(0.0, 120.0), (1.0, 131.5), (2.0, 128.0)])
    result.model = StandinStats(spec.median_ms, spec.sigma, tasks, 0, 37, 0, {"p50": 200.0})
    summarise(result, tally)
    return result


def pairs(slow_stretch: float = 2.1) -> list[ModelLatencyPair]:
    out = []
    for key in ("nats", "kafka"):
        zero = run(key, ModelSpec(0.0), 2000, 20, 2.0)
        slow = run(key, SPEC, 2000, 250, slow_stretch)
        out.append(ModelLatencyPair(key, zero, slow))
    return out


# -- rules -------------------------------------------------------------------------------------


def test_budgets_follow_the_design_and_issue_14() -> None:
    assert budget_for(50.0) == budget_for(200.0) == 0.9
    assert budget_for(200.5) == budget_for(2000.0) == 0.8
    assert budget_for(2001.0) is None


def test_sessions_leave_each_session_mostly_idle() -> None:
    assert sessions_for(400.0, ModelSpec(200.0)) == 363  # 4 x 400 x 0.2 x e^(0.5^2/2)
    assert sessions_for(400.0, ModelSpec(2000.0)) == 3627
    assert sessions_for(600.0, ModelSpec(200.0)) == 544
    assert sessions_for(600.0, ModelSpec(2000.0)) == 5440
    assert sessions_for(100.0, ModelSpec(10.0)) == 50  # never fewer than the plain mode's


def test_the_model_client_is_sized_for_the_sessions_unless_the_environment_says() -> None:
    assert client_concurrency({}, 363) == 363
    assert client_concurrency({"SLUICE_LLM_CONCURRENCY": " 32 "}, 363) == 32
    assert client_concurrency({"SLUICE_LLM_CONCURRENCY": "lots"}, 363) is None


def test_the_worker_is_pointed_at_the_stand_in_without_key_or_rate_limit() -> None:
    env = ModelSpec(2000.0, concurrency=500).worker_env("http://127.0.0.1:9/v1")
    assert env == {
        "SLUICE_LLM_URL": "http://127.0.0.1:9/v1",
        "SLUICE_LLM_MODEL": "sluice-standin",
        "SLUICE_LLM_API_KEY": "",
        "SLUICE_LLM_TIMEOUT": "40",  # 20 x the median, above the planner's default 20 s
        "SLUICE_LLM_RPM": "",
        "SLUICE_LLM_CONCURRENCY": "500",
    }
    assert "SLUICE_LLM_CONCURRENCY" not in ModelSpec(200.0).worker_env("u")
    assert ModelSpec(200.0).worker_env("u")["SLUICE_LLM_TIMEOUT"] == "20"


def test_the_mid_run_rate_ignores_the_ramp_up_and_the_last_latency() -> None:
    steady = [i * 5 * MS for i in range(1000)]  # one result every 5 ms: 200/s
    assert mid_run_rate(steady) == pytest.approx(200.0, rel=1e-3)
    late = [*steady[:-1], steady[-1] + 8_000 * MS]  # the last one 8 s late
    assert mid_run_rate(late) == pytest.approx(200.0, rel=1e-3)
    assert mid_run_rate(list(reversed(late))) == mid_run_rate(late)  # order does not matter
    assert mid_run_rate(steady[:9]) == 0.0
    assert mid_run_rate([7] * 50) == 0.0  # no time elapsed


def test_percentiles_need_enough_samples() -> None:
    # Ten samples beyond the percentile: one would make pN the largest value but one.
    assert percentile_supported(99.0, 1000) and not percentile_supported(99.0, 999)
    assert percentile_supported(99.9, 10_000) and not percentile_supported(99.9, 9_999)
    assert percentile_supported(90.0, 100) and not percentile_supported(90.0, 99)
    assert not percentile_supported(50.0, 0)
    recorder = LatencyRecorder()
    recorder.record_many_ns(i * MS for i in range(1, 1501))
    latency = supported_latency(recorder.percentiles())
    assert latency["p99"] is not None and latency["p999"] is None
    assert latency["max"] == pytest.approx(1500.0, rel=1e-2) and latency["count"] == 1500


# -- RSS -----------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc, which only Linux has")
def test_read_rss_mb_reads_proc() -> None:
    assert (read_rss_mb(os.getpid()) or 0.0) > 1.0
    assert read_rss_mb(2**22 + 12345) is None


async def test_rss_sampler_samples_at_start_each_interval_and_stop() -> None:
    readings = iter([100.0, 110.0, 150.0, 120.0, 125.0, 125.0, 125.0])
    ticks = iter(range(100))
    three = asyncio.Event()
    pids: list[int] = []

    def read(pid: int) -> float:
        pids.append(pid)
        if len(pids) == 3:
            three.set()
        return next(readings)

    sampler = RssSampler(42, interval_s=0.001, read=read, clock=lambda: float(next(ticks)))
    sampler.start()
    await asyncio.wait_for(three.wait(), 30)  # three samples taken (a bound, not a timing)
    series = await sampler.stop()
    assert set(pids) == {42} and len(series.samples) == len(pids) >= 4
    assert series.start == 100.0 and series.peak == 150.0
    assert series.end == series.samples[-1][1]
    assert [t for t, _ in series.samples] == sorted(t for t, _ in series.samples)
    assert series.samples[0][0] == 0.0
    out = series.as_json()
    assert out is not None and out["interval_s"] == 0.001
    assert out["samples"][0] == [0.0, 100.0]
    assert RssSeries().as_json() is None
    assert (await RssSampler(None).stop()).samples == []


# -- the report ----------------------------------------------------------------------------------


def test_model_latency_json_has_the_contract_fields() -> None:
    ps = pairs()
    report = json.loads(json.dumps(build_model_latency_report(ps, meta(), budget_for(200.0))))
    assert report["mode"] == "pipeline"
    assert report["settings"]["model"]["median_ms"] == 200.0
    assert report["settings"]["budget_ratio"] == 0.9
    assert set(report["transports"]) == {"nats", "kafka"}
    for pair in ps:
        obj = report["transports"][pair.key]
        assert obj["tasks_per_s"] == round(pair.model.tasks_per_s, 1) > 0
        assert obj["zero_latency_tasks_per_s"] == round(pair.zero.tasks_per_s, 1) > 0
        assert obj["model_latency_ratio"] == round(
            pair.model.tasks_per_s / pair.zero.tasks_per_s, 3
        )
        assert 0.9 < obj["model_latency_ratio"] < 1.0
        assert obj["budget_ratio"] == 0.9 and obj["within_budget"] is True
        assert obj["mid_run_tasks_per_s"] == pytest.approx(400 / 2.1, rel=0.01)
        assert obj["mid_run_ratio"] == pytest.approx(2.0 / 2.1, abs=0.002)
        assert obj["mid_run_within_budget"] is True
        assert obj["model_peak_in_flight"] == 37
        assert obj["zero_latency_saturated"] is True  # half the offered rate
        latency = obj["latency_ms"]
        assert latency["count"] == 1800
        assert latency["p50"] <= latency["p99"] <= latency["max"]
        assert latency["p999"] is None  # 1,800 samples cannot resolve p99.9
        rss = obj["worker_rss_mb"]
        assert (rss["start"], rss["peak"], rss["end"]) == (120.0, 131.5, 128.0)
        assert rss["samples"] == [[0.0, 120.0], [1.0, 131.5], [2.0, 128.0]]
        assert obj["model"]["median_ms"] == 200.0 and obj["model"]["requests"] == 2000
        zero = obj["zero_latency"]
        assert zero["model"]["median_ms"] == 0.0 and zero["tasks"] == 2000
        assert obj["sessions"] == zero["sessions"] == 363
        assert obj["error"] is None and zero["error"] is None


def test_a_slow_run_below_budget_is_not_met_and_a_failed_run_has_no_ratio() -> None:
    ps = pairs(slow_stretch=3.0)
    ps[1].zero.error = "5 of 2000 tasks have no result"
    report = build_model_latency_report(ps, meta(), 0.9)
    nats, kafka = report["transports"]["nats"], report["transports"]["kafka"]
    assert nats["model_latency_ratio"] < 0.9 and nats["within_budget"] is False
    assert kafka["model_latency_ratio"] is None and kafka["within_budget"] is False
    assert _failed(report)  # the instant run's error fails the command
    unbudgeted = build_model_latency_report(pairs(), meta(), None)
    assert unbudgeted["transports"]["nats"]["within_budget"] is None


def test_the_last_tasks_latency_costs_the_ratio_but_not_the_mid_run_ratio() -> None:
    ps = pairs()
    slow = ps[0].model
    before, mid_before = ps[0].ratio, ps[0].mid_run_ratio
    tally = scheduled(2000, 400.0)
    first = tally.due_ns[0]
    for i in range(2000):
        late = 8_000 * MS if i == 1999 else 250 * MS  # one slow call at the very end
        arrival = first + int((tally.due_ns[i] - first) * 2.1) + late
        tally.observe(
            [f'{{"data": {{"task_id": "task-{i}", "status": "completed"}}}}'.encode()], arrival
        )
    summarise(slow, tally)
    assert ps[0].ratio is not None and before is not None and ps[0].ratio < before - 0.2
    assert ps[0].mid_run_ratio == pytest.approx(mid_before, abs=0.002)
    obj = build_model_latency_report(ps, meta(), 0.9)["transports"]["nats"]
    assert obj["within_budget"] is False and obj["mid_run_within_budget"] is True
    line = next(
        x
        for x in render_table(build_model_latency_report(ps, meta(), 0.9)).splitlines()
        if x.startswith("nats ") and "saturated" in x
    )
    assert "NOT MET" in line and line.split()[-3] == "0.95" and line.split()[-2] == "met"


def test_a_short_run_leaves_unsupported_percentiles_out() -> None:
    short = [
        ModelLatencyPair(
            "nats", run("nats", ModelSpec(0.0), 200, 20, 2.0), run("nats", SPEC, 200, 250, 2.0)
        )
    ]
    obj = build_model_latency_report(short, meta(), 0.9)["transports"]["nats"]
    assert obj["latency_ms"]["count"] == 180
    assert obj["latency_ms"]["p999"] is None and obj["latency_ms"]["p99"] is None
    assert obj["latency_ms"]["p90"] is not None
    assert all(p <= 90.0 for p, _ in obj["latency_curve_ms"])


def test_model_latency_table_shows_both_runs_the_ratio_and_the_verdict() -> None:
    ps = pairs()
    ps[1].model.error = "the model stand-in exited with -9: (empty log)"
    text = render_table(build_model_latency_report(ps, meta(), 0.9))
    lines = text.splitlines()
    assert lines[0].startswith("pipeline benchmark with a model: 200 tasks at 400/s offered")
    assert "median 200 ms (sigma 0.5), 363 sessions" in lines[0]
    assert any(line.startswith("nats, instant ") for line in lines)
    assert any(line.startswith("nats, 200 ms ") for line in lines)
    assert any("120/132/128" in line for line in lines)  # RSS start/peak/end
    nats_ratio = next(line for line in lines if line.startswith("nats ") and "saturated" in line)
    assert ">=0.9" in nats_ratio and " met " in f"{nats_ratio} "
    kafka_ratio = next(line for line in lines if line.startswith("kafka ") and ">=0.9" in line)
    assert kafka_ratio.split()[3] == "-"  # no ratio for a failed run
    assert "kafka, 200 ms ! the model stand-in exited with -9: (empty log)" in lines


def test_an_instant_run_that_kept_up_is_flagged() -> None:
    ps = pairs()
    ps[0].zero.tasks_per_s = 399.0  # kept up with 400/s: not the capacity
    text = render_table(build_model_latency_report(ps, meta(), 0.9))
    assert "nats: the instant run kept up with the offered rate" in text
    assert "kafka: the instant run kept up" not in text


def test_model_latency_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "model.png"
    write_plot(build_model_latency_report(pairs(), meta(), 0.9), path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_plain_pipeline_report_carries_rss_and_no_model(tmp_path: Path) -> None:
    result = run("nats", SPEC, 200, 20, 1.0)
    result.model_spec, result.model = None, None
    report = build_pipeline_report([result], META)
    obj = report["transports"]["nats"]
    assert obj["model"] is None and obj["worker_rss_mb"]["peak"] == 131.5
    assert "nats worker RSS MB: start 120.0, peak 131.5, end 128.0 (3 samples)" in (
        render_table(report).splitlines()
    )
    write_plot(report, tmp_path / "plain.png")
    assert (tmp_path / "plain.png").read_bytes().startswith(b"\x89PNG")


# -- the CLI -------------------------------------------------------------------------------------


def test_model_latency_runs_each_transport_twice() -> None:
    assert _total("pipeline", options(model_latency_ms=200.0)) == 800
    assert _total("pipeline", options()) == 400


@pytest.mark.parametrize("flag", [["--model-latency", "200"], ["--sessions", "10"]])
def test_model_flags_need_pipeline_mode(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--mode", "transport", *flag]) == 2
    assert f"{flag[0]} applies to --mode pipeline only" in capsys.readouterr().err


def test_model_latency_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--mode", "pipeline", "--model-latency", "0"]) == 2
    assert "--model-latency" in capsys.readouterr().err
