"""The benchmark's stamps, warm-up cut and HDR percentiles (no timings)."""

from __future__ import annotations

from sluicegate.bench.latency import (
    STAMP_SIZE,
    LatencyRecorder,
    padding_for,
    read_stamp,
    stamp,
    warmup_count,
)


def test_stamp_round_trip_and_size() -> None:
    body = stamp(12345, 987_654_321_000, padding_for(256))
    assert len(body) == 256
    assert read_stamp(body) == (12345, 987_654_321_000)


def test_bodies_never_shorter_than_the_stamp() -> None:
    assert len(stamp(1, 2, padding_for(4))) == STAMP_SIZE


def test_warmup_is_five_percent_or_a_thousand_but_never_half() -> None:
    assert warmup_count(20_000) == 1000
    assert warmup_count(100_000) == 5000
    assert warmup_count(2000) == 1000
    assert warmup_count(500) == 250


def test_percentiles_of_a_uniform_distribution() -> None:
    recorder = LatencyRecorder()
    recorder.record_many_ns(ms * 1_000_000 for ms in range(1, 1001))  # 1..1000 ms
    p = recorder.percentiles()
    assert p.count == 1000
    # HdrHistogram keeps 3 significant digits: within 0.1%.
    assert abs(p.p50 - 500) <= 1
    assert abs(p.p90 - 900) <= 1
    assert abs(p.p99 - 990) <= 1
    assert abs(p.p999 - 999) <= 1
    assert abs(p.max - 1000) <= 1
    assert abs(p.mean - 500.5) <= 1


def test_percentile_curve_is_monotonic() -> None:
    recorder = LatencyRecorder()
    recorder.record_many_ns([1_000_000] * 90 + [50_000_000] * 10)
    curve = recorder.curve_ms([50.0, 90.0, 99.0, 99.9])
    values = [ms for _, ms in curve]
    assert values == sorted(values)
    assert values[0] < 1.01 and values[-1] > 49


def test_empty_and_out_of_range_values() -> None:
    assert LatencyRecorder().percentiles().count == 0
    recorder = LatencyRecorder()
    recorder.record_ns(-5)  # a clock artefact: clamped to the lowest bucket, not dropped
    recorder.record_ns(10**15)  # beyond the range: clamped to the highest
    assert recorder.count == 2
