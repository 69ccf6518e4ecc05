"""One model's way from its source to READY: fetch → verify → convert → stage → load.

Each phase is recorded in the registry as a transition; a failure lands the model in FAILED with a
reason a person can act on, and leaves the cache, the registry and Triton consistent: bad bytes
go to quarantine, nothing unverified reaches the cache or Triton's repository.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import (
    LoadProgress,
    Model,
    ModelState,
    PackageManifest,
)
from modelplane.loader.builders import RepositoryEntry, select_builder
from modelplane.loader.cache import PackageCache
from modelplane.loader.conversion import artifact_key, build_once, read_report
from modelplane.loader.errors import ChecksumMismatch
from modelplane.loader.formats import detect_format
from modelplane.loader.manifest import package_digest
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.sources import open_source
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.triton_repo import ModelRepository
from modelplane.registry.client import RegistryClient

log = structlog.get_logger()

ProgressListener = Callable[[LoadProgress], None]
_PROGRESS_INTERVAL_SECONDS = 0.5


class ModelTracker:
    """Holds a model's latest registry view during a load and records its transitions."""

    def __init__(self, registry: RegistryClient, model: Model, request_id: str, listener: ProgressListener) -> None:
        self.registry = registry
        self.model = model
        self.request_id = request_id
        self.listener = listener
        self._last_progress_write = 0.0
        self._began = False
        self._writes: set[asyncio.Task[None]] = set()

    async def enter(self, state: ModelState, message: str, **fields: Any) -> None:
        progress = LoadProgress(phase=state, message=message)
        self.model = await self.registry.transition(
            self.model,
            state,
            message,
            progress=progress,
            request_id=self.request_id,
            begins_operation=not self._began,
            **fields,
        )
        self._began = True
        self.listener(progress)

    def progress(self, progress: LoadProgress) -> None:
        """Streams every update to listeners; writes to the registry at most twice a second."""
        self.listener(progress)
        now = time.monotonic()
        if now - self._last_progress_write >= _PROGRESS_INTERVAL_SECONDS:
            self._last_progress_write = now
            task = asyncio.create_task(self._write_progress(progress))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write_progress(self, progress: LoadProgress) -> None:
        try:
            await self.registry.transition(self.model, progress.phase, progress=progress, progress_only=True)
        except ModelplaneError as error:
            log.debug("progress not recorded", error=error.message)


class LoadPipeline:
    def __init__(
        self,
        settings: LoaderSettings,
        registry: RegistryClient,
        cache: PackageCache,
        repository: ModelRepository,
        triton: TritonControl,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.cache = cache
        self.repository = repository
        self.triton = triton

    async def run(self, tracker: ModelTracker, *, refresh: bool = False) -> Model:
        model = tracker.model
        cached = None if refresh else self._cached_package(model)
        if cached is None:
            package, manifest = await self._fetch_and_verify(tracker)
        else:
            package, manifest = cached
        await self._stage(tracker, package, manifest)
        await self._load(tracker)
        return tracker.model

    def _cached_package(self, model: Model) -> tuple[Path, PackageManifest] | None:
        """A package verified before is not hashed again: the registry holds its digest."""
        manifest = model.status.manifest
        if manifest is None or not manifest.sha256:
            return None
        path = self.cache.package_path(manifest.sha256)
        return (path, manifest) if path is not None else None

    async def _fetch_and_verify(self, tracker: ModelTracker) -> tuple[Path, PackageManifest]:
        spec = tracker.model.spec
        source = open_source(spec.source_uri)
        await tracker.enter(ModelState.FETCHING, f"fetching from {source.display_uri}")
        files = await source.list_files()
        total = sum(f.size for f in files)

        def on_progress(done: int, files_done: int, current: str) -> None:
            tracker.progress(
                LoadProgress(
                    phase=ModelState.FETCHING,
                    bytes_done=done,
                    bytes_total=total,
                    files_done=files_done,
                    files_total=len(files),
                    current_file=current,
                )
            )

        staging, manifest = await self.cache.fetch(source, files, on_progress)
        await tracker.enter(ModelState.VERIFYING, f"verifying {len(manifest.files)} files")
        try:
            self._verify(tracker.model, manifest)
        except ChecksumMismatch:
            self.cache.quarantine(staging, tracker.model.name)
            raise
        package = self.cache.admit(staging, manifest)
        return package, manifest

    @staticmethod
    def _verify(model: Model, manifest: PackageManifest) -> None:
        spec = model.spec
        actual = package_digest(manifest)
        if spec.expected_sha256 and spec.expected_sha256 != actual:
            what = manifest.files[0].path if len(manifest.files) == 1 else "the package manifest"
            raise ChecksumMismatch(
                f"SHA-256 mismatch for {what}: expected {spec.expected_sha256}, got {actual}. The package at the "
                "source is not the one registered; check the source or register the right digest. The fetched "
                "bytes were moved to the cache's quarantine folder.",
                metadata={"model": spec.name, "expected": spec.expected_sha256, "actual": actual},
            )
        if spec.manifest and spec.manifest.files:
            expected = {f.path: f.sha256 for f in spec.manifest.files}
            got = {f.path: f.sha256 for f in manifest.files}
            for path in sorted(expected.keys() | got.keys()):
                if expected.get(path) != got.get(path):
                    raise ChecksumMismatch(
                        f"File {path}: expected SHA-256 {expected.get(path, '(not in manifest)')}, got "
                        f"{got.get(path, '(missing from package)')}. Fix the package or its manifest.",
                        metadata={"model": spec.name, "file": path},
                    )

    async def _stage(self, tracker: ModelTracker, package: Path, manifest: PackageManifest) -> RepositoryEntry:
        model = tracker.model
        builder = select_builder(model.spec.format or detect_format(package, manifest), model.spec.task)
        options = builder.options(model, self.settings)
        artifact = self.cache.artifact_path(artifact_key(manifest.sha256, builder.converter_version, options))
        report = read_report(artifact)
        if report is None:
            if tracker.model.state != ModelState.VERIFYING:
                await tracker.enter(ModelState.VERIFYING, "package found in the local cache")
            await tracker.enter(ModelState.CONVERTING, f"converting ({builder.converter_version})")
            report = await build_once(artifact, lambda work: builder.build(tracker.model, package, work, self.settings))
        entry = builder.entry(model, package, artifact, report, self.settings)
        await asyncio.to_thread(self.repository.write, entry.config, model.version, entry.files)
        if tracker.model.state != ModelState.STAGED:
            await tracker.enter(
                ModelState.STAGED,
                builder.describe(report),
                manifest=manifest,
                profile=entry.profile,
                assets=entry.assets,
            )
        return entry

    async def _load(self, tracker: ModelTracker) -> None:
        await tracker.enter(ModelState.LOADING, "loading into Triton")
        started = time.perf_counter()
        try:
            await self.triton.load(tracker.model.name, timeout_seconds=self.settings.triton_load_timeout_seconds)
        except BaseException:
            # Undo a partial load, so Triton holds nothing the registry does not know about.
            await _quietly(self.triton.unload(tracker.model.name))
            raise
        await tracker.enter(ModelState.READY, f"loaded into Triton in {time.perf_counter() - started:.1f} s")


async def _quietly(call: Any) -> None:
    try:
        await call
    except Exception as error:  # noqa: BLE001 - cleanup must not hide the original failure
        log.warning("cleanup step failed", error=str(error))
