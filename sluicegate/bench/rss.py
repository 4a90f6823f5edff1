"""The worker's resident memory over a run, sampled from ``/proc/<pid>/status`` (Linux).

The design promises backpressure: a slow model slows consumption, it does
not grow memory. The pipeline bench shows it by sampling the worker
process's ``VmRSS`` once a second while the tasks flow, from the first
scheduled task to the last result, and reporting the samples with the
start, peak and end values. Figures are in MB of 2**20 bytes (``VmRSS`` is
in kB of 1024 bytes). Where ``/proc`` is missing, nothing is sampled and
the report says ``null``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_INTERVAL_S = 1.0


def read_rss_mb(pid: int) -> float | None:
    """``VmRSS`` of process ``pid`` in MB (2**20 bytes), or None if it cannot be read."""
    try:
        with Path(f"/proc/{pid}/status").open() as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    parts = line.split()
                    return int(parts[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None  # a zombie has no VmRSS line


@dataclass(slots=True)
class RssSeries:
    """``(t, MB)`` samples, ``t`` in seconds from the start of sampling."""

    interval_s: float = DEFAULT_INTERVAL_S
    samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def start(self) -> float | None:
        return self.samples[0][1] if self.samples else None

    @property
    def peak(self) -> float | None:
        return max(mb for _, mb in self.samples) if self.samples else None

    @property
    def end(self) -> float | None:
        return self.samples[-1][1] if self.samples else None

    def as_json(self) -> dict[str, Any] | None:
        """``start``, ``peak``, ``end`` and the ``samples`` (``[t, MB]``); None if never read."""
        if not self.samples:
            return None
        return {
            "start": round(self.start or 0.0, 1),
            "peak": round(self.peak or 0.0, 1),
            "end": round(self.end or 0.0, 1),
            "interval_s": self.interval_s,
            "samples": [[round(t, 2), round(mb, 1)] for t, mb in self.samples],
        }


class RssSampler:
    """Samples ``read(pid)`` every ``interval_s`` in a task between ``start()`` and ``stop()``.

    One sample at ``start()``, one per interval, and a last one at ``stop()``,
    so the series always covers the whole window.
    """

    def __init__(
        self,
        pid: int | None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        read: Callable[[int], float | None] = read_rss_mb,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pid = pid
        self.series = RssSeries(interval_s)
        self._read = read
        self._clock = clock
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None

    def sample(self, now: float | None = None) -> None:
        if self.pid is None:
            return
        mb = self._read(self.pid)
        if mb is not None:
            t = (self._clock() if now is None else now) - self._t0
            self.series.samples.append((t, mb))

    def start(self) -> None:
        self._t0 = self._clock()
        self.sample(self._t0)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.series.interval_s)
            self.sample()

    async def stop(self) -> RssSeries:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.sample()
        return self.series


__all__: Sequence[str] = ("RssSampler", "RssSeries", "read_rss_mb")
