"""Schema migrations: Alembic, found beside the package, run against the configured database."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

ROOT = Path(__file__).resolve().parent.parent


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
    from .store import sqlite_path

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
