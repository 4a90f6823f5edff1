"""The bench report: JSON contract shape, the table and the plot (no timings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sluicegate.bench.latency import LatencyRecorder
from sluicegate.bench.plot import write_plot
from sluicegate.bench.report import build_step_report, build_transport_report, render_table
from sluicegate.bench.step_mode import FaustResult, StepResult, rate_after_warmup
from sluicegate.bench.transport_mode import CaseResult, TransportRow

META: dict[str, Any] = {
    "date": "2026-01-01T00:00:00+00:00",
    "settings": {"messages": 2000, "load_model": "max_throughput", "rate": None},
    "versions": {"clients": {}, "brokers": {}},
    "machine": {"cpu_model": "test", "cores": 2, "memory_bytes": 1},
}


def case(label: str, rate: float, latency_ms: float, size: int = 256) -> CaseResult:
    recorder = LatencyRecorder()
    recorder.record_many_ns(int(latency_ms * 1e6 * (1 + i / 100)) for i in range(100))
    return CaseResult(
        label,
        2000,
        size,
        received=2000,
        warmup=1000,
        producer_msgs_per_s=rate * 1.1,
        consumer_msgs_per_s=rate * 1.2,
        throughput_msgs_per_s=rate,
        latency=recorder.percentiles(),
        curve=recorder.curve_ms([50.0, 90.0, 99.0, 99.9]),
    )


def rows(size: int = 256) -> list[TransportRow]:
    return [
        TransportRow("nats_core", "NATS core", size, case("raw core", 90_000, 2, size)),
        TransportRow(
            "nats",
            "NATS JetStream",
            size,
            case("raw js", 10_000, 50, size),
            case("ours", 20_000, 9),
        ),
        TransportRow(
            "kafka", "Kafka", size, case("raw kafka", 50_000, 30, size), case("ours", 60_000, 20)
        ),
    ]


def transport_report() -> dict[str, Any]:
    return build_transport_report(rows(), META)


def step_report() -> dict[str, Any]:
    nats = StepResult("nats", 2000, 1000, step_msgs_per_s=3000, baseline_msgs_per_s=12000)
    kafka = StepResult("kafka", 2000, 1000, step_msgs_per_s=3500, baseline_msgs_per_s=5000)
    kafka.faust = FaustResult(
        msgs_per_s=700, received=2000, settings={"broker_session_timeout": 10}
    )
    kafka.faust_engine = FaustResult(msgs_per_s=1400, received=2000)
    return build_step_report([nats, kafka], META)


def test_transport_json_has_the_contract_fields() -> None:
    report = json.loads(json.dumps(transport_report()))  # JSON-serialisable as it is
    assert report["mode"] == "transport"
    assert set(report["transports"]) == {"nats", "kafka"}
    for name in ("nats", "kafka"):
        obj = report["transports"][name]
        assert obj["throughput_msgs_per_s"] > 0
        assert obj["baseline_msgs_per_s"] > 0
        assert {"p50", "p90", "p99", "p999", "max"} <= set(obj["latency_ms"])
        assert obj["measured"]["client"] == "ours"
    nats = report["transports"]["nats"]
    assert nats["throughput_msgs_per_s"] == 20_000 and nats["baseline_msgs_per_s"] == 10_000
    assert nats["ratio"] == 2.0
    core = nats["core"]
    assert core["measured"] is None and core["throughput_msgs_per_s"] == 90_000
    for key in ("date", "settings", "versions", "machine"):
        assert key in report


def test_a_size_sweep_keeps_the_first_size_under_transports() -> None:
    report = build_transport_report(rows(64) + rows(1024), META)
    assert [run["size_bytes"] for run in report["sweep"]] == [64, 1024]
    assert report["transports"]["kafka"]["size_bytes"] == 64


def test_step_json_has_the_contract_fields() -> None:
    report = json.loads(json.dumps(step_report()))
    nats, kafka = report["transports"]["nats"], report["transports"]["kafka"]
    assert nats["step_msgs_per_s"] == 3000 and nats["baseline_msgs_per_s"] == 12000
    assert nats["ratio"] == 0.25 and nats["within_budget"] is False
    assert "faust_msgs_per_s" not in nats
    assert kafka["faust_msgs_per_s"] == 700
    assert kafka["native_vs_faust"] == 5.0
    assert kafka["within_budget"] is True
    assert kafka["faust"]["settings"] == {"broker_session_timeout": 10}
    assert kafka["faust_engine_msgs_per_s"] == 1400
    assert kafka["native_vs_faust_engine"] == 2.5
    assert "faust_engine" not in nats


def test_transport_table_lists_every_client_and_ratio() -> None:
    table = render_table(transport_report())
    lines = table.splitlines()
    assert "p99.9 ms" in lines[1]
    assert sum(": raw" in line for line in lines) == 3
    assert any("NATS JetStream: ours" in line and "2.00x" in line for line in lines)
    assert len({len(line) for line in lines[1:3]}) == 1  # header and rule align


def test_step_table_shows_ratios_and_budget_verdicts() -> None:
    table = render_table(step_report())
    nats_line = next(line for line in table.splitlines() if line.startswith("nats"))
    kafka_line = next(line for line in table.splitlines() if line.startswith("kafka"))
    assert "0.25" in nats_line and "MISSED" in nats_line
    assert "0.70" in kafka_line and "5.00" in kafka_line and "MISSED" not in kafka_line
    assert "1,400" in kafka_line and "2.50" in kafka_line
    assert "faust engine/s" in table.splitlines()[1]


def test_a_failed_faust_engine_run_shows_its_error() -> None:
    report = step_report()
    kafka = report["transports"]["kafka"]
    assert kafka["faust_engine"]["error"] is None
    broken = StepResult("kafka", 2000, 1000, step_msgs_per_s=3500, baseline_msgs_per_s=5000)
    broken.faust_engine = FaustResult(error="faust engine: 10 of 2000 messages in 60s")
    obj = build_step_report([broken], META)["transports"]["kafka"]
    assert obj["faust_engine_msgs_per_s"] is None and obj["native_vs_faust_engine"] is None
    table = render_table(build_step_report([broken], META))
    assert "! faust engine: 10 of 2000 messages in 60s" in table


def test_errors_show_in_the_table() -> None:
    broken = rows()
    assert broken[2].measured is not None
    broken[2].measured.error = "timed out after 5s"
    table = render_table(build_transport_report(broken, META))
    assert "! timed out after 5s" in table


def test_plot_writes_png_for_both_modes(tmp_path: Path) -> None:
    for name, report in (("t.png", transport_report()), ("s.png", step_report())):
        path = tmp_path / name
        write_plot(report, path)
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_rate_after_warmup() -> None:
    second = 1_000_000_000
    marks = [(0, 0), (500, second), (1000, 2 * second), (3000, 3 * second)]
    assert rate_after_warmup(marks, 1000) == 2000.0  # 2000 messages in the last second
    assert rate_after_warmup(marks, 0) == 1000.0  # from the first mark
    assert rate_after_warmup(marks[:1], 0) == 0.0


def test_unresolvable_percentiles_are_null_n_a_and_off_the_curve(tmp_path: Path) -> None:
    # 100 samples per case: p50 and p90 are resolved, p99 and p99.9 are not.
    obj = transport_report()["transports"]["kafka"]
    assert obj["latency_ms"]["p90"] is not None
    assert obj["latency_ms"]["p99"] is None and obj["latency_ms"]["p999"] is None
    assert [p for p, _ in obj["measured"]["latency_curve_ms"]] == [50.0, 90.0]
    kafka_line = next(x for x in render_table(transport_report()).splitlines() if "ours" in x)
    assert kafka_line.count("n/a") == 2


def test_the_plot_title_says_what_was_measured() -> None:
    from sluicegate.bench.plot import title_of

    report = {**transport_report(), "settings": {**META["settings"], "size_bytes": 256}}
    assert title_of(report) == (
        "sluice bench --mode transport, 2,000 messages of 256 B, load max_throughput, "
        "2026-01-01T00:00:00+00:00"
    )
