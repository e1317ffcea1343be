"""What both stores share: units whose calls go together, and how waiting callers are answered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, text

from gateway.errors import LedgerUnavailable

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Many = Callable[[Connection, list[tuple[Any, ...]]], list[tuple[bool, Any]]]

UNAVAILABLE = "The gateway's ledger database cannot be reached, so nothing was forwarded. Retry shortly."

# The units whose calls go together (see `grouped`), each with the function that runs many of them.
GROUPS: dict[Callable[..., Any], Many] = {}
# Those functions: on PostgreSQL, each is one statement, run without BEGIN and COMMIT.
ONE_STATEMENT: set[Callable[..., Any]] = set()


def grouped(many: Callable[[Connection, Any], list[tuple[bool, Any]]]) -> Callable[[F], F]:
    """Mark a unit whose calls, from any callers, can run together as one call of `many`.

    `many(conn, [args, ...])` returns (ok, result or error) for each call, exactly what running
    them one after the other would give: a refused call takes nothing from the others. On
    PostgreSQL `many` is a single statement (atomic on its own, so run without BEGIN and COMMIT)
    that locks every row it changes in one fixed order, so statements of many processes cannot
    deadlock; calls that arrive while one is under way go together in the next (group commit). On
    SQLite, where a batch holds the only write lock, every call of the unit in a batch goes to one
    call of `many`.
    """

    def mark(fn: F) -> F:
        ONE_STATEMENT.add(many)
        GROUPS[fn] = many
        return fn

    return mark


def unavailable(exc: BaseException) -> LedgerUnavailable:
    """The 503 for a database that cannot be used, with the driver's reason for operators."""
    log.warning("database unavailable: %s", exc)
    error = LedgerUnavailable(UNAVAILABLE)
    # For operators (the CLI prints it); never in an HTTP answer.
    cause = getattr(exc, "orig", None) or exc
    error.reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return error


def answer(futures: Sequence[asyncio.Future[Any]], results: Sequence[tuple[bool, Any]]) -> None:
    """Give each caller still waiting its (ok, result or error)."""
    for future, (ok, value) in zip(futures, results, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def fail_waiting(futures: Iterable[asyncio.Future[Any]]) -> None:
    """Tell each caller still waiting that the database cannot be reached (503)."""
    for future in futures:
        if not future.done():
            future.set_exception(LedgerUnavailable(UNAVAILABLE))


def select_one(conn: Connection) -> None:
    """The unit a readiness check runs."""
    conn.execute(text("SELECT 1"))
