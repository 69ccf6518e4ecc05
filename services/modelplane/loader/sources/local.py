"""Local disks and NFS mounts: a plain path or a file:// URI.

A package directory may hold symbolic links to files and directories inside itself (they are read
as what they point at); a link out of the package, or a directory link that leads back into its
own path (a loop), refuses the whole package before anything is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from modelplane.common.types import FileDigest, PackageManifest
from modelplane.loader.errors import PackageRefused, SourceUnavailable
from modelplane.loader.manifest import SIDECAR_FILES, build_manifest, safe_relative_path
from modelplane.loader.sources import CHUNK_BYTES, PackageSource, SourceFile


class LocalSource(PackageSource):
    """A directory or a single file on a local disk or an NFS mount."""

    def __init__(self, uri: str, path: Path) -> None:
        super().__init__(uri)
        self.path = path

    @classmethod
    def from_uri(cls, uri: str) -> LocalSource:
        parts = urlsplit(uri)
        path = Path(unquote(parts.path) if parts.scheme == "file" else uri).expanduser()
        return cls(uri, path)

    async def list_files(self) -> list[SourceFile]:
        return await asyncio.to_thread(self.list_files_now)

    def list_files_now(self) -> list[SourceFile]:
        """`list_files`, in the calling thread."""
        if not self.path.exists():
            raise SourceUnavailable(
                f"Source path {self.path} does not exist. Check the model's source URI and that the disk or NFS "
                "share is mounted on the loader's machine."
            )
        if self.path.is_file():
            self.single_file = True
            return [SourceFile(self.path.name, self.path.stat().st_size)]
        if not self.path.is_dir():
            raise PackageRefused(f"Source path {self.path} is neither a file nor a directory; it cannot be a package.")
        root = self.path.resolve()
        files = [
            SourceFile(relative, target.stat().st_size)
            for relative, target in _package_files(root, root, "", frozenset({root}))
            if relative not in SIDECAR_FILES
        ]
        if not files:
            raise PackageRefused(f"Source directory {self.path} is empty; it holds no model files.")
        return files

    def local_path(self, file: SourceFile) -> Path:
        if self.path.is_file():
            return self.path
        # Checked again at reading and linking: a link changed since the listing must not lead out either.
        root = self.path.resolve()
        target = (self.path / file.path).resolve()
        if not target.is_relative_to(root):
            raise PackageRefused(_outside(file.path))
        return target

    async def read(self, file: SourceFile) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(open, self.local_path(file), "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield chunk
        finally:
            handle.close()

    async def read_sidecar(self, name: str) -> bytes | None:
        directory = self.path.parent if self.path.is_file() else self.path
        sidecar = directory / name
        return await asyncio.to_thread(sidecar.read_bytes) if sidecar.is_file() else None

    def manifest_now(self) -> PackageManifest:
        """The package's manifest, hashed here from the files the loader would fetch: the same
        listing, so the same digest (`manifest.package_digest`) the loader computes."""
        digests = []
        for file in self.list_files_now():
            hasher = hashlib.sha256()
            size = 0
            with self.local_path(file).open("rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    hasher.update(chunk)
                    size += len(chunk)
            digests.append(FileDigest(path=file.path, size_bytes=size, sha256=hasher.hexdigest()))
        return build_manifest(digests)


def _package_files(root: Path, directory: Path, prefix: str, visiting: frozenset[Path]) -> Iterator[tuple[str, Path]]:
    """(path relative to the package, resolved file) for every file under `directory`, the
    directory's own files first, then its subdirectories, each in name order. `visiting` holds the
    resolved directories on the way here, so a directory link into one of them (a loop) is caught."""
    entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    subdirectories = []
    for entry in entries:
        relative = safe_relative_path(prefix + entry.name)
        target = Path(entry.path).resolve() if entry.is_symlink() else Path(entry.path)
        if entry.is_symlink() and not target.is_relative_to(root):
            raise PackageRefused(_outside(relative, target.is_dir()))
        if target.is_dir():
            if target in visiting:
                raise PackageRefused(
                    f"{relative} is a symbolic link to a directory that contains it, which would make the package "
                    "endless. Remove the link."
                )
            subdirectories.append((relative, target))
        elif target.is_file():
            yield relative, target
    for relative, target in subdirectories:
        yield from _package_files(root, target, relative + "/", visiting | {target})


def _outside(relative: str, directory: bool = False) -> str:
    what = "directory" if directory else "file"
    return (
        f"{relative} is a symbolic link to a {what} outside the package; a package must be self-contained. "
        f"Copy the {what} into the package instead."
    )
