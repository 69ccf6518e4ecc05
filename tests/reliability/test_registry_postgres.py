"""The registry killed during writes on PostgreSQL (the several-replica deployment): a registry
process (`modelplane serve registry`, as production runs it) on a real PostgreSQL server from
Debian's packages, SIGKILLed while four clients register models, then started again. Every
registration it acknowledged must be there: the transaction commits before the answer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import ModelSpec, Task
from modelplane.registry.client import RegistryClient
from tests.conftest import free_port
from tests.postgres import PostgresServer
from tests.reliability.conftest import record, until


@pytest.fixture
async def database(postgres: PostgresServer) -> AsyncIterator[str]:
    name = await postgres.create_database()
    yield postgres.url(name)
    await postgres.drop_database(name)


def _start_registry(database_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "MODELPLANE_LOG_FORMAT": "json",
        "MODELPLANE_REGISTRY_HOST": "127.0.0.1",
        "MODELPLANE_REGISTRY_PORT": str(port),
        "MODELPLANE_REGISTRY_DATABASE_URL": database_url,
    }
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "modelplane.cli", "serve", "registry"], env=env, stdout=output, stderr=output
        )


async def _serving(address: str) -> bool:
    async with RegistryClient(address, timeout_seconds=1) as registry:
        await registry.list_models()
    return True


async def test_registry_on_postgres_killed_during_writes_loses_no_acknowledged_write(
    database: str, tmp_path: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "registry.log"
    process = _start_registry(database, port, log)
    try:
        await until(lambda: _serving(address), bool, 60)
        acknowledged: list[str] = []
        refused: Counter[str] = Counter()
        stop = asyncio.Event()

        async def writer(index: int) -> None:
            async with RegistryClient(address, timeout_seconds=5) as registry:
                n = 0
                while not stop.is_set():
                    name = f"pg-write-{index}-{n}"
                    try:
                        await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=f"/m/{name}"))
                    except ModelplaneError as error:
                        refused[error.code.name] += 1
                        await asyncio.sleep(0.1)
                        continue
                    acknowledged.append(name)
                    n += 1

        writers = [asyncio.create_task(writer(i)) for i in range(4)]
        await until(lambda: _count(acknowledged), lambda n: n >= 20, 60)
        before_kill = len(acknowledged)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        await asyncio.sleep(1.0)  # clients keep trying against nothing
        process = _start_registry(database, port, log)
        await until(lambda: _serving(address), bool, 60)
        back = time.monotonic() - killed
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)
        async with RegistryClient(address) as registry:
            stored = {m.name for m in await registry.list_models()}
        lost = [name for name in acknowledged if name not in stored]
        record(
            f"registry (PostgreSQL) SIGKILL during writes: {len(acknowledged)} acknowledged ({before_kill} before the "
            f"kill), refused meanwhile {dict(refused)}, lost {len(lost)}; serving again {back:.1f} s after the kill"
        )
        assert len(acknowledged) > before_kill
        assert lost == []
        assert set(refused) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    finally:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        if process.poll() is None:
            process.kill()
            process.wait()


async def _count(items: list[str]) -> int:
    return len(items)
