"""Telemetry from settings (runtime.configure_telemetry) and `sluice run --metrics-port`."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace

from sluicegate.cli import main
from sluicegate.runtime import configure_telemetry
from sluicegate.settings import Settings
from sluicegate.streams import metrics, tracing


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    import os

    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    # The global providers can be set once per process: record, don't set.
    made_global: list[object] = []
    monkeypatch.setattr(otel_trace, "set_tracer_provider", made_global.append)
    monkeypatch.setattr(otel_metrics, "set_meter_provider", made_global.append)
    yield made_global
    tracing.shutdown()
    metrics.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nothing_configured_turns_nothing_on(clean_env: list[object]) -> None:
    telemetry = configure_telemetry(Settings(), serve_metrics=True)
    assert not telemetry.tracing and not telemetry.metrics and telemetry.metrics_url is None
    assert not tracing.enabled() and not metrics.enabled() and clean_env == []


def test_an_otlp_endpoint_turns_on_traces_and_metrics(clean_env: list[object]) -> None:
    settings = Settings(otlp_endpoint="http://127.0.0.1:9/", trace_sample_ratio=0.25)
    telemetry = configure_telemetry(settings)
    try:
        assert telemetry.tracing and telemetry.metrics and tracing.enabled() and metrics.enabled()
        provider = tracing._state.provider
        assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
        assert len(clean_env) == 2  # both became the process's global providers
    finally:
        # Nothing listens on port 9: the exports fail quietly and shutdown returns.
        telemetry.shutdown()
    assert not tracing.enabled() and not metrics.enabled()


def test_metrics_port_serves_prometheus(clean_env: list[object]) -> None:
    port = free_port()
    telemetry = configure_telemetry(Settings(metrics_port=port), serve_metrics=True)
    try:
        assert telemetry.metrics and not telemetry.tracing
        assert telemetry.metrics_url == f"http://127.0.0.1:{port}/metrics"
        recorder = metrics.StepMetrics("intake", prefix="p")
        recorder.batch_done([], 2, 0, 0.02, [], None)
        with urllib.request.urlopen(telemetry.metrics_url, timeout=5) as response:
            body = response.read().decode()
        assert "sluice_step_events_out_total{" in body and 'sluice_step="intake"' in body
        assert "sluice_step_batch_duration_seconds_bucket" in body
    finally:
        telemetry.shutdown()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_busy_metrics_port_is_reported(clean_env: list[object]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            configure_telemetry(Settings(metrics_port=port), serve_metrics=True)
    assert not metrics.enabled()


def test_one_shot_commands_do_not_serve_metrics(clean_env: list[object]) -> None:
    telemetry = configure_telemetry(Settings(metrics_port=free_port()))
    assert telemetry.metrics_url is None and not metrics.enabled()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_TRACE_SAMPLE_RATIO", "0.01")
    monkeypatch.setenv("SLUICE_METRICS_PORT", "")
    settings = Settings()
    assert settings.trace_sample_ratio == 0.01 and settings.metrics_port is None
    assert Settings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("SLUICE_METRICS_PORT", "9464")
    assert Settings().metrics_port == 9464


def test_bad_ratio_and_port_are_one_line_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLUICE_TRACE_SAMPLE_RATIO", "1.5")
    assert main(["run", "--steps", "intake"]) == 2
    assert "SLUICE_TRACE_SAMPLE_RATIO" in capsys.readouterr().err
    monkeypatch.delenv("SLUICE_TRACE_SAMPLE_RATIO")
    assert main(["run", "--metrics-port", "0"]) == 2
    assert "--metrics-port" in capsys.readouterr().err


def test_run_help_documents_the_metrics_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--metrics-port" in out and "SLUICE_OTLP_ENDPOINT" in out
