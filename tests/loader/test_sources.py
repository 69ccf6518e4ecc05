"""Local sources: what a package directory holds, and what it must not."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelplane.loader.errors import PackageRefused, SourceUnavailable, UnsupportedSource
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.sources import SourceFile, open_source
from modelplane.loader.sources.local import LocalSource


async def test_lists_every_file_with_forward_slashes(tmp_path: Path) -> None:
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "1_Pooling" / "config.json").write_text("{}")
    files = await open_source(f"file://{tmp_path}", LoaderSettings()).list_files()
    assert files == [SourceFile("config.json", 2), SourceFile("1_Pooling/config.json", 2)]


async def test_reads_bytes_in_order(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40_000
    (tmp_path / "weights.bin").write_bytes(payload)
    source = open_source(str(tmp_path), LoaderSettings())
    [file] = await source.list_files()
    assert b"".join([chunk async for chunk in source.read(file)]) == payload


async def test_symlink_out_of_the_package_is_refused(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (tmp_path / "secret").write_text("do not ship")
    (package / "config.json").symlink_to(tmp_path / "secret")
    with pytest.raises(PackageRefused, match="outside the package"):
        await LocalSource(str(package), package).list_files()


async def test_missing_path_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match=r"does not exist.*mounted"):
        await open_source(str(tmp_path / "nope"), LoaderSettings()).list_files()


def test_unknown_scheme_is_refused_without_leaking_credentials() -> None:
    with pytest.raises(UnsupportedSource) as refused:
        open_source("ftp://admin:hunter2@models.internal/minilm", LoaderSettings())
    assert "hunter2" not in refused.value.message and "ftp" in refused.value.message
