"""The audit hash chain: canonical JSON of an audit row, its hash, linking and verifying.

Specification (enough for an external verifier to recompute every hash)
-----------------------------------------------------------------------
Rows of ``audit_log`` form one chain per ``(chain_step, chain_partition)``: the
committing step and the input partition. Within a chain ``seq`` counts from 1
with no gaps, and rows are linked in ``seq`` order.

The canonical JSON of a row is a JSON object with exactly these 16 members::

    chain_step, chain_partition, seq, time, tenant, session, event_id,
    causation_id, step, event_type, kind, decision, reasons, policy_version,
    trace_id, detail

- ``chain_partition`` and ``seq`` are JSON integers;
- ``time`` is a string, RFC 3339 in UTC, always with six fractional digits and
  a ``Z`` suffix: ``2025-01-31T12:00:00.000000Z``;
- ``causation_id``, ``decision``, ``policy_version`` and ``trace_id`` are a
  string or ``null``; the other text columns are strings;
- ``reasons`` is an array of strings and ``detail`` an object, as stored in
  their ``jsonb`` columns.

It is serialised as by ``orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)``:
object keys sorted by code point at every depth, no whitespace, UTF-8 output
with non-ASCII characters unescaped, control characters as ``\\u00XX``.

``hash = sha256(prev_hash + canonical_json).hexdigest()`` where ``prev_hash``
is the previous row's ``hash`` as 64 lower-case hex ASCII bytes, and the
first row of a chain has ``prev_hash`` = 64 zeros (``GENESIS_HASH``). Each
row stores its ``prev_hash`` and ``hash``; ``audit_chains`` stores each
chain's last ``seq`` and ``hash``, so a removed tail is detected as well.

Values are hashed as Postgres gives them back, read with orjson (as
``sinks.db.connect`` sets up; orjson also reads integers beyond 64 bits as
floats, which a verifier must match). So the writer first makes each record
storable: NUL characters, which text and ``jsonb`` cannot hold, become U+FFFD;
``-0.0`` becomes ``0.0`` (``numeric`` has no negative zero); and a float that
orjson writes with a positive exponent (magnitude >= 1e16, always integral)
becomes an integer when it fits in 64 bits, because ``jsonb`` prints it as
one (``1e+16`` comes back as ``10000000000000000``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import orjson

from streams.step import AuditRecord

GENESIS_HASH = "0" * 64

CANONICAL_FIELDS = (
    "chain_step",
    "chain_partition",
    "seq",
    "time",
    "tenant",
    "session",
    "event_id",
    "causation_id",
    "step",
    "event_type",
    "kind",
    "decision",
    "reasons",
    "policy_version",
    "trace_id",
    "detail",
)

# The audit_log columns the writer fills, in COPY order.
COPY_COLUMNS = (*CANONICAL_FIELDS, "prev_hash", "hash")

_SORTED = orjson.OPT_SORT_KEYS


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``, as the canonical form requires."""
    if value.tzinfo is None:
        raise ValueError("audit time must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(row: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an audit row (a mapping holding at least the 16 fields).

    ``time`` may be a timezone-aware ``datetime`` (as read from Postgres) or
    an already formatted string.
    """
    doc = {name: row[name] for name in CANONICAL_FIELDS}
    if isinstance(doc["time"], datetime):
        doc["time"] = format_time(doc["time"])
    return orjson.dumps(doc, option=_SORTED)


def chain_hash(prev_hash: str, row: Mapping[str, Any]) -> str:
    """The hash of ``row`` linked after a row whose hash is ``prev_hash``."""
    return _link_hash(prev_hash, canonical_json(row))


def _link_hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


# -- writing -----------------------------------------------------------------


@dataclass(slots=True)
class ChainHead:
    """The last link of a chain: ``seq`` 0 and ``GENESIS_HASH`` for an empty chain."""

    seq: int
    hash: str


def link(
    chain_step: str,
    time: datetime,
    records: Iterable[tuple[int, AuditRecord]],
    heads: dict[int, ChainHead],
) -> list[tuple[Any, ...]]:
    """``iter_links`` as a list."""
    return list(iter_links(chain_step, time, records, heads))


def iter_links(
    chain_step: str,
    time: datetime,
    records: Iterable[tuple[int, AuditRecord]],
    heads: dict[int, ChainHead],
) -> Iterator[tuple[Any, ...]]:
    """Chain ``records`` (partition, record) onto ``heads`` (partition -> head), in order.

    Yields one tuple per record in ``COPY_COLUMNS`` order (``time`` as the
    ``datetime``, ``reasons`` and ``detail`` as JSON text), advancing ``heads``
    in place as it goes: the store streams these into COPY, so hashing
    overlaps the server's work. Every partition of ``records`` must have a
    head (``ChainHead(0, GENESIS_HASH)`` for a new chain). This runs for every
    audit row, so it builds each canonical document directly instead of going
    through ``canonical_json``; ``tests/unit/test_sinks_audit.py`` holds the
    two to the same bytes.
    """
    stamp = format_time(time)
    for partition, record in records:
        head = heads[partition]
        seq = head.seq + 1
        canonical = _canonical_record(chain_step, partition, seq, stamp, record)
        if _needs_storable(canonical):
            record = storable(record)
            canonical = _canonical_record(chain_step, partition, seq, stamp, record)
        digest = _link_hash(head.hash, canonical)
        yield (
            chain_step,
            partition,
            seq,
            time,
            record.tenant,
            record.session,
            record.event_id,
            record.causation_id,
            record.step,
            record.event_type,
            record.kind,
            record.decision,
            _json_text(record.reasons, "[]"),
            record.policy_version,
            record.trace_id,
            _json_text(record.detail, "{}"),
            head.hash,
            digest,
        )
        head.seq = seq
        head.hash = digest


def _json_text(value: Any, empty: str) -> str:
    # Most rows have no reasons and no detail: skip serialising those.
    return orjson.dumps(value).decode() if value else empty


def _canonical_record(
    chain_step: str, partition: int, seq: int, stamp: str, record: AuditRecord
) -> bytes:
    return orjson.dumps(
        {
            "chain_step": chain_step,
            "chain_partition": partition,
            "seq": seq,
            "time": stamp,
            "tenant": record.tenant,
            "session": record.session,
            "event_id": record.event_id,
            "causation_id": record.causation_id,
            "step": record.step,
            "event_type": record.event_type,
            "kind": record.kind,
            "decision": record.decision,
            "reasons": record.reasons,
            "policy_version": record.policy_version,
            "trace_id": record.trace_id,
            "detail": record.detail,
        },
        option=_SORTED,
    )


def storable(record: AuditRecord) -> AuditRecord:
    """``record`` as Postgres will give it back (see the module docstring).

    Without this, a NUL in one odd event would make every retry of its batch
    fail and stall the partition, and some floats would break verification.
    """
    return AuditRecord(**{f.name: storable_value(getattr(record, f.name)) for f in fields(record)})


def storable_value(value: Any) -> Any:
    """``value`` (JSON-like) with NULs replaced and numbers as ``jsonb`` returns them."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, float):
        return _storable_float(value)
    if isinstance(value, dict):
        return {storable_value(k): storable_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(storable_value(v) for v in value)
    return value


def _storable_float(value: float) -> float | int:
    if value == 0.0:
        return 0.0
    if b"e+" in orjson.dumps(value) and -(2**63) <= value < 2**64:
        return int(value)
    return value


def _needs_storable(canonical: bytes) -> bool:
    """Whether a canonical row may hold something ``storable`` changes.

    Byte checks on the JSON, so the common row pays three substring scans; a
    false alarm (such text inside a string) only costs one normalising pass.
    """
    return b"\\u0000" in canonical or b"e+" in canonical or b"-0.0" in canonical


# -- verifying ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredHead:
    """A chain's head as ``audit_chains`` records it."""

    step: str
    partition: int
    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first row where a chain does not verify, and why."""

    chain_step: str
    chain_partition: int
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"chain ({self.chain_step}, {self.chain_partition}) seq {self.seq}: {self.reason}"


class ChainVerifier:
    """Checks one chain row by row, so a long chain can be streamed in pages.

    Feed the rows in ``seq`` order, then call ``finish`` with the chain's head
    from ``audit_chains``. Checks that ``seq`` runs 1, 2, ... without gaps,
    that each ``prev_hash`` is the previous row's ``hash`` (``GENESIS_HASH``
    first), that each ``hash`` recomputes, and that the rows end exactly at
    the head (a removed tail leaves no other trace).
    """

    def __init__(self, chain_step: str, chain_partition: int) -> None:
        self.chain_step = chain_step
        self.chain_partition = chain_partition
        self.last_seq = 0
        self.last_hash = GENESIS_HASH

    def feed(self, row: Mapping[str, Any]) -> ChainBreak | None:
        """Check the next row; the first break found is returned (stop feeding then)."""
        problem = _row_problem(row, self.last_seq + 1, self.last_hash)
        if problem is not None:
            return ChainBreak(self.chain_step, self.chain_partition, row["seq"], problem)
        self.last_seq += 1
        self.last_hash = row["hash"]
        return None

    def finish(self, head: StoredHead | None) -> ChainBreak | None:
        if head is None:
            if self.last_seq == 0:
                return None
            problem = "the chain has rows but no head in audit_chains"
        elif head.seq != self.last_seq:
            problem = f"the chain head is seq {head.seq} but the rows end at seq {self.last_seq}"
        elif head.hash != self.last_hash:
            problem = "the chain head's hash is not the last row's hash"
        else:
            return None
        return ChainBreak(self.chain_step, self.chain_partition, self.last_seq + 1, problem)


def verify_chain(
    chain_step: str,
    chain_partition: int,
    rows: Iterable[Mapping[str, Any]],
    head: StoredHead | None = None,
) -> ChainBreak | None:
    """Check one chain's rows, given in ``seq`` order; ``None`` when intact.

    See ``ChainVerifier``; without ``head`` the tail is not checked.
    """
    verifier = ChainVerifier(chain_step, chain_partition)
    for row in rows:
        found = verifier.feed(row)
        if found is not None:
            return found
    return verifier.finish(head) if head is not None else None


def _row_problem(row: Mapping[str, Any], expected_seq: int, prev: str) -> str | None:
    if row["seq"] != expected_seq:
        return f"expected seq {expected_seq}, found {row['seq']} (rows missing)"
    if row["prev_hash"] != prev:
        return "prev_hash is not the previous row's hash"
    if chain_hash(prev, row) != row["hash"]:
        return "hash does not match the row's contents"
    return None
