"""Migrations: every revision upgrades, downgrades and upgrades again (the stairway), on both dialects."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.store import migrate
from gateway.store.schema import Base

from .conftest import Backend


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite+aiosqlite:///unused.db"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_stairway(backend: Backend) -> None:
    # The fixture migrated to head already; go down to nothing first.
    migrate.downgrade(backend.url, "base")
    assert asyncio.run(_tables(backend.url)) <= {"alembic_version"}
    previous = "base"
    for revision in _revisions():
        migrate.upgrade(backend.url, revision)
        migrate.downgrade(backend.url, previous)
        migrate.upgrade(backend.url, revision)
        previous = revision
    assert asyncio.run(_tables(backend.url)) == set(Base.metadata.tables) | {"alembic_version"}


def test_head_matches_the_models(backend: Backend) -> None:
    """Autogenerate finds nothing to do: the migrations and schema.py describe the same database."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    async def diff() -> list[Any]:
        engine = create_async_engine(backend.url)
        try:
            async with engine.connect() as conn:
                return list(
                    await conn.run_sync(
                        lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
                    )
                )
        finally:
            await engine.dispose()

    assert asyncio.run(diff()) == []


def test_replicas_migrating_at_once(backend: Backend) -> None:
    """Several `gateway db upgrade` at the same moment on an empty database all succeed."""
    import os
    import subprocess
    import sys

    migrate.downgrade(backend.url, "base")
    env = {**os.environ, "GATEWAY_DATABASE_URL": backend.url}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "db", "upgrade"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=60)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    assert asyncio.run(_tables(backend.url)) == set(Base.metadata.tables) | {"alembic_version"}
