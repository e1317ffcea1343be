"""Database access: every unit of work is one plain function run in one transaction.

A unit of work is `fn(conn, *args)` on a synchronous SQLAlchemy `Connection`. The store runs it:

- SQLite (`sqlite.py`): on the event loop itself, with group commit. Units that arrive together
  share one transaction (a savepoint each, one commit); the admissions of a batch run as one unit,
  and so do its settlements (see `units.grouped`).
- PostgreSQL (`postgres.py`): on an asyncpg pool, one transaction per unit, retried on
  serialization failures and deadlocks. Admission and settlement are one statement each there
  (functions taking arrays, migration 0006): the calls of every caller that arrive while one such
  statement is under way go together in the next, so under load a commit serves many requests.

A database that cannot be reached raises `LedgerUnavailable`; any other error raised by a unit
(a refusal such as `BudgetExceeded`, or a bug) rolls back that unit alone and reaches its caller
unchanged. `sql.py` is how the hot path's statements reach either driver at the least cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import make_url

from gateway.store.postgres import PostgresStore
from gateway.store.sql import Sql, array_args, driver_connection, sql_of
from gateway.store.sqlite import SqliteStore
from gateway.store.units import grouped

__all__ = [
    "array_args",
    "PostgresStore",
    "Sql",
    "SqliteStore",
    "Store",
    "driver_connection",
    "grouped",
    "open_store",
    "sql_of",
    "sqlite_path",
]

T = TypeVar("T")


class Store(Protocol):
    """What the rest of the gateway needs of the database."""

    dialect: str

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in one transaction; it runs to its end even if the caller is cancelled."""
        ...

    async def read(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def sqlite_path(url: str) -> str:
    """The file path of a sqlite URL (relative paths resolve against the working directory)."""
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ValueError("GATEWAY_DATABASE_URL: an in-memory SQLite database cannot be shared; name a file")
    return database


def open_store(url: str, *, pool_size: int = 10) -> Store:
    """The store for a configured database URL."""
    if url.startswith("sqlite"):
        return SqliteStore(sqlite_path(url))
    return PostgresStore(url, pool_size=pool_size)
