"""Schema migrations: Alembic, found beside the package, run against the configured database."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str, connection: Connection | None = None) -> Config:
    """Alembic's configuration for this database (the URL comes from the gateway's settings)."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextlib.contextmanager
def _one_at_a_time(database_url: str) -> Iterator[None]:
    """Processes sharing a SQLite file migrate it one after another (PostgreSQL: see env.py)."""
    if not database_url.startswith("sqlite"):
        yield
        return
    from gateway.store import sqlite_path

    lock_path = Path(sqlite_path(database_url) + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database up to `revision`. Call it with no event loop running in this thread."""
    with _one_at_a_time(database_url):
        command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Migrate the database down to `revision`."""
    command.downgrade(alembic_config(database_url), revision)


# Connect arguments for the schema check: a database that does not answer is not waited for long.
_QUICK = {"postgresql+asyncpg": {"timeout": 2}}


class SchemaBehind(Exception):
    """The database is not at the schema this gateway's code needs."""


def head() -> str | None:
    """The latest migration this code knows."""
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


async def current(database_url: str) -> str | None:
    """The database's migration; None if it has none. Raises SQLAlchemyError or OSError if unreachable."""
    engine = create_async_engine(database_url, connect_args=_QUICK.get(database_url.split(":")[0], {}))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
    finally:
        await engine.dispose()


async def check_current(database_url: str) -> bool:
    """Raise SchemaBehind unless the database is at `head()`; False if it cannot be reached now.

    A replica started without migrating (`serve --no-migrate`) on a database not yet upgraded
    would fail every request; it refuses to start instead, saying what to run.
    """
    try:
        found = await current(database_url)
    except (SQLAlchemyError, OSError):
        return False
    latest = head()
    if found != latest:
        raise SchemaBehind(
            f"the database is at migration {found or 'none'} but this gateway needs {latest}; "
            "run 'gateway db upgrade' (once, from any one machine) and start again"
        )
    return True
