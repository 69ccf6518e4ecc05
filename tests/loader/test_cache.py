"""The cache's budget, eviction, restart and a full disk (a real tmpfs mounted as the cache)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import ModelSpec, ModelState, Task
from modelplane.loader.cache import PackageCache
from modelplane.loader.errors import CacheFull
from modelplane.loader.sources import open_source
from tests.loader.conftest import LoaderCore, loader_settings
from tests.loader.servers import FileServer, write_random_file

MiB = 1024 * 1024


async def _fetch(cache: PackageCache, root: Path, size: int) -> str:
    write_random_file(root / "weights.bin", size)
    source = open_source(str(root), loader_settings(root.parent))
    staging, manifest = await cache.fetch(source, await source.list_files(), lambda *_: None)
    cache.admit(staging, manifest)
    return manifest.sha256


async def test_least_recently_used_packages_that_no_model_needs_are_evicted(tmp_path: Path) -> None:
    cache = PackageCache(tmp_path / "cache", budget_bytes=3 * MiB)
    old = await _fetch(cache, tmp_path / "old", MiB)
    needed = await _fetch(cache, tmp_path / "needed", MiB)
    recent = await _fetch(cache, tmp_path / "recent", MiB)
    os.utime(cache.packages / needed, (1, 1))  # the oldest of all, but a loaded model needs it
    os.utime(cache.packages / old, (2, 2))
    assert await cache.make_room(MiB, keep={needed}) == [old]
    assert cache.package_path(old) is None and cache.package_path(needed) and cache.package_path(recent)
    with pytest.raises(CacheFull) as full:
        await cache.make_room(3 * MiB, keep={needed, recent})
    assert full.value.reason == "CACHE_FULL" and "MODELPLANE_LOADER_CACHE_BUDGET_BYTES" in full.value.message
    assert cache.package_path(needed) and cache.package_path(recent)  # a refusal evicts nothing it must keep


async def test_the_cache_reindexes_itself_after_a_restart_and_discards_partials(tmp_path: Path) -> None:
    cache = PackageCache(tmp_path / "cache")
    digest = await _fetch(cache, tmp_path / "pkg", MiB)
    (cache.partial / "crashed-fetch").mkdir()
    (cache.partial / "crashed-fetch" / "weights.bin.partial").write_bytes(b"half")
    restarted = PackageCache(tmp_path / "cache", budget_bytes=10 * MiB)
    assert [(e.digest, e.size_bytes) for e in restarted.index()] == [(digest, MiB)]
    assert not any(restarted.partial.iterdir())


async def test_a_package_larger_than_the_disk_is_refused_before_any_byte(
    tmpfs: Path, tmp_path: Path, make_core: Callable[..., LoaderCore]
) -> None:
    core = make_core(loader_settings(tmp_path, cache_dir=tmpfs / "cache"))
    write_random_file(tmp_path / "big" / "weights.bin", 12 * MiB)
    await core.register(ModelSpec(name="big", task=Task.EMBEDDING, source_uri=str(tmp_path / "big")))
    with pytest.raises(ModelplaneError) as refused:
        async for _ in core.handler.load("big", reason="test"):
            pass
    assert refused.value.reason == "CACHE_FULL" and "The package needs 12.0 MiB" in refused.value.message
    assert (await core.registry.get_model("big")).state == ModelState.FAILED
    assert not any(core.cache.partial.iterdir()) and not any(core.cache.packages.iterdir())


async def test_a_disk_that_fills_up_during_a_fetch(
    tmpfs: Path, tmp_path: Path, file_server: FileServer, make_core: Callable[..., LoaderCore]
) -> None:
    core = make_core(loader_settings(tmp_path, cache_dir=tmpfs / "cache"))
    write_random_file(file_server.state.root / "big.gguf", 12 * MiB)
    file_server.state.chunked = True  # the server sends no size, so the loader learns only by writing
    await core.register(ModelSpec(name="big", task=Task.EMBEDDING, source_uri=f"{file_server.url}/big.gguf"))
    with pytest.raises(ModelplaneError) as refused:
        async for _ in core.handler.load("big", reason="test"):
            pass
    assert refused.value.reason == "CACHE_FULL"
    assert "filled up while the package was fetched" in refused.value.message
    assert (await core.registry.get_model("big")).state == ModelState.FAILED
    assert not any(core.cache.partial.iterdir()) and not any(core.cache.packages.iterdir())
    assert os.statvfs(tmpfs).f_bfree * os.statvfs(tmpfs).f_frsize > 7 * MiB  # the partial bytes were freed


def test_quarantined_packages_expire_after_their_keep_time(tmp_path: Path) -> None:
    cache = PackageCache(tmp_path / "cache", quarantine_keep_seconds=3600)
    old = cache.quarantine_dir / "20260101T000000-old-abcdef12"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"refused bytes")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    staging = cache.partial / "fresh"
    staging.mkdir()
    fresh = cache.quarantine(staging, "fresh")
    assert not old.exists() and fresh.exists()  # the old one expired, the new one is kept
    assert PackageCache(tmp_path / "cache", quarantine_keep_seconds=0).expire_quarantine() == []


async def test_bytes_hard_linked_into_artifacts_count_once_in_the_budget(tmp_path: Path) -> None:
    """Converters hard-link package files (tokenizers, ONNX files) into their artifacts: one copy
    on the disk, so one charge in the budget, and no eviction a full count would call for."""
    cache = PackageCache(tmp_path / "cache", budget_bytes=3 * MiB)
    digest = await _fetch(cache, tmp_path / "pkg", 2 * MiB)
    artifact = cache.artifact_path(digest, "converter-v1")
    artifact.mkdir(parents=True)
    os.link(cache.packages / digest / "weights.bin", artifact / "weights.bin")
    (artifact / "report.json").write_bytes(b"x" * 100)
    assert [(e.digest, e.size_bytes) for e in cache.index()] == [(digest, 2 * MiB + 100)]
    assert await cache.make_room(MiB // 2, keep=set()) == []
    assert cache.package_path(digest) is not None
