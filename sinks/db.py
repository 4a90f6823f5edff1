"""Connections to the sluicegate schema: schema-name checks, search_path, JSON codecs.

Every table lives in one schema (default ``sluice``); code and migrations use
unqualified names and rely on the connection's ``search_path``, so the same
SQL serves the production schema and the throwaway schema of each test.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_dumps, set_json_loads

DEFAULT_SCHEMA = "sluice"

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
    conninfo: str, *, schema: str = DEFAULT_SCHEMA, autocommit: bool = True
) -> psycopg.AsyncConnection[Any]:
    """Open a connection whose ``search_path`` is ``schema`` and whose JSON codec is orjson.

    The schema need not exist yet (``migrate`` creates it).
    """
    check_schema(schema)
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=autocommit)
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
