"""How the hot path's statements reach the driver: the same `:name` statements on both dialects."""

from __future__ import annotations

import functools
import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, TextClause, text


class Sql(Protocol):
    """The few ways the hot path talks SQL: the same `:name` statements on both dialects."""

    dialect: str  # "sqlite" or "postgresql"

    def all(self, sql: str, params: Mapping[str, Any]) -> list[Any]: ...

    def first(self, sql: str, params: Mapping[str, Any]) -> Any | None: ...

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run a write once per row; a row's values in the order the statement names them first.
        How many rows they inserted, updated or deleted in all (SQLite; -1 where the driver does
        not say)."""
        ...

    def changed(self, sql: str, params: Mapping[str, Any]) -> int:
        """Run a write; how many rows it inserted, updated or deleted."""
        ...


class _DriverSql:
    """Straight to sqlite3 (which caches its prepared statements): several times cheaper per
    statement than going through SQLAlchemy, and these statements run on every request."""

    dialect = "sqlite"

    def __init__(self, raw: sqlite3.Connection) -> None:
        self._raw = raw

    def all(self, sql: str, params: Mapping[str, Any]) -> list[Any]:
        return self._raw.execute(sql, params).fetchall()

    def first(self, sql: str, params: Mapping[str, Any]) -> Any | None:
        return self._raw.execute(sql, params).fetchone()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        # Numbered parameters, bound from tuples: sqlite3 binds a named one by making a string of
        # its name and looking it up, which for a ledger row costs a fifth of the insert.
        return self._raw.executemany(_numbered(sql), rows).rowcount

    def changed(self, sql: str, params: Mapping[str, Any]) -> int:
        return self._raw.execute(sql, params).rowcount


@functools.lru_cache(maxsize=256)
def _clause(sql: str) -> TextClause:
    return text(sql)


# A `:name` parameter, as SQLAlchemy's `text()` finds them (not a PostgreSQL `::type` cast, nor an
# escaped `\:`).
_PARAMETER = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")


@functools.lru_cache(maxsize=256)
def _parameters(sql: str) -> tuple[str, ...]:
    """The names of a statement's parameters, each once, in the order they first appear."""
    return tuple(dict.fromkeys(_PARAMETER.findall(sql)))


@functools.lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    """The statement with `?N` (SQLite's numbered parameters) for each `:name`, in `_parameters` order."""
    number = {name: i for i, name in enumerate(_parameters(sql), start=1)}
    return _PARAMETER.sub(lambda m: f"?{number[m.group(1)]}", sql)


class _AlchemySql:
    """Through SQLAlchemy (PostgreSQL, on asyncpg)."""

    dialect = "postgresql"

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def all(self, sql: str, params: Mapping[str, Any]) -> list[Any]:
        return list(self._conn.execute(_clause(sql), params).all())

    def first(self, sql: str, params: Mapping[str, Any]) -> Any | None:
        return self._conn.execute(_clause(sql), params).first()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        names = _parameters(sql)
        return self._conn.execute(_clause(sql), [dict(zip(names, row, strict=True)) for row in rows]).rowcount

    def changed(self, sql: str, params: Mapping[str, Any]) -> int:
        return self._conn.execute(_clause(sql), params).rowcount


def sql_of(conn: Connection) -> Sql:
    """The cheapest way to run the hot path's statements on this connection."""
    if conn.dialect.name == "sqlite":
        return _DriverSql(driver_connection(conn))
    return _AlchemySql(conn)


def driver_connection(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy one."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw


def array_args(args: tuple[tuple[str, str], ...]) -> str:
    """A PostgreSQL function's arguments, one array parameter per column: `CAST(:name AS kind[])`."""
    return ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in args)
