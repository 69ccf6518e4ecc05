"""One model's way from its source to READY: fetch → verify → convert → stage → load.

Each phase is recorded in the registry as a transition; a failure lands the model in FAILED with a
reason a person can act on, and leaves the cache, the registry and Triton consistent: bad bytes
go to quarantine, nothing unverified reaches the cache or Triton's repository.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import (
    RESIDENT_STATES,
    WORKING_STATES,
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
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.signing import trusted_keys
from modelplane.loader.sources import PackageSource, SourceFile, open_source
from modelplane.loader.states import Transitions
from modelplane.loader.triton_control import UNDO_TIMEOUT_SECONDS, TritonControl
from modelplane.loader.triton_repo import BuiltEntry, ModelRepository
from modelplane.loader.verification import ExpectedPackage, check_listing, expected_package, verify
from modelplane.registry.client import RegistryClient

log = structlog.get_logger()

ProgressListener = Callable[[LoadProgress], None]
# Measures a model just loaded into Triton and returns its footprint in bytes.
Measure = Callable[[Model], Awaitable[int]]
_PROGRESS_INTERVAL_SECONDS = 0.5


class ModelTracker:
    """Holds a model's latest recorded view during a load and records its transitions."""

    def __init__(self, states: Transitions, model: Model, request_id: str, listener: ProgressListener) -> None:
        self.states = states
        self.model = model
        self.request_id = request_id
        self.listener = listener
        self._last_progress_write = 0.0
        self._began = False
        self._writes: set[asyncio.Task[None]] = set()

    async def enter(self, state: ModelState, message: str, **fields: Any) -> None:
        progress = LoadProgress(phase=state, message=message)
        self.model = await self.states.transition(
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
            await self.states.transition(self.model, progress.phase, progress=progress, progress_only=True)
        except ModelplaneError as error:
            log.debug("progress not recorded", error=error.message)


class SharedFetches:
    """Loads that need the same package (same source, same expectations) share one download."""

    def __init__(self) -> None:
        self._flights: dict[str, tuple[asyncio.Task[tuple[Path, PackageManifest]], list[ProgressListener]]] = {}

    async def run(
        self,
        key: str,
        fetch: Callable[[ProgressListener], Awaitable[tuple[Path, PackageManifest]]],
        listener: ProgressListener,
    ) -> tuple[Path, PackageManifest]:
        flight = self._flights.get(key)
        if flight is None:
            listeners: list[ProgressListener] = []

            def publish(progress: LoadProgress) -> None:
                for follow in list(listeners):
                    follow(progress)

            task = asyncio.create_task(fetch(publish))
            flight = (task, listeners)
            self._flights[key] = flight
            task.add_done_callback(lambda _: self._flights.pop(key, None))
        task, listeners = flight
        listeners.append(listener)
        try:
            # Shielded: one caller giving up must not cancel the download the others wait for.
            return await asyncio.shield(task)
        finally:
            listeners.remove(listener)
            if not listeners and not task.done():
                task.cancel()


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
        self.trusted_keys = trusted_keys(settings)
        self.fetches = SharedFetches()
        self._packages_in_use: collections.Counter[str] = collections.Counter()

    async def run(self, tracker: ModelTracker, *, refresh: bool = False) -> Model:
        await self.stage(tracker, refresh=refresh)
        await self.load(tracker)
        return tracker.model

    async def stage(self, tracker: ModelTracker, *, refresh: bool = False, beside: bool = False) -> BuiltEntry | None:
        """Everything before Triton: the verified package, its conversion and the repository entry.
        Takes no Triton memory, so the loader admits the model into its budget only after this.
        `beside`: the entry is built beside the one Triton serves and returned, not put in place
        (a refresh of a served model, which the caller switches to once it can)."""
        package, manifest = await self.prepare(tracker, refresh=refresh)
        self._packages_in_use[manifest.sha256] += 1
        try:
            return await self._stage(tracker, package, manifest, beside=beside)
        finally:
            self._packages_in_use[manifest.sha256] -= 1
            if not self._packages_in_use[manifest.sha256]:
                del self._packages_in_use[manifest.sha256]

    async def prepare(self, tracker: ModelTracker, *, refresh: bool = False) -> tuple[Path, PackageManifest]:
        """The model's verified package in the cache: found there, or fetched and verified."""
        cached = None if refresh else self._cached_package(tracker.model)
        if cached is None:
            return await self._fetch_and_verify(tracker, refresh=refresh)
        self.cache.touch(cached[1].sha256)
        return cached

    def _cached_package(self, model: Model) -> tuple[Path, PackageManifest] | None:
        """A package verified before is not hashed again: the registry holds its digest."""
        manifest = model.status.manifest
        if manifest is None or not manifest.sha256:
            return None
        path = self.cache.package_path(manifest.sha256)
        return (path, manifest) if path is not None else None

    async def _fetch_and_verify(self, tracker: ModelTracker, *, refresh: bool) -> tuple[Path, PackageManifest]:
        spec = tracker.model.spec
        known_paths = [f.path for f in spec.manifest.files] if spec.manifest else []
        source = open_source(spec.source_uri, self.settings, known_paths)
        try:
            await tracker.enter(ModelState.FETCHING, f"fetching from {source.display_uri}")
            files = await source.list_files()
            expected = await expected_package(
                tracker.model, source, files, self.trusted_keys, self.settings.require_signed_manifests
            )
            check_listing(expected, files, source.display_uri)
            package, manifest = await self.fetches.run(
                expected.fetch_key(spec.source_uri),
                lambda publish: self._fetch_verify_admit(source, files, expected, tracker.model.name, publish, refresh),
                tracker.progress,
            )
        finally:
            await source.close()
        signed = f", signed by key {expected.signed_by}" if expected.signed_by else ""
        await tracker.enter(
            ModelState.VERIFYING,
            f"verified {len(manifest.files)} files against {expected.describe()}{signed}",
            manifest=manifest,
        )
        return package, manifest

    async def _fetch_verify_admit(
        self,
        source: PackageSource,
        files: list[SourceFile],
        expected: ExpectedPackage,
        label: str,
        publish: ProgressListener,
        refresh: bool,
    ) -> tuple[Path, PackageManifest]:
        # Content-addressed: when the expectations name every file's digest and the cache holds those
        # bytes (another model's load, or one that finished a moment ago), nothing is fetched.
        known = None if refresh else expected.file_digests(files)
        cached = self.cache.find(known) if known is not None else None
        if cached is not None:
            with contextlib.suppress(ChecksumMismatch):  # the listing's sizes differ: fetch and see
                verify(expected, files, cached[1])
                return cached
        total = sum(max(f.size, 0) for f in files)
        keep = await self._packages_needed()
        await self.cache.make_room(total, keep)

        def on_progress(done: int, files_done: int, current: str) -> None:
            publish(
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
        try:
            verify(expected, files, manifest)
        except ChecksumMismatch:
            self.cache.quarantine(staging, label)
            raise
        return self.cache.admit(staging, manifest), manifest

    async def _packages_needed(self) -> set[str]:
        """Packages the cache must keep: those of models resident in Triton or being loaded."""
        models = await self.registry.list_models(states=sorted(RESIDENT_STATES | WORKING_STATES))
        needed = {m.status.manifest.sha256 for m in models if m.status.manifest is not None}
        return needed | set(self._packages_in_use)

    async def _stage(
        self, tracker: ModelTracker, package: Path, manifest: PackageManifest, *, beside: bool
    ) -> BuiltEntry | None:
        model = tracker.model
        builder = select_builder(model.spec.format or detect_format(package, manifest), model.spec.task)
        options = builder.options(model, self.settings)
        artifact = self.cache.artifact_path(manifest.sha256, artifact_key(builder.converter_version, options))
        report = read_report(artifact)
        if report is None:
            if tracker.model.state != ModelState.VERIFYING:
                await tracker.enter(ModelState.VERIFYING, "package found in the local cache")
            await tracker.enter(ModelState.CONVERTING, f"converting ({builder.converter_version})")
            report = await build_once(artifact, lambda work: builder.build(tracker.model, package, work, self.settings))
        entry = builder.entry(model, package, artifact, report, self.settings)
        if not beside:
            await asyncio.to_thread(self.repository.write, entry.config, model.version, entry.files)
            await self._staged(tracker, builder.describe(report), manifest, entry)
            return None
        built = await asyncio.to_thread(self.repository.build, entry.config, model.version, entry.files)
        try:
            await self._staged(tracker, builder.describe(report), manifest, entry)
        except BaseException:
            self.repository.discard(built.path)
            raise
        return built

    async def _staged(
        self, tracker: ModelTracker, message: str, manifest: PackageManifest, entry: RepositoryEntry
    ) -> None:
        if tracker.model.state != ModelState.STAGED:
            await tracker.enter(
                ModelState.STAGED, message, manifest=manifest, profile=entry.profile, assets=entry.assets
            )

    async def load(self, tracker: ModelTracker, *, measure: Measure | None = None) -> None:
        """Loads the staged model into Triton. `measure` (which may refuse the model by raising)
        returns its footprint, recorded with READY."""
        await tracker.enter(ModelState.LOADING, "loading into Triton")
        started = time.perf_counter()
        try:
            await self.triton.load(tracker.model.name, timeout_seconds=self.settings.triton_load_timeout_seconds)
            footprint = await measure(tracker.model) if measure else 0
        except BaseException:
            # Undo a partial load, so Triton holds nothing the registry does not know about.
            await _quietly(self.triton.unload(tracker.model.name, timeout_seconds=UNDO_TIMEOUT_SECONDS))
            raise
        message = f"loaded into Triton in {time.perf_counter() - started:.1f} s"
        if footprint:
            message += f"; holds {footprint / 2**20:.0f} MiB"
        await tracker.enter(ModelState.READY, message, footprint_bytes=footprint)


async def _quietly(call: Any) -> None:
    try:
        await call
    except Exception as error:  # noqa: BLE001 - cleanup must not hide the original failure
        log.warning("cleanup step failed", error=str(error))
