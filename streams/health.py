"""Why this worker is not ready right now: the conditions behind ``/readyz``.

Runners report, per step, what keeps them from doing their work: an outage
they are riding out (the broker or the store failing) and partitions with
lag and no progress (stalled). The application reads :func:`not_ready` to
answer ``/readyz`` (sluicegate/health.py). One
registry per process: a worker runs all its steps in one process, and
readiness is the process's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from sluicegate.streams.transport import TopicPartition

_lock = threading.Lock()  # read from the metrics server's thread
_outages: dict[str, str] = {}
_stalled: dict[str, frozenset[TopicPartition]] = {}


def outage(step: str, reason: str | None) -> None:
    """``step`` is riding out a failure (``reason``), or recovered (None)."""
    with _lock:
        if reason is None:
            _outages.pop(step, None)
        else:
            _outages[step] = reason


def outages() -> dict[str, str]:
    """The outages reported now, by reporter."""
    with _lock:
        return dict(_outages)


def stalled(step: str, tps: Iterable[TopicPartition]) -> None:
    """The partitions of ``step`` that have lag and made no progress (empty: none)."""
    frozen = frozenset(tps)
    with _lock:
        if frozen:
            _stalled[step] = frozen
        else:
            _stalled.pop(step, None)


def stalled_counts() -> dict[str, int]:
    """Stalled partitions per step (for the metrics)."""
    with _lock:
        return {step: len(tps) for step, tps in _stalled.items()}


def not_ready() -> list[str]:
    """One line per reason this worker is not ready; empty when it is."""
    with _lock:
        lines = [f"{step}: {reason}" for step, reason in sorted(_outages.items())]
        lines += [
            f"{step}: stalled {', '.join(f'{tp.topic}[{tp.partition}]' for tp in sorted(tps))}"
            for step, tps in sorted(_stalled.items())
        ]
    return lines


def forget(step: str) -> None:
    """Drop what ``step`` reported (its runner stopped)."""
    with _lock:
        _outages.pop(step, None)
        _stalled.pop(step, None)
