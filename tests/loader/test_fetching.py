"""Bringing packages into the cache in one pass: each byte read from the source once, hashed once,
written at most once; local files linked and hashed in place; memory that does not grow with the
package; a linked file rewritten at its source never served as verified."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
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

        read_into = fetching._read_into

        def read_local(handle: object, buffer: memoryview) -> int:
            got = read_into(handle, buffer)
            counted.read += got
            return got

        monkeypatch.setattr(fetching, "hashlib", SimpleNamespace(sha256=Hasher))
        monkeypatch.setattr(fetching, "_write_all", write)
        monkeypatch.setattr(LocalSource, "read", read)
        monkeypatch.setattr(fetching, "_read_into", read_local)  # a copy reads the file itself, not via read()


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
    monkeypatch.setattr(fetching, "COPY_CHUNK_BYTES", 256 * 1024)  # a copy's buffers are reused many times
    monkeypatch.setattr(fetching, "COPY_STEP_BYTES", MiB)

    cached, got = await _fetch(PackageCache.from_settings(settings), open_source(uri, settings))

    assert got == digests
    assert {path: hashlib.sha256((cached / path).read_bytes()).hexdigest() for path in SIZES} == digests
    assert counted.hashed == TOTAL
    assert counted.written == (0 if way == "linked" else TOTAL)
    read = {
        "linked": counted.read,  # a linked file is never read through the source
        "copied": counted.read,  # read once into the copy's buffers; the hash and the write share each buffer
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


async def test_a_copied_file_cut_short_after_listing_is_refused_and_kept_out_of_the_cache(
    tmp_path: Path, make_core: Callable[..., LoaderCore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed at its full size, truncated before it is copied: the copy ends early, and the
    package is quarantined with what to do, never admitted."""
    core = make_core(loader_settings(tmp_path, link_local_sources=False))
    digests = _package(tmp_path / "pkg")
    (tmp_path / "pkg" / "SHA256SUMS").write_text("".join(f"{d}  {p}\n" for p, d in digests.items()))
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    copy_and_hash = fetching._copy_and_hash

    async def cut_then_copy(local: Path, *rest: object) -> object:
        if local.name == "model.safetensors":
            os.truncate(local, MiB)
        return await copy_and_hash(local, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(fetching, "_copy_and_hash", cut_then_copy)
    with pytest.raises(ModelplaneError) as refused:
        async for _ in core.handler.load("m", reason="test"):
            pass
    assert refused.value.reason == "CHECKSUM_MISMATCH"
    assert f"The file is truncated: {MiB} of {SIZES['model.safetensors']} bytes." in refused.value.message
    assert "moved to the cache's quarantine folder" in refused.value.message
    assert not any(core.cache.packages.iterdir()) and not any(core.cache.partial.iterdir())


async def test_a_disk_that_fills_up_during_a_copy_keeps_nothing(tmpfs: Path, tmp_path: Path) -> None:
    """A local file that grew after it was listed (so the room made for it was too little) fills
    the cache's disk half-way through the copy: nothing of it stays, and the error says what to do."""
    settings = loader_settings(tmp_path, cache_dir=tmpfs / "cache")  # another filesystem: copied
    cache = PackageCache.from_settings(settings)
    write_random_file(tmp_path / "pkg" / "model.gguf", MiB)
    source = open_source(str(tmp_path / "pkg" / "model.gguf"), settings)
    files = await source.list_files()
    write_random_file(tmp_path / "pkg" / "model.gguf", 12 * MiB)
    with pytest.raises(ModelplaneError) as refused:
        await cache.fetch(source, files, lambda *_: None)
    assert refused.value.reason == "CACHE_FULL"
    assert "filled up while the package was fetched" in refused.value.message
    assert not any(cache.partial.iterdir()) and not any(cache.packages.iterdir())
    assert os.statvfs(tmpfs).f_bfree * os.statvfs(tmpfs).f_frsize > 7 * MiB  # the partial bytes were freed


@pytest.mark.parametrize("way", ["copied", "http in parts"])
async def test_a_fetch_cancelled_half_way_leaves_no_thread_file_or_partial_behind(
    way: str, tmp_path: Path, file_server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = loader_settings(tmp_path, link_local_sources=False)
    digests = _package(file_server.state.root / "pkg")
    (file_server.state.root / "pkg" / "SHA256SUMS").write_text("".join(f"{d}  {p}\n" for p, d in digests.items()))
    monkeypatch.setattr(fetching, "COPY_CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(fetching, "COPY_STEP_BYTES", 256 * 1024)
    cache = PackageCache.from_settings(settings)
    source = open_source(
        str(file_server.state.root / "pkg") if way == "copied" else f"{file_server.url}/pkg/", settings
    )
    files = await source.list_files()
    progressed = []

    def cancel_at_first_progress(done: int, *_: object) -> None:
        if done and not progressed:
            progressed.append(done)
            inner.cancel()

    inner = asyncio.ensure_future(cache.fetch(source, files, cancel_at_first_progress))
    with pytest.raises(asyncio.CancelledError):
        await inner
    await source.close()
    assert 0 < progressed[0] < TOTAL  # cancelled half-way
    assert [t.name for t in threading.enumerate() if t.name.startswith("fetch-")] == []
    assert not any(cache.partial.iterdir()) and not any(cache.packages.iterdir())
    open_files = {Path(os.readlink(f"/proc/self/fd/{fd}")) for fd in os.listdir("/proc/self/fd") if _is_link(fd)}
    assert not {p for p in open_files if p.is_relative_to(tmp_path)}


def _is_link(fd: str) -> bool:
    return os.path.islink(f"/proc/self/fd/{fd}")


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
