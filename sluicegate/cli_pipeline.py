"""``--pipeline`` and ``--steps``, as ``run``, ``demo``, ``bench`` and ``publish`` share them.

``--pipeline MODULE:ATTR`` (``SLUICE_PIPELINE``; default the reference
pipeline) is eager, so ``sluice run --pipeline myapp:pipeline --help`` lists
that pipeline's steps under ``--steps``; the help of ``--steps`` is
computed when it is shown, by loading the pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from sluicegate.agents.graph import Pipeline
from sluicegate.loading import ENV_PIPELINE, PipelineLoadError, load_pipeline, pipeline_spec

F = TypeVar("F", bound=Callable[..., Any])


def pipeline_option(func: F) -> F:
    decorator = click.option(
        "--pipeline",
        "pipeline_spec",
        default=None,
        metavar="MODULE:ATTR",
        is_eager=True,
        help=(
            f"The pipeline to use, imported from the current directory ({ENV_PIPELINE}; "
            "default: the reference pipeline, sluicegate.pipeline:reference)."
        ),
    )
    return decorator(func)


def resolve_pipeline(spec: str | None) -> Pipeline:
    """The pipeline ``spec`` (or ``SLUICE_PIPELINE``) names; a bad one is a usage error (exit 2)."""
    try:
        return load_pipeline(pipeline_spec(spec))
    except PipelineLoadError as exc:
        hint = "'--pipeline'" if spec else ENV_PIPELINE if os.environ.get(ENV_PIPELINE) else None
        raise click.BadParameter(str(exc), param_hint=hint) from None
    except ValueError as exc:
        # A step's own setting (the reference pipeline's SLUICE_LLM_*, tools).
        raise click.UsageError(str(exc)) from None


class StepsOption(click.Option):
    """``--steps``, whose help names the steps of the pipeline ``--pipeline`` chose."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        spec = pipeline_spec(ctx.params.get("pipeline_spec") or os.environ.get(ENV_PIPELINE))
        try:
            names = ", ".join(load_pipeline(spec).step_names)
            extra = f"Steps of {spec}: {names}."
        except (PipelineLoadError, ValueError) as exc:
            extra = f"(the steps of {spec} are unknown: {exc})"
        return record[0], f"{record[1]} {extra}"


def steps_option(func: F) -> F:
    decorator = click.option(
        "--steps",
        cls=StepsOption,
        default=None,
        metavar="LIST",
        help="Comma-separated step names (default: all).",
    )
    return decorator(func)
