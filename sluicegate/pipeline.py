"""Pipeline assembly: which steps run, in which order, with which gate and planner.

``build_steps`` gives the reference pipeline with the application's choices
made (planner from ``SLUICE_LLM_URL``, policy gate when it is available);
``select_steps`` picks the ones a worker runs (``sluice run --steps``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from agents.pipeline import reference_steps
from agents.planner import make_planner
from streams.step import Processor


def build_steps() -> list[Processor]:
    return reference_steps(planner=make_planner(os.environ))


def step_names() -> list[str]:
    return [step.name for step in build_steps()]


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
