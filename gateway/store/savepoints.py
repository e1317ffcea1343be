"""SQLite units inside a batch's transaction: a savepoint each, grouped calls together, and which
errors are the database's (an outage) rather than one unit's."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from gateway.errors import GatewayError
from gateway.store.units import Many

log = logging.getLogger(__name__)

# SQLite's primary result codes that say the database cannot be used (locked, out of memory,
# read-only, I/O error, corrupt, full, cannot open, not a database); any other error of a unit
# (SQLITE_ERROR: a statement SQLite cannot run) is that unit's alone, unless it says the schema is
# missing (a database never migrated), which no unit can use either.
_OUTAGE_CODES = frozenset(
    getattr(sqlite3, name)
    for name in (
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
        "SQLITE_NOMEM",
        "SQLITE_READONLY",
        "SQLITE_IOERR",
        "SQLITE_CORRUPT",
        "SQLITE_FULL",
        "SQLITE_CANTOPEN",
        "SQLITE_PROTOCOL",
        "SQLITE_NOTADB",
    )
)

_NO_SCHEMA = ("no such table", "no such column")


def is_outage(exc: BaseException) -> bool:
    """Locked past the busy timeout, unreadable, full: the database itself, not a faulty unit."""
    if isinstance(exc, OSError):
        return True
    if isinstance(exc, OperationalError):
        exc = exc.orig if isinstance(exc.orig, BaseException) else exc
    if not isinstance(exc, (OperationalError, sqlite3.OperationalError)):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or code & 0xFF in _OUTAGE_CODES or str(exc).startswith(_NO_SCHEMA)


def for_caller(exc: Exception) -> Exception:
    """A unit's error as its caller gets it. A refusal (a GatewayError, such as BudgetExceeded)
    loses its traceback, which says nothing a refusal needs: it held the store's frames, and through
    them the batch with this very error, in a reference cycle that kept each refused request (its
    body, up to the size limit) alive until a collection. A bug keeps its traceback, for the log."""
    return exc.with_traceback(None) if isinstance(exc, GatewayError) else exc


def in_savepoint(raw: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """SQLite, inside a transaction: `fn(*args)`, rolled back alone if it raises; (ok, result or error)."""
    raw.execute("SAVEPOINT unit")
    try:
        result = fn(*args)
    except Exception as exc:
        if is_outage(exc):
            raise
        raw.execute("ROLLBACK TO unit")
        raw.execute("RELEASE unit")
        return (False, for_caller(exc))
    raw.execute("RELEASE unit")
    return (True, result)


def many_in_savepoint(
    raw: sqlite3.Connection,
    many: Many,
    conn: Connection,
    calls: list[tuple[Any, ...]],
) -> list[tuple[bool, Any]]:
    """SQLite: `many(conn, calls)` in a savepoint; if it raises (or answers for the wrong number of
    calls), each call alone, so one call's error (a bug) is that call's only."""
    ok, results = in_savepoint(raw, _answered, many, conn, calls)
    if ok:
        return list(results)
    log.warning("grouped calls failed together (%s); running the %d calls one by one", results, len(calls))
    alone: list[tuple[bool, Any]] = []
    for args in calls:
        ok, result = in_savepoint(raw, _answered, many, conn, [args])
        alone.append(result[0] if ok else (False, result))
    return alone


def _answered(
    many: Many,
    conn: Connection,
    calls: list[tuple[Any, ...]],
) -> list[tuple[bool, Any]]:
    """`many(conn, calls)`, which must answer each call once."""
    results = many(conn, calls)
    if len(results) != len(calls):
        raise AssertionError(f"{len(results)} results for {len(calls)} calls")
    return results
