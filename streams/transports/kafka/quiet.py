"""Keeping aiokafka's logs readable while a broker is away.

aiokafka logs every failed attempt at ERROR: with a broker down, a worker's
clients (a consumer per step, the producer, the admin) wrote some 500 lines a
second, "Unable connect to node", "Unable to update metadata", "Failed fetch
messages", burying the one line per step that says what the worker does
about it. :class:`RepeatFilter` lets the first of each kind through and then
one per interval, saying how many it held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

# Seconds between two lines of the same kind (same logger, same message template).
REPEAT_INTERVAL_S = 30.0


class RepeatFilter(logging.Filter):
    """Passes a message kind once per ``interval_s``, then notes how many it held back."""

    def __init__(
        self, interval_s: float = REPEAT_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._seen[key] = (last[0], last[1] + 1)
                return False
            self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = f"{record.getMessage()} ({last[1]} more like this in {now - last[0]:.0f}s)"
            record.args = ()
        return True


_filter = RepeatFilter()


def quiet_aiokafka() -> None:
    """Put the filter on aiokafka's loggers (those that exist; idempotent)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "aiokafka"]
    for name in ["aiokafka", *names]:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)
