"""Reading numeric ``SLUICE_*`` settings of the agent steps from an environment mapping.

A bad value raises :class:`ValueError` naming the variable and the value: a
typo in a limit must stop the worker at start (``sluice run`` reports it on
one line), not quietly run it with a default. Unset or blank means the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def _bad(name: str, raw: str, expected: str) -> ValueError:
    return ValueError(f"{name}={raw!r}: expected {expected}")


def positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    """``env[name]`` as a finite number above 0, or ``default`` when unset."""
    value = optional_positive_float(env, name)
    return default if value is None else value


def optional_positive_float(env: Mapping[str, str], name: str) -> float | None:
    """``env[name]`` as a finite number above 0, or None when unset."""
    raw = _raw(env, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, raw, "a number above 0") from None
    if not (math.isfinite(value) and value > 0):
        raise _bad(name, raw, "a number above 0")
    return value


def positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    """``env[name]`` as a whole number of at least 1, or ``default`` when unset."""
    raw = _raw(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(name, raw, "a whole number of at least 1") from None
    if value < 1:
        raise _bad(name, raw, "a whole number of at least 1")
    return value
