"""SLUICE_LLM_* and SLUICE_TOOL_LATENCY_MS: read, checked, and a bad one is a one-line error."""

from __future__ import annotations

import os

import pytest

from sluicegate.agents.model_limits import LimitConfig
from sluicegate.agents.openai_planner import OpenAIPlanner
from sluicegate.agents.planner import make_planner
from sluicegate.agents.rule_planner import RuleBasedPlanner
from sluicegate.agents.tools import builtin_tools
from sluicegate.agents.tools.latency import Latency, SlowTool, parse_latency_ms, tools_from_env
from sluicegate.cli import main

# A URL of this module's own: the process-wide limits are per endpoint, and
# other tests register the defaults for theirs.
URL = "http://127.0.0.1:9/settings-test/v1"


def test_llm_settings_reach_the_client() -> None:
    planner = make_planner(
        {
            "SLUICE_LLM_URL": URL,
            "SLUICE_LLM_TIMEOUT": "2.5",
            "SLUICE_LLM_CONCURRENCY": "8",
            "SLUICE_LLM_RPM": "30",
            "SLUICE_LLM_MAX_ATTEMPTS": "2",
        }
    )
    assert isinstance(planner, OpenAIPlanner)
    client = planner.client
    assert (client.timeout, client.max_attempts) == (2.5, 2)
    assert client.limits == LimitConfig(concurrency=8, rpm=30.0)


def test_llm_defaults() -> None:
    planner = make_planner({"SLUICE_LLM_URL": URL + "/defaults", "SLUICE_LLM_RPM": " "})
    assert isinstance(planner, OpenAIPlanner)
    assert (planner.client.timeout, planner.client.max_attempts) == (20.0, 4)
    assert planner.client.limits == LimitConfig(concurrency=64, rpm=None)


BAD_LLM = [
    ("SLUICE_LLM_TIMEOUT", "soon"),
    ("SLUICE_LLM_TIMEOUT", "0"),
    ("SLUICE_LLM_TIMEOUT", "inf"),
    ("SLUICE_LLM_CONCURRENCY", "0"),
    ("SLUICE_LLM_CONCURRENCY", "2.5"),
    ("SLUICE_LLM_RPM", "fast"),
    ("SLUICE_LLM_RPM", "-1"),
    ("SLUICE_LLM_MAX_ATTEMPTS", "0"),
    ("SLUICE_LLM_MAX_ATTEMPTS", "many"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_LLM)
@pytest.mark.parametrize("url", [URL, ""])
def test_a_bad_llm_setting_raises_naming_it(variable: str, value: str, url: str) -> None:
    # Checked with or without a URL: a typo waiting for the day the URL is set is still a typo.
    with pytest.raises(ValueError) as caught:
        make_planner({"SLUICE_LLM_URL": url, variable: value})
    assert f"{variable}={value!r}" in str(caught.value)


def test_no_url_is_the_rule_based_planner() -> None:
    assert isinstance(make_planner({"SLUICE_LLM_CONCURRENCY": "3"}), RuleBasedPlanner)


def test_tool_latency_setting() -> None:
    assert parse_latency_ms("200") == Latency(0.2, 0.2)
    assert parse_latency_ms(" 100-300 ") == Latency(0.1, 0.3)
    assert parse_latency_ms("0") is None
    assert parse_latency_ms("") is None
    assert tools_from_env({}) is None
    tools = tools_from_env({"SLUICE_TOOL_LATENCY_MS": "50"})
    assert tools is not None and set(tools) == set(builtin_tools())
    assert all(isinstance(tool, SlowTool) for tool in tools.values())


@pytest.mark.parametrize("value", ["soon", "300-100", "-5", "1-2-3"])
def test_a_bad_tool_latency_raises_naming_it(value: str) -> None:
    with pytest.raises(ValueError, match=rf"^SLUICE_TOOL_LATENCY_MS={value!r}: expected"):
        tools_from_env({"SLUICE_TOOL_LATENCY_MS": value})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SLUICE_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("command", [["run"], ["demo"]])
@pytest.mark.parametrize(
    ("variable", "value"),
    [("SLUICE_LLM_RPM", "fast"), ("SLUICE_LLM_TIMEOUT", "0"), ("SLUICE_TOOL_LATENCY_MS", "soon")],
)
def test_the_cli_reports_a_bad_value_on_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    variable: str,
    value: str,
) -> None:
    monkeypatch.setenv("SLUICE_LLM_URL", URL + "/cli")
    monkeypatch.setenv(variable, value)
    # Refused before anything starts: no broker, database or local stack is touched.
    assert main(command) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert f"{variable}={value!r}" in lines[0]
    assert "Traceback" not in captured.err
