"""The local (hot) cache in front of remote storage, content-addressed by digest.

    packages/<manifest sha256>/          verified packages; visible only once every file matched
    artifacts/<manifest sha256>/<key>/   what converters made of that package, keyed by converter
    partial/<id>/                        fetches in progress; never read by anything else
    quarantine/<time>-<name>/            bytes that failed verification, kept for the operator

A file is hashed while it is written to `<name>.partial`, fsynced and renamed; a package
directory is renamed into `packages/` only after verification, so nothing half-written or
unproven is ever where Triton or a converter could read it.

The cache keeps to a byte budget by evicting the least recently used packages (with their
artifacts) that no loaded or loading model needs. Its state is its directory tree: after a
restart it knows every package from the tree, their last use from the directories' mtimes, and
discards what a crash left in `partial/`.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from modelplane.common.types import FileDigest, PackageManifest
from modelplane.loader.errors import CacheFull
from modelplane.loader.manifest import build_manifest
from modelplane.loader.sources import PackageSource, SourceFile

log = structlog.get_logger()

ProgressCallback = Callable[[int, int, str], None]  # (bytes_done, files_done, current_file)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class CachedPackage:
    digest: str
    size_bytes: int  # the package and every artifact made from it
    last_used: float  # seconds since the epoch


class PackageCache:
    def __init__(self, root: Path, budget_bytes: int = 0, quarantine_keep_seconds: float = 7 * 86400) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.quarantine_keep_seconds = quarantine_keep_seconds
        self.packages = root / "packages"
        self.artifacts = root / "artifacts"
        self.partial = root / "partial"
        self.quarantine_dir = root / "quarantine"
        for directory in (self.packages, self.artifacts, self.partial, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._discard_partials()
        self.expire_quarantine()

    def _discard_partials(self) -> None:
        """A fetch interrupted by a crash left only bytes nobody trusts; start those afresh."""
        for leftover in self.partial.iterdir():
            log.info("discarding interrupted fetch", path=str(leftover))
            shutil.rmtree(leftover, ignore_errors=True)

    # Lookup -------------------------------------------------------------------------------

    def package_path(self, manifest_sha256: str) -> Path | None:
        path = self.packages / manifest_sha256
        return path if path.is_dir() else None

    def artifact_path(self, manifest_sha256: str, key: str) -> Path:
        return self.artifacts / manifest_sha256 / key

    def touch(self, manifest_sha256: str) -> None:
        """Marks a package used now, for least-recently-used eviction."""
        path = self.packages / manifest_sha256
        if path.is_dir():
            os.utime(path)

    def index(self) -> list[CachedPackage]:
        """Every cached package, least recently used first. A file's bytes count once however many
        names it has: converters hard-link package files into their artifacts, and such a file is
        charged to the least recently used package that holds it."""
        packages = sorted((p for p in self.packages.iterdir() if p.is_dir()), key=_mtime)
        counted: set[tuple[int, int]] = set()
        entries = []
        for path in packages:
            size = _tree_bytes(path, counted) + _tree_bytes(self.artifacts / path.name, counted)
            entries.append(CachedPackage(path.name, size, _mtime(path)))
        return entries

    # Room ---------------------------------------------------------------------------------

    async def make_room(self, needed_bytes: int, keep: set[str]) -> list[str]:
        """Evicts least recently used packages outside `keep` until `needed_bytes` fit the budget
        and the disk; refuses when even that is not enough. Returns the digests evicted."""
        return await asyncio.to_thread(self._make_room, needed_bytes, keep)

    def _make_room(self, needed: int, keep: set[str]) -> list[str]:
        entries = self.index()
        used = sum(e.size_bytes for e in entries)
        evicted: list[str] = []

        def short() -> bool:
            over_budget = self.budget_bytes > 0 and used + needed > self.budget_bytes
            return over_budget or shutil.disk_usage(self.root).free < needed

        for entry in entries:
            if not short():
                break
            if entry.digest in keep:
                continue
            self.evict(entry.digest)
            used -= entry.size_bytes
            evicted.append(entry.digest)
        if short():
            kept = sum(e.size_bytes for e in entries if e.digest in keep)
            budget = f"; its budget is {_size(self.budget_bytes)}" if self.budget_bytes else ""
            raise CacheFull(
                f"The package needs {_size(needed)}, but the cache at {self.root} has "
                f"{_size(shutil.disk_usage(self.root).free)} free on its disk{budget}, with {_size(kept)} held by "
                "packages that loaded models need. Free space on that disk, point MODELPLANE_LOADER_CACHE_DIR at a "
                "larger one, raise MODELPLANE_LOADER_CACHE_BUDGET_BYTES, or unload models.",
                metadata={"needed_bytes": str(needed)},
            )
        return evicted

    def evict(self, manifest_sha256: str) -> None:
        """Removes a package and its artifacts; renamed away first, so nobody sees half of it."""
        for path in (self.packages / manifest_sha256, self.artifacts / manifest_sha256):
            if path.exists():
                doomed = self.partial / f"evicted-{uuid.uuid4().hex}"
                path.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        log.info("package evicted from the cache", package=manifest_sha256)

    # Fetching -----------------------------------------------------------------------------

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
                digest = await self._fetch_file(
                    source, file, staging, lambda n, base=done_bytes, i=index, f=file.path: on_progress(base + n, i, f)
                )
                done_bytes += digest.size_bytes
                digests.append(digest)
                on_progress(done_bytes, index + 1, file.path)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            if error.errno in _DISK_FULL:
                raise CacheFull(
                    f"The cache's disk at {self.root} filled up while the package was fetched ({_size(done_bytes)} "
                    "written); nothing of it was kept. Free space on that disk, point MODELPLANE_LOADER_CACHE_DIR "
                    "at a larger one, or set MODELPLANE_LOADER_CACHE_BUDGET_BYTES below the disk's size so the "
                    "cache evicts in time."
                ) from None
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging, build_manifest(digests)

    async def _fetch_file(
        self, source: PackageSource, file: SourceFile, staging: Path, on_bytes: Callable[[int], None]
    ) -> FileDigest:
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
                on_bytes(written)
            await asyncio.to_thread(_flush_and_sync, handle)
        finally:
            handle.close()
        partial.rename(target)
        return FileDigest(path=file.path, size_bytes=written, sha256=hasher.hexdigest())

    def admit(self, staging: Path, manifest: PackageManifest) -> Path:
        """Makes a verified package visible under its digest (atomic rename)."""
        final = self.packages / manifest.sha256
        if final.exists():
            shutil.rmtree(staging, ignore_errors=True)  # the same bytes were admitted by another fetch
        else:
            _sync_directory_tree(staging)
            staging.rename(final)
        os.utime(final)
        return final

    def quarantine(self, staging: Path, label: str) -> Path:
        destination = self.quarantine_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{label}-{uuid.uuid4().hex[:8]}"
        staging.rename(destination)
        log.warning("package quarantined", path=str(destination))
        self.expire_quarantine()
        return destination

    def expire_quarantine(self) -> list[Path]:
        """Removes quarantined packages older than `quarantine_keep_seconds` (0 keeps them all):
        kept long enough for a person to look, never filling the disk with refused downloads.
        Runs at start and at each new quarantine."""
        if self.quarantine_keep_seconds <= 0:
            return []
        oldest = time.time() - self.quarantine_keep_seconds
        expired = [entry for entry in self.quarantine_dir.iterdir() if entry.stat().st_mtime < oldest]
        for entry in expired:
            log.info("quarantined package expired", path=str(entry))
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return expired


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


def _tree_bytes(root: Path, counted: set[tuple[int, int]]) -> int:
    """Bytes of the files under `root` whose inodes are not in `counted` yet (adds them)."""
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                status = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue  # evicted or published while we counted
            inode = (status.st_dev, status.st_ino)
            if inode not in counted:
                counted.add(inode)
                total += status.st_size
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0  # evicted while we listed


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
