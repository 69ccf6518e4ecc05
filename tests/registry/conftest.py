"""Every registry test runs twice: on SQLite (one replica) and on a real PostgreSQL server (`slow`:
each test makes a database of its own; `make test-fast` runs the SQLite half)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of an empty database of each backend; the PostgreSQL one is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        return
    postgres: PostgresServer = request.getfixturevalue("postgres")
    name = await postgres.create_database()
    yield postgres.url(name)
    await postgres.drop_database(name)
