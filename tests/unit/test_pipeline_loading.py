"""``--pipeline MODULE:ATTR``: imported from the current directory; every mistake is one line."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from sluicegate.cli import main
from sluicegate.loading import PipelineLoadError, load_pipeline, pipeline_spec
from sluicegate.pipeline import DEFAULT_PIPELINE

APP = """
from sluicegate import Context, Event, Output, Pipeline, Step

class Shout(Step):
    name = "shout"
    inputs = ("words",)
    outputs = ("shouted",)

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        return []

pipeline = Pipeline([Shout()])

def make() -> Pipeline:
    return pipeline

def broken() -> Pipeline:
    raise RuntimeError("no config")

number = 3
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module (unique name) in a folder outside the repository, made the current directory."""
    name = f"userapp_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP)
    (tmp_path / f"{name}_bad.py").write_text("import json\nraise ValueError('bad config')\n")
    (tmp_path / f"{name}_exits.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLUICE_PIPELINE", raising=False)
    return name


def test_a_pipeline_or_a_function_returning_one(app_module: str) -> None:
    assert load_pipeline(f"{app_module}:pipeline").step_names == ["shout"]
    assert load_pipeline(f"{app_module}:make").step_names == ["shout"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{m}", "--pipeline takes MODULE:ATTR such as myapp:pipeline, got '{m}'"),
        ("{m}:", "--pipeline takes MODULE:ATTR"),
        ("no_such_module_xyz:pipeline", "no module named 'no_such_module_xyz' in "),
        ("{m}_bad:pipeline", "module '{m}_bad' failed to import: ValueError: bad config ("),
        ("{m}:nothing", "module '{m}' has no attribute 'nothing'"),
        ("{m}:number", "{m}:number is not a sluicegate.Pipeline (nor a function returning one)"),
        ("{m}:broken", "{m}:broken() failed: RuntimeError: no config"),
        ("{m}:Shout", "is not a sluicegate.Pipeline"),
        ("{m}_exits:pipeline", "module '{m}_exits' called sys.exit(3) while being imported"),
    ],
)
def test_bad_specs_are_one_line(app_module: str, spec: str, message: str) -> None:
    with pytest.raises(PipelineLoadError) as caught:
        load_pipeline(spec.format(m=app_module))
    text = str(caught.value)
    assert message.format(m=app_module) in text
    assert "\n" not in text


def test_the_default_is_the_reference_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_PIPELINE", raising=False)
    assert pipeline_spec(None) == DEFAULT_PIPELINE
    monkeypatch.setenv("SLUICE_PIPELINE", "x:y")
    assert pipeline_spec(None) == "x:y"
    assert pipeline_spec("a:b") == "a:b"
    monkeypatch.delenv("SLUICE_PIPELINE")
    assert load_pipeline(DEFAULT_PIPELINE).step_names == [
        "intake",
        "context",
        "planner",
        "gate",
        "tools",
        "responder",
    ]


def test_run_reports_a_bad_pipeline_on_one_line_with_exit_2(
    app_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--pipeline", f"{app_module}_bad:pipeline"]) == 2
    err = capsys.readouterr().err.strip()
    assert "failed to import: ValueError: bad config" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["demo", "--pipeline", "nope_xyz:app"]) == 2
    assert main(["publish", "--pipeline", f"{app_module}:number", "-"]) == 2


def test_steps_help_lists_the_pipelines_steps(
    app_module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["run", "--pipeline", f"{app_module}:pipeline", "--help"]) == 0
    assert f"Steps of {app_module}:pipeline: shout." in " ".join(capsys.readouterr().out.split())
    monkeypatch.setenv("SLUICE_PIPELINE", f"{app_module}:pipeline")
    assert main(["run", "--help"]) == 0
    assert "shout." in " ".join(capsys.readouterr().out.split())
    monkeypatch.delenv("SLUICE_PIPELINE")
    assert main(["run", "--help"]) == 0
    assert "intake, context, planner, gate, tools, responder" in " ".join(
        capsys.readouterr().out.split()
    )


def test_publish_rejects_a_topic_the_pipeline_lacks(
    app_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", "--pipeline", f"{app_module}:pipeline", "--topic", "tasks", "-"]) == 2
    assert "'tasks' is not a topic of the pipeline ('words', 'shouted', 'dlq')" in (
        capsys.readouterr().err
    )


def test_bench_takes_a_pipeline_in_pipeline_mode_only(
    app_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--mode", "step", "--pipeline", f"{app_module}:pipeline"]) == 2
    assert "--pipeline applies to --mode pipeline only" in capsys.readouterr().err
    assert main(["bench", "--mode", "pipeline", "--pipeline", f"{app_module}:pipeline"]) == 2
    assert "does not take tasks or answer on results" in capsys.readouterr().err


def test_publish_validates_against_the_pipelines_upstream_schema() -> None:
    from pydantic import BaseModel

    from sluicegate import Context, Event, Output, Pipeline, Step
    from sluicegate.publishing import make_publisher
    from sluicegate.streams.codec import DecodeError
    from sluicegate.streams.transports.memory import MemoryTransport

    class Ticket(BaseModel):
        subject: str

    class Triage(Step[Ticket]):
        name = "triage"
        inputs = ("tickets",)
        types = ("ticket.opened",)

        async def process(self, event: Event, ctx: Context[Ticket]) -> list[Output]:
            return []

    app = Pipeline([Triage()])
    publisher = make_publisher(MemoryTransport(), topic="tickets", pipeline=app)
    event = publisher.prepare({"tenant": "t", "session": "s", "data": {"subject": "hi"}})
    assert event.type == "ticket.opened"  # the topic's only type is the default
    with pytest.raises(DecodeError, match="invalid_data"):
        publisher.prepare({"tenant": "t", "session": "s", "data": {"body": "no subject"}})
    with pytest.raises(DecodeError, match="unknown_type"):
        publisher.prepare({"tenant": "t", "session": "s", "type": "x", "data": {"subject": "a"}})


def test_tail_follows_the_pipelines_topics(
    app_module: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sluicegate.cli_tail import _topic

    spec = f"{app_module}:pipeline"
    assert _topic(spec, None) == "shouted"  # what its steps write and none reads
    assert _topic(spec, "dlq") == "dlq"
    assert _topic(None, None) == "results"
    assert main(["tail", "--pipeline", spec, "results"]) == 2
    assert "'results' is not a topic of the pipeline ('words', 'shouted', 'dlq')" in (
        capsys.readouterr().err
    )
