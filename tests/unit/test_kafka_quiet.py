"""aiokafka's per-attempt errors while a broker is away: one line per kind and interval."""

from __future__ import annotations

import logging

from sluicegate.streams.transports.kafka.quiet import RepeatFilter, quiet_aiokafka


def record(msg: str, *args: object, name: str = "aiokafka.client") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_repeated_kind_passes_once_per_interval_and_counts_what_it_held() -> None:
    clock = [100.0]
    quiet = RepeatFilter(interval_s=30, clock=lambda: clock[0])
    template = "Unable connect to node with id %s: %s"
    assert quiet.filter(record(template, 1, "refused"))
    held = [quiet.filter(record(template, 1, "refused")) for _ in range(500)]
    assert not any(held)
    assert quiet.filter(record("Unable to update metadata from %s", [1])), "another kind"
    clock[0] += 31
    again = record(template, 1, "refused")
    assert quiet.filter(again)
    assert again.getMessage() == (
        "Unable connect to node with id 1: refused (500 more like this in 31s)"
    )


def test_the_filter_sits_on_every_aiokafka_logger() -> None:
    import aiokafka.conn  # noqa: F401  (its logger exists once imported)

    quiet_aiokafka()
    quiet_aiokafka()
    for name in ("aiokafka", "aiokafka.conn"):
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, RepeatFilter)]
        assert len(filters) == 1, name
