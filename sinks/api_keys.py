"""API keys of the HTTP gateway: made, listed, revoked and checked against ``api_keys``.

A key reads ``sg_<key_id>_<secret>``. ``key_id`` (12 hex digits) finds the
row; only the SHA-256 of ``secret`` is stored, so a copy of the table does not
let anyone in. The secret is 32 random bytes: a fast hash is enough, since
there is nothing to guess (a slow one, as for passwords, would only slow down
every request). The key itself is shown once, when it is made.

Each function takes a connection whose ``search_path`` is the sluicegate
schema (``sinks.db.connect``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row

from sluicegate.streams.errors import SluiceError

Conn = psycopg.AsyncConnection[Any]

PREFIX = "sg"
_KEY_RE = re.compile(r"^sg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
MAX_TENANT = 128


class ApiKeyError(SluiceError, ValueError):
    """A tenant, key or key id that cannot be used (the message says why)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One ``api_keys`` row, without the secret's hash."""

    key_id: str
    tenant: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: ``key`` is the only copy of the secret there will ever be."""

    key: str
    key_id: str
    tenant: str


def parse_key(key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(key)
    return (match.group(1), match.group(2)) if match else None


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    """The tenant name if usable (what the event envelope accepts), else ``ApiKeyError``."""
    if not tenant or len(tenant) > MAX_TENANT or tenant != tenant.strip():
        raise ApiKeyError(
            f"invalid tenant {tenant!r}: 1 to {MAX_TENANT} characters, "
            "without leading or trailing spaces"
        )
    return tenant


async def create_key(conn: Conn, tenant: str, *, label: str | None = None) -> NewKey:
    """Make and store a key for ``tenant``; the returned ``key`` is not stored anywhere."""
    check_tenant(tenant)
    secret = secrets.token_urlsafe(32)  # 43 characters
    while True:
        key_id = secrets.token_hex(6)
        cur = await conn.execute(
            "INSERT INTO api_keys (key_id, tenant, secret_hash, label) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (key_id) DO NOTHING",
            (key_id, tenant, secret_hash(secret), label),
        )
        if cur.rowcount == 1:  # 48-bit ids: a clash is rare, but then draw again
            return NewKey(f"{PREFIX}_{key_id}_{secret}", key_id, tenant)


async def list_keys(
    conn: Conn, *, tenant: str | None = None, include_revoked: bool = True
) -> list[ApiKey]:
    """Keys, oldest first; without their secrets (which are not stored)."""
    query = "SELECT key_id, tenant, label, created_at, revoked_at FROM api_keys WHERE true"
    params: list[object] = []
    if tenant is not None:
        query += " AND tenant = %s"
        params.append(tenant)
    if not include_revoked:
        query += " AND revoked_at IS NULL"
    cur = conn.cursor(row_factory=class_row(ApiKey))
    await cur.execute(query + " ORDER BY created_at, key_id", params)
    return await cur.fetchall()


async def revoke_key(conn: Conn, key_id: str) -> ApiKey | None:
    """Revoke a key (idempotent); None when there is no such key."""
    cur = conn.cursor(row_factory=class_row(ApiKey))
    await cur.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = %s"
        " RETURNING key_id, tenant, label, created_at, revoked_at",
        (key_id,),
    )
    return await cur.fetchone()


async def tenant_of(conn: Conn, key: str) -> str | None:
    """The tenant of a valid, unrevoked ``key``; None for anything else."""
    parsed = parse_key(key)
    if parsed is None:
        return None
    key_id, secret = parsed
    cur = await conn.execute(
        "SELECT tenant, secret_hash FROM api_keys WHERE key_id = %s AND revoked_at IS NULL",
        (key_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    tenant, stored = row
    # Constant time: how much of a guessed hash matched must not show in timing.
    return str(tenant) if hmac.compare_digest(stored, secret_hash(secret)) else None
