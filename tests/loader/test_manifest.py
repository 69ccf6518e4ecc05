"""Manifests: digests an operator can reproduce with sha256sum, and paths that cannot escape."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from modelplane.common.types import FileDigest
from modelplane.loader.errors import PackageRefused
from modelplane.loader.manifest import build_manifest, package_digest, parse_sha256sums, safe_relative_path


def _digest_files(root: Path) -> list[FileDigest]:
    return [
        FileDigest(
            path=p.relative_to(root).as_posix(),
            size_bytes=p.stat().st_size,
            sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in root.rglob("*")
        if p.is_file()
    ]


def test_directory_digest_equals_the_documented_sha256sum_pipeline(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (tmp_path / "Zeta.bin").write_bytes(b"\x00" * 10)
    shell = "find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum"
    expected = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert package_digest(build_manifest(_digest_files(tmp_path))) == expected.stdout.split()[0]


def test_single_file_package_digest_is_the_file_digest(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\x01" * 100)
    manifest = build_manifest(_digest_files(tmp_path))
    assert package_digest(manifest) == hashlib.sha256(b"GGUF" + b"\x01" * 100).hexdigest()


@pytest.mark.parametrize("path", ["../outside", "a/../../b", "/etc/passwd", "a\\b", ""])
def test_paths_that_escape_the_package_are_refused(path: str) -> None:
    with pytest.raises(PackageRefused):
        safe_relative_path(path)


def test_sha256sums_in_text_and_binary_mode() -> None:
    digest = "a" * 64
    parsed = parse_sha256sums(f"{digest}  model.safetensors\n{digest.upper()} *./sub/vocab.txt\n\n")
    assert parsed == {"model.safetensors": digest, "sub/vocab.txt": digest}
    with pytest.raises(PackageRefused, match="line 1"):
        parse_sha256sums("not a checksum line\n")
    with pytest.raises(PackageRefused, match="escapes"):
        parse_sha256sums(f"{digest}  ../../etc/passwd\n")
