"""Event ids: time-ordered UUIDv7 for new events, deterministic ids for derived ones.

A derived id keeps the 48-bit millisecond timestamp of its input (so derived
events still sort by time) and fills the remaining bits from a SHA-256 of
(input id, step, output index). Replaying an input therefore yields the same
output ids, which lets the next step drop the re-produced copies.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_id() -> str:
    """Return a new UUIDv7 (RFC 9562) string, monotonic within this process."""
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            # Same (or earlier, clock stepped back) millisecond: keep order by
            # bumping a 12-bit counter, borrowing the next millisecond on overflow.
            _counter += 1
            if _counter > 0xFFF:
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        else:
            _last_ms = ms
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        counter = _counter
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
    return str(uuid.UUID(int=value))


def timestamp_ms(event_id: str) -> int | None:
    """The millisecond timestamp of a UUIDv7 id, or None for other ids."""
    try:
        u = uuid.UUID(event_id)
    except ValueError:
        return None
    if u.version != 7:
        return None
    return u.int >> 80


def derived_id(input_id: str, step: str, index: int) -> str:
    """Deterministic id for output ``index`` of ``step`` processing ``input_id``."""
    digest = hashlib.sha256(f"{input_id}\x1f{step}\x1f{index}".encode()).digest()
    ms = _uuid7_ms(input_id)
    if ms is None:
        ms = int.from_bytes(digest[:6], "big")
    tail = int.from_bytes(digest[6:16], "big")
    rand_a = tail >> 68 & 0xFFF
    rand_b = tail & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    # Formatted by hand: one per output event, and uuid.UUID costs ~3 µs more.
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _uuid7_ms(event_id: str) -> int | None:
    """The timestamp of a canonical lowercase UUIDv7 string, without parsing a UUID."""
    if len(event_id) == 36 and event_id[14] == "7" and event_id[8] == "-":
        try:
            return int(event_id[:8] + event_id[9:13], 16)
        except ValueError:
            return None
    return timestamp_ms(event_id)
