"""One error root: every error class of ours is a ``SluiceError`` that says if retrying helps.

And the runner decides with it: a step's non-retriable ``SluiceError`` is
dead-lettered at once, a retriable one is retried like any other failure.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from sluicegate import Context, Event, Output, Pipeline, SluiceError, Step
from sluicegate.agents.tools.base import RetryableToolError, ToolError
from sluicegate.streams.checkpoint import StaleBatchError, StorePermanentError
from sluicegate.streams.codec import DecodeError
from sluicegate.streams.errors import is_retriable
from sluicegate.streams.runner import OutageError, StoreUnavailableError
from sluicegate.streams.transport import TransportError
from sluicegate.testing import MemoryPipeline, make_event

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("streams", "agents", "policy", "sinks", "sluicegate")
# Not failures of ours to classify: click's usage errors render themselves.
EXEMPT = {"BadSettingError"}


def error_classes() -> list[tuple[str, str]]:
    """(module, class) of every class named like an error in our packages."""
    found: list[tuple[str, str]] = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[0] != "sluicegate":
                parts.insert(0, "sluicegate")
            elif len(parts) > 1 and parts[1] in FOLDERS:
                continue  # the symlinked library folders, seen above
            if parts[-1] == "__init__":
                parts.pop()
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    named = node.name.endswith(("Error", "Exception", "Decision", "Complex"))
                    if (named or node.name == "DeadLetter") and node.name not in EXEMPT:
                        found.append((".".join(parts), node.name))
    return found


def test_every_error_class_of_ours_is_a_sluice_error() -> None:
    classes = error_classes()
    assert len(classes) > 15
    wrong = []
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        is_error = isinstance(cls, type) and issubclass(cls, BaseException)
        if is_error and not issubclass(cls, SluiceError):
            wrong.append(f"{module}.{name}")
    assert wrong == []


def test_what_each_kind_says_about_retrying() -> None:
    for retriable in (TransportError, StoreUnavailableError, StaleBatchError, RetryableToolError):
        assert is_retriable(retriable("x")), retriable
    for final in (DecodeError("bad", "x"), StorePermanentError("x"), OutageError("x")):
        assert not is_retriable(final), final
    assert not is_retriable(ToolError("x"))
    assert not is_retriable(ValueError("not ours"))
    # An instance may say otherwise than its class.
    assert not is_retriable(TransportError("refused configuration", retriable=False))
    # Still the builtin it refines, for callers that catch that.
    assert isinstance(DecodeError("bad", "x"), ValueError)


class Flaky(Step):
    name = "flaky"
    inputs = ("in",)
    outputs = ("out",)

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def process(self, event: Event, ctx: Context) -> list[Output]:
        kind = str(event.data["kind"])
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if kind == "final":
            raise SluiceError("this input can never succeed")
        if kind == "transient" and self.calls[kind] < 3:
            raise SluiceError("try again", retriable=True)
        return [ctx.output("out", "done", {"kind": kind})]


async def test_the_runner_dead_letters_a_final_error_at_once_and_retries_a_retriable_one() -> None:
    flaky = Flaky()
    async with MemoryPipeline(Pipeline([flaky])) as run:
        await run.publish(
            "in",
            [
                make_event("t", {"kind": "final"}, session="a"),
                make_event("t", {"kind": "transient"}, session="b"),
            ],
        )
        await run.run()
        [letter] = await run.dead_letters()
        assert letter.reason == "step_error"
        assert [e.data for e in await run.events("out")] == [{"kind": "transient"}]
    assert flaky.calls == {"final": 1, "transient": 3}
