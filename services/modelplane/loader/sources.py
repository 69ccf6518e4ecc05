"""Where packages are kept. A source lists a package's files and streams their bytes in order;
the cache writes and hashes them. Local disks and NFS mounts are plain paths or file:// URIs."""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from modelplane.common.redact import redact_uri
from modelplane.loader.errors import PackageRefused, SourceUnavailable, UnsupportedSource
from modelplane.loader.manifest import safe_relative_path

CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the package root, forward slashes
    size: int


class PackageSource(abc.ABC):
    def __init__(self, uri: str) -> None:
        self.uri = uri

    @property
    def display_uri(self) -> str:
        """The URI as it may appear in logs, events and errors."""
        return redact_uri(self.uri)

    @abc.abstractmethod
    async def list_files(self) -> list[SourceFile]:
        """Every file of the package; refuses paths that escape it."""

    @abc.abstractmethod
    def read(self, file: SourceFile) -> AsyncIterator[bytes]:
        """The file's bytes, in order."""


class LocalSource(PackageSource):
    """A directory or a single file on a local disk or an NFS mount."""

    def __init__(self, uri: str, path: Path) -> None:
        super().__init__(uri)
        self.path = path

    async def list_files(self) -> list[SourceFile]:
        return await asyncio.to_thread(self._list_files)

    def _list_files(self) -> list[SourceFile]:
        if not self.path.exists():
            raise SourceUnavailable(
                f"Source path {self.path} does not exist. Check the model's source URI and that the disk or NFS "
                "share is mounted on the loader's machine."
            )
        if self.path.is_file():
            return [SourceFile(self.path.name, self.path.stat().st_size)]
        root = self.path.resolve()
        files: list[SourceFile] = []
        for directory, subdirectories, names in os.walk(root, followlinks=False):
            subdirectories.sort()
            for name in sorted(names):
                full = Path(directory) / name
                relative = safe_relative_path(full.relative_to(root).as_posix())
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

    async def read(self, file: SourceFile) -> AsyncIterator[bytes]:
        full = self.path if self.path.is_file() else self.path / file.path
        handle = await asyncio.to_thread(open, full, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield chunk
        finally:
            handle.close()


def open_source(uri: str) -> PackageSource:
    """The source for a model's source URI."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        path = Path(unquote(parts.path) if parts.scheme == "file" else uri).expanduser()
        return LocalSource(uri, path)
    raise UnsupportedSource(
        f"Source {redact_uri(uri)} has scheme '{parts.scheme}', which this loader cannot read; "
        "use a local path, file://, s3:// or http(s)://."
    )
