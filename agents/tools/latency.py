"""Simulated tool latency: the built-in tools answer at once, real backends do not.

:class:`SlowTool` wraps any tool so each call first waits a while, fixed or
drawn uniformly from a range. The wait is inside the call, so the tools
step's per-call timeout and its concurrency cap see it as they would see a
slow backend: that is what tests and load runs use it for. ``sluice run``
slows the built-in tools when ``SLUICE_TOOL_LATENCY_MS`` is set
(:func:`tools_from_env`): ``200`` waits 200 ms per call, ``100-300`` between
100 and 300 ms; unset or ``0`` leaves them instant.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sluicegate.agents.tools import builtin_tools
from sluicegate.agents.tools.base import JSON, Tool, ToolContext

LATENCY_ENV = "SLUICE_TOOL_LATENCY_MS"

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Latency:
    """A wait of ``low_s`` to ``high_s`` seconds, uniform between them (fixed when equal)."""

    low_s: float
    high_s: float

    def __post_init__(self) -> None:
        if not 0 <= self.low_s <= self.high_s:
            raise ValueError(f"latency needs 0 <= low <= high, got {self.low_s}..{self.high_s}")

    def draw(self, rng: Callable[[], float]) -> float:
        return self.low_s + (self.high_s - self.low_s) * rng()


def parse_latency_ms(text: str, *, name: str = LATENCY_ENV) -> Latency | None:
    """``"200"`` or ``"100-300"`` (milliseconds) as a :class:`Latency`; None for ``0`` or blank.

    Anything else raises :class:`ValueError` naming ``name`` and the value.
    """
    raw = text.strip()
    if not raw:
        return None
    low_text, dash, high_text = raw.partition("-")
    try:
        low = float(low_text)
        high = float(high_text) if dash else low
        latency = Latency(low / 1000, high / 1000)
    except ValueError:
        raise ValueError(
            f"{name}={text!r}: expected milliseconds such as 200, or a range such as 100-300"
        ) from None
    return latency if latency.high_s > 0 else None


class SlowTool:
    """``tool``, after a wait drawn from ``latency`` (``sleep`` and ``rng`` injectable)."""

    def __init__(
        self,
        tool: Tool,
        latency: Latency,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.tool = tool
        self.latency = latency
        self._sleep = sleep
        self._rng = rng

    async def __call__(self, args: Mapping[str, Any], ctx: ToolContext) -> JSON:
        await self._sleep(self.latency.draw(self._rng))
        return await self.tool(args, ctx)


def slowed(tools: Mapping[str, Tool], latency: Latency | None) -> dict[str, Tool]:
    """Every tool of ``tools`` behind the same latency (unchanged when None)."""
    if latency is None:
        return dict(tools)
    return {name: SlowTool(tool, latency) for name, tool in tools.items()}


def tools_from_env(env: Mapping[str, str]) -> dict[str, Tool] | None:
    """The built-in tools slowed by ``SLUICE_TOOL_LATENCY_MS``; None (the default) when unset."""
    latency = parse_latency_ms(env.get(LATENCY_ENV, ""))
    return None if latency is None else slowed(builtin_tools(), latency)
