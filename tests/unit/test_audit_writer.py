"""The writer's fast path (``iter_links``) against the hash spec.

The writer builds each canonical document by hand, with its keys pre-sorted
and orjson's sorting only for rows with ``detail``. Whatever the record
holds, it must hash exactly what the spec (``canonical_json``, and a
standard-library reimplementation) hashes for the row as Postgres gives it
back.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.sinks.audit import (
    CANONICAL_FIELDS,
    COPY_COLUMNS,
    GENESIS_HASH,
    ChainHead,
    canonical_json,
    chain_hash,
    link,
    verify_chain,
)
from sluicegate.streams.step import AuditRecord

T0 = datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)

text = st.text(max_size=30)  # any code point, NUL and quotes and backslashes included
optional_text = st.none() | text
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
records = st.builds(
    AuditRecord,
    kind=st.sampled_from(["processed", "decision", "dead_letter", "shadow_divergence"]),
    step=text,
    event_id=text,
    event_type=text,
    tenant=text,
    session=text,
    causation_id=optional_text,
    decision=optional_text,
    reasons=st.lists(text, max_size=3).map(tuple),
    policy_version=optional_text,
    trace_id=optional_text,
    detail=st.dictionaries(text, json_values, max_size=4),
)


def read_back(copy_row: tuple[Any, ...]) -> dict[str, Any]:
    """A COPY tuple as the verifier reads it back (jsonb through orjson)."""
    row = dict(zip(COPY_COLUMNS, copy_row, strict=True))
    row["reasons"] = orjson.loads(row["reasons"])
    row["detail"] = orjson.loads(row["detail"])
    return row


def has_exponent(value: Any) -> bool:
    if isinstance(value, float):
        return "e" in repr(value)
    if isinstance(value, dict):
        return any(has_exponent(v) for v in value.values())
    if isinstance(value, list):
        return any(has_exponent(v) for v in value)
    return False


def stdlib_hash(prev: str, row: dict[str, Any]) -> str:
    doc = {name: row[name] for name in CANONICAL_FIELDS}
    doc["time"] = doc["time"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(prev.encode() + text.encode()).hexdigest()


@settings(max_examples=300, deadline=None)
@given(
    chain_step=text,
    partitions=st.lists(st.integers(0, 3), min_size=1, max_size=6),
    batch=st.lists(records, min_size=6, max_size=6),
    start=st.integers(0, 10**12),
)
def test_fast_path_hashes_what_the_spec_hashes(
    chain_step: str, partitions: list[int], batch: list[AuditRecord], start: int
) -> None:
    pairs = list(zip(partitions, batch, strict=False))
    heads = {p: ChainHead(start, GENESIS_HASH if start == 0 else "a" * 64) for p in partitions}
    rows = [read_back(r) for r in link(chain_step, T0, pairs, heads)]
    for row in rows:
        prev = row["prev_hash"]
        assert row["hash"] == chain_hash(prev, row)
        # The stdlib writes exponents its own way (1e+16, 1e-07): compare the rest.
        if not has_exponent(row["detail"]):
            assert row["hash"] == stdlib_hash(prev, row)
    for p in set(partitions):
        chain = [r for r in rows if r["chain_partition"] == p]
        assert [r["seq"] for r in chain] == list(range(start + 1, start + 1 + len(chain)))
        assert heads[p] == ChainHead(chain[-1]["seq"], chain[-1]["hash"])


def test_detail_is_sorted_only_where_it_needs_to_be() -> None:
    record = AuditRecord(
        "decision",
        "s",
        "e1",
        "t",
        "acme",
        "s1",
        reasons=("b", "a"),
        detail={"b": 1, "a": {"d": 2, "c": 3}},
    )
    (row,) = (read_back(r) for r in link("w", T0, [(0, record)], {0: ChainHead(0, GENESIS_HASH)}))
    assert row["reasons"] == ["b", "a"]  # a list keeps its order
    assert canonical_json(row).startswith(
        b'{"causation_id":null,"chain_partition":0,"chain_step":"w","decision":null,'
        b'"detail":{"a":{"c":3,"d":2},"b":1},'
    )
    assert row["hash"] == chain_hash(GENESIS_HASH, row)


def test_a_chain_written_by_the_fast_path_verifies() -> None:
    heads = {0: ChainHead(0, GENESIS_HASH)}
    batches = [
        [(0, AuditRecord("decision", "g", f"e{b}-{i}", "a", "t", "s", reasons=("r",)))]
        for b in range(3)
        for i in range(2)
    ]
    rows = []
    for n, batch in enumerate(batches):
        rows += [read_back(r) for r in link("g", T0 + timedelta(seconds=n), batch, heads)]
    assert verify_chain("g", 0, rows) is None
