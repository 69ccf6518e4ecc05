"""The local (hot) cache in front of remote storage, content-addressed by digest.

    packages/<manifest sha256>/   verified packages; visible only once every file matched
    artifacts/<key>/              converted artifacts, keyed by package digest and converter
    partial/<id>/                 fetches in progress; never read by anything else
    quarantine/<time>-<name>/     bytes that failed verification, kept for the operator

A file is hashed while it is written to `<name>.partial`, fsynced and renamed; a package
directory is renamed into `packages/` only after verification, so nothing half-written or
unproven is ever where Triton or a converter could read it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import structlog

from modelplane.common.types import FileDigest, PackageManifest
from modelplane.loader.manifest import build_manifest
from modelplane.loader.sources import PackageSource, SourceFile

log = structlog.get_logger()

ProgressCallback = Callable[[int, int, str], None]  # (bytes_done, files_done, current_file)


class PackageCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.packages = root / "packages"
        self.artifacts = root / "artifacts"
        self.partial = root / "partial"
        self.quarantine_dir = root / "quarantine"
        for directory in (self.packages, self.artifacts, self.partial, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._discard_partials()

    def _discard_partials(self) -> None:
        """A fetch interrupted by a crash left only bytes nobody trusts; start those afresh."""
        for leftover in self.partial.iterdir():
            log.info("discarding interrupted fetch", path=str(leftover))
            shutil.rmtree(leftover, ignore_errors=True)

    def package_path(self, manifest_sha256: str) -> Path | None:
        path = self.packages / manifest_sha256
        return path if path.is_dir() else None

    def artifact_path(self, key: str) -> Path:
        return self.artifacts / key

    async def fetch(
        self, source: PackageSource, files: list[SourceFile], on_progress: ProgressCallback
    ) -> tuple[Path, PackageManifest]:
        """Copies every file into a fresh partial directory, hashing as it writes."""
        staging = self.partial / uuid.uuid4().hex
        staging.mkdir(parents=True)
        digests: list[FileDigest] = []
        done_bytes = 0
        try:
            for index, file in enumerate(files):
                target = staging / file.path
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                hasher = hashlib.sha256()
                written = 0
                handle = await asyncio.to_thread(open, partial, "wb")
                try:
                    async for chunk in source.read(file):
                        await asyncio.to_thread(_write_and_hash, handle, hasher, chunk)
                        written += len(chunk)
                        on_progress(done_bytes + written, index, file.path)
                    await asyncio.to_thread(_flush_and_sync, handle)
                finally:
                    handle.close()
                partial.rename(target)
                done_bytes += written
                digests.append(FileDigest(path=file.path, size_bytes=written, sha256=hasher.hexdigest()))
                on_progress(done_bytes, index + 1, file.path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging, build_manifest(digests)

    def admit(self, staging: Path, manifest: PackageManifest) -> Path:
        """Makes a verified package visible under its digest (atomic rename)."""
        final = self.packages / manifest.sha256
        if final.exists():
            shutil.rmtree(staging, ignore_errors=True)  # the same bytes were admitted by another fetch
        else:
            _sync_directory_tree(staging)
            staging.rename(final)
        return final

    def quarantine(self, staging: Path, label: str) -> Path:
        destination = self.quarantine_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{label}-{uuid.uuid4().hex[:8]}"
        staging.rename(destination)
        log.warning("package quarantined", path=str(destination))
        return destination


def _write_and_hash(handle: object, hasher: hashlib._Hash, chunk: bytes) -> None:
    handle.write(chunk)  # type: ignore[attr-defined]
    hasher.update(chunk)


def _flush_and_sync(handle: object) -> None:
    handle.flush()  # type: ignore[attr-defined]
    os.fsync(handle.fileno())  # type: ignore[attr-defined]


def _sync_directory_tree(root: Path) -> None:
    for directory, _, _ in os.walk(root):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
