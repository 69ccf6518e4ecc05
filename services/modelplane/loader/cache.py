"""The local (hot) cache in front of remote storage, content-addressed by digest.

    packages/<manifest sha256>/          verified packages; visible only once every file matched
    artifacts/<manifest sha256>/<key>/   what converters made of that package, keyed by converter
    partial/<id>/                        fetches in progress; never read by anything else
    quarantine/<time>-<name>/            bytes that failed verification, kept for the operator
    links/<manifest sha256>.json         files of that package hard-linked from a local source

A file is hashed in the pass that brings it (loader/fetching.py): linked from a local source and
hashed in place, or hashed while it is written to `<name>.partial`, fsynced and renamed; a package
directory is renamed into `packages/` only after verification, so nothing half-written or
unproven is ever where Triton or a converter could read it. A linked file shares its bytes with
the source's file: the cache notes what each was when hashed, and a package one of whose files
changed since (a write in place at the source) is evicted when next asked for, and fetched and
verified again.

The cache keeps to a byte budget by evicting the least recently used packages (with their
artifacts) that no loaded or loading model needs. Its state is its directory tree: after a
restart it knows every package from the tree, their last use from the directories' mtimes, and
discards what a crash left in `partial/`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from modelplane.common.types import FileDigest, PackageManifest
from modelplane.loader.errors import CacheFull
from modelplane.loader.fetching import LinkedFile, ProgressCallback, bring_files
from modelplane.loader.manifest import build_manifest
from modelplane.loader.sources import PackageSource, SourceFile

if TYPE_CHECKING:
    from modelplane.loader.settings import LoaderSettings

log = structlog.get_logger()

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class CachedPackage:
    digest: str
    size_bytes: int  # the package and every artifact made from it
    last_used: float  # seconds since the epoch


class PackageCache:
    def __init__(
        self,
        root: Path,
        budget_bytes: int = 0,
        quarantine_keep_seconds: float = 7 * 86400,
        *,
        link_local_files: bool = True,
        fetch_concurrency: int = 4,
        large_file_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.quarantine_keep_seconds = quarantine_keep_seconds
        self.link_local_files = link_local_files
        self.fetch_concurrency = fetch_concurrency
        self.large_file_bytes = large_file_bytes
        self.packages = root / "packages"
        self.artifacts = root / "artifacts"
        self.partial = root / "partial"
        self.quarantine_dir = root / "quarantine"
        self.links = root / "links"
        for directory in (self.packages, self.artifacts, self.partial, self.quarantine_dir, self.links):
            directory.mkdir(parents=True, exist_ok=True)
        self._staged_links: dict[Path, list[LinkedFile]] = {}  # fetched, not yet admitted
        self._discard_partials()
        self.expire_quarantine()

    @classmethod
    def from_settings(cls, settings: LoaderSettings) -> PackageCache:
        return cls(
            settings.cache_dir,
            settings.cache_budget_bytes,
            settings.quarantine_keep_seconds,
            link_local_files=settings.link_local_sources,
            fetch_concurrency=settings.fetch_concurrency,
            large_file_bytes=settings.download_part_bytes,
        )

    def _discard_partials(self) -> None:
        """A fetch interrupted by a crash left only bytes nobody trusts; start those afresh."""
        for leftover in self.partial.iterdir():
            log.info("discarding interrupted fetch", path=str(leftover))
            shutil.rmtree(leftover, ignore_errors=True)
        for record in self.links.iterdir():
            if not (self.packages / record.name.removesuffix(".json")).is_dir():
                record.unlink(missing_ok=True)

    # Lookup -------------------------------------------------------------------------------

    def package_path(self, manifest_sha256: str) -> Path | None:
        """The verified package, or None: not cached, or one of its files linked from the source was
        changed there since it was verified (then the package is evicted, to be fetched again)."""
        path = self.packages / manifest_sha256
        if not path.is_dir():
            return None
        changed = self._changed_link(manifest_sha256)
        if changed is not None:
            log.warning(
                "a cached file linked from its source changed since it was verified; fetching the package again",
                package=manifest_sha256,
                file=changed,
            )
            self.evict(manifest_sha256)
            return None
        return path

    def _changed_link(self, manifest_sha256: str) -> str | None:
        record = self.links / f"{manifest_sha256}.json"
        try:
            linked = [LinkedFile(**entry) for entry in json.loads(record.read_text())]
        except FileNotFoundError:
            return None  # nothing of it is linked
        for file in linked:
            try:
                if not file.unchanged(os.stat(self.packages / manifest_sha256 / file.path)):
                    return file.path
            except FileNotFoundError:
                return file.path
        return None

    def find(self, digests: dict[str, str]) -> tuple[Path, PackageManifest] | None:
        """The cached package whose files have exactly these digests, with its manifest."""
        candidate = build_manifest(FileDigest(path=p, size_bytes=0, sha256=d) for p, d in digests.items())
        path = self.package_path(candidate.sha256)
        if path is None:
            return None
        try:
            sizes = {p: (path / p).stat().st_size for p in digests}
        except FileNotFoundError:
            return None
        self.touch(candidate.sha256)
        return path, build_manifest(FileDigest(path=p, size_bytes=sizes[p], sha256=d) for p, d in digests.items())

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
                f"The package needs {_size(needed)}, but the loader's cache (MODELPLANE_LOADER_CACHE_DIR) has "
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
        (self.links / f"{manifest_sha256}.json").unlink(missing_ok=True)
        log.info("package evicted from the cache", package=manifest_sha256)

    # Fetching -----------------------------------------------------------------------------

    async def fetch(
        self, source: PackageSource, files: list[SourceFile], on_progress: ProgressCallback
    ) -> tuple[Path, PackageManifest]:
        """Brings every file into a fresh partial directory, hashing each in the same pass."""
        staging = self.partial / uuid.uuid4().hex
        staging.mkdir(parents=True)
        done_bytes = 0

        def progress(bytes_done: int, files_done: int, current: str) -> None:
            nonlocal done_bytes
            done_bytes = bytes_done
            on_progress(bytes_done, files_done, current)

        try:
            fetched = await bring_files(
                source,
                files,
                staging,
                progress,
                link_local=self.link_local_files,
                concurrency=self.fetch_concurrency,
                large_bytes=self.large_file_bytes,
            )
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            if error.errno in _DISK_FULL:
                raise CacheFull(
                    f"The disk of the loader's cache (MODELPLANE_LOADER_CACHE_DIR) filled up while the package was "
                    f"fetched ({_size(done_bytes)} "
                    "written); nothing of it was kept. Free space on that disk, point MODELPLANE_LOADER_CACHE_DIR "
                    "at a larger one, or set MODELPLANE_LOADER_CACHE_BUDGET_BYTES below the disk's size so the "
                    "cache evicts in time."
                ) from None
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if fetched.linked:
            self._staged_links[staging] = fetched.linked
        return staging, build_manifest(fetched.digests)

    def admit(self, staging: Path, manifest: PackageManifest) -> Path:
        """Makes a verified package visible under its digest (atomic rename)."""
        final = self.packages / manifest.sha256
        linked = self._staged_links.pop(staging, [])
        if final.exists():
            shutil.rmtree(staging, ignore_errors=True)  # the same bytes were admitted by another fetch
        else:
            record = self.links / f"{manifest.sha256}.json"
            if linked:  # written first: a package is never visible without the record of its links
                _write_durably(record, [dataclasses.asdict(f) for f in linked])
            else:
                record.unlink(missing_ok=True)  # left by a crash between the two steps
            _sync_directory_tree(staging)
            staging.rename(final)
        os.utime(final)
        return final

    def quarantine(self, staging: Path, label: str) -> Path:
        self._staged_links.pop(staging, None)
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


def _write_durably(path: Path, value: object) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    partial.rename(path)


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
