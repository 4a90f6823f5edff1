"""Telling Postgres outages from permanent errors.

An outage (connection refused or lost, the server shutting down, a
statement that ran out of time) is worth riding out: the same call works
once the server is back. A permanent error (a column missing after schema
drift, a refused permission, a database or schema that does not exist) fails
the same way every time, so the worker must say so at once, in one line,
instead of retrying until its outage patience runs out.
"""

from __future__ import annotations

import psycopg

from sluicegate.streams.checkpoint import StorePermanentError

# SQLSTATE classes that no amount of waiting fixes: 0A feature not supported,
# 22 data exception, 28 invalid authorization, 3D invalid catalog (database),
# 3F invalid schema, 42 syntax error or access rule violation (undefined
# column or table, insufficient privilege).
PERMANENT_CLASSES = frozenset({"0A", "22", "28", "3D", "3F", "42"})


def permanent(exc: BaseException, doing: str) -> StorePermanentError | None:
    """A one-line ``StorePermanentError`` for ``exc`` if it is permanent, else None."""
    if not isinstance(exc, psycopg.Error):
        return None
    state = exc.sqlstate
    if state is None:
        # Raised by the client itself: a query and its parameters that do not
        # match, say. Connection failures are OperationalErrors: an outage.
        if isinstance(exc, psycopg.ProgrammingError | psycopg.DataError):
            return StorePermanentError(f"Postgres refused {doing}: {_first_line(exc)}")
        return None
    if state[:2] not in PERMANENT_CLASSES:
        return None
    return StorePermanentError(f"Postgres refused {doing}: {_first_line(exc)} (SQLSTATE {state})")


def _first_line(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    text = primary or str(exc) or type(exc).__name__
    return text.strip().splitlines()[0]
