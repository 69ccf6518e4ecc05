"""Bringing packages into the cache in one pass: each byte read from the source once, hashed once,
written at most once; local files linked and hashed in place; memory that does not grow with the
package; a linked file rewritten at its source never served as verified."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import ModelSpec, ModelState, Task
from modelplane.loader import fetching
from modelplane.loader.cache import PackageCache
from modelplane.loader.sources import PackageSource, SourceFile, open_source
from modelplane.loader.sources.local import LocalSource
from tests.loader.conftest import LoaderCore, loader_settings
from tests.loader.servers import FileServer, S3Server, write_random_file

MiB = 1024 * 1024
# A file of several ranged parts (the tests' part size is 1 MiB) and two small ones.
SIZES = {"model.safetensors": 3 * MiB + 7, "config.json": 100, "1_Pooling/config.json": 50}
TOTAL = sum(SIZES.values())


def _package(root: Path) -> dict[str, str]:
    return {path: write_random_file(root / path, size) for path, size in SIZES.items()}


class _Counted:
    """Bytes hashed, written and read from sources by the cache's fetch (the real work, counted)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashed = 0
        self.written = 0
        self.read = 0
        counted = self

        class Hasher:
            def __init__(self) -> None:
                self._inner = hashlib.sha256()

            def update(self, data: bytes) -> None:
                counted.hashed += memoryview(data).nbytes
                self._inner.update(data)

            def hexdigest(self) -> str:
                return self._inner.hexdigest()

        write_all = fetching._write_all

        def write(handle: object, data: bytes) -> None:
            counted.written += len(data)
            write_all(handle, data)

        local_read = LocalSource.read

        async def read(source: LocalSource, file: SourceFile) -> AsyncIterator[bytes]:
            async for chunk in local_read(source, file):
                counted.read += len(chunk)
                yield chunk

        monkeypatch.setattr(fetching, "hashlib", SimpleNamespace(sha256=Hasher))
        monkeypatch.setattr(fetching, "_write_all", write)
        monkeypatch.setattr(LocalSource, "read", read)


async def _fetch(cache: PackageCache, source: PackageSource) -> tuple[Path, dict[str, str]]:
    staging, manifest = await cache.fetch(source, await source.list_files(), lambda *_: None)
    await source.close()
    return cache.admit(staging, manifest), {f.path: f.sha256 for f in manifest.files}


@pytest.mark.parametrize("way", ["linked", "copied", "http", "http in parts", "s3 in parts"])
async def test_each_byte_is_read_once_hashed_once_and_written_at_most_once(
    way: str, tmp_path: Path, file_server: FileServer, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = loader_settings(tmp_path, s3_server, link_local_sources=way == "linked")
    digests = _package(file_server.state.root / "pkg")
    (file_server.state.root / "pkg" / "SHA256SUMS").write_text("".join(f"{d}  {p}\n" for p, d in digests.items()))
    file_server.state.announce_ranges = way == "http in parts"
    if way.startswith("s3"):
        s3_server.upload_tree("fetching", "pkg", file_server.state.root / "pkg")
    s3_server.bytes_sent.clear()
    uri = {
        "linked": str(file_server.state.root / "pkg"),
        "copied": str(file_server.state.root / "pkg"),
        "http": f"{file_server.url}/pkg/",
        "http in parts": f"{file_server.url}/pkg/",
        "s3 in parts": "s3://fetching/pkg",
    }[way]
    counted = _Counted(monkeypatch)

    cached, got = await _fetch(PackageCache.from_settings(settings), open_source(uri, settings))

    assert got == digests
    assert counted.hashed == TOTAL
    assert counted.written == (0 if way == "linked" else TOTAL)
    read = {
        "linked": counted.read,  # a linked file is never read through the source
        "copied": counted.read,
        "http": sum(n for p, n in file_server.state.bytes_sent.items() if p != "pkg/SHA256SUMS"),
        "http in parts": sum(n for p, n in file_server.state.bytes_sent.items() if p != "pkg/SHA256SUMS"),
        "s3 in parts": sum(n for p, n in s3_server.bytes_sent.items() if p.removeprefix("/fetching/pkg/") in SIZES),
    }[way]
    assert read == (0 if way == "linked" else TOTAL)
    shares_inode = _inode(cached / "model.safetensors") == _inode(file_server.state.root / "pkg/model.safetensors")
    assert shares_inode == (way == "linked")


def _inode(path: Path) -> int:
    return path.stat().st_ino


async def test_a_local_file_on_another_filesystem_is_copied(tmpfs: Path, tmp_path: Path) -> None:
    """The cache's disk is not the source's: no link is possible, so the file is streamed."""
    digest = write_random_file(tmpfs / "model.gguf", 2 * MiB)
    settings = loader_settings(tmp_path)
    cached, got = await _fetch(PackageCache.from_settings(settings), open_source(str(tmpfs / "model.gguf"), settings))
    assert got == {"model.gguf": digest}
    assert hashlib.sha256((cached / "model.gguf").read_bytes()).hexdigest() == digest
    assert (cached / "model.gguf").stat().st_dev != (tmpfs / "model.gguf").stat().st_dev


async def test_a_linked_file_rewritten_in_place_at_its_source_is_fetched_again_and_refused(
    tmp_path: Path, make_core: Callable[..., LoaderCore]
) -> None:
    """`cp new.gguf model.gguf` writes into the file the cache linked. The next load must not take
    the cached package as verified: it fetches again, and the bytes no longer match the digests
    recorded at the first fetch."""
    core = make_core(loader_settings(tmp_path))
    source = tmp_path / "pkg"
    _package(source)
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(source)))
    first = await core.prepare("m")
    assert first.status.manifest is not None
    digest = first.status.manifest.sha256
    assert _inode(core.cache.packages / digest / "config.json") == _inode(source / "config.json")
    await core.registry.transition(first, ModelState.STAGED, "staged (this test stops before conversion)")
    with (source / "config.json").open("r+b") as handle:  # what cp does to an existing file
        handle.write(os.urandom(SIZES["config.json"]))
    with pytest.raises(ModelplaneError) as refused:
        async for _ in core.handler.load("m", reason="test"):  # not a refresh: the cache is asked first
            pass
    assert refused.value.reason == "CHECKSUM_MISMATCH"
    assert "File config.json: expected SHA-256" in refused.value.message
    assert core.cache.package_path(digest) is None  # no longer offered as verified
    assert (await core.registry.get_model("m")).state == ModelState.FAILED


async def test_a_linked_package_left_alone_is_reused_without_reading_it(
    tmp_path: Path, make_core: Callable[..., LoaderCore], monkeypatch: pytest.MonkeyPatch
) -> None:
    core = make_core(loader_settings(tmp_path))
    _package(tmp_path / "pkg")
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    first = await core.prepare("m")
    counted = _Counted(monkeypatch)
    again = await core.prepare("m")
    assert again.status.manifest == first.status.manifest
    assert (counted.hashed, counted.read) == (0, 0)


@pytest.mark.slow  # writes and fetches 160 MiB twice, in a fresh process
def test_a_package_is_verified_in_memory_that_does_not_grow_with_its_size(tmp_path: Path) -> None:
    """Peak resident memory of a fresh process fetching a 160 MiB package, over its memory before
    the fetch: bounded by the hash window and the chunks in flight, not by the file (linked, and
    copied). `make bench` prints the same for 1 GiB."""
    write_random_file(tmp_path / "pkg" / "model.safetensors", 160 * MiB)
    script = """
import asyncio, json, sys
from pathlib import Path
from modelplane.loader.cache import PackageCache
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.sources import open_source

async def main(link):
    settings = LoaderSettings(cache_dir=Path(sys.argv[2]) / ("linked" if link else "copied"), link_local_sources=link)
    cache = PackageCache.from_settings(settings)
    source = open_source(sys.argv[1], settings)
    files = await source.list_files()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the memory now
    before = peak_kib()
    staging, manifest = await cache.fetch(source, files, lambda *_: None)
    return peak_kib() - before

def peak_kib():
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])

print(json.dumps({"linked": asyncio.run(main(True)), "copied": asyncio.run(main(False))}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pkg"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        check=True,
    )
    growth_kib = json.loads(result.stdout.splitlines()[-1])
    assert growth_kib["linked"] < 48 * 1024, growth_kib
    assert growth_kib["copied"] < 48 * 1024, growth_kib
