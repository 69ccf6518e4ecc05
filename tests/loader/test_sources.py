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


async def test_symlinked_directory_out_of_the_package_is_refused_without_naming_its_target(tmp_path: Path) -> None:
    package = tmp_path / "package"
    (package / "1_Pooling").mkdir(parents=True)
    (package / "config.json").write_text("{}")
    elsewhere = tmp_path / "private" / "weights"
    elsewhere.mkdir(parents=True)
    (elsewhere / "model.safetensors").write_bytes(b"\x00" * 8)
    (package / "weights").symlink_to(elsewhere)
    with pytest.raises(PackageRefused) as refused:
        await open_source(str(package), LoaderSettings()).list_files()
    assert refused.value.message.startswith("weights is a symbolic link to a directory outside the package")
    assert "Copy the directory into the package" in refused.value.message
    assert str(tmp_path) not in refused.value.message


async def test_symlinked_directory_inside_the_package_is_read_as_its_target(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "vocab.txt").write_text("abc")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "config.json").write_text("{}")
    source = open_source(str(tmp_path), LoaderSettings())
    files = await source.list_files()
    assert files == [SourceFile("config.json", 2), SourceFile("alias/vocab.txt", 3), SourceFile("real/vocab.txt", 3)]
    assert b"".join([chunk async for chunk in source.read(files[1])]) == b"abc"


async def test_directory_link_that_loops_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"x")
    (tmp_path / "a" / "again").symlink_to(tmp_path)
    with pytest.raises(PackageRefused, match=r"a/again is a symbolic link to a directory that contains it"):
        await open_source(str(tmp_path), LoaderSettings()).list_files()


async def test_link_turned_outward_after_listing_is_refused_at_reading(tmp_path: Path) -> None:
    package = tmp_path / "package"
    package.mkdir()
    (package / "real.bin").write_bytes(b"inside")
    (package / "model.bin").symlink_to(package / "real.bin")
    (tmp_path / "secret").write_text("do not ship")
    source = open_source(str(package), LoaderSettings())
    files = await source.list_files()
    (package / "model.bin").unlink()
    (package / "model.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(PackageRefused, match=r"model\.bin is a symbolic link to a file outside the package"):
        [chunk async for chunk in source.read(next(f for f in files if f.path == "model.bin"))]
