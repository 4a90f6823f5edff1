"""Who is calling: ``Authorization: Bearer KEY`` to the key's tenant, with a short cache.

Checking a key is a primary-key read; caching a good answer for
``ttl`` seconds (SLUICE_GATEWAY_KEY_CACHE) keeps that read off the hot path of
every submit. The price is stated: a revoked key keeps working in a running
gateway for at most ``ttl`` seconds. Bad keys are not cached, so a key made a
moment ago works at once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

from sluicegate.gateway.problems import Problem
from sluicegate.sinks.api_keys import parse_key

# Cached keys kept at most; past it the cache starts over (a flood of
# different valid keys is unusual, and memory must stay bounded).
MAX_CACHED = 10_000

Lookup = Callable[[str], Awaitable[str | None]]


class Authenticator:
    def __init__(
        self, lookup: Lookup, *, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lookup = lookup
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[str, float]] = {}

    async def tenant(self, headers: Mapping[str, str]) -> str:
        """The caller's tenant; ``Problem(401)`` without a valid, unrevoked key."""
        return (await self.caller(headers))[0]

    async def caller(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """The caller's tenant and key id (who decided, on an approval); else ``Problem(401)``."""
        header = headers.get("authorization")
        if not header:
            raise Problem(
                401,
                "missing API key: send Authorization: Bearer KEY (made by `sluice keys create`)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scheme, _, key = header.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Problem(
                401,
                "the Authorization header must read: Bearer KEY",
                headers={"WWW-Authenticate": 'Bearer error="invalid_request"'},
            )
        parsed = parse_key(key)
        key_id = parsed[0] if parsed else "?"
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0], key_id
        tenant = await self._lookup(key)
        if tenant is None:
            self._cache.pop(key, None)
            raise Problem(
                401,
                "unknown or revoked API key",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if self.ttl > 0:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[key] = (tenant, now + self.ttl)
        return tenant, key_id
