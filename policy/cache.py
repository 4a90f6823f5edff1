"""A bounded decision cache, keyed on the exact policy input.

Why a cache cannot change a decision: one cache belongs to one compiled
bundle (a reload builds a new one), the key is the complete input document
the policy sees (canonical JSON, sorted keys), and a deterministic policy's
decision is a function of its data and input alone. Bundles whose policy
calls a non-deterministic builtin (the clock, randomness, the network) get no
cache (see :data:`NONDETERMINISTIC`). Only valid decisions made within the
time budget are stored; failures are re-evaluated every time.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final, Generic, TypeVar

from sluicegate.policy.bundle import Bundle

V = TypeVar("V")

# Builtins whose result is not a function of input and data.
NONDETERMINISTIC: Final = re.compile(
    r"\b(?:time\.now_ns|rand\.intn|uuid\.rfc4122|uuid\.parse|http\.send|net\.lookup_ip_addr"
    r"|opa\.runtime|crypto\.x509\.parse_and_verify_certificates)\b"
)
# Keys longer than this are replaced by a 128-bit digest, so a cache of large
# inputs stays small in memory. Digests get a prefix no JSON document starts
# with, so a digest can never equal an inline key.
_INLINE_KEY_BYTES: Final = 256
_DIGEST_PREFIX: Final = b"#"


def deterministic(bundle: Bundle) -> bool:
    """Whether every decision of ``bundle`` depends on its input and data only."""
    return not any(NONDETERMINISTIC.search(text) for _, text in bundle.modules)


def cache_key(input_json: bytes) -> bytes:
    """The cache key of a canonical input document: the document itself, or its digest."""
    if len(input_json) <= _INLINE_KEY_BYTES:
        return input_json
    return _DIGEST_PREFIX + hashlib.blake2b(input_json, digest_size=16).digest()


class DecisionCache(Generic[V]):
    """At most ``size`` entries; when full, the oldest entry goes (FIFO, cheap and fair here)."""

    __slots__ = ("_entries", "hits", "misses", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[bytes, V] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> V | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: bytes, value: V) -> None:
        if self.size <= 0:
            return
        if len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)
