"""Where packages are kept. A source lists a package's files and streams each file's bytes in
order (and, on a local disk, says where the file is); the cache hashes and keeps them. Local
disks and NFS mounts (plain paths, file://), S3 and MinIO (s3://bucket/prefix) and HTTP(S)
servers are supported.

A package is a directory tree, or a single file. `SHA256SUMS` and `SHA256SUMS.sig` in the
package's directory (beside a single-file package) are its manifest and the manifest's
signature, never part of the package itself.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from modelplane.common.redact import CREDENTIALS_BELONG, credentials_in_uri, redact_uri
from modelplane.loader.errors import UnsupportedSource

if TYPE_CHECKING:
    from modelplane.loader.settings import LoaderSettings

CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the package root, forward slashes
    size: int  # bytes; -1 when the source cannot tell before sending it
    version: str = ""  # ETag or Last-Modified: a resumed or ranged read must get the same bytes


class PackageSource(abc.ABC):
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.single_file = False  # known after list_files: the package is one file, not a directory

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

    def local_path(self, file: SourceFile) -> Path | None:
        """The file's path when the loader's machine can open it directly (a local disk or an NFS
        mount): the cache may then link it instead of copying it. None for remote sources."""
        return None

    @abc.abstractmethod
    async def read_sidecar(self, name: str) -> bytes | None:
        """A small file kept beside the package (its SHA256SUMS), or None when there is none."""

    async def close(self) -> None:  # noqa: B027 - sources without connections have nothing to close
        """Releases connections."""


def open_source(uri: str, settings: LoaderSettings, known_paths: Sequence[str] = ()) -> PackageSource:
    """The source for a model's source URI. `known_paths` (from an operator-given manifest) lists
    the files of a package on a server that cannot list directories (HTTP)."""
    from modelplane.loader.sources.http import HttpSource  # noqa: PLC0415 - each source imports its client lazily
    from modelplane.loader.sources.local import LocalSource  # noqa: PLC0415
    from modelplane.loader.sources.s3 import S3Source  # noqa: PLC0415

    parts = urlsplit(uri)
    secret = credentials_in_uri(uri)
    if secret:
        # The registry refuses these; one registered before it did is refused here, never used.
        raise UnsupportedSource(
            f"Source {redact_uri(uri)} carries credentials in its URI ({secret}), where logs and the registry "
            f"would keep them. {CREDENTIALS_BELONG}"
        )
    if parts.scheme in ("", "file"):
        return LocalSource.from_uri(uri)
    if parts.scheme == "s3":
        return S3Source(uri, settings)
    if parts.scheme in ("http", "https"):
        return HttpSource(uri, settings, known_paths)
    raise UnsupportedSource(
        f"Source {redact_uri(uri)} has scheme '{parts.scheme}', which this loader cannot read; "
        "use a local path, file://, s3:// or http(s)://."
    )
