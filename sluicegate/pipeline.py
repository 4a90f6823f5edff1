"""The reference pipeline, and the ``Pipeline`` a command runs.

``reference()`` is the reference pipeline as a :class:`~sluicegate.Pipeline`,
what ``sluice run`` runs without ``--pipeline`` (``DEFAULT_PIPELINE``);
:func:`load_pipeline` imports the one ``--pipeline MODULE:ATTR`` /
``SLUICE_PIPELINE`` names. ``build_steps`` gives the reference steps with the application's choices
made: the planner from ``SLUICE_LLM_*``, the Rego policy gate (bundle
from ``SLUICE_POLICY_BUNDLE``, shadow from ``SLUICE_POLICY_SHADOW``) and the
built-in tools, slowed by ``SLUICE_TOOL_LATENCY_MS`` when set;
``select_steps`` picks the ones a worker runs (``sluice run --steps``). A bad
value of those variables raises :class:`ValueError` naming it, which the
commands report on one line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from sluicegate.agents import topics
from sluicegate.agents.graph import Pipeline
from sluicegate.agents.pipeline import reference_steps
from sluicegate.agents.planner import make_planner
from sluicegate.agents.schemas import TASK_SUBMITTED, TaskSubmitted
from sluicegate.agents.tools.latency import tools_from_env
from sluicegate.policy.gate import PolicyGate
from sluicegate.streams.codec import DataRegistry
from sluicegate.streams.step import Processor

TOPICS: tuple[str, ...] = topics.ALL


def build_steps() -> list[Processor]:
    return reference_steps(
        planner=make_planner(os.environ), make_gate=PolicyGate, tools=tools_from_env(os.environ)
    )


def reference() -> Pipeline:
    """The reference pipeline (intake, context, planner, Rego gate, tools, responder)."""
    return Pipeline(
        build_steps(), upstream={topics.TASKS: {TASK_SUBMITTED: TaskSubmitted}}, name="reference"
    )


DEFAULT_PIPELINE = "sluicegate.pipeline:reference"


def check_step_settings() -> None:
    """Read the steps' own variables now, so a bad one stops a command before it starts anything."""
    make_planner(os.environ)
    tools_from_env(os.environ)


def task_registry() -> DataRegistry:
    """What upstream may publish on ``tasks``: the schema ``sluice publish`` validates."""
    registry = DataRegistry()
    registry.register(TASK_SUBMITTED, TaskSubmitted)
    return registry


def select_steps(steps: Sequence[Processor], wanted: str | None) -> list[Processor]:
    """The steps named in the comma-separated ``wanted`` (all when None or "all")."""
    if wanted is None or wanted.strip() in ("", "all"):
        return list(steps)
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    by_name = {step.name: step for step in steps}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(
            f"unknown step {', '.join(unknown)}; the pipeline has {', '.join(by_name)}"
        )
    return [by_name[name] for name in names]
