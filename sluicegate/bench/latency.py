"""Latency measurement: message stamps, the warm-up cut and HDR histogram percentiles.

Every benchmark message carries its index and its send time in the first 16
bytes of its body, so the consumer needs no side channel: latency is arrival
time minus the stamped time. In the fixed-rate model the stamp is the
*intended* send time (``t0 + i / rate``), so a producer that falls behind
shows up as latency instead of being hidden (coordinated omission).

Times are ``time.monotonic_ns()``: producer and consumer share the host, and
CLOCK_MONOTONIC is system-wide on Linux, so they may also be in different
processes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from hdrh.histogram import HdrHistogram

STAMP = struct.Struct(">QQ")  # index, send time (ns)
STAMP_SIZE = STAMP.size

# The histogram records microseconds, from 1 µs to 10 minutes, with 3
# significant digits (0.1% error), which is what HdrHistogram is built for.
_LOWEST_US = 1
_HIGHEST_US = 600_000_000
_DIGITS = 3

# Percentiles reported everywhere (and plotted); "max" is added separately.
PERCENTILES: Mapping[str, float] = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}

WARMUP_FRACTION = 0.05
WARMUP_MESSAGES = 1000


def warmup_count(n: int) -> int:
    """Messages excluded at the start: 5% or 1000, whichever is more, but never half of ``n``.

    The first messages pay for connection set-up, JIT-less first calls, page
    faults and consumer start, which a steady-state figure must not include.
    """
    wanted = max(int(n * WARMUP_FRACTION), WARMUP_MESSAGES)
    return min(wanted, n // 2)


def stamp(index: int, sent_ns: int, padding: bytes) -> bytes:
    """A body of ``STAMP_SIZE + len(padding)`` bytes carrying ``index`` and ``sent_ns``."""
    return STAMP.pack(index, sent_ns) + padding


def padding_for(size: int) -> bytes:
    """The filler that makes stamped bodies ``size`` bytes long (at least the stamp)."""
    return b"x" * max(0, size - STAMP_SIZE)


def read_stamp(body: bytes) -> tuple[int, int]:
    """``(index, sent_ns)`` of a stamped body."""
    index, sent_ns = STAMP.unpack_from(body)
    return int(index), int(sent_ns)


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Latency percentiles in milliseconds, and how many samples they summarise."""

    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float
    count: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def empty(cls) -> Percentiles:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)


class LatencyRecorder:
    """An HDR histogram of latencies, fed in nanoseconds, read in milliseconds."""

    def __init__(self) -> None:
        self._hist = HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)

    def record_ns(self, latency_ns: int) -> None:
        # Clamp into the histogram's range: a negative latency can only be a
        # clock artefact (sub-µs), and HdrHistogram drops out-of-range values.
        us = min(max(latency_ns // 1000, _LOWEST_US), _HIGHEST_US)
        self._hist.record_value(us)

    def record_many_ns(self, latencies_ns: Iterable[int]) -> None:
        for value in latencies_ns:
            self.record_ns(value)

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def value_at_ms(self, percentile: float) -> float:
        return float(self._hist.get_value_at_percentile(percentile)) / 1000.0

    def curve_ms(self, percentiles: Iterable[float]) -> list[tuple[float, float]]:
        """``(percentile, ms)`` points, for a percentile plot."""
        return [(p, self.value_at_ms(p)) for p in percentiles]

    def percentiles(self) -> Percentiles:
        if self.count == 0:
            return Percentiles.empty()
        return Percentiles(
            p50=self.value_at_ms(50.0),
            p90=self.value_at_ms(90.0),
            p99=self.value_at_ms(99.0),
            p999=self.value_at_ms(99.9),
            max=float(self._hist.get_max_value()) / 1000.0,
            mean=float(self._hist.get_mean_value()) / 1000.0,
            count=self.count,
        )


# Points of the plotted percentile curve: "nines" from the median to 99.99.
CURVE_PERCENTILES: tuple[float, ...] = (50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99)
