"""Sealed chain heads: Ed25519 signatures that hold outside the database.

The hash chains (``sinks.audit``) catch anyone who edits, removes or adds
rows without recomputing what follows. They cannot catch the database's
owner, who can disable the append-only trigger, rewrite a row, recompute
every later hash and move the head in ``audit_chains``: the chain then
verifies again. A seal closes that gap. ``seal`` signs the current heads,
each chain's (step, partition, seq, hash), with an Ed25519 private key that
never enters the database, and appends the signed document to
``audit_seals``. ``check_seals`` (``sluice audit verify --public-key``) then
requires, for every seal, a valid signature by that key and, for every head
it names, a row at that seq whose hash is the sealed one. Since each hash
commits to everything before it, the whole sealed prefix of every chain is
fixed: a rewrite below a seal changes the hash at the sealed seq (or removes
the row), and the owner cannot sign a new seal without the key.

What the owner can still do: delete seals (then rewrite what only the
deleted seals covered) or rewrite rows written after the last seal. So keep
the key off the database host, seal often, and keep the printed seals (or
the latest seq per chain) somewhere the owner cannot write (README,
"Sealing the audit trail").

The signed document is canonical JSON (sorted keys, no whitespace, as
``orjson.dumps(doc, option=OPT_SORT_KEYS)``)::

    {"heads": [{"hash": H, "partition": P, "seq": N, "step": S}, ...],
     "key_id": K, "schema": SCHEMA, "sealed_at": "2026-12-07T19:00:00.000000Z",
     "version": 1}

with heads sorted by (step, partition); ``key_id`` is the first 16 hex
digits of the SHA-256 of the raw 32-byte public key. ``audit_seals`` stores
the document's exact bytes (as text) and the base64 signature over them.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sluicegate.sinks.audit import StoredHead, format_time
from sluicegate.streams.errors import SluiceError

Conn = psycopg.AsyncConnection[Any]

DOCUMENT_VERSION: Final = 1

# Problem codes, for --json and scripts.
BAD_SIGNATURE: Final = "seal_bad_signature"
OTHER_KEY: Final = "seal_other_key"
SEALED_ROW_MISSING: Final = "sealed_row_missing"
SEALED_HASH_MISMATCH: Final = "sealed_hash_mismatch"
NO_SEALS: Final = "no_seals"


class SealError(SluiceError):
    """A key that cannot be read or used, or a seal that cannot be made (one line)."""


@dataclass(frozen=True, slots=True)
class SealProblem:
    """Why a seal, or the trail measured against it, does not hold."""

    seal_id: int | None
    problem: str
    reason: str
    chain_step: str | None = None
    chain_partition: int | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = f"seal {self.seal_id}" if self.seal_id is not None else "seals"
        if self.chain_step is not None:
            where += f", chain ({self.chain_step}, {self.chain_partition}) seq {self.seq}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Seal:
    id: int
    sealed_at: datetime
    key_id: str
    heads: tuple[StoredHead, ...]


# -- keys ----------------------------------------------------------------------------


def generate_keys(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM files (the private one mode 0600); its key id."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path in (private_path, public_path):
        if path.exists():
            raise SealError(f"{path} exists; refusing to overwrite a key")
    # Created with 0600 from the start: never readable by others, not even briefly.
    with open(private_path, "xb", opener=lambda p, f: _open_private(p, f)) as out:
        out.write(private)
    public_path.write_bytes(public)
    return key_id(key.public_key())


def _open_private(path: str, flags: int) -> int:
    import os

    return os.open(path, flags, 0o600)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(_read(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SealError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read(path))
    except ValueError as exc:
        raise SealError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SealError(f"{path} is not an Ed25519 public key")
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SealError(f"cannot read key {path}: {exc.strerror or exc}") from None


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- sealing -------------------------------------------------------------------------


def document(heads: Sequence[StoredHead], *, sealed_at: datetime, key: str, schema: str) -> bytes:
    """The canonical bytes a seal signs."""
    doc = {
        "version": DOCUMENT_VERSION,
        "schema": schema,
        "sealed_at": format_time(sealed_at),
        "key_id": key,
        "heads": [
            {"step": h.step, "partition": h.partition, "seq": h.seq, "hash": h.hash}
            for h in sorted(heads, key=lambda h: (h.step, h.partition))
        ],
    }
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


_HEADS = "SELECT step, partition, seq, hash FROM audit_chains ORDER BY step, partition"
_ROW_HASHES = """
SELECT b.step, b.partition, b.seq, a.hash
FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS b(step, partition, seq)
LEFT JOIN audit_log a
  ON a.chain_step = b.step AND a.chain_partition = b.partition AND a.seq = b.seq
"""
_INSERT = """
INSERT INTO audit_seals (sealed_at, key_id, document, signature) VALUES (%s, %s, %s, %s)
RETURNING id
"""


async def seal(
    conn: Conn, key: Ed25519PrivateKey, *, schema: str, now: datetime
) -> tuple[int, bytes, str]:
    """Sign the current chain heads and append the seal; (id, document, signature).

    Heads are read in one snapshot with the rows they name, and a head whose
    row does not carry its hash is refused: a seal vouches only for a trail
    that is consistent when sealed.
    """
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur = await conn.execute(_HEADS)
        heads = [StoredHead(*row) for row in await cur.fetchall()]
        mismatched = await _mismatches(conn, heads)
        if mismatched:
            raise SealError(
                f"not sealing: {len(mismatched)} chain head(s) do not match their rows, "
                f"first {mismatched[0]}; run `sluice audit verify`"
            )
        kid = key_id(key.public_key())
        signed = document(heads, sealed_at=now, key=kid, schema=schema)
        signature = base64.b64encode(key.sign(signed)).decode()
        cur = await conn.execute(_INSERT, (now, kid, signed.decode(), signature))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), signed, signature


async def _mismatches(conn: Conn, heads: Sequence[StoredHead]) -> list[SealProblem]:
    """Heads whose row is missing or carries another hash."""
    if not heads:
        return []
    cur = await conn.execute(
        _ROW_HASHES,
        ([h.step for h in heads], [h.partition for h in heads], [h.seq for h in heads]),
    )
    stored = {(step, part, seq): digest for step, part, seq, digest in await cur.fetchall()}
    problems = []
    for h in heads:
        found = stored.get((h.step, h.partition, h.seq))
        if found is None:
            problems.append(
                SealProblem(None, SEALED_ROW_MISSING, "the row is gone", h.step, h.partition, h.seq)
            )
        elif found != h.hash:
            problems.append(
                SealProblem(
                    None,
                    SEALED_HASH_MISMATCH,
                    "the row's hash is not the sealed one (rewritten after sealing)",
                    h.step,
                    h.partition,
                    h.seq,
                )
            )
    return problems


# -- checking ------------------------------------------------------------------------

_SEALS = "SELECT id, document, signature FROM audit_seals ORDER BY id"


async def check_seals(
    conn: Conn, keys: Sequence[Ed25519PublicKey]
) -> tuple[int, list[SealProblem]]:
    """Check every seal against ``keys`` and the rows it names; (seals read, problems).

    Each seal must be signed by one of ``keys`` (several after a key
    rotation); the one it names by ``key_id`` is tried. Run in the same
    snapshot as the chain verification (``verify_chains`` holds each chain's
    prefix to its hashes; this holds those hashes to the seals). No seal at
    all is a problem: there is nothing to trust then.
    """
    cur = await conn.execute(_SEALS)
    rows = await cur.fetchall()
    if not rows:
        return 0, [SealProblem(None, NO_SEALS, "no seals in audit_seals; run `sluice audit seal`")]
    by_id = {key_id(key): key for key in keys}
    problems: list[SealProblem] = []
    for seal_id, text, signature in rows:
        signed = str(text).encode()
        claimed = _claimed_key(signed)
        public = by_id.get(claimed or "")
        if public is None:
            why = f"signed by key {claimed}, not by {', '.join(sorted(by_id))}"
            problems.append(SealProblem(int(seal_id), OTHER_KEY, why))
            continue
        try:
            public.verify(base64.b64decode(str(signature), validate=True), signed)
            doc = orjson.loads(signed)
            heads = [
                StoredHead(h["step"], int(h["partition"]), int(h["seq"]), h["hash"])
                for h in doc["heads"]
            ]
        except (InvalidSignature, ValueError, KeyError, TypeError):
            why = "the signature does not verify (the seal was altered or forged)"
            problems.append(SealProblem(int(seal_id), BAD_SIGNATURE, why))
            continue
        for found in await _mismatches(conn, heads):
            problems.append(
                SealProblem(
                    int(seal_id),
                    found.problem,
                    found.reason,
                    found.chain_step,
                    found.chain_partition,
                    found.seq,
                )
            )
    return len(rows), problems


def _claimed_key(signed: bytes) -> str | None:
    try:
        claimed = orjson.loads(signed).get("key_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return claimed if isinstance(claimed, str) else None
