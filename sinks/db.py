"""Connections to the sluicegate schema: schema-name checks, search_path, JSON codecs.

Every table lives in one schema (default ``sluice``); code and migrations use
unqualified names and rely on the connection's ``search_path``, so the same
SQL serves the production schema and the throwaway schema of each test.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_dumps, set_json_loads

DEFAULT_SCHEMA = "sluice"

# Seconds a connection attempt may take. A server that accepts the TCP
# connection and never answers would otherwise hang its caller for good (libpq
# waits forever unless told). A ``connect_timeout`` in the URL takes precedence.
DEFAULT_CONNECT_TIMEOUT = 10.0

# Plain lower-case identifiers only: they need no quoting anywhere (psql,
# migrations, logs) and cannot smuggle SQL into the SET statements below.
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema(schema: str) -> str:
    """Return ``schema`` if it is a plain lower-case identifier, else raise ``ValueError``."""
    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(
            f"invalid schema name {schema!r}: use lower-case letters, digits and _ "
            "(at most 63 characters, not starting with a digit)"
        )
    return schema


def _orjson_dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def connect(
    conninfo: str,
    *,
    schema: str = DEFAULT_SCHEMA,
    autocommit: bool = True,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> psycopg.AsyncConnection[Any]:
    """Open a connection whose ``search_path`` is ``schema`` and whose JSON codec is orjson.

    The schema need not exist yet (``migrate`` creates it). Connecting, the
    first statement included, takes about ``connect_timeout`` seconds at most
    (or the URL's own ``connect_timeout``), then ``TimeoutError``.
    """
    check_schema(schema)
    params = conninfo_to_dict(conninfo)
    # libpq counts whole seconds; 0 would mean "wait forever".
    params.setdefault("connect_timeout", str(max(1, round(connect_timeout))))
    # Bounded either way, also for a URL that says 0 (wait forever).
    limit = (float(params["connect_timeout"] or 0) or connect_timeout) + 1
    async with asyncio.timeout(limit):
        return await _connect(params, schema, autocommit)


async def _connect(
    params: dict[str, Any], schema: str, autocommit: bool
) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(**params, autocommit=autocommit)
    try:
        # SET rather than an ``options`` connection parameter, which would
        # silently replace any ``options`` the operator put in the URL.
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        if not autocommit:
            await conn.commit()
    except BaseException:
        await conn.close()
        raise
    # jsonb columns are read and written often (states, audit detail); orjson
    # is several times faster than the stdlib codec psycopg uses by default.
    set_json_loads(orjson.loads, conn)
    set_json_dumps(_orjson_dumps, conn)
    return conn
