"""Import the pipeline that ``--pipeline MODULE:ATTR`` (or ``SLUICE_PIPELINE``) names.

As uvicorn and faststream do, the module is imported with the current
directory first on ``sys.path``, so ``sluice run --pipeline myapp:pipeline``
works from the folder holding ``myapp.py`` without installing it. ``ATTR``
is a :class:`~sluicegate.Pipeline`, or a function taking no arguments that
returns one (for a pipeline built from the environment at start, as the
reference one is). Every way this can go wrong is a :class:`PipelineLoadError`
with a one-line message; the commands report it with exit 2.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

from sluicegate.agents.graph import Pipeline
from sluicegate.policy.bundle import BundleError
from sluicegate.policy.engine import PolicyCompileError
from sluicegate.streams.errors import SluiceError

ENV_PIPELINE = "SLUICE_PIPELINE"


class PipelineLoadError(SluiceError, ValueError):
    """``--pipeline`` names something that cannot be imported or is not a pipeline."""


def pipeline_spec(given: str | None) -> str:
    """What to load: the flag, else ``SLUICE_PIPELINE``, else the reference pipeline."""
    from sluicegate.pipeline import DEFAULT_PIPELINE

    return (given or os.environ.get(ENV_PIPELINE, "")).strip() or DEFAULT_PIPELINE


def load_pipeline(spec: str) -> Pipeline:
    """Import ``MODULE:ATTR`` from the current directory and return the pipeline it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not _dotted(module_name):
        raise PipelineLoadError(
            f"--pipeline takes MODULE:ATTR such as myapp:pipeline, got {spec!r}"
        )
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise PipelineLoadError(
                f"no module named {module_name!r} in {here} or the installed packages"
            ) from None
        raise PipelineLoadError(_failed(module_name, exc)) from None
    except Exception as exc:
        # Whatever the user's module raises while it loads, on one line.
        raise PipelineLoadError(_failed(module_name, exc)) from None
    except SystemExit as exc:
        # A module that exits when imported (a script's main at top level).
        raise PipelineLoadError(
            f"module {module_name!r} called sys.exit({exc.code!r}) while being imported"
        ) from None
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise PipelineLoadError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if isinstance(target, Pipeline):
        return target
    if callable(target) and not isinstance(target, type):
        try:
            made = target()
        except (BundleError, PolicyCompileError):
            # The pipeline is fine, its policy bundle is not: reported as
            # the bundle's problem (exit 2, see cli_errors), not --pipeline's.
            raise
        except ValueError:
            # A bad setting the function read (the reference pipeline's
            # SLUICE_LLM_*): its own one-line message says which.
            raise
        except Exception as exc:
            raise PipelineLoadError(f"{spec}() failed: {_one_line(exc)}") from None
        if isinstance(made, Pipeline):
            return made
        raise PipelineLoadError(
            f"{spec}() returned an object of type {type(made).__name__}, not a sluicegate.Pipeline"
        )
    raise PipelineLoadError(
        f"{spec} is not a sluicegate.Pipeline (nor a function returning one): "
        f"it is of type {type(target).__name__}"
    )


def _failed(module_name: str, exc: BaseException) -> str:
    return f"module {module_name!r} failed to import: {_one_line(exc)}"


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _one_line(exc: BaseException) -> str:
    """``Type: message (file:line)`` of where the import failed, on one line."""
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        where = f" ({last.filename}:{last.lineno})"
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({exc.filename}:{exc.lineno})"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}{where}"
