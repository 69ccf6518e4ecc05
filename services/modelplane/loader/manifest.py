"""Package manifests: the files of a package with their sizes and SHA-256 digests.

A manifest's digest is the SHA-256 of its canonical text, which is exactly what `sha256sum`
prints for the files sorted by path (`SHA256SUMS` and `SHA256SUMS.sig` left out), so an operator
can compute the expected digest of a directory with `modelplane digest` (the loader's own listing,
`LocalSource.manifest_now`) or with standard tools:

    cd package && find -L . -type f ! -path ./SHA256SUMS ! -path ./SHA256SUMS.sig -printf '%P\\n' \\
      | LC_ALL=C sort | xargs -r -d '\\n' sha256sum | sha256sum
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import PurePosixPath

from modelplane.common.types import FileDigest, PackageManifest
from modelplane.loader.errors import PackageRefused

SUMS_FILE = "SHA256SUMS"
SIGNATURE_FILE = "SHA256SUMS.sig"
# Kept beside a package to describe it; never part of it, nor of its digest.
SIDECAR_FILES = frozenset({SUMS_FILE, SIGNATURE_FILE})


def safe_relative_path(path: str) -> str:
    """Returns the path normalised, or refuses one that could land outside the package."""
    if not path or "\x00" in path or "\\" in path:
        raise PackageRefused(f"Package path {path!r} is not a valid relative path.")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise PackageRefused(
            f"Package path {path!r} escapes the package directory; a manifest may list only relative paths "
            "without '..'. Fix the manifest or the package."
        )
    return str(pure)


def canonical_text(files: Iterable[FileDigest]) -> str:
    return "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path.encode()))


def build_manifest(files: Iterable[FileDigest]) -> PackageManifest:
    ordered = sorted(files, key=lambda f: f.path.encode())
    return PackageManifest(files=ordered, sha256=hashlib.sha256(canonical_text(ordered).encode()).hexdigest())


def package_digest(manifest: PackageManifest) -> str:
    """The digest an operator compares against: the file's own for a one-file package (so a
    published checksum of a .gguf or .onnx file works as it is), the manifest's for a directory."""
    if len(manifest.files) == 1 and "/" not in manifest.files[0].path:
        return manifest.files[0].sha256
    return manifest.sha256


def parse_sha256sums(text: str) -> dict[str, str]:
    """Reads `sha256sum` output: '<digest>  <path>' or '<digest> *<path>' (binary mode)."""
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if len(digest) != 64 or not name:
            raise PackageRefused(f"SHA256SUMS line {number} is not '<sha256>  <path>': {line[:80]!r}")
        path = safe_relative_path(name.removeprefix("./"))
        if path not in SIDECAR_FILES:  # `sha256sum * > SHA256SUMS` lists the file it writes
            digests[path] = digest.lower()
    return digests
