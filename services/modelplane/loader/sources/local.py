"""Local disks and NFS mounts: a plain path or a file:// URI."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from modelplane.loader.errors import PackageRefused, SourceUnavailable
from modelplane.loader.manifest import SIDECAR_FILES, safe_relative_path
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
        return await asyncio.to_thread(self._list_files)

    def _list_files(self) -> list[SourceFile]:
        if not self.path.exists():
            raise SourceUnavailable(
                f"Source path {self.path} does not exist. Check the model's source URI and that the disk or NFS "
                "share is mounted on the loader's machine."
            )
        if self.path.is_file():
            self.single_file = True
            return [SourceFile(self.path.name, self.path.stat().st_size)]
        root = self.path.resolve()
        files: list[SourceFile] = []
        for directory, subdirectories, names in os.walk(root, followlinks=False):
            subdirectories.sort()
            for name in sorted(names):
                full = Path(directory) / name
                relative = safe_relative_path(full.relative_to(root).as_posix())
                if relative in SIDECAR_FILES:
                    continue
                target = full.resolve()
                if not target.is_relative_to(root):
                    raise PackageRefused(
                        f"{relative} is a symbolic link to {target}, outside the package; a package must be "
                        "self-contained. Copy the file into the package instead."
                    )
                if target.is_file():
                    files.append(SourceFile(relative, target.stat().st_size))
        if not files:
            raise PackageRefused(f"Source directory {self.path} is empty; it holds no model files.")
        return files

    def local_path(self, file: SourceFile) -> Path:
        return self.path if self.path.is_file() else self.path / file.path

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
