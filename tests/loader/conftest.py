"""Fixtures of the loader's tests: real S3 and HTTP servers on loopback, and the loader's core
(pipeline and handler) against a real in-process registry."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from modelplane.common.types import LoadProgress, Model, ModelSpec
from modelplane.loader.cache import PackageCache
from modelplane.loader.handlers import LoaderHandler
from modelplane.loader.pipeline import LoadPipeline, ModelTracker
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import ModelRepository
from modelplane.registry.client import RegistryClient
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from tests.conftest import free_port
from tests.loader.servers import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, FileServer, S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root).start()
    yield server
    server.stop()


def loader_settings(tmp_path: Path, s3: S3Server | None = None, **overrides: object) -> LoaderSettings:
    values: dict[str, object] = {
        "cache_dir": tmp_path / "cache",
        "fetch_retry_backoff_seconds": 0.01,
        "download_part_bytes": 1024 * 1024,
        "download_concurrency": 4,
    }
    if s3 is not None:
        values.update(
            s3_endpoint_url=s3.endpoint,
            s3_access_key_id=SecretStr(S3_ACCESS_KEY_ID),
            s3_secret_access_key=SecretStr(S3_SECRET_ACCESS_KEY),
        )
    values.update(overrides)
    return LoaderSettings(**values)  # type: ignore[arg-type]


@dataclass
class LoaderCore:
    """The loader's pipeline and handler with a real registry. Triton is not running: these tests
    stop before Triton (a refusal, or `prepare`, which ends with the package in the cache); the
    tests under tests/integration load into the real Triton."""

    registry: RegistryClient
    pipeline: LoadPipeline
    handler: LoaderHandler
    cache: PackageCache
    repository: ModelRepository

    async def register(self, spec: ModelSpec) -> Model:
        model, _ = await self.registry.register(spec)
        return model

    async def prepare(self, name: str, progress: list[LoadProgress] | None = None) -> Model:
        listener = progress.append if progress is not None else (lambda _: None)
        tracker = ModelTracker(self.registry, await self.registry.get_model(name), "", listener)
        await self.pipeline.prepare(tracker)
        return tracker.model


@pytest.fixture
async def registry_service(tmp_path: Path) -> AsyncIterator[RegistryService]:
    service = RegistryService(
        RegistrySettings(host="127.0.0.1", port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    )
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def make_core(tmp_path: Path, registry_service: RegistryService) -> AsyncIterator[Callable[..., LoaderCore]]:
    made: list[tuple[RegistryClient, TritonControl]] = []

    def make(settings: LoaderSettings) -> LoaderCore:
        registry = RegistryClient(f"127.0.0.1:{registry_service.port}")
        triton = TritonControl(f"127.0.0.1:{free_port()}")  # nothing listens: see LoaderCore
        made.append((registry, triton))
        cache = PackageCache.from_settings(settings)
        repository = ModelRepository(tmp_path / "triton-models")
        pipeline = LoadPipeline(settings, registry, cache, repository, triton)
        handler = LoaderHandler(settings, registry, pipeline, triton, repository)
        return LoaderCore(registry, pipeline, handler, cache, repository)

    yield make
    for registry, triton in made:
        await registry.close()
        await triton.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs: a second filesystem (a small disk for the cache, full after 8 MiB)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
