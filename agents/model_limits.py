"""Per-endpoint limits on model calls, shared by every client of an endpoint in the process.

Two limits, both keyed by the endpoint URL:

- a concurrency cap, an :class:`asyncio.Semaphore` held for one HTTP attempt
  (not during a retry's backoff, so a call waiting to retry holds no slot);
- an optional requests-per-minute limit, a :class:`TokenBucket` that holds at
  most ``burst`` tokens (by default one second's worth) and refills at
  ``rpm / 60`` per second; every attempt, retries included, takes a token,
  because the provider counts every request.

They are per endpoint and process-wide because that is how providers limit:
per key and endpoint, not per step. Two planners, or the planner and a
user's step, calling one endpoint share one budget. The first client of an
endpoint fixes its limits; a second one asking for different limits is a
configuration error (:class:`LimitRegistry.register` raises), never a
silent second budget.

asyncio primitives belong to one event loop, so the registry keeps one set
per running loop (a worker has one; tests and repeated ``asyncio.run`` calls
have several). Entries of closed loops are dropped on the next lookup.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


class PerLoop(Generic[T]):
    """One value per running event loop, made on first use there."""

    def __init__(self) -> None:
        # A plain dict, not a WeakKeyDictionary: the values (sessions, bound
        # semaphores) refer to their loop, so weak keys would never die.
        self._values: dict[asyncio.AbstractEventLoop, T] = {}

    def get(self, make: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        value = self._values.get(loop)
        if value is None:
            for old in [old for old in self._values if old.is_closed()]:
                del self._values[old]
            value = self._values[loop] = make()
        return value

    def pop_current(self) -> T | None:
        """Forget (and return) the running loop's value."""
        return self._values.pop(asyncio.get_running_loop(), None)

    def replace_current(self, value: T) -> None:
        self._values[asyncio.get_running_loop()] = value


class TokenBucket:
    """At most ``rate_per_minute`` admissions a minute, in bursts of at most ``burst``.

    ``clock`` and ``sleep`` are injectable so tests can drive time by hand.
    """

    def __init__(
        self,
        rate_per_minute: float,
        *,
        burst: int | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not rate_per_minute > 0:
            raise ValueError(f"rate_per_minute must be positive, got {rate_per_minute!r}")
        self.rate = rate_per_minute / 60.0  # tokens per second
        self.capacity = float(burst if burst is not None else max(1, math.ceil(self.rate)))
        if self.capacity < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self) -> bool:
        """Take a token if one is there, without waiting."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a token and take it."""
        # One waiter at a time computes its wait, so callers are admitted in
        # arrival order and a crowd cannot wake together and overdraw.
        async with self._lock:
            while not self.try_acquire():
                await self._sleep((1 - self._tokens) / self.rate)


@dataclass(frozen=True, slots=True)
class LimitConfig:
    concurrency: int
    rpm: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency!r}")
        if self.rpm is not None and not self.rpm > 0:
            raise ValueError(f"rpm must be positive or None, got {self.rpm!r}")


class EndpointLimits:
    """The live limits of one endpoint on one event loop."""

    def __init__(self, config: LimitConfig, *, clock: Clock, sleep: Sleep) -> None:
        self.config = config
        self.semaphore = asyncio.Semaphore(config.concurrency)
        self.bucket = (
            TokenBucket(config.rpm, clock=clock, sleep=sleep) if config.rpm is not None else None
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a concurrency slot and a rate token for one request."""
        # Slot first, then token: a request goes out right after its token
        # is taken. The other order lets tokens pile up in requests queued
        # for a slot, which then all go out at once and overrun the rate.
        async with self.semaphore:
            if self.bucket is not None:
                await self.bucket.acquire()
            yield


class LimitRegistry:
    """Endpoint URL -> its limits. One registry per process is the default (:func:`shared_limits`);
    tests make their own, with a hand-driven clock for the token buckets."""

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._configs: dict[str, LimitConfig] = {}
        self._live: PerLoop[dict[str, EndpointLimits]] = PerLoop()

    def register(self, endpoint: str, config: LimitConfig) -> None:
        """Declare the limits of ``endpoint``; the same again is fine, different ones raise."""
        known = self._configs.setdefault(endpoint, config)
        if known != config:
            raise ValueError(
                f"model endpoint {endpoint} already has limits concurrency={known.concurrency}, "
                f"rpm={known.rpm}; a second client asked for concurrency={config.concurrency}, "
                f"rpm={config.rpm} (clients of one endpoint share its limits)"
            )

    def config(self, endpoint: str) -> LimitConfig | None:
        return self._configs.get(endpoint)

    def limits(self, endpoint: str) -> EndpointLimits:
        """The running loop's limits for a registered ``endpoint``."""
        config = self._configs.get(endpoint)
        if config is None:
            raise KeyError(f"model endpoint {endpoint} has no registered limits")
        live = self._live.get(dict)
        found = live.get(endpoint)
        if found is None:
            found = live[endpoint] = EndpointLimits(config, clock=self._clock, sleep=self._sleep)
        return found


_shared = LimitRegistry()


def shared_limits() -> LimitRegistry:
    """The process-wide registry every :class:`~agents.model_client.ModelClient` uses by default."""
    return _shared
